"""Wall time per round: the default experiment on a real deployment vs in simulation.

    python bench/deploy.py [--rounds 3] [--isolation subprocess process] [--no-sim]
    python bench/deploy.py --experiment experiments/smoke.yaml --set federated.num_clients=3 --containers

`--containers` adds the compose stack (docker/e2e.sh: SuperLink, 3 SuperNodes and the executors in
containers, TLS + node auth, host network) on the same experiment, which must then have 3 clients;
it also records the images' sizes and, when e2e.sh had to build the lab's image, the build time.

Deployment: `fl-lab deploy up` (SuperLink + one SuperNode per client, TLS + node auth, loopback)
then `deploy run`; every message starts a fresh `flwr-clientapp` process that imports torch.
Simulation: `fl-lab run`'s private SuperLink + Ray, whose ClientApp actors stay warm. Same
experiment (experiments/default.yaml, fewer rounds, capture off so both do the same work), same
seeds. The statistic is the median `round_seconds` over rounds 2..R (round 1 carries start-up);
set-up time (`up`, Ray start) is reported separately. Results go to bench/results/deploy.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands import deploy
from commands.launch import run_experiment
from lab.artifacts import read_jsonl, write_json
from lab.config import load_experiment


def per_round(out: Path) -> dict[str, float | list[float]]:
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["round"] >= 1]
    later = [r["round_seconds"] for r in rows if r["round"] >= 2] or [r["round_seconds"] for r in rows]
    return {"median_round_seconds": statistics.median(later), "round_seconds": [r["round_seconds"] for r in rows]}


def containers(experiment: str, overrides: list[str], work: Path) -> dict[str, object]:
    """One run of the experiment on the compose stack (docker/e2e.sh, offline jobs skipped)."""
    work.mkdir(mode=0o755, parents=True, exist_ok=True)
    work.chmod(0o755)  # the containers' user reads the mounted folders
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(ROOT / "docker" / "e2e.sh"), "--work", str(work), "--experiment", experiment,
                          "--set", " ".join(overrides), "--no-jobs"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    (work / "e2e.log").write_text(res.stderr + res.stdout)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "no output"
    if res.returncode != 0:
        raise SystemExit(f"containers: {last} (log: {work / 'e2e.log'})")
    sizes = dict(re.findall(r"image (\S+): (\d+) MB", res.stderr))
    built = re.search(r"built \S+ in (\d+) s", res.stderr)
    summary = json.loads((work / "runs" / "smoke" / "summary.json").read_text())
    return {"e2e_seconds": time.monotonic() - t0, "final_accuracy": summary["final_accuracy"],
            "image_mb": {k: int(v) for k, v in sizes.items()},
            "lab_image_build_seconds": int(built.group(1)) if built else None, **per_round(work / "runs" / "smoke")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/default.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isolation", nargs="+", default=["process"], choices=deploy.ISOLATIONS)
    parser.add_argument("--no-sim", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="experiment overrides")
    parser.add_argument("--containers", action="store_true", help="also the compose stack (docker/e2e.sh)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "deploy.json"))
    args = parser.parse_args()
    overrides = [*args.set, f"training.rounds={args.rounds}", "capture.enabled=false", "capture.rounds=[]"]
    cfg = load_experiment(ROOT / args.experiment, overrides)
    n = cfg.federated.num_clients
    malicious = round(cfg.attack.ratios[0] * n) if cfg.attack.type != "none" else 0
    result: dict[str, object] = {"experiment": args.experiment, "rounds": args.rounds, "clients": n,
                                 "machine": platform.platform(), "deployment": {}}
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for isolation in args.isolation:
            folder = Path(tmp) / f"dep-{isolation}"
            t0 = time.monotonic()
            try:
                deploy.up(folder, n, malicious, isolation=isolation, timeout=600)
                up_s = time.monotonic() - t0
                summary = deploy.run_experiment(folder, cfg, folder / "run")
                stats = per_round(folder / "run")
                result["deployment"][isolation] = {"up_seconds": up_s, "wall_seconds": summary["wall_seconds"],  # type: ignore[index]
                                                   "final_accuracy": summary["final_accuracy"], **stats}
            finally:
                deploy.down(folder)
            print(isolation, json.dumps(result["deployment"][isolation]), flush=True)  # type: ignore[index]
        if args.containers:
            result["containers"] = containers(args.experiment, overrides, Path(tempfile.mkdtemp(dir="/var/tmp")))
            print("containers", json.dumps(result["containers"]), flush=True)
        if not args.no_sim:
            out = Path(tmp) / "sim"
            summary = run_experiment(cfg, out)
            result["simulation"] = {"wall_seconds": summary["wall_seconds"], "final_accuracy": summary["final_accuracy"],
                                    **per_round(out)}
            print("simulation", json.dumps(result["simulation"]), flush=True)
            sim = result["simulation"]["median_round_seconds"]  # type: ignore[index]
            for d in [*result["deployment"].values(), *([result["containers"]] if args.containers else [])]:  # type: ignore[attr-defined]
                d["ratio_vs_simulation"] = d["median_round_seconds"] / sim
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
