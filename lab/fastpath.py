"""The fastest correct CPU path for a model's step, chosen by a measured probe (issue 15).

The candidates are `lab.kernels.Plan`s (memory layout, oneDNN on or off, ReLU/max-pool order,
threads). Left out: `torch.compile`. Measured in a plain process (bench/kernels.py --compile,
cold inductor cache, load 4-10): 4-69 s to compile one model's training step, and the compiled
step was no faster (0.4-1.1x the plain one: these nets are a handful of oneDNN calls, nothing to
fuse), so it never pays, and the inductor needs a C++ compiler the client images do not promise.

`measure` runs every candidate from the same weights on the same batch. Its first step's outputs
(for training: the loss and every gradient) must match the default path's within `TOLERANCE`
(relative L2 error per tensor), or the candidate is rejected, as is one that raises. Survivors are
timed interleaved (best of several steps; the check step was the warm-up; clearly slower ones
are dropped early), and the fastest wins only when it beats
the default path by `MARGIN`: a gain inside the noise never changes the numbers. `Chooser` keeps
the result per process and, unless FL_LAB_KERNEL_CACHE=off, as JSON under a cache directory keyed
by torch version, CPU, model structure, input shape and threads, so a worker pays once.
FL_LAB_KERNELS=default turns the probe off (the plain path everywhere).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.kernels import DEFAULT, Plan, arrange, candidates, running
from lab.models import device_of

log = logging.getLogger(__name__)

# Relative L2 error per compared tensor. A reordered float32 sum is off by ~1e-6 (2 threads vs 1:
# 1.6e-6 on ResNet-18). The untrained ResNet-18's BatchNorm gradients are ill-conditioned (float32
# is 0.4% off float64 there) and its other kernels differ by 0.7-1.2%: rejected, it keeps the plain path.
TOLERANCE = 1e-4
MARGIN = 0.05  # a candidate must be this much faster than the default path to be chosen
BUDGET_S = 0.6  # wall time for the timing rounds of one probe (the correctness checks come on top)
MIN_ROUNDS, MAX_ROUNDS = 3, 10  # timed rounds per probe
SLOW_STEP_S = 0.2  # a default step slower than this: one timed round only (big models)
PRUNE = 1.3  # after a timed round, candidates this much slower than the best so far stop running
VERSION = 1  # part of every cache key: bump it when the candidates or the trials change
ENV_MODE = "FL_LAB_KERNELS"  # "default": no probe, the plain path
ENV_CACHE = "FL_LAB_KERNEL_CACHE"  # a directory for probe results, or "off"

Step = Callable[[], Sequence[Tensor]]  # one step; returns what must agree across plans
Trial = Callable[[Plan], Step]  # sets up one candidate on its own copy of the state


@dataclass(frozen=True)
class Probe:
    """What a probe measured: the chosen plan and the evidence (seconds are best-of per step)."""

    plan: Plan
    seconds: dict[str, float]  # label -> best step time, accepted candidates only
    rejected: dict[str, str]  # label -> why
    probe_seconds: float

    def speedup(self) -> float:
        """The yardstick's (the first plan's) step time over the chosen one's (1.0: it was kept)."""
        return next(iter(self.seconds.values())) / self.seconds[self.plan.label] if self.seconds else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"plan": dataclasses.asdict(self.plan), "seconds": self.seconds, "rejected": self.rejected,
                "probe_seconds": self.probe_seconds}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Probe:
        return cls(Plan(**raw["plan"]), {str(k): float(v) for k, v in raw["seconds"].items()},
                   {str(k): str(v) for k, v in raw["rejected"].items()}, float(raw["probe_seconds"]))


# -- the probe --------------------------------------------------------------------------------------

def mismatch(got: Sequence[Tensor], ref: Sequence[Tensor]) -> float:
    """Largest relative L2 error over paired tensors (inf on a shape or count mismatch or NaN)."""
    if len(got) != len(ref):
        return math.inf
    worst = 0.0
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            return math.inf
        diff = float(torch.linalg.vector_norm((a.float() - b.float()).flatten()))
        scale = float(torch.linalg.vector_norm(b.float().flatten()))
        err = diff / scale if scale > 0 else diff
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def by_threads(plans: Sequence[Plan]) -> dict[int | None, list[Plan]]:
    """Plans grouped by thread count, the caller's own (None) first, order kept within a group."""
    groups: dict[int | None, list[Plan]] = {None: []}
    for plan in plans:
        groups.setdefault(plan.threads, []).append(plan)
    return {k: v for k, v in groups.items() if v}


