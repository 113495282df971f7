"""Gradient-inversion speed and quality, on the CPU (one thread) or a CUDA GPU.

    .venv/bin/python bench/inversion.py --device cpu --quick      # ~2 minutes
    .venv/bin/python bench/inversion.py --device cpu --out bench/inversion.json
    python3 bench/inversion.py --device cuda --out inversion-gpu.json   # GPU mode, ~4 minutes on an H200

Measures, for the digits CNN (lab "cnn", 1x28x28) and the CIFAR-style ResNet-18 (lab "resnet18",
3x32x32), both untrained: the milliseconds one Inverting-Gradients iteration costs (objective,
double backward and the Adam step) for 1 and 4 images, for a gradient (K=1) and a 5-step update;
restarts per second, sequential (autograd loop) against vectorised (torch.func.vmap); and the PSNR
reached after 1k and 2k iterations on the digits CNN. Times are minima over interleaved
repetitions (the box is shared). The reference (notes/inversion.md, a 97k-param
CNN): ~12 ms/iteration for one image, 16 ms for four, 44 ms for a 5-step update; vmap ~1.4x.

On a GPU (`--device cuda`, or `auto` where torch sees one) the same cases run for 1, 4, 16 and 64
images (`--images`), timed between CUDA synchronisations, and every row runs the vmap comparison;
a case that runs out of GPU memory is recorded, not fatal. The JSON is rewritten after every row,
so a run stopped at its time limit still leaves what it measured. Imports need torch, numpy,
scikit-learn, pyyaml, safetensors and tqdm, not Flower.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inversion import invert_entry  # noqa: E402
from inversion.optimizer import worth_vectorizing  # noqa: E402
from inversion.metrics import psnr, score  # noqa: E402
from inversion.objective import UpdateMatcher, model_at  # noqa: E402
from lab.capture import CapturedUpdate, probe_update  # noqa: E402
from lab.config import DatasetConfig  # noqa: E402
from lab.data import load_data  # noqa: E402
from lab.models import build_model  # noqa: E402
from lab.task import LocalHyperparams, pick_device  # noqa: E402

MODELS = {"cnn": (1, 28, 28), "resnet18": (3, 32, 32)}


def make_entry(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> CapturedUpdate:
    hp = LocalHyperparams(epochs=1, steps=steps, batch_size=len(y), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return CapturedUpdate({k: v.clone() for k, v in model.state_dict().items()}, probe_update(model, x, y, hp),
                          len(y), 1, 0, 0, hp, y, tuple(x.shape[1:]))


def images_for(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    shape = MODELS[name]
    if name == "cnn":
        d = load_data(DatasetConfig(), 0)
        return d.train.x[:n], d.train.y[:n], build_model(name, shape, 10, d.mean, d.std, seed=0)
    gen = torch.Generator().manual_seed(0)  # shapes and cost only: random images suffice
    x = torch.rand((n, *shape), generator=gen)
    y = torch.arange(n) % 10
    return x, y, build_model(name, shape, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def min_ms(*fns: Callable[[], Any], reps: int, warmup: int = 2, device: torch.device = torch.device("cpu"),
           per_timing: int = 1) -> list[float]:
    """Milliseconds per call of each fn: the minimum over `reps` interleaved timings.

    The box is shared (load 2-4 on 2 cores): the minimum, with the candidates interleaved so a
    burst of load hits both alike, is the stable estimate (the prototype's min-of-blocks). On a
    GPU each timing is `per_timing` calls between two synchronisations (the queue drains once).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_timing):
                fn()
            sync(device)
            best[i] = min(best[i], (time.perf_counter() - t0) / per_timing)
    return [1000 * b for b in best]


def iteration_fn(matcher: UpdateMatcher, restarts: int, n: int, shape: tuple[int, ...],
                 vectorize: bool) -> Callable[[], None]:
    """One full iteration for `restarts` restarts: objective + sign + Adam + box."""
    fn = matcher.vmap_fn() if vectorize else matcher.autograd_fn()
    z = torch.randn(restarts, n, *shape, generator=torch.Generator().manual_seed(0))
    z = z.to(matcher.target_flat.device).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.1)

    def iteration() -> None:
        gz, _, _ = fn(z.detach())
        z.grad = gz.sign()
        opt.step()
        with torch.no_grad():
            z.clamp_(-3, 3)

    return iteration


Emit = Callable[[str, dict[str, Any]], None]


def vmap_restarts(name: str, n: int, steps: int, quick: bool, gpu: bool) -> tuple[int, ...]:
    """Restart counts compared sequential vs vmap: every row on a GPU; on the CPU as before."""
    cases = (4, 8) if steps == 1 else (4,)
    return cases if gpu or name == "cnn" or (not quick and steps == 1 and n == 1) else ()


