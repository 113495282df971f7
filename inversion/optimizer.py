"""Inverting Gradients: optimisation-based reconstruction from a captured gradient or FedAvg update.

Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020 ("Inverting Gradients - How easy is it to
break privacy in federated learning?"). Signed Adam (lr 0.1) on the cosine + TV objective of
`inversion.objective`, MultiStepLR x0.1 at 3/8, 5/8 and 7/8 of the iterations, projection onto the
[0, 1] pixel box after every step, R random restarts scored by their gradient loss. As in breaching
(the authors' successor library) each restart keeps its best iterate, not its last one.

All restarts advance in lockstep on one (R, B, C, H, W) tensor: Adam, sign and the box are
elementwise, so this is the same as R independent runs, and it lets the R gradients come from one
torch.func.vmap call where that pays (`worth_vectorizing`).

On a GPU everything (model copy, entry, candidates, best iterates) lives on the device from the
start; the loop reads nothing back except the progress callback's loss, every
`progress_every(device)` iterations, and the result comes back to the CPU once at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from inversion.labels import LABEL_SOURCES, count_images
from inversion.objective import ObjectiveFn, UpdateMatcher, model_at
from inversion.types import Progress, Reconstruction
from lab.capture import CapturedUpdate
from lab.errors import ConfigError
from lab.fastpath import probed_plan
from lab.kernels import DEFAULT, Plan, candidates, scoped
from lab.task import pick_device

log = logging.getLogger(__name__)

PROBE_MIN_ITERATIONS = 200  # shorter runs skip the kernel probe (see `objective_plan`)


@dataclass(frozen=True)
class IGConfig:
    """Hyperparameters of the attack (lr and TV are in the model's normalised input space)."""

    iterations: int
    restarts: int
    tv: float
    lr: float = 0.1
    signed: bool = True
    lr_decay: bool = True
    vectorize: Literal["auto", "on", "off"] = "auto"  # auto: see `worth_vectorizing`
    seed: int = 0
    image_shape: tuple[int, int, int] | None = None  # (C, H, W); None = the entry's
    device: str = "auto"  # lab.task.pick_device: auto = CUDA when torch sees a GPU, else the CPU

    def __post_init__(self) -> None:
        problems = []
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1, got {self.iterations}")
        if self.restarts < 1:
            problems.append(f"restarts must be >= 1, got {self.restarts}")
        if self.tv < 0 or self.lr <= 0:
            problems.append(f"need tv >= 0 and lr > 0, got tv={self.tv}, lr={self.lr}")
        if self.vectorize not in ("auto", "on", "off"):
            problems.append(f"vectorize must be auto, on or off, got {self.vectorize!r}")
        if problems:
            raise ConfigError(problems)


IG_PRESETS: dict[str, IGConfig] = {
    # The paper's CLI setting (24k iterations, TV 1e-4, one restart): sized for GPUs and deep nets.
    "paper": IGConfig(iterations=24_000, restarts=1, tv=1e-4),
    # The prototype on this 2-core CPU: 1k-2k iterations suffice on small nets, TV 1e-3..1e-2 beat
    # 1e-4 (1e-2 was best for batches, FedAvg updates and trained nets, and on the lab's digits,
    # which are smooth upsampled 8x8 images), and restarts scored by gradient loss pay off
    # (run-to-run spread was 25-38 dB).
    "fast-cpu": IGConfig(iterations=1_500, restarts=4, tv=1e-2),
    "dry-run": IGConfig(iterations=1, restarts=1, tv=1e-3),
}


def ig_config(preset: str, **overrides: Any) -> IGConfig:
    """The preset with `overrides` applied (None values are ignored, so CLI defaults pass through).

    Raises:
        ConfigError: unknown preset or override name, or an invalid value.
    """
    if preset not in IG_PRESETS:
        raise ConfigError(f"unknown inverting-gradients preset {preset!r}; known: {sorted(IG_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(IGConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown inverting-gradients parameter(s) {unknown}; known: {sorted(fields)}")
    return dataclasses.replace(IG_PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def milestones(iterations: int) -> list[int]:
    """LR decay points at 3/8, 5/8 and 7/8 of the run (the paper's T/2.667, T/1.6, T/1.142)."""
    return [max(1, int(iterations * f)) for f in (3 / 8, 5 / 8, 7 / 8)]


def progress_every(device: torch.device) -> int:
    """Iterations between progress reports (and non-finite checks): reading the loss back from a
    GPU waits for its queue to drain, which costs more than a small model's iteration; on the CPU
    it is free, so every iteration reports."""
    return 1 if device.type == "cpu" else 50


def worth_vectorizing(num_images: int, steps: int, restarts: int, num_params: int,
                      device: torch.device | str = "cpu") -> bool:
    """Whether vmap over restarts beats the autograd loop (bench/inversion.py, 1 thread, shared box).

    Digits CNN (106k parameters), one local step: 1.3-1.5x restarts/second for B=4 (R=4, 8) but
    only 1.0-1.1x for B=1 at R=4 and 1.05-1.5x at R=8 (our autograd loop is already ~3x faster
    than the prototype's, so vmap's fixed overhead weighs more). Unrolled 5-step updates: 0.7-1.2x,
    not reliably better. ResNet-18 (11M parameters): 0.6x. Hence: one step, a small model and at
    least 8 images in flight.

    On the CPU vmap pays only by batching restarts whose own batches are small (issue 15,
    measured 2026-11-30, load ~3): R >= 4 with B <= 8 gave 1.1-1.7x (B=4 R=16: 1.64x, B=8 R=4:
    1.1x), but two restarts lose at any B (B=4, 8, 16 at R=2: 0.94x, 0.78x, 0.90x) and 16+
    images per restart lose at any R (0.6-1.0x, bench/RESULTS.md "Inversion on a GPU"). So the
    CPU also needs R >= 4 and B <= 8. A GPU keeps the rule above until the H200 run says where
    its cap lies.
    """
    small_enough = steps == 1 and restarts >= 2 and restarts * num_images >= 8 and num_params <= 1_000_000
    if torch.device(device).type != "cpu":
        return small_enough
    return small_enough and restarts >= 4 and num_images <= 8


def make_objective(matcher: UpdateMatcher, vectorize: bool) -> ObjectiveFn:
    return matcher.vmap_fn() if vectorize else matcher.autograd_fn()


def objective_plan(matcher: UpdateMatcher, z: Tensor, vectorize: bool, iterations: int) -> Plan:
    """`lab.fastpath`'s measured CPU plan for this objective at restarts x images `z` (R, B, C, H, W):
    conv-weight layout, oneDNN on or off, threads. Its ReLU/pool reordering does not apply here
    (functional_call runs the model's own forward). Below PROBE_MIN_ITERATIONS iterations the
    probe's ~40 objective calls cannot pay back, so short runs keep the default path."""
    if iterations < PROBE_MIN_ITERATIONS:
        return DEFAULT
    plans = [p for p in candidates(matcher.model) if not p.pool_first]

    def setup(plan: Plan) -> Callable[[], list[Tensor]]:
        fn = make_objective(matcher.laid_out(plan.channels_last), vectorize)
        return lambda: list(fn(z))  # (grad wrt z, gradient loss, objective) must all agree

    return probed_plan("inversion-objective", matcher.model, z, plans, setup,
                       backend="vmap" if vectorize else "autograd", steps=matcher.schedule.steps)


class InvertingGradients:
    """`reconstruct(entry, model)` with the configured labels source and number of images."""

    name = "inverting-gradients"

    def __init__(self, config: IGConfig, *, labels: str = "recovered", num_images: int | None = None,
                 progress: Progress | None = None) -> None:
        if labels not in LABEL_SOURCES:
            raise ConfigError(f"unknown labels source {labels!r}; known: {sorted(LABEL_SOURCES)}")
        self.config = config
        self.labels = labels
        self.num_images = num_images
        self.progress = progress

    def reconstruct(self, target: CapturedUpdate, model: nn.Module) -> Reconstruction:
        """Optimise R restarts of B candidate images; return the best restart's best iterate.

        Ctrl-C (KeyboardInterrupt) stops the optimisation and returns the best images so far
        with `interrupted=True`.

        Raises:
            CaptureError: the entry does not fit the model, or labels='known' without labels.
            ValueError: the image shape is unknown (neither in the entry nor in the config).
        """
        cfg = self.config
        start = time.perf_counter()
        device = pick_device(cfg.device)
        target = target.to(device)
        net = model_at(target, model, device)
        n = count_images(target, self.num_images)
        labels = LABEL_SOURCES[self.labels](target, net, n).to(device)
        shape = cfg.image_shape or target.image_shape
        if shape is None:
            raise ValueError("the image shape is unknown: the capture entry has no image_shape; "
                             "pass image_shape=(C, H, W)")
        matcher = UpdateMatcher(target, net, labels, cfg.tv)
        vectorize = cfg.vectorize == "on" or (cfg.vectorize == "auto" and worth_vectorizing(
            n, matcher.schedule.steps, cfg.restarts, int(matcher.target_flat.numel()), device))

        gen = torch.Generator().manual_seed(cfg.seed)  # drawn on the CPU: the same start on every device
        lo = ((0.0 - matcher.mean) / matcher.std).unsqueeze(0)  # (1, 1, C, 1, 1) box in z space
        hi = ((1.0 - matcher.mean) / matcher.std).unsqueeze(0)
        z = torch.randn((cfg.restarts, n, *shape), generator=gen).to(device)  # paper: randn in model space
        z = torch.maximum(torch.minimum(z, hi), lo).requires_grad_(True)
        plan = objective_plan(matcher, z.detach(), vectorize, cfg.iterations)
        objective = scoped(plan, make_objective(matcher.laid_out(plan.channels_last), vectorize))
        opt = torch.optim.Adam([z], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=milestones(cfg.iterations) if cfg.lr_decay else [], gamma=0.1)

        best_loss = torch.full((cfg.restarts,), math.inf, device=device)  # (R,)
        best_z = z.detach().clone()  # (R, B, C, H, W)
        dead_at = torch.full((), -1, dtype=torch.int64, device=device)  # first all-non-finite iteration
        every = progress_every(device)
        done, interrupted = 0, False
        try:
            for i in range(cfg.iterations):
                gz, rec, _total = objective(z.detach())  # rec, total: (R,) at the current iterate
                finite = torch.isfinite(rec) & torch.isfinite(gz).flatten(1).all(dim=1)  # (R,)
                better = finite & (rec < best_loss)
                best_loss = torch.where(better, rec, best_loss)
                best_z = torch.where(better.view(-1, 1, 1, 1, 1), z.detach(), best_z)  # no sync, unlike best_z[better]
                dead_at = torch.where((dead_at < 0) & ~finite.any(), i, dead_at)
                done += 1
                if done % every == 0 or done == cfg.iterations:
                    # One read-back per report: past a dead iteration nothing improves best_z, so
                    # stopping late returns the same images; `done` is set back to it.
                    if int(dead_at) >= 0:
                        done = int(dead_at) + 1
                        log.warning("objective is not finite for every restart; stopping at %d", done)
                        break
                    if self.progress is not None:
                        self.progress(done, float(best_loss.min()))
                gz = torch.where(finite.view(-1, 1, 1, 1, 1), gz, torch.zeros_like(gz))
                z.grad = gz.sign() if cfg.signed else gz
                opt.step()
                sched.step()
                with torch.no_grad():
                    z.copy_(torch.maximum(torch.minimum(z, hi), lo))
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted after %d iterations; returning the best iterate so far", done)

        best_loss = best_loss.cpu()  # the one read-back of the results
        winner = int(best_loss.argmin())
        images = (best_z[winner] * matcher.std + matcher.mean).clamp(0.0, 1.0).cpu()
        labels = labels.cpu()
        seconds = time.perf_counter() - start
        log.info("inverting-gradients: B=%d K=%d R=%d %s on %s (%s), %d iterations, loss %.4f, %.1f s",
                 n, matcher.schedule.steps, cfg.restarts, "vmap" if vectorize else "autograd", device,
                 plan.label, done, float(best_loss[winner]), seconds)
        return Reconstruction(
            images=images.detach(), labels=labels, loss=float(best_loss[winner]), iterations=done,
            seconds=seconds, restart_losses=tuple(float(v) for v in best_loss), interrupted=interrupted,
            attack=self.name, stats={"vectorized": float(vectorize), "tv": cfg.tv, "restarts": cfg.restarts},
        )