def measure(plans: Sequence[Plan], trial: Trial, *, budget_s: float = BUDGET_S, seed: int = 0) -> Probe:
    """Check each plan against `plans[0]` (the default path), time the equivalent ones, pick one.

    The global RNG is seeded the same for every candidate (dropout draws the same masks) and is
    restored afterwards: probing changes no caller's random stream.

    Raises:
        Exception: whatever the first plan's trial raises (the default path itself is broken).
    """
    start = time.perf_counter()
    steps: dict[Plan, Step] = {}
    rejected: dict[str, str] = {}
    ref: list[Tensor] = []
    first_s = 0.0  # the default path's first step
    with torch.random.fork_rng(devices=[]):
        for i, plan in enumerate(plans):
            try:
                torch.manual_seed(seed)
                step = trial(plan)
                with running(plan):
                    t0 = time.perf_counter()
                    out = [t.detach().clone(memory_format=torch.contiguous_format) for t in step()]
                    first_s = time.perf_counter() - t0 if i == 0 else first_s
            except Exception as exc:  # a kernel this CPU or layout lacks: reject, never crash
                if i == 0:
                    raise
                rejected[plan.label] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            err = 0.0 if i == 0 else mismatch(out, ref)
            if i == 0:
                ref = out
            if err > TOLERANCE:
                rejected[plan.label] = f"relative error {err:.2e} > tolerance {TOLERANCE:.0e}"
                continue
            steps[plan] = step
        if len(steps) == 1:  # every alternative was rejected: nothing to time
            return Probe(plans[0], {}, rejected, time.perf_counter() - start)
        best = {plan: math.inf for plan in steps}
        live = list(steps)
        min_rounds = MIN_ROUNDS if first_s < SLOW_STEP_S else 1  # ResNet-18: ~1 s a step here
        timing = time.perf_counter()
        for rounds in range(1, MAX_ROUNDS + 1):  # the check call above was each plan's warm-up
            if rounds > min_rounds and time.perf_counter() - timing > budget_s:
                break
            groups = by_threads(live)
            for threads, members in groups.items():
                with running(Plan(threads=threads)):
                    if len(groups) > 1:  # OpenMP re-forms its team on the first parallel region
                        steps[members[0]]()  # after a switch (~10 ms here): an untimed step absorbs it
                    for plan in members:
                        with running(plan):
                            t0 = time.perf_counter()
                            steps[plan]()
                            best[plan] = min(best[plan], time.perf_counter() - t0)
            # Drop the clearly slower ones: after one sample only the hopeless (2 x PRUNE: say an
            # oversubscribed thread count), then PRUNE on best-of-two. The default is the yardstick
            # and stays unless hopeless; one survivor ends the probe.
            lead = min(best[p] for p in live)
            live = [p for p in live
                    if best[p] <= (PRUNE if rounds >= 2 and p != plans[0] else 2 * PRUNE) * lead]
            if len(live) == 1:
                break
    default = plans[0]
    fastest = min(best, key=lambda p: best[p])
    chosen = fastest if best[fastest] < (1 - MARGIN) * best[default] else default
    return Probe(chosen, {p.label: best[p] for p in best}, rejected, time.perf_counter() - start)


# -- the training-step trial -------------------------------------------------------------------------

def training_trial(model: nn.Module, x: Tensor, y: Tensor, *, lr: float, momentum: float,
                   weight_decay: float) -> Trial:
    """One SGD step of cross-entropy on (x, y) for a copy of `model`; outputs: loss, gradients."""

    def setup(plan: Plan) -> Step:
        net = copy.deepcopy(model).train()
        forward = arrange(net, plan)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

        def step() -> list[Tensor]:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            opt.step()
            return [loss.detach(), *grads]

        return step

    return setup


# -- choosing once per process (and per machine) -----------------------------------------------------

