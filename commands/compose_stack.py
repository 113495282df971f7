"""The Flower side of docker/e2e.sh, run inside the lab's executor image on the host's network.

    python -m commands.compose_stack test-compose --nodes 3 --malicious 1 --link-port P --node-ports A,B,C \\
        --secrets DIR --runs DIR                  # compose.yaml on the host network (YAML, stdout)
    python -m commands.compose_stack register --address 127.0.0.1:P --ca CA KEY.pub...
    python -m commands.compose_stack wait-nodes N [--timeout S]
    python -m commands.compose_stack run EXPERIMENT --address ... --ca CA --malicious-partitions 2 --out DIR
    python -m commands.compose_stack check RUN_DIR --rounds N [--failures] [--jobs]

`register` writes the Flower connection `docker` ($FLWR_HOME/config.toml, trusting only the stack's CA)
and registers the SuperNodes' public keys. `run` is `flwr run` on that connection (commands.launch:
the status comes from `flwr ls`, since `flwr run` exits 0 when the run failed). `check` reads what
the ServerApp wrote to the mounted run folder and prints one line `rounds=N accuracy=A asr=S`; any
missing or inconsistent artifact is a one-line error and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from commands.compose import host_network_spec
from commands.console import guarded, say
from commands.launch import (
    BIN,
    finished_summary,
    flower_env,
    flwr_run,
    prepare_run_dir,
    write_connection,
)
from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from lab.errors import RunError

CONNECTION = "docker"


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def register(address: str, ca: Path, keys: list[Path]) -> None:
    home = flwr_home()
    write_connection(home, CONNECTION, address, {"insecure": False, "root-certificates": str(ca)})
    for key in keys:
        res = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(key), CONNECTION],
                             env=flower_env(home), capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0 or "rror" in res.stdout:
            raise RunError(f"could not register {key}: {(res.stdout + res.stderr).strip()[-400:]}")


def online_nodes() -> int:
    """SuperNodes the SuperLink lists as online (`flwr supernode ls --format json`); 0 if it does not answer."""
    res = subprocess.run([str(BIN / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
                         env=flower_env(flwr_home()), capture_output=True, text=True, timeout=120, check=False)
    try:
        nodes = json.loads(res.stdout).get("nodes") or []
    except json.JSONDecodeError:
        return 0
    return sum(str(n.get("status", "")).lower() == "online" for n in nodes)


def wait_nodes(count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (n := online_nodes()) < count:
        if time.monotonic() > deadline:
            raise RunError(f"only {n} of {count} SuperNodes online after {timeout:.0f} s")
        time.sleep(2.0)
    return n


def run(experiment: Path, overrides: list[str], malicious: str, out: Path, app_dir: Path,
        server_out: str | None = None) -> dict[str, Any]:
    """One experiment on the stack; returns summary.json's content (RunError if Flower says it failed).

    `out` is the run folder here, `server_out` the same folder as the ServerApp's container sees it
    (its mount of runs/: /app/runs/<name>); the same path when this runs in a container too."""
    cfg = load_experiment(experiment, overrides)
    out = prepare_run_dir(cfg, out)
    run_config = {"experiment-text": dump_yaml(cfg), "output-dir": server_out or str(out),
                  "malicious-partitions": malicious}
    outcome = flwr_run(CONNECTION, flwr_home(), run_config, out, None, None, None, app_dir)
    summary = finished_summary(outcome, out)
    summary["failures"] = sum(len(r.get("failures") or []) for r in read_jsonl(out / "metrics.jsonl"))
    return summary


def check(run_dir: Path, rounds: int | None = None, failures: bool = False, jobs: bool = False) -> str:
    """What a completed run leaves in its folder; `rounds`: default the run's training.rounds;
    `failures`: some round lists a failed reply; `jobs`: the offline jobs' outputs too. Returns
    `rounds=N accuracy=A asr=S`."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RunError(f"{run_dir}: {what}")

    need((run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file(), "no config.yaml or summary.json")
    cfg = load_experiment(run_dir / "config.yaml")
    rounds = cfg.training.rounds if rounds is None else rounds
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if int(r["round"]) >= 1]
    logged = [int(r["round"]) for r in rows]
    need(logged == list(range(1, rounds + 1)), f"metrics.jsonl has rounds {logged}, expected 1..{rounds} once each")
    need(int(summary.get("rounds", -1)) == rounds, f"summary.json says {summary.get('rounds')} rounds, not {rounds}")
    need(any((run_dir / "checkpoints").glob("*.safetensors")), "no checkpoint in checkpoints/")
    if cfg.capture.enabled:
        need((run_dir / "captures" / "manifest.jsonl").is_file()
             and bool(read_jsonl(run_dir / "captures" / "manifest.jsonl")), "no capture in captures/manifest.jsonl")
    if failures:
        need(any(r.get("failures") for r in rows), "no round lists the stopped SuperNode under failures")
    if jobs:
        need(any((run_dir / "inversion").rglob("metrics.json")), "no inversion/**/metrics.json")
        need((run_dir / "unlearning" / "metrics.json").is_file(), "no unlearning/metrics.json")
    acc, asr = summary.get("final_accuracy"), summary.get("final_asr")
    return f"rounds={rounds} accuracy={acc:.4f} asr={'-' if asr is None else f'{asr:.4f}'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commands.compose_stack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    over = sub.add_parser("test-compose", help="compose.yaml with the host-network test override (YAML on stdout)")
    over.add_argument("--nodes", type=int, default=3)
    over.add_argument("--malicious", type=int, default=1)
    over.add_argument("--link-port", type=int, required=True)
    over.add_argument("--node-ports", required=True, help="comma-separated, one per SuperNode")
    over.add_argument("--secrets", required=True, help="host folder with certs/ and keys/")
    over.add_argument("--runs", required=True, help="host folder mounted at /app/runs")
    reg = sub.add_parser("register", help="the `docker` connection and the node keys registered")
    reg.add_argument("keys", nargs="+", type=Path)
    runp = sub.add_parser("run", help="flwr run an experiment on the stack")
    runp.add_argument("experiment", type=Path)
    runp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    runp.add_argument("--malicious-partitions", default="none")
    runp.add_argument("--out", type=Path, required=True, help="the run folder")
    runp.add_argument("--server-out", help="the run folder in the ServerApp's container (default: --out)")
    runp.add_argument("--app", type=Path, default=Path("."), help="the app (FAB source) folder")
    for p in (reg, runp):
        p.add_argument("--address", required=True)
        p.add_argument("--ca", type=Path, required=True)
    wait = sub.add_parser("wait-nodes", help="until N SuperNodes are online")
    wait.add_argument("count", type=int)
    wait.add_argument("--timeout", type=float, default=180.0)
    chk = sub.add_parser("check", help="the run folder's artifacts; prints rounds= accuracy= asr=")
    chk.add_argument("run_dir", type=Path)
    chk.add_argument("--rounds", type=int, help="default: the run's training.rounds")
    chk.add_argument("--failures", action="store_true")
    chk.add_argument("--jobs", action="store_true")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.action == "test-compose":
            import yaml

            ports = [int(p) for p in args.node_ports.split(",")]
            spec = host_network_spec(args.nodes, args.malicious, args.link_port, ports, args.secrets, args.runs)
            say(yaml.safe_dump(spec, sort_keys=False, width=120).rstrip())
        elif args.action == "register":
            register(args.address, args.ca, args.keys)
            say(f"registered {len(args.keys)} SuperNode keys at {args.address}")
        elif args.action == "wait-nodes":
            say(f"{wait_nodes(args.count, args.timeout)} SuperNodes online")
        elif args.action == "run":
            if "FLWR_HOME" not in os.environ:
                os.environ["FLWR_HOME"] = str(flwr_home())
            s = run(args.experiment, args.set, args.malicious_partitions, args.out, args.app, args.server_out)
            say(json.dumps({k: s.get(k) for k in ("flower_run_id", "rounds", "final_accuracy", "final_asr",
                                                  "failures", "wall_seconds")}))
        else:
            say(check(args.run_dir, args.rounds, args.failures, args.jobs))
        return 0

    return guarded("compose_stack", body)


if __name__ == "__main__":
    sys.exit(main())
