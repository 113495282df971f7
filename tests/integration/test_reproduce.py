"""`fl-lab reproduce --quick` on the poisoning-guide card: real Flower runs (in-process), the
reproduction.json shape, the measured proxy bounds, reuse of finished runs; and the CLI's --check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commands.cards import load_card
from commands.cli import main
from commands.report import write_report
from commands.reproduce import reproduce
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
