"""`fl-lab sweep`: the grid, the reuse of finished runs, the table and the plots (runs in-process)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from commands.sweep import load_sweep, run_sweep
from lab.config import ExperimentConfig, dump_yaml
from lab.errors import ConfigError
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

SWEEP = f"""
name: tiny
base: {ROOT / 'experiments/smoke.yaml'}
seeds: [0]
overrides: [training.rounds=1, dataset.source_class=null]
grid:
  federated.aggregator: [{{name: fedavg}}, {{name: median}}]
  attack: [{{label: bd, type: backdoor}}, {{label: clean, type: none}}]
  attack.poison_ratio: [0.25, 0.5]
"""


def test_sweep_runs_the_grid_once_and_writes_the_table_and_plots(tmp_path: Path) -> None:
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(SWEEP)
    calls: list[Path] = []

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        calls.append(run_dir)
        run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(run_dir)}, cfg.federated.num_clients)
        return {}

    rows = run_sweep(sweep, tmp_path / "out", runner)
    assert len(rows) == 8
    assert len(calls) == 6  # clean runs do not depend on the poison ratio: run once per rule
    table = list(csv.DictReader((tmp_path / "out/results.csv").open()))
    assert {r["federated.aggregator"] for r in table} == {"fedavg", "median"}
    attacked = [r for r in table if r["attack"] == "bd"]
    assert all(r["asr_floor"] not in ("", None) for r in attacked)  # filled from the clean run of the rule
    # the pooled AUC of the rule's suspicion: a number with an attacker, empty without one
    assert all(0.0 <= float(r["detection_auc"]) <= 1.0 for r in attacked)
    assert all(r["detection_auc"] == "" for r in table if r["attack"] == "clean")
    md = (tmp_path / "out/results.md").read_text()
    assert "| fedavg | bd | 0.25 | 1 |" in md and "ASR floor" in md and "detection AUC" in md
    assert (tmp_path / "out/plots/rounds_bd.png").exists()
    assert (tmp_path / "out/plots/asr_vs_poison_ratio.png").exists()
    run_sweep(sweep, tmp_path / "out", runner)
    assert len(calls) == 6  # finished runs are reused
    # Offline-tool settings do not change the Flower run: still reused.
    sweep.write_text(SWEEP.replace("overrides: [", "overrides: [unlearning.lr=0.05, inversion.iterations=7, "))
    run_sweep(sweep, tmp_path / "out", runner)
    assert len(calls) == 6
    # A base experiment that now trains differently makes every finished run stale.
    sweep.write_text(SWEEP.replace("training.rounds=1", "training.rounds=2"))
    run_sweep(sweep, tmp_path / "out", runner)
    assert len(calls) == 12


def test_a_stopped_sweep_keeps_the_table_of_what_finished(tmp_path: Path) -> None:
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(SWEEP)
    calls: list[Path] = []

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        if len(calls) == 2:  # Ctrl-C during the third run, after its first checkpoint
            (run_dir / "checkpoints").mkdir(parents=True)
            (run_dir / "checkpoints" / "round_0001.safetensors").write_bytes(b"")
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
            raise KeyboardInterrupt
        calls.append(run_dir)
        run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(run_dir)}, cfg.federated.num_clients)
        return {}

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path / "out", runner)
    table = list(csv.DictReader((tmp_path / "out/results.csv").open()))
    assert sorted(Path(r["run"]) for r in table) == sorted(calls)  # the two finished runs (one per row)
    assert "4 run(s) of the sweep not finished" in (tmp_path / "out/results.md").read_text()

    resumed: dict[Path, bool] = {}

    def again(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        resumed[run_dir] = cfg.execution.resume
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # run again: the interrupted run continues, not restarts
        run_sweep(sweep, tmp_path / "out", again)
    assert list(resumed.values()) == [True] and next(iter(resumed)) not in calls


def test_bad_sweeps_report_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'experiments/smoke.yaml'}\nfoo: 1\ngrid: {{training.rounds: [0, 2]}}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep(bad)
    assert any("foo" in p for p in err.value.problems)
    bad.write_text(f"base: {ROOT / 'experiments/smoke.yaml'}\ngrid: {{training.rounds: [0, 2]}}\n")
    with pytest.raises(ConfigError, match="training.rounds"):
        load_sweep(bad)
