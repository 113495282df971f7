"""What a run exposes on the machine: listening sockets (loopback only) and the clients' raw images
(evidence: simulation only, private)."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from commands.procs import family
from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import FakeGrid

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host (little-endian) order."""
    raw = b"".join(bytes.fromhex(hex_addr[i:i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    return ipaddress.ip_address(raw)


def _loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_sockets(pids: list[int]) -> set[tuple[str, int, str, int]]:
    """(address, port, command, pid) of every listening TCP socket the processes `pids` hold."""
    owners: dict[str, tuple[str, int]] = {}
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owners[link[8:-1]] = (comm, pid)
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owners:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                found.add((str(_address(addr)), int(port, 16), *owners[fields[9]]))
    return found


def test_a_simulation_listens_on_loopback_only_and_its_ray_wants_a_token(tmp_path: Path) -> None:
    """Every listening socket of the run's processes (SuperLink, flwr-simulation, Ray's GCS, raylet,
    workers, agents), sampled while `fl-lab run` runs, is on 127.0.0.1 / ::1."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "commands.cli", "run", "experiments/smoke.yaml", "--out", str(out),
                             "--set", "training.rounds=4"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int, str, int]] = set()
    ray_env: dict[int, bytes] = {}
    try:
        while proc.poll() is None:
            now = listening_sockets(family([proc.pid], out / ".flwr"))
            for pid in {pid for _, _, comm, pid in now if comm == "gcs_server"} - set(ray_env):
                try:
                    ray_env[pid] = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    pass
            seen |= now
            time.sleep(0.3)
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    commands = {comm for _, _, comm, _ in seen}
    assert {"gcs_server", "raylet", "flower-superlin"} <= commands, seen  # Ray was watched too
    exposed = sorted(s for s in seen if not _loopback(ipaddress.ip_address(s[0])))
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # Loopback still admits other local users: Ray's token authentication keeps them out.
    assert ray_env and all(b"RAY_AUTH_MODE=token" in env.split(b"\0") for env in ray_env.values())


def _run(out: Path, node_configs: list[dict[str, object]]) -> list[dict[str, object]]:
    """The smoke experiment in-process, probing every client in round 2 with evidence asked for."""
    from client.app import app as client_app
    from server.app import app as server_app

    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [
        "capture.enabled=true", "capture.rounds=[2]", "capture.clients=all",
        "capture.probe={local_steps: 1, batch_size: 4, lr: 0.01}", "capture.evidence=true"])
    run_config = {"experiment-text": dump_yaml(cfg), "output-dir": str(out)}
    server_app(FakeGrid(client_app, node_configs, run_config),
               Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return read_jsonl(out / "captures" / "manifest.jsonl")


def test_evidence_only_from_simulated_nodes_and_private(tmp_path: Path) -> None:
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    sim = tmp_path / "sim"
    rows = _run(sim, [{"partition-id": i, "num-partitions": 4} for i in range(4)])
    assert sorted(str(r["evidence"]) for r in rows) == [
        f"evidence/round_0002_partition_{i:03d}.safetensors" for i in range(4)]
    captures = sim / "captures"
    assert mode(captures) == mode(captures / "evidence") == mode(captures / "round_0002") == 0o700
    files = [*captures.glob("evidence/*.safetensors"), *captures.glob("round_0002/*.safetensors")]
    assert len(files) == 8 and {mode(f) for f in files} == {0o600}

    # The lab's SuperNodes (fl-lab deploy, compose.yaml) name `malicious` and `data-dir`: real nodes.
    dep = tmp_path / "deploy"
    rows = _run(dep, [{"partition-id": i, "num-partitions": 4, "malicious": i == 3, "data-dir": str(tmp_path / "data")}
                      for i in range(4)])
    assert len(rows) == 4 and all(r["evidence"] is None for r in rows)  # captured, but no raw images
    assert not (dep / "captures" / "evidence").exists()
