"""Real `flwr run` simulations through `fl-lab run` (a private SuperLink, Ray, subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.runfolder import RUN_MARKER
from lab.artifacts import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
FL_LAB = [sys.executable, "-m", "commands.cli"]
pytestmark = pytest.mark.integration


def flower_processes_using(flwr_home: Path) -> list[int]:
    """PIDs of live processes whose environment points FLWR_HOME at `flwr_home`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"FLWR_HOME={flwr_home}".encode() in env.split(b"\0"):
            pids.append(int(proc.name))
    return pids


def fl_lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FL_LAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_fl_lab_run_smoke_is_a_real_flower_simulation(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    res = fl_lab("run", "experiments/smoke.yaml", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "round   2/2" in res.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert sorted(rows[1]["clients"]) == [0, 1, 2, 3]
    assert (out / "checkpoints" / "round_0002.safetensors").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "fedavg"
    assert "Successfully started run" in (out / "flwr.log").read_text()
    assert flower_processes_using(out / ".flwr") == []  # the SuperLink and its children are gone


def test_a_failed_flower_run_gives_a_non_zero_exit(tmp_path: Path) -> None:
    out = tmp_path / "broken"
    out.mkdir()
    (out / RUN_MARKER).touch()  # one of our run folders, so the lab may reuse it
    (out / "checkpoints").write_text("a file where the ServerApp needs a folder")
    res = fl_lab("run", "experiments/smoke.yaml", "--out", str(out), "--set", "training.rounds=1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "did not complete" in res.stderr and "Traceback" not in res.stderr
    assert flower_processes_using(out / ".flwr") == []


def test_config_mistakes_exit_2_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    from commands.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {rounds: -1, lr: fast}\nattack: {type: backdor}\n")
    res = subprocess.run([*FL_LAB, "run", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    for key in ("training.rounds", "training.lr", "attack.type"):
        assert key in res.stderr
    assert "Traceback" not in res.stderr
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_unknown_rule_fails_before_any_process_starts(tmp_path: Path) -> None:
    res = fl_lab("run", "experiments/smoke.yaml", "--out", str(tmp_path), "--set", "federated.aggregator.name=nope")
    assert res.returncode == 2 and "unknown rule 'nope'" in res.stderr
    assert not (tmp_path / ".flwr").exists()


@pytest.mark.skipif(os.environ.get("FL_LAB_SKIP_SLOW") == "1", reason="FL_LAB_SKIP_SLOW=1")
def test_attackers_ratio_list_runs_one_experiment_per_value(tmp_path: Path) -> None:
    res = fl_lab("run", "experiments/smoke.yaml", "--out", str(tmp_path), "--set", "attack.attackers_ratio=[0.25,0.5]",
                 "training.rounds=1")
    assert res.returncode == 0, res.stdout + res.stderr
    s1 = json.loads((tmp_path / "attackers_0.25" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "attackers_0.5" / "summary.json").read_text())
    assert len(s1["malicious_partitions"]) == 1 and len(s2["malicious_partitions"]) == 2


def test_stopping_fl_lab_run_mid_run_stops_at_the_next_round_and_leaves_no_process(tmp_path: Path) -> None:
    """Rounds of the smoke run take about 0.3 s and `flwr stop` some seconds: the stop must come
    through the run folder (commands/interrupt.py), at the next round boundary, with no summary."""
    import signal
    import time

    out = tmp_path / "stopped"
    proc = subprocess.Popen([*FL_LAB, "run", "experiments/smoke.yaml", "--out", str(out), "--set", "training.rounds=40"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(read_jsonl(out / "metrics.jsonl")) < 3:
        time.sleep(0.1)
    seen = max(r["round"] for r in read_jsonl(out / "metrics.jsonl"))
    assert seen >= 2, "the run never got going"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    rounds = [r["round"] for r in read_jsonl(out / "metrics.jsonl")]
    assert proc.returncode == 130, err
    last = rounds[-1]
    assert seen <= last <= seen + 2 and rounds == list(range(last + 1)), (seen, rounds, err)
    assert not (out / "summary.json").exists() and not (out / "final.safetensors").exists()
    assert (out / "checkpoints" / f"round_{last:04d}.safetensors").exists()
    assert f"interrupted after round {last} of 40: {out} keeps rounds 1-{last} (checkpoints, metrics)" in err, err
    time.sleep(2)
    assert flower_processes_using(out / ".flwr") == []  # flwr-simulation and Ray included