def failure(exc: RuntimeError) -> str:
    """A GPU case that failed (out of memory, say), in one line for the JSON."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def speed(args: argparse.Namespace, device: torch.device, emit: Emit) -> None:
    gpu = device.type == "cuda"
    for name in MODELS:
        if name == "resnet18" and args.skip_resnet:
            continue
        for n in args.images:
            x, y, model = images_for(name, n)
            for steps in (1, 5):
                slow = name == "resnet18" and (steps > 1 or args.quick)
                if gpu:  # timings of `per` iterations between synchronisations
                    big = name == "resnet18" and n >= 16
                    reps, per = (3, 3) if big or args.quick else (5, 5)
                else:
                    reps, per = (3 if slow else (5 if args.quick else 15)), 1
                entry = make_entry(model, x, y, steps).to(device)
                row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters()),
                                       "images": n, "steps": steps}
                try:
                    matcher = UpdateMatcher(entry, model_at(entry, model, device), y.to(device), tv=1e-2)
                    (ms,) = min_ms(iteration_fn(matcher, 1, n, MODELS[name], False), reps=reps, device=device,
                                   per_timing=per)
                    row["ms_per_iteration"] = round(ms, 2 if gpu else 1)
                    for r in vmap_restarts(name, n, steps, args.quick, gpu):
                        row[f"R{r}_auto_vmap"] = worth_vectorizing(n, steps, r, row["params"])
                        seq, vec = min_ms(iteration_fn(matcher, r, n, MODELS[name], False),
                                          iteration_fn(matcher, r, n, MODELS[name], True),
                                          reps=reps if gpu else max(3, reps // 2), device=device, per_timing=per)
                        row.update({f"R{r}_restarts_per_s_sequential": round(1000 * r / seq, 1),
                                    f"R{r}_restarts_per_s_vmap": round(1000 * r / vec, 1),
                                    f"R{r}_vmap_speedup": round(seq / vec, 2)})
                except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
                    if not gpu:
                        raise
                    row["error"] = failure(exc)
                finally:
                    matcher = None  # type: ignore[assignment]
                    if gpu:
                        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                emit("speed", row)


def quality(args: argparse.Namespace, device: torch.device, emit: Emit) -> None:
    d = load_data(DatasetConfig(), 0)
    model = build_model("cnn", d.image_shape, 10, d.mean, d.std, seed=0)
    picks = [0] if args.quick else [0, 1, 2]
    cases = [(1, 1, 4), (4, 1, 1), (1, 5, 1)] if not args.quick else [(1, 1, 4)]
    budgets = (1000,) if args.quick else (1000, 2000)
    for n, steps, restarts in cases:
        for it in budgets:
            if (n, steps) != (1, 1) and it > 1000:
                continue  # the expensive cases once, at 1k
            for start in picks:
                x, y = d.train.x[start * n : (start + 1) * n], d.train.y[start * n : (start + 1) * n]
                rec = invert_entry(make_entry(model, x, y, steps), model, preset="fast-cpu", labels="recovered",
                                   iterations=it, restarts=restarts, device=str(device))
                s = score(rec.images, x, rec.labels, y)
                emit("quality", {"images": n, "steps": steps, "iterations": it, "restarts": restarts, "sample": start,
                                 "psnr": round(float(s.psnr.mean()), 2), "ssim": round(float(s.ssim.mean()), 3),
                                 "grey_psnr": round(float(psnr(torch.full_like(x, 0.5), x).mean()), 2),
                                 "label_accuracy": s.label_accuracy, "seconds": round(rec.seconds, 1),
                                 "vectorized": bool(rec.stats["vectorized"])})


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": threads,
                            "python": sys.version.split()[0]}
    if device.type == "cuda":
        info.update({"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version(), "tf32_conv": torch.backends.cudnn.allow_tf32,
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): CUDA when torch sees a GPU, else the CPU")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, cases and images")
    parser.add_argument("--images", type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="image counts for the speed rows (default 1,4 on the CPU; 1,4,16,64 on a GPU)")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON here (rewritten after every row)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    args.images = args.images or ((1, 4, 16, 64) if device.type == "cuda" else (1, 4))
    torch.set_num_threads(args.threads)  # the box is shared: one thread is faster and stable
    result: dict[str, Any] = {**machine(device, args.threads), "speed": [], "quality": []}
    print(json.dumps({k: v for k, v in result.items() if k not in ("speed", "quality")}), flush=True)

    def emit(part: str, row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        result[part].append(row)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")

    if not args.skip_speed:
        speed(args, device, emit)
    if not args.skip_quality:
        quality(args, device, emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
