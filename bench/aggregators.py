"""Speed and peak memory of every aggregation rule, side by side with Flower's built-ins.

Run:
    .venv/bin/python bench/aggregators.py --quick                 # d = 1e5, n in {10, 20, 50}
    .venv/bin/python bench/aggregators.py --n 20 --d 11200000     # the acceptance point
    .venv/bin/python bench/aggregators.py --out bench/aggregators.md   # full grid (heavy)
    .venv/bin/python bench/aggregators.py --end-to-end --n 20 --d 11200000 \
        --rules fedavg median trimmed-mean krum --json bench/results/aggregators-end-to-end.json

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

End to end (`--end-to-end`): replies in, new global ArrayRecord out, against Flower's whole
`aggregate_train`. Ours is the round as `RobustFedAvg.aggregate_train` runs it (flatten the global,
replies -> (n, d) matrix, rule, add, finiteness check, unflatten, ArrayRecord), with the matrix
built three ways: `old` (`Array.numpy()`, `ParamLayout.check`, `flatten_into`, isfinite, sub, norm),
`new` (`strategies.ingest.IngestPlan`, i.e. `ingest_into`, a fresh matrix per round) and `new-reuse` (the same into a
matrix kept across rounds: no page faults after the first); plus `wrapper`, the real
`RobustFedAvg.aggregate_train` as it stands. Replies come from distinct nodes (1000 + i) so the
wrapper's identity check accepts them all.
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
    "geomed": {},
    "centered-clipping": {},
    "rlr": {},
    "dnc": {"num_byzantine": "f"},
    "signguard": {},
    "nnm>median": {},  # COMPOSED: a pre-aggregator in front of a rule
    "bucketing>median": {},
    "freqfed": {},
    "fldetector": {},
    "deepsight": {"num_seeds": 1, "num_samples": 8},  # forward passes: (n + 1) x seeds x samples
    "multi-metrics": {},
}
# Rules whose round needs more than a random matrix (see `_our_call`): a real ResNet-18 layout
# (2-D weights to transform, an output layer, DeepSight's model forward) and d = its size, or
# rounds of history before the timed one (FLDetector: a full window of 10 pairs + 1).
MODEL_RULES = {"freqfed", "deepsight"}
WARM_ROUNDS = {"fldetector": 11}
# our rule -> the Flower built-in it is compared with
FLOWER_PEER = {
    "fedavg": "FedAvg",
    "median": "FedMedian",
    "trimmed-mean": "FedTrimmedAvg",
    "krum": "Krum",
    "multi-krum": "MultiKrum",
    "bulyan": "Bulyan",
}
# bench name -> (rule, federated.aggregator.pre); "f" in a pre's params is num_byzantine(n)
COMPOSED: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "nnm>median": ("median", [{"name": "nnm", "params": {"f": "f"}}]),
    "bucketing>median": ("median", [{"name": "bucketing", "params": {"s": 2}}]),
}
PHASES: list[dict[str, float]] = []  # worker only: CPU seconds per phase of each of our rounds, in call order
OUTPUT_LAYER = 512 * 10 + 10  # ResNet-18 fc on 10 classes: the last 5130 coordinates
NUM_ARRAYS = 62


def num_byzantine(n: int) -> int:
    return max(1, n // 10)


# ---------------------------------------------------------------------------------------------- worker


def _make_updates(n: int, d: int):
    import torch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, d, generator=g).mul_(0.01)
    u[: num_byzantine(n)] += 0.05
    return u


def _measure(run: Callable[[], Any], prepare: Callable[[], Any], repeats: int) -> dict[str, float]:
    from lab.cost import (
        measured,  # the same VmHWM reading the server's rule_peak_mb uses
    )

    arg = prepare()
    _, cost = measured(lambda: run(arg))
    first = cost.seconds
    peak_mb = float("nan") if cost.peak_mb is None else cost.peak_mb
    del arg
    times, cpu = [], []
    for _ in range(repeats):
        arg = prepare()
        t0, c0 = time.perf_counter(), time.process_time()
        run(arg)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # not counting the time other users' processes held the core
    return {"seconds": min(times) if times else first, "cpu_seconds": min(cpu) if cpu else float("nan"),
            "first": first, "peak_mb": peak_mb}


def worker(kind: str, name: str, n: int, d: int, repeats: int, num_arrays: int = NUM_ARRAYS) -> dict[str, float]:
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
        start = torch.zeros(d)
        if name in MODEL_RULES:
            ctx, u, start = _resnet_context(n)
            d = ctx.layout.num_params
        hp = {k: (f if v == "f" else v) for k, v in OURS[name].items()}
        rule, pre = COMPOSED.get(name, (name, []))
        pre = [{"name": p["name"], "params": {k: (f if v == "f" else v) for k, v in p["params"].items()}} for p in pre]
        agg = build_aggregator(rule, hp, ctx, pre=pre)
        g0 = u[f:].mean(0)  # a stand-in root-set update, computed outside the timing
        info = RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.full((n,), 100.0),
                         global_params=start, reference_update=lambda: g0)
        if name in WARM_ROUNDS:
            return _measure(_rounds_with_history(agg, u, WARM_ROUNDS[name]), lambda: u, repeats)
        return _measure(lambda x: agg(x, info), lambda: u, repeats)
    # Flower built-ins and our whole round, on reply messages
    import logging

    from flwr.serverapp import strategy as fs
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    build = _reply_builder(u, num_arrays)
    if kind != "flower":
        res = _measure(_our_round(kind, name, u, num_arrays), build, repeats)
        if kind != "wrapper":  # the phases of the fastest timed call (ingest, rule, output)
            timed = PHASES[1:] or PHASES
            res.update(min(timed, key=lambda p: sum(p.values())))
        return res
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


def _resnet_context(n: int) -> tuple[Any, Any, Any]:
    """A ResNet-18 (CIFAR, 10 classes) context with its model, a matrix of its size and its
    initial flat weights (the global model: BatchNorm variances must stay positive)."""
    import torch

    from lab.models import build_model
    from lab.records import ParamLayout
    from strategies.types import AggregatorContext, ModelSpec

    def net() -> torch.nn.Module:
        return build_model("resnet18", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, seed=0)

    state = net().state_dict()
    layout = ParamLayout.of(state)
    ctx = AggregatorContext(layout=layout, clients_per_round=n, seed=0, output_slice=layout.output_slice(),
                            model=ModelSpec(net, (3, 32, 32), 10))
    return ctx, _make_updates(n, layout.num_params), layout.flatten(state)


def _rounds_with_history(agg: Any, u: Any, warm: int) -> Callable[[Any], Any]:
    """Run `warm` rounds on rescaled copies of `u` (n, d) (the global model moving by each round's
    update), then return a callable that runs the next round on its argument: a stateful rule
    timed with its history."""
    import torch

    from strategies.types import RoundInfo

    n, d = u.shape
    state = {"round": 0, "global": torch.zeros(d)}

    def step(x: Any) -> Any:
        state["round"] += 1
        info = RoundInfo(server_round=state["round"], client_ids=tuple(range(n)),
                         num_examples=torch.full((n,), 100.0), global_params=state["global"])
        out = agg(x, info)
        state["global"] = state["global"] + out.update
        return out

    for k in range(warm):
        step(u * (1.0 + 0.01 * k * torch.linspace(-1.0, 1.0, n)[:, None]))  # rows drift apart
    return step


def _cuts(d: int, num_arrays: int):
    import numpy as np

    return np.linspace(0, d, num_arrays + 1).astype(np.int64)


def _reply_builder(u: Any, num_arrays: int) -> Callable[[], list[Any]]:
    """Replies carrying global + U_i (global = 0, so exactly U_i), split into `num_arrays` arrays,
    reply i from node 1000 + i claiming partition i."""
    from flwr.app import (
        Array,
        ArrayRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )

    un = u.numpy()
    n, d = un.shape
    cuts = _cuts(d, num_arrays)

    def build() -> list[Message]:
        out = []
        for i in range(n):
            instr = Message(RecordDict(), dst_node_id=1000 + i, message_type=MessageType.TRAIN)
            w = un[i]  # a view: Array() serialises it
            rec = ArrayRecord({f"layer{k}": Array(w[cuts[k] : cuts[k + 1]]) for k in range(num_arrays)})
            metrics = MetricRecord({"num-examples": 100, "partition-id": i})
            out.append(Message(content=RecordDict({"arrays": rec, "metrics": metrics}), reply_to=instr))
        return out

    return build


def _our_round(kind: str, name: str, u: Any, num_arrays: int) -> Callable[[list[Any]], Any]:
    """One of our rounds over reply messages (see the module docstring, End to end)."""
    import math

    import torch
    from flwr.app import ArrayRecord

    from lab.records import ParamLayout
    from strategies.flower import RobustFedAvg, to_tensors
    from strategies.ingest import IngestPlan, UpdateMatrix
    from strategies.registry import build_aggregator
    from strategies.types import AggregatorContext, RoundInfo

    n, d = u.shape
    f = num_byzantine(n)
    cuts = _cuts(d, num_arrays)
    glob = {f"layer{k}": torch.zeros(int(cuts[k + 1] - cuts[k])) for k in range(num_arrays)}
    layout = ParamLayout.of(glob)
    hp = {k: (f if v == "f" else v) for k, v in OURS.get(name, {}).items()}
    ctx = AggregatorContext(layout=layout, clients_per_round=n, seed=0, output_slice=None)
    rule = build_aggregator(name, hp, ctx) if name in OURS else None
    if kind == "wrapper":
        assert rule is not None
        wrapper = RobustFedAvg(rule, layout, clients_per_round=n, num_clients=n, train_config={})
        wrapper._global = glob  # what configure_train would have remembered

        def whole(msgs: list[Any]) -> Any:
            new, _ = wrapper.aggregate_train(1, msgs)
            assert new is not None, "the wrapper refused the round"
            return new

        return whole

    def old(arrays: Any, row: torch.Tensor, global_flat: torch.Tensor) -> float:
        state = to_tensors(arrays)
        layout.check(state)
        layout.flatten_into(state, row)
        if not bool(torch.isfinite(row).all()):
            raise AssertionError("non-finite")
        row.sub_(global_flat)
        norm = float(row.norm())
        assert math.isfinite(norm)
        return norm

    plan = IngestPlan.of(layout)  # once per layout, as the wrapper would in __init__

    def new(arrays: Any, row: torch.Tensor, global_flat: torch.Tensor) -> float:
        return plan(arrays, global_flat, row)

    path = kind.split("-")[1]  # ingest-old, ingest-new, ingest-new-reuse, e2e-many, e2e-many-reuse, ...
    ingest = {"old": old, "new": new, "many": None}[path]
    kept = UpdateMatrix(layout.num_params)  # new-reuse: the matrix a server keeps across rounds

    def matrix(rows: int) -> torch.Tensor:
        return kept.rows(rows) if kind.endswith("-reuse") else torch.empty((rows, layout.num_params))

    def one_round(msgs: list[Any]) -> Any:
        t0 = time.process_time()
        global_flat = layout.flatten(glob)
        updates = matrix(len(msgs))
        records = [msg.content.array_records["arrays"] for msg in msgs]
        if ingest is None:
            assert all(isinstance(r, float) for r in plan.ingest_many(records, global_flat, updates))
        else:
            for i, arrays in enumerate(records):
                ingest(arrays, updates[i], global_flat)
        t1 = time.process_time()
        if rule is None:  # ingest only
            PHASES.append({"ingest_cpu": t1 - t0})
            return updates
        info = RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.full((n,), 100.0),
                         global_params=global_flat)
        new_flat = global_flat.add_(rule(updates, info).update)
        t2 = time.process_time()
        assert bool(torch.isfinite(new_flat).all())
        out = ArrayRecord(layout.unflatten(new_flat, glob))
        PHASES.append({"ingest_cpu": t1 - t0, "rule_cpu": t2 - t1, "output_cpu": time.process_time() - t2})
        return out

    return one_round


# ---------------------------------------------------------------------------------------------- driver


def run_case(kind: str, name: str, n: int, d: int, repeats: int, timeout: float,
             num_arrays: int = NUM_ARRAYS) -> dict[str, float] | None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, name, str(n), str(d), str(repeats),
           str(num_arrays)]
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
            ingest = run_case("ingest-new", "ingest", n, d, repeats, timeout)
            fl_s = floor["seconds"] if floor else None
            lines.append(f"\n### n = {n}, d = {d:,} (update matrix {matrix_mb:.0f} MB, f = {num_byzantine(n)})\n")
            lines.append(f"Floor `updates.sum(0)`: {fmt_s(fl_s)}. "
                         f"Replies -> matrix (`strategies.ingest`, not in the rule times; see --end-to-end): "
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


END_TO_END = {  # kind -> column title
    "e2e-old": "ours, old ingest",
    "e2e-new-reuse": "ours, ingest per reply, kept matrix",
    "e2e-many": "ours, ingest_many, fresh matrix",
    "e2e-many-reuse": "ours, ingest_many, kept matrix",
    "wrapper": "RobustFedAvg as is",
}
INGESTS = ("ingest-old", "ingest-new", "ingest-new-reuse", "ingest-many", "ingest-many-reuse")


def bench_end_to_end(ns: Sequence[int], ds: Sequence[int], rules: Sequence[str], repeats: int, timeout: float,
                     num_arrays: int) -> tuple[str, list[dict[str, Any]]]:
    """Replies -> new global, ours (each ingest) against Flower's whole `aggregate_train`."""
    lines: list[str] = []
    records: list[dict[str, Any]] = []
    for d in ds:
        for n in ns:
            lines += _end_to_end_block(n, d, rules, repeats, timeout, num_arrays, records)
    head = ("# End-to-end aggregation: replies in, new global ArrayRecord out\n\nOne thread everywhere; "
            "time = best of the timed calls after a warm-up; peak extra = VmHWM growth over the first call "
            "beyond the inputs (see bench/aggregators.py, End to end).\n")
    return head + "\n".join(lines) + "\n", records


