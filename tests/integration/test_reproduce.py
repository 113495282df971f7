"""`fl-lab reproduce --quick` on the poisoning-guide card: real Flower runs (in-process), the
reproduction.json shape, the measured proxy bounds, reuse of finished runs; the CLI's --check; and
readings at a round (`at_round`) and relative expectations on real runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commands.cards import load_card
from commands.cli import main
from commands.report import write_report
from commands.reproduce import planned_runs, reproduce
from lab.config import ExperimentConfig, dump_yaml
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
CARD = ROOT / "experiments/papers/poisoning-guide.yaml"
pytestmark = pytest.mark.integration


def test_the_quick_card_runs_and_meets_its_measured_bounds(tmp_path: Path) -> None:
    card = load_card(CARD, quick=True)
    calls: list[Path] = []

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        calls.append(run_dir)
        run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(run_dir)}, cfg.federated.num_clients)
        return {}

    out = tmp_path / "out"
    result = reproduce(card, out, runner)
    assert len(calls) == 7  # fedavg x none's ASR and accuracy share one run
    saved = json.loads((out / "reproduction.json").read_text())
    assert saved == result and saved["card"] == "poisoning-guide" and saved["proxy"] is True
    assert len(saved["cells"]) == 8
    for cell in saved["cells"]:
        assert {"id", "rule", "attack", "metric", "paper", "expect", "ours", "rounds", "verdict"} <= set(cell)
        assert set(cell["ours"]) == {"mean", "sd", "values"} and len(cell["ours"]["values"]) == 1
        assert cell["rounds"] == 8 and cell["proxy"] is True
        assert cell["expect"] is not None and "measured" in cell["source"]
    assert {c["id"]: c["verdict"] for c in saved["cells"]} == {c["id"]: "reproduced" for c in saved["cells"]}, \
        [(c["id"], c["ours"]["mean"], c["expect"]) for c in saved["cells"]]
    md = (out / "reproduction.md").read_text()
    assert "CPU PROXY" in md and "reproduced (proxy)" in md
    report_md, _ = write_report(out)  # `fl-lab report DIR` shows the paper-vs-lab table
    text = report_md.read_text()
    assert "# Reproduction report: out" in text and "## Paper vs lab" in text and "CPU proxy" in text
    assert "plots/paper_vs_lab.png" in text and (out / "plots" / "paper_vs_lab.png").exists()  # and the figure
    reproduce(card, out, runner)  # an interrupted or repeated card reuses every finished run
    assert len(calls) == 7


def test_cli_check_names_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", str(CARD), "--quick", "--check", "--out", str(tmp_path / "o")]) == 0
    assert "ok:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'experiments/smoke.yaml'}\ncells:\n"
                   "  - {rule: fedavg, attack: nope, source: x}\n  - {rule: median, attack: none}\n")
    assert main(["reproduce", str(bad), "--check"]) == 2
    err = capsys.readouterr().err
    assert "unknown attack 'nope'" in err and "cells[1] (median:none) source:" in err


def test_readings_at_a_round_and_relative_cells_on_real_runs(tmp_path: Path) -> None:
    card_path = tmp_path / "card.yaml"
    card_path.write_text(f"name: rounds\nbase: {ROOT / 'experiments/smoke.yaml'}\nmetric: asr\n"
                         "setting: {training: {rounds: 3}}\ncells:\n"
                         "  - {rule: fedavg, attack: backdoor, source: lab}\n"
                         "  - {id: at1, rule: fedavg, attack: backdoor, at_round: 1, source: lab}\n"
                         "  - {id: acc1, rule: fedavg, attack: backdoor, metric: accuracy, at_round: 1, source: lab}\n"
                         "  - {id: same, rule: median, attack: backdoor, source: lab,\n"
                         "     expect: {relative_to: 'fedavg:backdoor', max_delta: 1.0}}\n")
    calls: list[Path] = []

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        calls.append(run_dir)
        run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(run_dir)}, cfg.federated.num_clients)
        return {}

    result = reproduce(load_card(card_path), tmp_path / "out", runner)
    assert len(calls) == 2  # the readings at round 1 come from FedAvg's 3-round run
    cells = {c["id"]: c for c in result["cells"]}
    fedavg_run = Path(cells["at1"]["runs"][0])
    assert cells["fedavg:backdoor"]["runs"] == cells["at1"]["runs"]
    rows = {r["round"]: r for r in map(json.loads, (fedavg_run / "metrics.jsonl").read_text().splitlines())}
    assert cells["at1"]["ours"]["values"] == [round(rows[1]["asr"], 6)] and cells["at1"]["at_round"] == 1
    assert cells["acc1"]["ours"]["values"] == [round(rows[1]["accuracy"], 6)]
    summary = json.loads((fedavg_run / "summary.json").read_text())
    assert cells["fedavg:backdoor"]["ours"]["values"] == [round(summary["final_asr"], 6)]
    assert cells["same"]["against"]["mean"] == cells["fedavg:backdoor"]["ours"]["mean"]
    assert cells["same"]["verdict"] == "reproduced"  # ASRs lie in [0, 1]: always within 1.0
    assert "round 1 of 3" in (tmp_path / "out" / "reproduction.md").read_text()


class Killed(Exception):
    """Stands for the ServerApp killed in the middle of a run (a session's end, a reboot)."""


def test_an_interrupted_card_run_continues_after_its_checkpoint_and_ends_as_an_unbroken_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import strategies.flower as sf

    card = load_card(CARD, quick=True, only=["fedavg:backdoor@attackers=3"])
    started: list[int] = []

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(run_dir)}, cfg.federated.num_clients)
        return {}

    unbroken = reproduce(card, tmp_path / "unbroken", runner)
    original = sf.RobustFedAvg.configure_train

    def configure(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        started.append(server_round)
        if server_round == 6 and len(started) == 6:
            raise Killed  # rounds 1-5 and their checkpoints are written
        return original(self, server_round, arrays, config, grid)

    monkeypatch.setattr(sf.RobustFedAvg, "configure_train", configure)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        reproduce(card, out, runner)
    (run_dir, _), = planned_runs(card, out)
    assert not (run_dir / "summary.json").exists() and (run_dir / "checkpoints" / "round_0005.safetensors").exists()
    said: list[str] = []
    resumed = reproduce(card, out, runner, on_start=lambda i, n, d, state: said.append(state))
    assert said == ["interrupted: continues after its last checkpoint"]
    # Flower counts the continued run's rounds from 1 again: 3 rounds ran, not 8
    assert len(started) == 6 + 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(9))  # rounds 0-5 kept, 6-8 added, none twice
    assert resumed["cells"][0]["ours"] == unbroken["cells"][0]["ours"]
    assert resumed["cells"][0]["verdict"] == unbroken["cells"][0]["verdict"]