def default_cache_dir() -> Path | None:
    """FL_LAB_KERNEL_CACHE (a directory, or "off"), else $XDG_CACHE_HOME/fl-lab/kernels."""
    env = os.environ.get(ENV_CACHE, "")
    if env == "off":
        return None
    if env:
        return Path(env)
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fl-lab" / "kernels"
    except RuntimeError:  # no home directory (a bare container user): this process only
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def model_signature(model: nn.Module) -> str:
    """A digest of the model's structure: its repr and each parameter's shape, dtype and trainability."""
    spec = repr(model) + repr([(k, tuple(p.shape), str(p.dtype), p.requires_grad) for k, p in model.named_parameters()])
    return hashlib.blake2b(spec.encode(), digest_size=10).hexdigest()


class Chooser:
    """Probe results by key: in memory for this process and, when `cache_dir()` gives a folder,
    as one JSON file per key there (written atomically; unreadable or stale files are re-probed)."""

    def __init__(self, cache_dir: Callable[[], Path | None] = default_cache_dir) -> None:
        self.cache_dir = cache_dir
        self.known: dict[str, Probe] = {}
        self.probes_run = 0

    def choose(self, key: dict[str, Any], plans: Sequence[Plan], trial: Trial, *, persist: bool = True) -> Probe:
        digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
        if digest in self.known:
            return self.known[digest]
        folder = self.cache_dir() if persist else None
        probe = self._load(folder / f"{digest}.json", key, plans) if folder else None
        if probe is None:
            probe = measure(plans, trial)
            self.probes_run += 1
            log.info("kernel probe %s: %s (%.2fx the default path), rejected %s, %.2f s", key.get("kind"),
                     probe.plan.label, probe.speedup(), sorted(probe.rejected) or "none", probe.probe_seconds)
            if folder:
                self._store(folder / f"{digest}.json", key, probe)
        self.known[digest] = probe
        return probe

    @staticmethod
    def _load(path: Path, key: dict[str, Any], plans: Sequence[Plan]) -> Probe | None:
        try:
            raw = json.loads(path.read_text())
            probe = Probe.from_json(raw["probe"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return probe if raw.get("key") == key and probe.plan in plans else None

    @staticmethod
    def _store(path: Path, key: dict[str, Any], probe: Probe) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "probe": probe.to_json()}, indent=1))
            os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        except OSError as exc:  # a read-only home must not stop training
            log.debug("kernel cache not written (%s): %s", path, exc)


# Per process by design ("paid once per worker"); tests pass their own Chooser instead.
PROCESS_CHOOSER = Chooser()


def probed_plan(kind: str, model: nn.Module, example: Tensor, plans: Sequence[Plan], trial: Trial, *,
                chooser: Chooser | None = None, **extra: Any) -> Plan:
    """The plan for steps of kind `kind` on `model` with inputs shaped like `example`: the default
    path off the CPU or with FL_LAB_KERNELS=default, else the probe's choice (cached under a key of
    kind, torch, CPU, model structure, input shape and dtype, threads and `extra`)."""
    if device_of(model).type != "cpu" or example.device.type != "cpu" or os.environ.get(ENV_MODE) == "default":
        return DEFAULT
    threads = torch.get_num_threads()
    key = {"kind": kind, "version": VERSION, "torch": torch.__version__, "cpu": cpu_name(),
           "isa": torch.backends.cpu.get_cpu_capability(), "model": model_signature(model),
           "input": list(example.shape), "dtype": str(example.dtype), "threads": threads, **extra}
    chooser = chooser or PROCESS_CHOOSER
    if threads > 1:
        # The thread count first, on the plain layout, then the layouts at the winner: the other
        # way, every layout would run oversubscribed too (a step 10-100x slower under load). More
        # than one thread is only right while cores are free: decided per process, never stored.
        pick = chooser.choose({**key, "axis": "threads"}, [DEFAULT, Plan(threads=1)], trial, persist=False)
        plans = [dataclasses.replace(p, threads=pick.plan.threads) for p in plans]
    return chooser.choose(key, plans, trial, persist=threads == 1).plan


def training_plan(model: nn.Module, x: Tensor, y: Tensor, *, lr: float, momentum: float, weight_decay: float,
                  chooser: Chooser | None = None) -> Plan:
    """The plan for SGD steps of `model` on batches shaped like `x` (B, C, H, W)."""
    trial = training_trial(model, x, y, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return probed_plan("train-step", model, x, candidates(model), trial, chooser=chooser)
