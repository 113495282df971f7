"""Per-round wall time of the lab: against a plain Flower FedAvg app, and at paper scale.

    python bench/round_time.py [--rounds 12] [--repeats 2] [--experiment experiments/no-attack.yaml]
    python bench/round_time.py --paper-scale --clients 100 --rounds 4 --json bench/results/round-time-paper-100.json \
        [--lab-set execution.client_cpus=1 ...] [--skip plain,peer] [--floor-workers W]

Default mode (the security bookkeeping's cost): both apps run as real `flwr run` simulations on the
same private SuperLink settings, with the same model, data, local training and central evaluation;
they differ only in what the lab adds (reply validation, the update matrix, norms, decisions,
metrics.jsonl, checkpoints). The statistic is the median per-round wall time over rounds 2..R
(round 1 carries Ray's start-up), runs alternating between the two apps so that load from other
work on the machine hits both alike.

Paper-scale mode (`--paper-scale`, issue 15 "measure first"): the FoundationFL Fashion-MNIST card's
setting (experiments/papers/foundationfl-fmnist.yaml: fltrust-cnn, bias split h = 0.5, lr 0.01,
i.e. 1/3200 on a batch-summed gradient, plain SGD) with N clients, all in every round, one minibatch of 32 each, no attack, FedAvg, central
evaluation only on round 0 and the last round. Seconds per round is the median over rounds
2..R-1: round 1 carries the start-up and round R the one central evaluation (hence R >= 3). Parts:

- lab: `commands.launch.run_experiment`, `round_seconds` of metrics.jsonl (server/recorder.py).
- plain_flower: bench/plain_fedavg (Flower's FedAvg, one message per client), same setting, same
  statistic from its rounds.jsonl.
- floor (bench/plain_fedavg/plainapp/floor.py): the same client steps (load the global weights,
  `lab.task.train_local` for one step of 32 on the client's partition, the flat update) in a process
  pool of W one-thread workers, no Flower, then a plain mean. W = the clients the lab's simulation
  trains at once: usable cores // `execution.client_cpus` (Ray's actor count), at least 1;
  `--floor-workers` sets it. Each worker returns the sum of its clients' updates, so the floor pays
  no per-client transfer.
- peers (bench/plain_fedavg/plainapp/peer_byzfl.py): ByzFL's own benchmark loop
  (`byzfl.benchmark.train.start_training`: FedAvg, Average, no attack) on the same model (the lab's
  fltrust-cnn, registered under a ByzFL model name), N clients, one step of 32, one process, one
  thread; its seconds per round is the median gap between consecutive server updates (rounds
  2..R). Its data pipeline is its own (torchvision, PIL transforms, its gamma-similarity split
  instead of the bias split), fed the same Fashion-MNIST files; nothing is downloaded.
- first_round: the lab's round 1 (`round_seconds`), i.e. start-up included.
- breakdown of the lab's round: `training` = the floor's round (wall time), and
  `training_idle_cores` = the floor workers' CPU seconds per round / workers, the same work on
  otherwise idle cores (other programs' load stretches wall time, not CPU time);
  `serialisation` = N ArrayRecord <-> state dict round trips (state dict -> ArrayRecord -> state
  dict, timed over min(N, 100) trips and scaled to N); `aggregation` = median `aggregate_seconds`
  of metrics.jsonl over the same rounds; `evaluation` = one central evaluation timed here (not in
  the median round, which does not evaluate; it costs this once per `eval_every` rounds), and
  `evaluation_in_run` = the lab's last round less its median round, the same cost seen inside the
  run; `messages` = lab - training - serialisation - aggregation, the remainder: Flower's
  messaging, Ray, the per-message client set-up (config, partition lookup, model build) and the
  lab's bookkeeping. Under load the wall-time parts come from different moments, so the remainder
  can even be negative: read it with the load averages next to it.

The JSON is rewritten after each part, so a run cut short keeps what it measured. Every part
records the load average (1, 5, 15 min) before and after it: on a shared machine the numbers are
upper bounds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (the lab's floor): Flower's own dependency, the same parser
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PLAIN_APP = ROOT / "bench" / "plain_fedavg"
sys.path[:0] = [str(ROOT), str(PLAIN_APP)]  # the lab, and `plainapp` (the baselines)

import torch
from plainapp.floor import floor_workers, measure_floor
from plainapp.peer_byzfl import measure_byzfl

from commands.launch import flwr_run, run_experiment, simulation_superlink
from lab import log as lablog
from lab.artifacts import read_jsonl, write_json
from lab.config import ExperimentConfig, dump_yaml, load_experiment, read_yaml, to_dict
from lab.data import load_data
from lab.metrics import evaluate
from lab.records import ParamLayout
from lab.task import build_for, set_threads, state_of, usable_cores
from lab.triggers import make_trigger

log = logging.getLogger("bench.round_time")
CARD = ROOT / "experiments" / "papers" / "foundationfl-fmnist.yaml"
SKIPPABLE = ("plain", "peer")


# --------------------------------------------------------------------------------------------
# Shared: the plain Flower app


def median_round(rows: list[dict[str, float]]) -> float:
    return statistics.median(r["round_seconds"] for r in rows if r["round"] >= 2)


def run_plain(cfg: ExperimentConfig, out: Path) -> list[dict[str, Any]]:
    """The plain FedAvg app as a real `flwr run` simulation; its rounds.jsonl rows."""
    out.mkdir(parents=True, exist_ok=True)
    federation = (f"num-supernodes={cfg.federated.num_clients} "
                  f"client-resources-num-cpus={cfg.execution.client_cpus:g}")
    with simulation_superlink(out / ".flwr", out / "superlink.log") as conn:
        outcome = flwr_run(conn, out / ".flwr", {"experiment-text": dump_yaml(cfg), "output-dir": str(out)}, out,
                           federation, app_dir=PLAIN_APP)
    if outcome.status != "finished:completed":
        raise SystemExit(f"plain app failed: {outcome.status} {outcome.details}; see {out}/flwr.log")
    return read_jsonl(out / "rounds.jsonl")


def compare_main(args: argparse.Namespace) -> int:
    """The default mode: lab vs plain Flower on one experiment, `--repeats` alternating runs."""
    cfg = load_experiment(args.experiment, [f"training.rounds={args.rounds}"])
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_experiment(cfg, Path(tmp) / f"lab{i}")
            ours.append(median_round(read_jsonl(Path(tmp) / f"lab{i}" / "metrics.jsonl")))
            plain.append(median_round(run_plain(cfg, Path(tmp) / f"plain{i}")))
    o, p = statistics.median(ours), statistics.median(plain)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "experiment": Path(args.experiment).name, "clients": cfg.federated.num_clients, "rounds": args.rounds,
        "lab_round_s": round(o, 4), "plain_round_s": round(p, 4), "overhead": round(o / p - 1, 4),
        "lab_runs": ours, "plain_runs": plain,
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def machine() -> str:
    return f"{platform.machine()}, {platform.processor() or '?'}, {os.cpu_count()} CPUs ({usable_cores()} usable)"


# --------------------------------------------------------------------------------------------
# Paper scale: the setting


def paper_config(clients: int, rounds: int, lab_set: Sequence[str]) -> ExperimentConfig:
    """The card's setting at `clients` clients (all per round), no attack, FedAvg, evaluation only
    on the last round; `lab_set` overrides come last and pass through unread."""
    setting = read_yaml(CARD)["setting"]
    overrides = [
        f"name=round-time-paper-{clients}",
        f"federated.num_clients={clients}", f"federated.clients_per_round={clients}",
        "federated.aggregator.name=fedavg",
        "attack.type=none", "attack.attackers_ratio=0.0",
        f"training.rounds={rounds}", f"training.eval_every={rounds}",
        "training.local_steps=1", "training.batch_size=32",
        "dataset.download=false",  # the Debian copy or data/; a bench never downloads
        "execution.num_threads=1",
        *lab_set,
    ]
    return load_experiment(setting, overrides)


def describe(cfg: ExperimentConfig, lab_set: Sequence[str]) -> dict[str, Any]:
    f, t = cfg.federated, cfg.training
    return {
        "card": str(CARD.relative_to(ROOT)), "dataset": cfg.dataset.name, "model": t.model,
        "clients": f.num_clients, "clients_per_round": f.round_size, "rounds": t.rounds,
        "partitioning": f.partitioning, "bias_h": f.bias_h if f.partitioning == "bias" else None,
        "local_steps": t.local_steps, "batch_size": t.batch_size, "lr": t.lr, "momentum": t.momentum,
        "weight_decay": t.weight_decay, "aggregator": f.aggregator.name, "attack": cfg.attack.type,
        "eval_every": t.eval_every, "client_cpus": cfg.execution.client_cpus,
        "threads_per_process": cfg.execution.num_threads, "execution": to_dict(cfg.execution),
        "lab_set": list(lab_set),
        "statistic": "median seconds per round over rounds 2..R-1 (round 1: start-up; round R: the "
                     "one central evaluation)",
    }


def steady(rows: list[dict[str, Any]], key: str = "round_seconds") -> list[float]:
    """`key` of rounds 2.. that were not centrally evaluated (metrics.jsonl or rounds.jsonl rows).

    Raises:
        SystemExit: no such round (fewer than 3 rounds).
    """
    values = [float(r[key]) for r in rows
              if int(r["round"]) >= 2 and r.get("accuracy") is None and r.get(key) is not None]
    if not values:
        raise SystemExit(f"no round >= 2 without central evaluation in {len(rows)} rows: use --rounds >= 3")
    return values


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Report:
    """The JSON result, rewritten after every part."""

    def __init__(self, path: Path | None, setting: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "torch": torch.__version__,
            "flwr": _version("flwr"), "byzfl": _version("byzfl"), "load_average": load(),
            "setting": setting, "lab": None, "plain_flower": None, "floor": None, "peers": {},
            "first_round": None, "breakdown": {}, "details": {},
        }

    def part(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one measurement; its result (with load before and after) goes under details[name]."""
        before, started = load(), time.monotonic()
        log.info("measuring %s (load %s)", name, before)
        detail = fn()
        detail.update({"load_before": before, "load_after": load(), "wall_s": round(time.monotonic() - started, 2)})
        self.data["details"][name] = detail
        self.data["load_average_end"] = load()
        return detail

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Paper scale: the Flower runs


