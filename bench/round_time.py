"""Per-round cost of the lab's security bookkeeping against a plain Flower FedAvg app.

    python bench/round_time.py [--rounds 12] [--repeats 2] [--experiment experiments/no-attack.yaml]

Both apps run as real `flwr run` simulations on the same private SuperLink settings, with the same
model, data, local training and central evaluation; they differ only in what the lab adds (reply
validation, the update matrix, norms, decisions, metrics.jsonl, checkpoints). The statistic is the
median per-round wall time over rounds 2..R (round 1 carries Ray's start-up), runs alternating
between the two apps so that load from other work on the machine hits both alike.
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

from lab.artifacts import read_jsonl  # noqa: E402
from lab.config import dump_yaml, load_experiment  # noqa: E402
from commands.launch import flwr_run, run_experiment, simulation_superlink  # noqa: E402


def median_round(rows: list[dict[str, float]]) -> float:
    return statistics.median(r["round_seconds"] for r in rows if r["round"] >= 2)


def run_plain(cfg_text: str, out: Path, num_clients: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    with simulation_superlink(out / ".flwr", out / "superlink.log") as conn:
        outcome = flwr_run(conn, out / ".flwr", {"experiment-text": cfg_text, "output-dir": str(out)}, out,
                           f"num-supernodes={num_clients} client-resources-num-cpus=2",
                           app_dir=ROOT / "bench" / "plain_fedavg")
    if outcome.status != "finished:completed":
        raise SystemExit(f"plain app failed: {outcome.status} {outcome.details}; see {out}/flwr.log")
    return median_round(read_jsonl(out / "rounds.jsonl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments/no-attack.yaml"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = load_experiment(args.experiment, [f"training.rounds={args.rounds}"])
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_experiment(cfg, Path(tmp) / f"lab{i}")
            ours.append(median_round(read_jsonl(Path(tmp) / f"lab{i}" / "metrics.jsonl")))
            plain.append(run_plain(dump_yaml(cfg), Path(tmp) / f"plain{i}", cfg.federated.num_clients))
    o, p = statistics.median(ours), statistics.median(plain)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
        "experiment": Path(args.experiment).name, "clients": cfg.federated.num_clients, "rounds": args.rounds,
        "lab_round_s": round(o, 4), "plain_round_s": round(p, 4), "overhead": round(o / p - 1, 4),
        "lab_runs": ours, "plain_runs": plain,
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
