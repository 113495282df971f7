"""`fl-lab reproduce CARD --record`: a card's finished runs kept beside the card, read back by a
fresh checkout that has none of the run folders, and never mixed in once the card has changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from commands.card_record import card_folder, is_recorded, measured_dir
from commands.cards import load_card
from commands.cli import main
from commands.reproduce import planned_runs, reproduce
from tests.unit.test_card_score import never, runs_in_parts

PAPERS = Path(__file__).resolve().parents[2] / "experiments/papers"


def record_and_forget(tmp_path: Path) -> tuple[Path, Path]:
    """Run a card in parts, record it, and lose the run folders (a fresh clone)."""
    path, out = runs_in_parts(tmp_path)
    assert main(["reproduce", str(path), "--score", "--record", "--out", str(out)]) == 0
    for f in sorted(out.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    out.rmdir()
    return path, tmp_path / "fresh"


def test_a_recorded_run_is_judged_in_a_fresh_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, fresh = record_and_forget(tmp_path)
    said = capsys.readouterr().out
    record = measured_dir(load_card(path))
    # only the finished run is recorded; the half-finished one is not evidence
    assert "recorded 1 finished run(s)" in said and [d.name.split("__")[0] for d in record.iterdir()] == ["fedavg"]
    run = next(record.iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 4]  # evaluated rounds only, the torn line gone
    assert rows[1] == {"round": 4, "accuracy": 0.78, "asr": 0.0, "loss": 1.0}  # the scalars, not the lists
    meta = json.loads((run / "record.json").read_text())
    assert meta["run"] == run.name and meta["recorded"] and "CPUs" in meta["machine"]

    result = reproduce(load_card(path), fresh, never, score_only=True, measured=record)
    cells = {c["id"]: c for c in result["cells"]}
    assert cells["done"]["verdict"] == "reproduced" and cells["done"]["ours"]["values"] == [pytest.approx(0.22)]
    assert cells["done"]["runs"] == [str(run)] and cells["done"]["recorded"][0]["run"] == run.name
    assert cells["half"]["verdict"] == "not-run"  # its partial run was never recorded
    md = (fresh / "reproduction.md").read_text()
    assert "## Runs read from the card's record" in md and f"- `{run.name}`: recorded {meta['recorded']}" in md


def test_a_full_reproduce_does_not_rerun_a_recorded_run(tmp_path: Path) -> None:
    path, fresh = record_and_forget(tmp_path)
    ran: list[str] = []

    def fake_run(cfg: Any, run_dir: Path) -> dict[str, Any]:
        ran.append(run_dir.name.split("__")[0])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps({"final_accuracy": 0.8, "final_asr": 0.0}))
        return {}

    reproduce(load_card(path), fresh, fake_run, measured=measured_dir(load_card(path)))
    assert sorted(ran) == ["krum", "median", "trimmed-mean"]
    ran.clear()
    reproduce(load_card(path), tmp_path / "again", fake_run)  # without the record everything runs
    assert sorted(ran) == ["fedavg", "krum", "median", "trimmed-mean"]


def test_a_record_of_another_setting_or_ignored_reads_not_run(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path, fresh = record_and_forget(tmp_path)
    assert main(["reproduce", str(path), "--score", "--ignore-records", "--out", str(fresh)]) == 0
    assert json.loads((fresh / "reproduction.json").read_text())["cells"][0]["verdict"] == "not-run"
    assert main(["reproduce", str(path), "--score", "--out", str(fresh)]) == 0
    assert json.loads((fresh / "reproduction.json").read_text())["cells"][0]["verdict"] == "reproduced"
    # the card edited since the run was recorded: the old number is not mixed in
    path.write_text(path.read_text().replace("rounds: 4,", "rounds: 4, lr: 0.5,"))
    assert main(["reproduce", str(path), "--score", "--out", str(tmp_path / "edited")]) == 0
    cells = json.loads((tmp_path / "edited" / "reproduction.json").read_text())["cells"]
    assert cells[0]["verdict"] == "not-run" and cells[0]["recorded"] == []


def test_every_committed_record_is_a_current_run_of_its_card() -> None:
    """A record the card no longer asks for (the card or a default changed since) would be skipped
    silently by `reproduce`: it must be run again or removed, so it fails here."""
    modes: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(PAPERS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        modes[card_folder(load_card(path))] = (path, {})
        if "proxy" in raw:
            modes[card_folder(load_card(path, quick=True))] = (path, {"quick": True})
        for subset in raw.get("subsets") or {}:
            modes[card_folder(load_card(path, subset=subset))] = (path, {"subset": subset})
    measured = PAPERS / "measured"
    problems = []
    for folder in sorted(measured.iterdir()) if measured.exists() else []:
        if folder.name not in modes:
            problems.append(f"{folder.name}: no card, proxy or subset writes this folder")
            continue
        path, mode = modes[folder.name]
        seeds = sorted({int(run.name.rsplit("__seed", 1)[1]) for run in folder.iterdir()})
        card = load_card(path, seeds=seeds, **mode)
        planned = {run_dir.name: cfg for run_dir, cfg in planned_runs(card, folder)}
        problems += [f"{folder.name}/{run.name}: not a run of the card as it stands" for run in folder.iterdir()
                     if run.name not in planned or not is_recorded(run, planned[run.name])]
    assert not problems
