"""Real deployment on loopback: a SuperLink and SuperNodes as separate processes, TLS and node auth.

One deployment (3 SuperNodes, partition 2 malicious) serves the tests of this module, in order:
the security checks (an unlisted node key and a client without the CA are refused), a real
ServerApp kill + `execution.resume`, and the main run (2 rounds of smoke.yaml with capture) in
which an honest SuperNode is killed during round 2. Every process is stopped by PID in the
fixture's teardown, even on failure. The in-process resume tests at the end use the fake Grid:
their oracle is an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from commands import deploy, secrets
from commands.launch import BIN, flower_env, write_connection
from lab.artifacts import load_tensors, read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
FL_LAB = [sys.executable, "-m", "commands.cli"]
pytestmark = pytest.mark.integration
SMOKE = ["federated.num_clients=3", "attack.boost=5", "capture.enabled=true", "capture.rounds=[1,2]",
         "capture.clients=all"]


def fl_lab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FL_LAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def start_fl_lab(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([*FL_LAB, *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def rounds_logged(out: Path) -> list[int]:
    return [int(r["round"]) for r in read_jsonl(out / "metrics.jsonl")]


def descendants_named(dep: deploy.Deployment, root: str, name: str) -> list[int]:
    """Our own processes only: the family of the recorded process `root`, filtered by command."""
    recs = [p for p in dep.processes if p.name == root]
    pids = deploy.family(recs, Path("/nonexistent"))
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                out.append(pid)
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[deploy.Deployment]:
    folder = tmp_path_factory.mktemp("deploy")
    try:
        res = fl_lab("deploy", "up", "--nodes", "3", "--malicious", "1", "--dir", str(folder), timeout=400)
        assert res.returncode == 0, res.stdout + res.stderr
        dep = deploy.Deployment.load(folder)
        yield dep
    finally:
        recorded = deploy.Deployment.load(folder).processes if (folder / "deployment.json").exists() else []
        res = fl_lab("deploy", "down", "--dir", str(folder), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert not any(deploy.alive(p) for p in recorded)
        assert deploy.family([], (folder / ".flwr").resolve()) == []  # no child or orphan left


def test_up_secures_and_records_everything(deployment: deploy.Deployment) -> None:
    dep = deployment
    assert dep.tls and dep.auth and dep.malicious == [2] and dep.address.startswith("127.0.0.1:")
    by_name = {p.name: p for p in dep.processes}
    # process isolation (the default): an app executor beside the SuperLink and beside each SuperNode
    assert [p.name for p in dep.processes] == [
        "superlink", "superexec-serverapp", *(f"{kind}-{i}" for i in range(3) for kind in ("supernode", "superexec-clientapp"))]
    assert all(deploy.alive(p) and Path(p.log).exists() for p in dep.processes)
    link = " ".join(by_name["superlink"].cmd)
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link and "--insecure" not in link
    assert "--isolation process" in link
    # the ServerApp executor reaches the SuperLink's ServerAppIo API over TLS too
    assert "--root-certificates" in by_name["superexec-serverapp"].cmd
    for i in range(3):
        node = by_name[f"supernode-{i}"].cmd
        assert "--root-certificates" in node and "--auth-supernode-private-key" in node and "--insecure" not in node
        assert f"malicious={'true' if i == 2 else 'false'}" in node[-1]
        # the ClientApp executor talks to its own SuperNode on loopback, at the port the node serves
        assert by_name[f"superexec-clientapp-{i}"].cmd[-1] == f"{deploy.HOST}:{node[node.index('--port') + 1]}"
    toml = (dep.flwr_home / "config.toml").read_text()
    assert 'root-certificates = "' in toml and "insecure = false" in toml
    assert len(deploy.online_nodes(dep)) == 3


def test_unlisted_key_and_missing_ca_are_refused(deployment: deploy.Deployment, tmp_path: Path) -> None:
    dep = deployment
    rogue_key = tmp_path / "rogue"
    secrets.make_node_key(rogue_key)
    env = flower_env(tmp_path / "rogue-home")
    common = ["--superlink", dep.address, "--max-retries", "3", "--max-wait-time", "30",
              "--node-config", "partition-id=9 num-partitions=3 malicious=true"]
    cmds = {
        "unlisted-key": [str(BIN / "flower-supernode"), "--root-certificates", str(dep.ca_cert),
                         "--auth-supernode-private-key", str(rogue_key), "--port", str(deploy.free_port()), *common],
        "no-ca": [str(BIN / "flower-supernode"), "--auth-supernode-private-key", dep.node_keys[0],
                  "--port", str(deploy.free_port()), *common],
    }
    procs = {}
    try:
        for name, cmd in cmds.items():
            with open(tmp_path / f"{name}.log", "wb") as fh:
                procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # The CLI without the CA: the SuperLink's certificate cannot be verified.
        no_ca = tmp_path / "no-ca-home"
        write_connection(no_ca, "lab-deploy", dep.address, {"insecure": False})
        res = subprocess.run([str(BIN / "flwr"), "ls", "lab-deploy", "--format", "json"], env=flower_env(no_ca),
                             capture_output=True, text=True, timeout=120, check=False)
        assert json.loads(res.stdout)["success"] is False and "unavailable" in res.stdout
        trusted = deploy.flwr_cli(dep, "ls", deploy.CONNECTION, "--format", "json")  # the control: with the CA
        assert "runs" in json.loads(trusted.stdout), trusted.stdout
        wait_for(lambda: all(p.poll() is not None for p in procs.values()), 240, "the refused SuperNodes to give up")
        logs = {n: (tmp_path / f"{n}.log").read_text() for n in procs}
        assert "CERTIFICATE_VERIFY_FAILED" in logs["no-ca"] or "certificate verify failed" in logs["no-ca"]
        assert "Failed to activate SuperNode" in logs["unlisted-key"]  # its key is not registered
        assert "SuperNode ID" not in logs["unlisted-key"] and "SuperNode ID" not in logs["no-ca"]
        assert len(deploy.online_nodes(dep)) == 3  # only the registered nodes
    finally:
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_serverapp_killed_mid_run_resumes_without_losing_or_repeating_a_round(
        deployment: deploy.Deployment, tmp_path: Path) -> None:
    dep = deployment
    out = tmp_path / "resume"
    args = ["deploy", "run", "experiments/smoke.yaml", "--dir", dep.folder, "--out", str(out), "--set",
            "federated.num_clients=3", "training.rounds=2"]
    first = start_fl_lab(*args, log=tmp_path / "first.log")
    try:
        wait_for(lambda: 1 in rounds_logged(out) or first.poll() is not None, 400, "round 1")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        # process isolation: flwr-serverapp runs under the ServerApp executor, not the SuperLink
        serverapps = descendants_named(dep, "superexec-serverapp", "flwr-serverapp")
        assert serverapps, "no flwr-serverapp process under our ServerApp executor"
        for pid in serverapps:
            os.kill(pid, signal.SIGKILL)
        run_id = re.search(r"Successfully started run (\d+)", (out / "flwr.log").read_text()).group(1)
        deploy.flwr_cli(dep, "stop", run_id, deploy.CONNECTION)
        assert first.wait(240) != 0  # the interrupted run is reported as failed
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert rounds_logged(out) in ([0, 1], [0, 1, 2])
    assert not (out / "summary.json").exists()
    res = fl_lab(*args, "execution.resume=true")
    assert res.returncode == 0, res.stdout + res.stderr
    assert rounds_logged(out) == [0, 1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round_0001.safetensors",
                                                                        "round_0002.safetensors"]
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_smoke_with_capture_and_a_supernode_killed_in_round_2(deployment: deploy.Deployment, tmp_path: Path) -> None:
    dep = deployment
    out = tmp_path / "smoke"
    run = start_fl_lab("deploy", "run", "experiments/smoke.yaml", "--dir", dep.folder, "--out", str(out),
                       "--set", *SMOKE, log=tmp_path / "run.log")
    try:
        wait_for(lambda: 1 in rounds_logged(out) or run.poll() is not None, 400, "round 1")
        # supernode-0 is honest; the machine dies with its ClientApp executor
        victims = [p for p in dep.processes if p.name in ("supernode-0", "superexec-clientapp-0")]
        assert len(victims) == 2 and all(deploy.alive(v) for v in victims)
        for victim in victims:
            os.killpg(victim.pid, signal.SIGKILL)
        # Flower answers for a vanished node once it misses its heartbeats (2 x 30 s).
        assert run.wait(400) == 0, (tmp_path / "run.log").read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    r1, r2 = rows[1], rows[2]
    assert sorted(r1["clients"]) == [0, 1, 2] and r1["failures"] == [] and r1["malicious"] == [2]
    norms = {int(k): v for k, v in r1["update_norms"].items()}
    assert norms[2] > 2.5 * max(norms[0], norms[1])  # the boosted attacker's update stands out
    assert sorted(r2["clients"]) == [1, 2]  # round 2 completed with the nodes left
    assert len(r2["failures"]) == 1 and "Unavailable" in r2["failures"][0]["reason"]
    assert "1 failed replies" in (tmp_path / "run.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round_0001.safetensors",
                                                                        "round_0002.safetensors"]
    manifest = read_jsonl(out / "captures" / "manifest.jsonl")
    assert sorted((e["round"], e["partition_id"]) for e in manifest) == [(1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["malicious_partitions"] == [2] and summary["rounds"] == 2


def test_deploy_run_refuses_an_experiment_that_does_not_fit(deployment: deploy.Deployment) -> None:
    res = fl_lab("deploy", "run", "experiments/smoke.yaml", "--dir", deployment.folder)
    assert res.returncode == 2 and "federated.num_clients=3" in res.stderr


def test_auth_without_tls_is_refused_before_anything_starts(tmp_path: Path) -> None:
    res = fl_lab("deploy", "up", "--nodes", "2", "--no-tls", "--dir", str(tmp_path / "d"))
    assert res.returncode == 2 and "needs TLS" in res.stderr
    assert not (tmp_path / "d" / "deployment.json").exists()


# --------------------------------------------------------------------------------------------
# execution.resume in-process (fake Grid)


class Killed(Exception):
    """Stands for SIGKILL of the ServerApp process in the middle of a round."""


def smoke(*overrides: str) -> str:
    return dump_yaml(load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=4", *overrides]))


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "rule_peak_mb"} for r in rows]


@pytest.mark.parametrize("rule", ["fedavg", "foolsgold"])  # foolsgold: per-client history across rounds
def test_resume_reproduces_the_uninterrupted_run(rule: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    capture = ["capture.enabled=true", "capture.rounds=[1,2,3,4]", "capture.clients=all",
               f"federated.aggregator={{name: {rule}, params: {{}}}}"]
    full = tmp_path / "full"
    run_in_process({"experiment-text": smoke(*capture), "output-dir": str(full)}, 4)

    out = tmp_path / "resumed"
    import strategies.flower as sf

    original = sf.RobustFedAvg.configure_train

    def configure(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        if server_round == 3 and not getattr(configure, "done", False):
            configure.done = True  # type: ignore[attr-defined]
            raise Killed  # dies at the start of round 3, after round 2 was written
        return original(self, server_round, arrays, config, grid)

    monkeypatch.setattr(sf.RobustFedAvg, "configure_train", configure)
    with pytest.raises(Killed):
        run_in_process({"experiment-text": smoke(*capture), "output-dir": str(out)}, 4)
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    # What a SIGKILL at a worse moment leaves: round 3's line written but not its checkpoint,
    # a half-written temporary checkpoint, and a capture entry of round 3.
    rows = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(rows + rows.splitlines()[-1].replace('"round": 2', '"round": 3') + "\n")
    (out / "checkpoints" / ".round_0003.safetensors.x1.tmp").write_bytes(b"half")
    (out / "captures" / "round_0003").mkdir()
    (out / "captures" / "round_0003" / "partition_000.safetensors").write_bytes(b"stale")

    monkeypatch.setattr(sf.RobustFedAvg, "configure_train", original)
    run_in_process({"experiment-text": smoke(*capture, "execution.resume=true"), "output-dir": str(out)}, 4)

    got, want = read_jsonl(out / "metrics.jsonl"), read_jsonl(full / "metrics.jsonl")
    assert [r["round"] for r in got] == [0, 1, 2, 3, 4]  # nothing lost, nothing twice
    assert strip(got) == strip(want)
    a, b = load_tensors(out / "final.safetensors"), load_tensors(full / "final.safetensors")
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in b)
    saved = [f"round_000{i}.safetensors" for i in (1, 2, 3, 4)]
    if rule == "foolsgold":
        saved += [f"aggregator_round_000{i}.safetensors" for i in (1, 2, 3, 4)]
        history = load_tensors(out / "checkpoints" / "aggregator_round_0004.safetensors")
        assert sorted(history) == [f"history.{p}" for p in range(4)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(saved)
    manifest = read_jsonl(out / "captures" / "manifest.jsonl")
    assert sorted((e["round"], e["partition_id"]) for e in manifest) == [(r, p) for r in (1, 2, 3, 4) for p in range(4)]
    assert not list(out.rglob("*.tmp"))
    for entry in manifest:  # every capture file is complete and loads
        load_tensors(out / "captures" / entry["file"])


def test_resume_without_a_checkpoint_starts_over(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "accuracy": 0.1}\n')
    run_in_process({"experiment-text": smoke("training.rounds=1", "execution.resume=true"),
                    "output-dir": str(tmp_path)}, 4)
    assert [r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_resume_of_a_finished_run_runs_no_round(tmp_path: Path) -> None:
    run_in_process({"experiment-text": smoke("training.rounds=2"), "output-dir": str(tmp_path)}, 4)
    before = read_jsonl(tmp_path / "metrics.jsonl")
    grid = run_in_process({"experiment-text": smoke("training.rounds=2", "execution.resume=true"),
                           "output-dir": str(tmp_path)}, 4)
    assert read_jsonl(tmp_path / "metrics.jsonl") == before
    assert next(grid._ids) == 1  # no message was sent
