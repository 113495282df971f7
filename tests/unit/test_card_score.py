"""`fl-lab reproduce CARD --score`: a card run in parts is scored as it stands, and a cell's notes
(the lab's measured explanation of an off cell) reach reproduction.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commands.cards import load_card
from commands.cli import main
from commands.report import write_report
from commands.reproduce import planned_runs, reproduce
from lab.config import dump_yaml
from lab.errors import ConfigError
from lab.runfolder import RUN_MARKER

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments/smoke.yaml"

CELLS = """\
  - {id: done, rule: fedavg, attack: none, source: T1, expect: {value: 0.25, tolerance: 0.05},
     notes: "measured: the run that isolates it"}
  - {id: half, rule: median, attack: none, source: T1, expect: {value: 0.2, tolerance: 0.05}}
  - {id: never, rule: trimmed-mean, attack: none, source: T1, expect: {value: 0.2, tolerance: 0.05}}
  - {id: near, rule: krum, attack: none, source: lab, expect: {relative_to: half, max_delta: 0.1}}
  - {id: near-done, rule: fedavg, attack: none, metric: accuracy, source: lab, expect: {min: 0.5}}
"""


def card_path(tmp_path: Path, cells: str = CELLS) -> Path:
    path = tmp_path / "card.yaml"
    path.write_text(f"name: t\nbase: {SMOKE}\nmetric: error\nsetting: {{training: {{rounds: 4, eval_every: 2}}}}\n"
                    f"cells:\n{cells}")
    return path


def leave_run(run_dir: Path, cfg: Any, rows: list[dict[str, Any]], finished: bool) -> None:
    """What a run leaves in its folder: its config, metrics.jsonl, and summary.json once it finished."""
    run_dir.mkdir(parents=True)
    (run_dir / RUN_MARKER).touch()
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 3, "acc')
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"final_accuracy": rows[-1]["accuracy"], "final_asr": 0.0}))


def runs_in_parts(tmp_path: Path) -> tuple[Path, Path]:
    path, out = card_path(tmp_path), tmp_path / "out"
    runs = {d.name.split("__")[0]: (d, cfg) for d, cfg in planned_runs(load_card(path), out)}
    row = {"asr": 0.0, "loss": 1.0, "clients": [0, 1], "weights": {"0": 0.5, "1": 0.5}}
    leave_run(*runs["fedavg"], [{"round": 0, "accuracy": 0.1, **row}, {"round": 4, "accuracy": 0.78, **row}], True)
    leave_run(*runs["median"], [{"round": 0, "accuracy": 0.1, **row}, {"round": 1, "accuracy": None},
                                {"round": 2, "accuracy": 0.7, **row}, {"round": 3, "accuracy": None}], False)
    return path, out


def never(cfg: Any, run_dir: Path) -> dict[str, Any]:
    raise AssertionError("score_only started a run")


def test_score_only_judges_finished_runs_and_says_how_far_the_others_got(tmp_path: Path) -> None:
    path, out = runs_in_parts(tmp_path)
    result = reproduce(load_card(path), out, never, score_only=True)
    cells = {c["id"]: c for c in result["cells"]}
    assert cells["done"]["verdict"] == "reproduced" and cells["done"]["ours"]["mean"] == pytest.approx(0.22)
    assert cells["near-done"]["verdict"] == "reproduced"  # the same finished run, read as accuracy
    # an unfinished run is never judged, however good its last evaluation looks
    assert cells["half"]["verdict"] == "not-run" and cells["half"]["ours"]["values"] == []
    assert cells["half"]["progress"][0]["round"] == 3 and cells["half"]["progress"][0]["evaluated_round"] == 2
    assert cells["half"]["progress"][0]["reading"] == pytest.approx(0.3)
    assert cells["never"]["verdict"] == "not-run" and cells["never"]["progress"][0]["round"] is None
    assert cells["near"]["verdict"] == "not-run"  # compared with a cell that has not run
    md = (out / "reproduction.md").read_text()
    assert "2 reproduced, 0 off, 0 lab-only, 3 not-run" in md
    assert "3 of 5 cells have every run finished" not in md and "2 of 5 cells have every run finished" in md
    assert "stopped at round 3 of 4 (error 0.300 at round 2, not judged)" in md and "| not started |" in md
    assert "- `done` (reproduced): measured: the run that isolates it" in md
    assert not (out / "runs" / "trimmed-mean__none__seed0").exists()
    report = write_report(out)[0].read_text()  # `fl-lab report DIR`: the table, the figure and the notes
    assert "| half | error |" in report and (out / "plots" / "paper_vs_lab.png").exists()
    assert "done (reproduced): measured: the run that isolates it" in report


def test_a_full_reproduce_reruns_nothing_finished_and_judges_everything(tmp_path: Path) -> None:
    path, out = runs_in_parts(tmp_path)
    ran: list[str] = []

    def fake_run(cfg: Any, run_dir: Path) -> dict[str, Any]:
        ran.append(run_dir.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps({"final_accuracy": 0.8, "final_asr": 0.0}))
        return {}

    result = reproduce(load_card(path), out, fake_run)
    assert sorted(n.split("__")[0] for n in ran) == ["krum", "median", "trimmed-mean"]
    assert {c["verdict"] for c in result["cells"]} == {"reproduced"} and not result["scored_only"]
    assert "not-run" not in (out / "reproduction.md").read_text()


def test_the_cli_scores_without_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = runs_in_parts(tmp_path)
    assert main(["reproduce", str(path), "--score", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "nothing run" in said and "| done | error |" in said
    assert json.loads((out / "reproduction.json").read_text())["scored_only"] is True


def test_notes_must_be_text_and_the_proxy_keeps_its_own(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_card(card_path(tmp_path, "  - {id: a, rule: fedavg, attack: none, source: x, notes: [1]}\n"))
    assert err.value.problems == ["cells[0] (a) notes: expected text, got list"]
    path = card_path(tmp_path, CELLS)
    path.write_text(path.read_text() + 'proxy:\n  overrides: [training.rounds=2]\n  cells:\n'
                    '    half: {expect: {max: 1.0}, source: "lab, measured", notes: "proxy: 3 seeds"}\n')
    quick = {c.id: c.notes for c in load_card(path, quick=True).cells}
    assert quick["half"] == "proxy: 3 seeds" and quick["done"] is None  # the paper setting's note is not the proxy's
    assert {c.id: c.notes for c in load_card(path).cells}["done"] == "measured: the run that isolates it"
