"""Wall time per round: the default experiment on a real deployment vs in simulation.

    python bench/deploy.py [--rounds 3] [--isolation subprocess process] [--no-sim]

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands import deploy  # noqa: E402
from lab.artifacts import read_jsonl, write_json  # noqa: E402
from lab.config import load_experiment  # noqa: E402
from commands.launch import run_experiment  # noqa: E402


def per_round(out: Path) -> dict[str, float | list[float]]:
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["round"] >= 1]
    later = [r["round_seconds"] for r in rows if r["round"] >= 2] or [r["round_seconds"] for r in rows]
    return {"median_round_seconds": statistics.median(later), "round_seconds": [r["round_seconds"] for r in rows]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/default.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isolation", nargs="+", default=["process"], choices=deploy.ISOLATIONS)
    parser.add_argument("--no-sim", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "deploy.json"))
    args = parser.parse_args()
    cfg = load_experiment(ROOT / args.experiment, [f"training.rounds={args.rounds}", "capture.enabled=false", "capture.rounds=[]"])
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
        if not args.no_sim:
            out = Path(tmp) / "sim"
            summary = run_experiment(cfg, out)
            result["simulation"] = {"wall_seconds": summary["wall_seconds"], "final_accuracy": summary["final_accuracy"],
                                    **per_round(out)}
            print("simulation", json.dumps(result["simulation"]), flush=True)
            for isolation, d in result["deployment"].items():  # type: ignore[attr-defined]
                d["ratio_vs_simulation"] = d["median_round_seconds"] / result["simulation"]["median_round_seconds"]  # type: ignore[index]
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
