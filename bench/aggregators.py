"""Speed and peak memory of every aggregation rule, side by side with Flower's built-ins.

Run:
    .venv/bin/python bench/aggregators.py --quick                 # d = 1e5, n in {10, 20, 50}
    .venv/bin/python bench/aggregators.py --n 20 --d 11200000     # the acceptance point
    .venv/bin/python bench/aggregators.py --out bench/aggregators.md   # full grid (heavy)

Every (rule, n, d) case runs in a fresh subprocess with one thread everywhere (torch, OpenMP,
OpenBLAS, MKL), so cases do not share allocator state and the numbers are comparable on a shared
machine. Inputs are identical for all rules of a case: U = 0.01 * randn(n, d) from a fixed seed,
with f = max(1, n // 10) rows shifted by +0.05 (the "attackers"); Flower's strategies get the same
rows as replies carrying global + U_i, split into 62 arrays like a ResNet-18 state dict, and
`num-examples` = 100 each.

Time: the first call is a warm-up (it also measures memory); then the best of `--repeats`
timed calls (best-of, because other users share the cores). Flower's replies are rebuilt before
every call outside the timed region, since FedMedian and FedTrimmedAvg pop arrays out of them.

Peak memory: torch's CPU allocator has no statistics and tracemalloc does not see it, so the
worker reads the kernel's peak resident set (VmHWM in /proc/self/status). After the inputs are
built it resets the peak (writing 5 to /proc/self/clear_refs) and reports VmHWM - VmRSS over the
first call: the extra memory the rule needed beyond its inputs, shown in MB and as a multiple
of the update matrix (n * d * 4 bytes). Our rules get the (n, d) matrix; Flower's get the reply
messages (their own copies of the weights are part of their cost, as in a real server).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

OURS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "krum": {"num_byzantine": "f"},
    "multi-krum": {"num_byzantine": "f"},
    "median": {},
    "trimmed-mean": {"beta": 0.2},
    "bulyan": {"num_byzantine": "f"},
    "foolsgold": {},
    "fl-defender": {},
    "fltrust": {},
    "norm-clip": {"max_norm": 1.0, "noise_std": 0.001},
    "rfout-1d": {},
    "iqr-filter": {},
    "clip-avg": {"clip_gamma": 1.0, "clip_decay": 0.5},
    "clip-avg-iqr": {"clip_gamma": 1.0, "clip_decay": 0.5},
    "flame": {},
}
# our rule -> the Flower built-in it is compared with
FLOWER_PEER = {
    "fedavg": "FedAvg",
    "median": "FedMedian",
    "trimmed-mean": "FedTrimmedAvg",
    "krum": "Krum",
    "multi-krum": "MultiKrum",
    "bulyan": "Bulyan",
}
OUTPUT_LAYER = 512 * 10 + 10  # ResNet-18 fc on 10 classes: the last 5130 coordinates
NUM_ARRAYS = 62


def num_byzantine(n: int) -> int:
    return max(1, n // 10)


# ---------------------------------------------------------------------------------------------- worker


def _mem_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make_updates(n: int, d: int):  # noqa: ANN202
    import torch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, d, generator=g).mul_(0.01)
    u[: num_byzantine(n)] += 0.05
    return u


def _measure(run: Callable[[], Any], prepare: Callable[[], Any], repeats: int) -> dict[str, float]:
    arg = prepare()
    base = _mem_kb("VmRSS")
    exact = _reset_peak()
    run_arg = arg
    t0 = time.perf_counter()
    run(run_arg)
    first = time.perf_counter() - t0
    peak_kb = _mem_kb("VmHWM") - base if exact else float("nan")
    del run_arg
    times = []
    for _ in range(repeats):
        arg = prepare()
        t0 = time.perf_counter()
        run(arg)
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times) if times else first, "first": first, "peak_mb": peak_kb / 1024}


def worker(kind: str, name: str, n: int, d: int, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    u = _make_updates(n, d)
    f = num_byzantine(n)
    if kind == "floor":
        return _measure(lambda x: x.sum(0), lambda: u, repeats)
    if kind == "ours":
        from lab.records import ParamLayout
        from strategies.registry import build_aggregator
        from strategies.types import AggregatorContext, RoundInfo

        layout = ParamLayout.of({"body": torch.zeros(d - OUTPUT_LAYER), "fc.weight": torch.zeros(OUTPUT_LAYER)})
        ctx = AggregatorContext(layout=layout, clients_per_round=n, seed=0,
                                output_slice=slice(d - OUTPUT_LAYER, d))
        hp = {k: (f if v == "f" else v) for k, v in OURS[name].items()}
        agg = build_aggregator(name, hp, ctx)
        g0 = u[f:].mean(0)  # a stand-in root-set update, computed outside the timing
        info = RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.full((n,), 100.0),
                         global_params=torch.zeros(d), reference_update=lambda: g0)
        return _measure(lambda x: agg(x, info), lambda: u, repeats)
    # Flower built-ins on reply messages
    import logging

    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import strategy as fs
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    un = u.numpy()
    glob = np.zeros(d, dtype=np.float32)  # global = 0 so replies carry exactly U (no extra rounding)
    cuts = np.linspace(0, d, NUM_ARRAYS + 1).astype(np.int64)
    instr = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)

    def build() -> list[Message]:
        out = []
        for i in range(n):
            w = glob + un[i]
            rec = ArrayRecord({f"layer{k}": Array(w[cuts[k] : cuts[k + 1]]) for k in range(NUM_ARRAYS)})
            metrics = MetricRecord({"num-examples": 100, "partition-id": i})
            out.append(Message(content=RecordDict({"arrays": rec, "metrics": metrics}), reply_to=instr))
        return out

    if kind == "ingest":
        # what our wrapper adds on top of a rule: validated replies -> (n, d) float32 update matrix
        from lab.records import ParamLayout
        from strategies.flower import RobustFedAvg, RoundDecisions
        from strategies.mean import weighted_mean

        layout = ParamLayout.of({f"layer{k}": glob[cuts[k] : cuts[k + 1]] for k in range(NUM_ARRAYS)})
        wrapper = RobustFedAvg(weighted_mean, layout, clients_per_round=n, num_clients=n, train_config={})
        global_flat = torch.from_numpy(glob)

        def ingest(msgs: list[Message]) -> Any:
            return wrapper._accept(msgs, RoundDecisions(1), global_flat)[0]

        return _measure(ingest, build, repeats)
    strategies = {
        "FedAvg": lambda: fs.FedAvg(),
        "FedMedian": lambda: fs.FedMedian(),
        "FedTrimmedAvg": lambda: fs.FedTrimmedAvg(beta=0.2),
        "Krum": lambda: fs.Krum(num_malicious_nodes=f),
        "MultiKrum": lambda: fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f),
        "Bulyan": lambda: fs.Bulyan(num_malicious_nodes=f),
    }
    strat = strategies[name]()
    return _measure(lambda msgs: strat.aggregate_train(1, msgs), build, repeats)


# ---------------------------------------------------------------------------------------------- driver


def run_case(kind: str, name: str, n: int, d: int, repeats: int, timeout: float) -> dict[str, float] | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, name, str(n), str(d), str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"{kind} {name} n={n} d={d}: timed out after {timeout:.0f} s\n")
        return None
    if proc.returncode != 0:
        sys.stderr.write(f"{kind} {name} n={n} d={d}: failed\n{proc.stderr[-2000:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_s(x: float | None) -> str:
    return "n/a" if x is None else (f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s")


def bench(ns: Sequence[int], ds: Sequence[int], rules: Sequence[str], repeats: int, timeout: float) -> str:
    lines = []
    for d in ds:
        for n in ns:
            matrix_mb = n * d * 4 / 2**20
            sys.stderr.write(f"== n={n} d={d}\n")
            floor = run_case("floor", "sum", n, d, repeats, timeout)
            ingest = run_case("ingest", "ingest", n, d, repeats, timeout)
            fl_s = floor["seconds"] if floor else None
            lines.append(f"\n### n = {n}, d = {d:,} (update matrix {matrix_mb:.0f} MB, f = {num_byzantine(n)})\n")
            lines.append(f"Floor `updates.sum(0)`: {fmt_s(fl_s)}. "
                         f"Replies -> matrix (our wrapper's ingest, not in the rule times): "
                         f"{fmt_s(ingest['seconds'] if ingest else None)}.\n")
            lines.append("| rule | ours | x floor | peak extra (x matrix) | Flower | Flower peak extra (x matrix) | speed-up |")
            lines.append("|---|---|---|---|---|---|---|")
            for rule in rules:
                ours = run_case("ours", rule, n, d, repeats, timeout)
                peer = FLOWER_PEER.get(rule)
                theirs = run_case("flower", peer, n, d, repeats, timeout) if peer else None
                o_s = ours["seconds"] if ours else None
                t_s = theirs["seconds"] if theirs else None
                row = [
                    rule,
                    fmt_s(o_s),
                    f"{o_s / fl_s:.1f}" if o_s and fl_s else "n/a",
                    f"{ours['peak_mb']:.0f} MB ({ours['peak_mb'] / matrix_mb:.2f})" if ours else "n/a",
                    f"{peer} {fmt_s(t_s)}" if peer else "-",
                    f"{theirs['peak_mb']:.0f} MB ({theirs['peak_mb'] / matrix_mb:.2f})" if theirs else "-",
                    f"{t_s / o_s:.1f}x" if o_s and t_s else "-",
                ]
                lines.append("| " + " | ".join(row) + " |")
                sys.stderr.write(lines[-1] + "\n")
    head = ("# Aggregator benchmark\n\nOne thread everywhere; time = best of the timed calls after a warm-up; "
            "peak extra = VmHWM growth over the first call beyond the inputs (see bench/aggregators.py).\n")
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 1e5 only (smoke run)")
    p.add_argument("--n", type=int, nargs="*", help="clients per round (default 10 20 50)")
    p.add_argument("--d", type=int, nargs="*", help="parameters (default 100000 11200000)")
    p.add_argument("--rules", nargs="*", default=list(OURS), choices=list(OURS))
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, name, n, d, reps = args.worker
        print(json.dumps(worker(kind, name, int(n), int(d), int(reps))))
        return 0
    ds = args.d or ([100_000] if args.quick else [100_000, 11_200_000])
    ns = args.n or [10, 20, 50]
    repeats = args.repeats if args.repeats is not None else (5 if max(ds) <= 1_000_000 else 2)
    table = bench(ns, ds, args.rules, repeats, args.timeout)
    sys.stdout.write(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
