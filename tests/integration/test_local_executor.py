"""`--in-process` (commands/local_run.py, server/local_grid.py): the same numbers as `flwr run`,
grids run side by side, and the misuse refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from commands.local_run import run_experiment_in_process
from lab.artifacts import read_jsonl
from lab.config import load_experiment
from lab.errors import RunError
from lab.runfolder import RUN_MARKER

ROOT = Path(__file__).resolve().parents[2]
FL_LAB = [sys.executable, "-m", "commands.cli"]
pytestmark = pytest.mark.integration


def fl_lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FL_LAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def readings(run_dir: Path) -> list[tuple[object, ...]]:
    return [(r["round"], r["accuracy"], r.get("asr"), r.get("clients"), r.get("detection"))
            for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_in_process_run_reads_exactly_what_flwr_run_reads(tmp_path: Path) -> None:
    flower = tmp_path / "flower"
    res = fl_lab("run", "experiments/smoke.yaml", "--out", str(flower), "--set", "attack.boost=3.0")
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["attack.boost=3.0"])
    summary = run_experiment_in_process(cfg, tmp_path / "local")
    assert summary["executor"] == "in-process" and summary["wall_seconds"] > 0
    assert readings(tmp_path / "local") == readings(flower)
    assert (tmp_path / "local" / "checkpoints" / "round_0002.safetensors").exists()
    assert not (tmp_path / "local" / "flwr.log").exists()  # no Flower run was started


def test_a_failing_in_process_run_says_why(tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml")
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_MARKER).touch()
    (out / "checkpoints").write_text("a file where the ServerApp makes its checkpoint folder")
    with pytest.raises(RunError, match="in-process run failed"):
        run_experiment_in_process(cfg, out)


def test_sweep_in_process_runs_side_by_side_and_reuses_finished_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "grid.yaml"
    sweep.write_text(f"name: grid\nbase: {ROOT / 'experiments/smoke.yaml'}\nseeds: [0]\n"
                     "grid:\n  federated.aggregator:\n    - {name: fedavg}\n    - {name: median}\n"
                     "    - {name: trimmed-mean, params: {beta: 0.25}}\n")
    out = tmp_path / "out"
    res = fl_lab("sweep", str(sweep), "--in-process", "--jobs", "2", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["fedavg__seed0", "median__seed0", "trimmed-mean__seed0"]
    for run in runs:
        summary = json.loads((out / "runs" / run / "summary.json").read_text())
        assert summary["rounds"] == 2
    stamps = {run: (out / "runs" / run / "summary.json").stat().st_mtime_ns for run in runs}
    again = fl_lab("sweep", str(sweep), "--in-process", "--jobs", "2", "--out", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[1/3]" not in again.stdout  # nothing ran again
    assert {run: (out / "runs" / run / "summary.json").stat().st_mtime_ns for run in runs} == stamps
    assert (out / "results.csv").read_text().count("\n") == 4


def test_jobs_without_in_process_is_refused_in_one_line(tmp_path: Path) -> None:
    res = fl_lab("sweep", str(ROOT / "experiments/sweeps/defenses.yaml"), "--jobs", "2", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "--jobs N > 1 needs --in-process" in res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_a_worker_carries_nothing_from_one_run_to_the_next(tmp_path: Path) -> None:
    from commands.local_run import LocalWorkers

    first = load_experiment(ROOT / "experiments/smoke.yaml")
    other = load_experiment(ROOT / "experiments/smoke.yaml", ["federated.aggregator.name=median", "training.seed=3"])
    with LocalWorkers(1, tmp_path / "logs") as workers:  # one worker serves all three runs
        workers.run(first, tmp_path / "a")
        workers.run(other, tmp_path / "b")
        workers.run(first, tmp_path / "a-again")
    assert readings(tmp_path / "a-again") == readings(tmp_path / "a")
    assert readings(tmp_path / "b") != readings(tmp_path / "a")
    assert len(list((tmp_path / "logs").glob("worker-*.log"))) == 1
    assert "experiment smoke" in (tmp_path / "b" / "logs" / "local.log").read_text()


def test_fl_lab_run_in_process_prints_each_round(tmp_path: Path) -> None:
    res = fl_lab("run", "experiments/smoke.yaml", "--in-process", "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round   2/2" in res.stdout and "(in-process)" in res.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 2