def _end_to_end_block(n: int, d: int, rules: Sequence[str], repeats: int, timeout: float, num_arrays: int,
                      records: list[dict[str, Any]]) -> list[str]:
    matrix_mb = n * d * 4 / 2**20
    sys.stderr.write(f"== end to end: n={n} d={d} arrays={num_arrays}\n")

    def case(kind: str, name: str) -> dict[str, float] | None:
        res = run_case(kind, name, n, d, repeats, timeout, num_arrays)
        records.append({"n": n, "d": d, "arrays": num_arrays, "kind": kind, "rule": name,
                        "matrix_mb": round(matrix_mb, 1), "load": _load(), **(res or {"failed": True})})
        sys.stderr.write(f"  {kind} {name}: {res}\n")
        return res

    def cell(res: dict[str, float] | None) -> str:
        if res is None:
            return "n/a"
        part = f" [{fmt_s(res['ingest_cpu'] + res['rule_cpu'])}]" if "rule_cpu" in res else ""
        return f"{fmt_s(res['seconds'])} / {fmt_s(res['cpu_seconds'])}{part}, {res['peak_mb'] / matrix_mb:.2f}x"

    lines = [f"\n### n = {n}, d = {d:,}, {num_arrays} arrays per reply (matrix {matrix_mb:.0f} MB)\n"]
    lines.append("Each cell: best wall time / best CPU time of the process (what other users' load on the shared "
                 "cores does not inflate) [ours: CPU time of ingest + rule, without the output ArrayRecord], "
                 "peak extra memory as a multiple of the matrix (the replies, 1.0x more, are the input and not "
                 "counted). `new`: `IngestPlan` one reply at a time; `many`: `IngestPlan.ingest_many`; "
                 "`reuse`/kept: the matrix is an `UpdateMatrix` kept across rounds.\n")
    ing = {k: case(k, "ingest") for k in INGESTS}
    lines.append("Replies -> matrix only: " + "; ".join(f"{k.removeprefix('ingest-')} {cell(v)}"
                                                         for k, v in ing.items()) + ".\n")
    lines.append("| rule | " + " | ".join(END_TO_END.values()) + " | Flower | Flower / ours (ingest_many, kept): "
                 "CPU, whole round [ingest + rule] |")
    lines.append("|---" * (len(END_TO_END) + 3) + "|")
    for rule in rules:
        res = {k: case(k, rule) for k in END_TO_END}
        peer = FLOWER_PEER.get(rule)
        theirs = case("flower", peer) if peer else None
        ours = res["e2e-many-reuse"]
        ratio = (f"{theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}x "
                 f"[{theirs['cpu_seconds'] / (ours['ingest_cpu'] + ours['rule_cpu']):.2f}x]"
                 if theirs and ours else "-")
        lines.append("| " + " | ".join([rule, *(cell(res[k]) for k in END_TO_END),
                                         f"{peer} {cell(theirs)}" if peer else "-", ratio]) + " |")
        sys.stderr.write(lines[-1] + "\n")
    return lines


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 1e5 only (smoke run)")
    p.add_argument("--n", type=int, nargs="*", help="clients per round (default 10 20 50)")
    p.add_argument("--d", type=int, nargs="*", help="parameters (default 100000 11200000)")
    p.add_argument("--rules", nargs="*", default=list(OURS), choices=list(OURS))
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--out", type=Path, help="also write the markdown table here")
    p.add_argument("--end-to-end", action="store_true", help="replies -> new global, ours vs Flower's whole round")
    p.add_argument("--arrays", type=int, default=NUM_ARRAYS, help="arrays per reply (end to end)")
    p.add_argument("--json", type=Path, help="end to end: also write every case's numbers here")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, name, n, d, reps, arrays = args.worker
        print(json.dumps(worker(kind, name, int(n), int(d), int(reps), int(arrays))))
        return 0
    ds = args.d or ([100_000] if args.quick else [100_000, 11_200_000])
    ns = args.n or [10, 20, 50]
    repeats = args.repeats if args.repeats is not None else (5 if max(ds) <= 1_000_000 else 2)
    if args.end_to_end:
        table, records = bench_end_to_end(ns, ds, args.rules, repeats, args.timeout, args.arrays)
        if args.json:
            args.json.write_text(json.dumps(records, indent=1) + "\n")
    else:
        table = bench(ns, ds, args.rules, repeats, args.timeout)
    sys.stdout.write(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
