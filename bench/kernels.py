"""CPU kernel speed: images/s of one training step per model, plain path vs the probed path.

    .venv/bin/python bench/kernels.py                        # ~30 s; writes bench/results/kernels.json
    .venv/bin/python bench/kernels.py --compile              # + torch.compile's cost (~1-2 min)
    .venv/bin/python bench/kernels.py --threads 2 --reps 40  # the probe then also weighs 1 thread

For each model (lab.models names, 1x28x28 inputs, 10 classes, batch 32, SGD momentum 0.9): the
probe `lab.fastpath` runs in a train_local (its choice, every candidate's best step time and the
rejected ones), then the plain path and the chosen path are timed interleaved, one SGD step per
timing, and reported as images/s (best and median over `--reps`). Next to them: the process's
fp32 matmul GFLOP/s (1024x1024 @ 1024x1024, best of 10) and each step's FLOPs counted by
torch.utils.flop_counter, so a model's images/s can be read against what the same process does
on a dense GEMM ("efficiency" = achieved step GFLOP/s over matmul GFLOP/s). The box is shared:
`uptime`'s load is recorded before and after, and the best-of figures are the stable ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.fastpath import Chooser, cpu_name, training_plan  # noqa: E402
from lab.kernels import DEFAULT, Plan, arrange, running  # noqa: E402
from lab.models import build_model  # noqa: E402

MODELS = ("fltrust-cnn", "lenet", "softmax", "cnn")  # "cnn" is the digits default
SHAPE, BATCH, CLASSES = (1, 28, 28), 32, 10


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def matmul_gflops(n: int = 1024, reps: int = 30) -> float:
    a, b = torch.rand(n, n), torch.rand(n, n)
    best = float("inf")
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_fn(model: torch.nn.Module, plan: Plan, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD step of a copy of `model` laid out for `plan` (run it inside `running(plan)`)."""
    net = copy.deepcopy(model).train()
    forward = arrange(net, plan)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    return step


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    net = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return int(counter.get_total_flops())


def time_plans(model: torch.nn.Module, plans: list[Plan], x: torch.Tensor, y: torch.Tensor,
               reps: int) -> list[list[float]]:
    """Seconds per step for each plan, interleaved (a burst of load hits all alike)."""
    steps = [step_fn(model, p, x, y) for p in plans]
    times: list[list[float]] = [[] for _ in plans]
    switch = any(p.threads is not None for p in plans)
    for r in range(reps + 3):
        for i, (plan, step) in enumerate(zip(plans, steps, strict=True)):
            with running(plan):
                if switch:  # the first step after a thread-count switch re-forms OpenMP's team
                    step()
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
            if r >= 3:  # three warm-up rounds
                times[i].append(dt)
    return times


def compile_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict[str, Any]:
    """torch.compile of the forward: seconds to the first compiled step (inductor's on-disk cache is
    pointed at a fresh folder in main(), so this is a cold compile, as in a new worker image), then
    the best step time after three more warm-up steps."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step(forward: Callable[[torch.Tensor], torch.Tensor]) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    try:
        fwd = torch.compile(net)
        first = step(fwd)
        for _ in range(3):
            step(fwd)
        best = min(step(fwd) for _ in range(reps))
    except Exception as exc:  # no C++ compiler, an inductor bug: recorded, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"compile_s": round(first, 2), "step_ms_best": round(1000 * best, 3)}


def bench_model(name: str, reps: int, with_compile: bool) -> dict[str, Any]:
    model = build_model(name, SHAPE, CLASSES, (0.5,), (0.25,), seed=0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(BATCH, *SHAPE, generator=gen), torch.randint(0, CLASSES, (BATCH,), generator=gen)
    chooser = Chooser(lambda: None)
    chosen = training_plan(model, x, y, lr=0.05, momentum=0.9, weight_decay=0.0, chooser=chooser)
    probes = list(chooser.known.values())  # [threads stage,] layouts at the chosen thread count
    times = time_plans(model, [DEFAULT, chosen], x, y, reps)
    flops = step_flops(model, x, y)
    row: dict[str, Any] = {
        "model": name, "params": sum(p.numel() for p in model.parameters()), "batch": BATCH,
        "step_gflop": round(flops / 1e9, 4), "chosen": chosen.label,
        "probe_seconds": round(sum(p.probe_seconds for p in probes), 3),
        "probe_ms": {k: round(1000 * v, 3) for p in probes for k, v in p.seconds.items()},
        "rejected": {k: v for p in probes for k, v in p.rejected.items()},
    }
    for label, ts in zip(("default", "chosen"), times, strict=True):
        row[f"{label}_ms_best"] = round(1000 * min(ts), 3)
        row[f"{label}_ms_median"] = round(1000 * statistics.median(ts), 3)
        row[f"{label}_images_per_s"] = round(BATCH / min(ts), 1)
        row[f"{label}_images_per_s_median"] = round(BATCH / statistics.median(ts), 1)
        row[f"{label}_step_gflops"] = round(flops / min(ts) / 1e9, 2)
    row["speedup_best"] = round(min(times[0]) / min(times[1]), 3)
    row["speedup_median"] = round(statistics.median(times[0]) / statistics.median(times[1]), 3)
    if with_compile:
        row["torch_compile"] = compile_cost(model, x, y, max(5, reps // 2))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compile:  # a cold inductor cache: what a fresh worker would pay
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    t0 = time.perf_counter()  # torch.optim's first use imports torch._dynamo (1.5-2.5 s here): any
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # trainer pays it, so not the probe
    optim_first_use = time.perf_counter() - t0
    before = load()
    gflops_before = matmul_gflops()
    rows = []
    for name in args.models:
        row = bench_model(name, args.reps, args.compile)
        rows.append(row)
        sys.stderr.write(f"{name}: {row['chosen']} {row['speedup_best']}x (best), "
                         f"{row['default_images_per_s']} -> {row['chosen_images_per_s']} images/s\n")
    # The process's matmul rate, best of before and after: contention only ever lowers it.
    gflops = max(gflops_before, matmul_gflops())
    for row in rows:
        row["images_per_s_per_matmul_gflops"] = round(row["chosen_images_per_s"] / gflops, 2)
        row["efficiency_default"] = round(row["default_step_gflops"] / gflops, 3)
        row["efficiency_chosen"] = round(row["chosen_step_gflops"] / gflops, 3)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
        "threads": args.threads, "cores": os.cpu_count(), "load_before": before,
        "matmul_gflops_1024_fp32": round(gflops, 1), "matmul_gflops_before": round(gflops_before, 1),
        "load_after": load(), "optim_first_use_s": round(optim_first_use, 2), "models": rows,
        "notes": "ms and images/s: one SGD step of batch 32 (forward, backward, update); best-of and "
                 "median over interleaved reps; probe_ms: the probe's own best-of per candidate",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stderr.write(f"matmul {gflops:.1f} GFLOP/s (before: {gflops_before:.1f}); "
                     f"load {before} -> {result['load_after']}; wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