def measure_lab(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    run_experiment(cfg, out)
    rows = read_jsonl(out / "metrics.jsonl")
    rounds = [r for r in rows if int(r["round"]) >= 1]
    median = statistics.median(steady(rows))
    # How the launcher ran it: several clients per message (lab.cohort) or one, from the run config
    # it handed to `flwr run` (absent key: one message per client).
    with open(out / "run_config.toml", "rb") as fh:
        per_message = int(tomllib.load(fh).get("cohort-size", 1))
    return {
        "round_s": median,
        "clients_per_message": per_message,
        "messages_per_round": math.ceil(cfg.federated.round_size / per_message),
        "aggregate_s": statistics.median(steady(rows, "aggregate_seconds")),
        "first_round_s": float(rounds[0]["round_seconds"]),
        # A second estimate of one evaluation, inside the run: the last round less a median round.
        "evaluation_in_run_s": float(rounds[-1]["round_seconds"]) - median,
        "round_seconds": [round(float(r["round_seconds"]), 3) for r in rounds],
        "aggregate_seconds": [round(float(r.get("aggregate_seconds") or 0.0), 4) for r in rounds],
    }


def measure_plain(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    rows = run_plain(cfg, out)
    rounds = [r for r in rows if int(r["round"]) >= 1]
    return {"round_s": statistics.median(steady(rows)),
            "round_seconds": [round(float(r["round_seconds"]), 3) for r in rounds]}


# --------------------------------------------------------------------------------------------
# Paper scale: the breakdown's own timings


def measure_evaluation(cfg: ExperimentConfig) -> dict[str, Any]:
    """One central evaluation as the recorder runs it (accuracy, loss, ASR with the card's trigger)."""
    set_threads(cfg.execution.num_threads)
    data = load_data(cfg.dataset, cfg.seed)
    model = build_for(cfg, data, seed=cfg.seed)
    trigger = make_trigger(cfg.attack.trigger, *data.image_shape[1:])
    model(data.test.x[:32])  # first-call set-up is not evaluation
    started = time.perf_counter()
    evaluate(model, data.test, trigger, cfg.dataset.target_class, cfg.dataset.source_class)
    return {"seconds": time.perf_counter() - started, "test_images": len(data.test)}


def measure_serialisation(cfg: ExperimentConfig) -> dict[str, Any]:
    """ArrayRecord <-> state dict round trips, scaled to one per client of a round."""
    from flwr.app import ArrayRecord

    set_threads(cfg.execution.num_threads)
    state = state_of(build_for(cfg, seed=cfg.seed))
    trips = min(cfg.federated.num_clients, 100)
    ArrayRecord(state).to_torch_state_dict()  # warm-up
    started = time.perf_counter()
    for _ in range(trips):
        ArrayRecord(state).to_torch_state_dict()
    per_trip = (time.perf_counter() - started) / trips
    return {"seconds": per_trip * cfg.federated.num_clients, "per_round_trip_s": per_trip, "trips_timed": trips,
            "params": ParamLayout.of(state).num_params}


# --------------------------------------------------------------------------------------------
# Paper scale: the driver


def paper_main(args: argparse.Namespace) -> int:
    lab_set = list(args.lab_set or [])
    skip = {s.strip() for s in (args.skip or "").split(",") if s.strip()}
    if skip - set(SKIPPABLE):
        raise SystemExit(f"--skip: unknown {sorted(skip - set(SKIPPABLE))}; known: {', '.join(SKIPPABLE)}")
    if args.rounds < 3:
        raise SystemExit("--paper-scale needs --rounds >= 3 (round 1 is start-up, round R evaluates)")
    cfg = paper_config(args.clients, args.rounds, lab_set)
    report = Report(Path(args.json) if args.json else None, describe(cfg, lab_set))
    report.save()
    data = report.data
    with tempfile.TemporaryDirectory(prefix="round-time-") as tmp:
        lab = report.part("lab", lambda: measure_lab(cfg, Path(tmp) / "lab"))
        data["lab"], data["first_round"] = lab["round_s"], lab["first_round_s"]
        workers = args.floor_workers or floor_workers(cfg, lab["clients_per_message"])
        data["setting"]["lab_clients_per_message"] = lab["clients_per_message"]
        data["setting"]["floor_workers"] = workers
        report.save()
        floor = report.part("floor", lambda: measure_floor(cfg, workers))
        data["floor"] = floor["round_s"]
        report.save()
        ev = report.part("evaluation", lambda: measure_evaluation(cfg))
        ser = report.part("serialisation", lambda: measure_serialisation(cfg))
        data["breakdown"] = {
            "training": floor["round_s"], "training_idle_cores": floor["idle_cores_round_s"],
            "serialisation": ser["seconds"], "aggregation": lab["aggregate_s"],
            "evaluation": ev["seconds"], "evaluation_in_run": lab["evaluation_in_run_s"],
            "messages": lab["round_s"] - floor["round_s"] - ser["seconds"] - lab["aggregate_s"],
            "evaluation_in_round": False,
        }
        report.save()
        if "plain" not in skip:
            plain = report.part("plain_flower", lambda: measure_plain(cfg, Path(tmp) / "plain"))
            data["plain_flower"] = plain["round_s"]
            report.save()
        if "peer" in skip:
            data["peers_note"] = "skipped (--skip peer)"
        else:
            try:
                peer = report.part("byzfl", lambda: measure_byzfl(cfg, Path(tmp) / "byzfl"))
                data["peers"]["byzfl"] = peer["round_s"]
            except Exception as exc:  # a peer's failure is a finding to record, not a reason to lose the rest
                log.exception("ByzFL peer failed")
                data["peers_note"] = f"byzfl failed: {type(exc).__name__}: {exc}"
        report.save()
    sys.stdout.write(json.dumps({k: data[k] for k in ("lab", "plain_flower", "floor", "peers", "first_round",
                                                      "breakdown")}, indent=2) + "\n")
    return 0


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments/no-attack.yaml"))
    parser.add_argument("--rounds", type=int, default=None, help="default: 12, or 4 with --paper-scale")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paper-scale", action="store_true", help="the FoundationFL Fashion-MNIST setting")
    parser.add_argument("--clients", type=int, default=100, help="--paper-scale: clients (all in every round)")
    parser.add_argument("--json", help="--paper-scale: write the result here (after every part)")
    parser.add_argument("--lab-set", action="append", metavar="KEY=VALUE",
                        help="--paper-scale: an extra experiment override, passed through (repeatable)")
    parser.add_argument("--skip", default="", help=f"--paper-scale: comma list of {', '.join(SKIPPABLE)}")
    parser.add_argument("--floor-workers", type=int, default=0,
                        help="--paper-scale: floor pool size (default: the lab's concurrent clients)")
    args = parser.parse_args(argv)
    # SIGTERM (`timeout`, kill PID) as an exception: the launch helpers' finally blocks then stop
    # the SuperLink and simulation processes they started, instead of leaving them behind.
    signal.signal(signal.SIGTERM, _terminated)
    lablog.configure()
    set_threads(1)
    if args.paper_scale:
        args.rounds = args.rounds or 4
        return paper_main(args)
    args.rounds = args.rounds or 12
    return compare_main(args)


if __name__ == "__main__":
    sys.exit(main())
