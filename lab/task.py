"""The one local training loop, shared by honest and malicious clients, the FLTrust server and the
unlearning tool; plus the model/weights plumbing every entry point needs.

Malicious behaviour plugs in through `poison` (a batch transform) and the caller's update
transform; the loop itself is never forked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.cohort import usable_cores
from lab.config import ExperimentConfig
from lab.data import DataBundle, Split, load_data
from lab.errors import ConfigError
from lab.fastpath import training_plan
from lab.kernels import prepared
from lab.models import build_model, device_of

BatchTransform = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class LocalHyperparams:
    """What a client needs to train locally; the server sends these every round."""

    epochs: int
    steps: int | None  # when set, exactly this many SGD steps (cycling through the data)
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float


    @classmethod
    def of(cls, cfg: ExperimentConfig) -> LocalHyperparams:
        t = cfg.training
        return cls(t.local_epochs, t.local_steps, t.batch_size, t.lr, t.momentum, t.weight_decay)

    def to_config(self) -> dict[str, int | float]:
        """Kebab-case keys for Flower's ConfigRecord (0 local steps = use epochs)."""
        return {"local-epochs": self.epochs, "local-steps": self.steps or 0, "batch-size": self.batch_size,
                "lr": self.lr, "momentum": self.momentum, "weight-decay": self.weight_decay}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> LocalHyperparams:
        steps = int(config["local-steps"])  # type: ignore[call-overload]
        return cls(
            epochs=int(config["local-epochs"]),  # type: ignore[call-overload]
            steps=steps or None,
            batch_size=int(config["batch-size"]),  # type: ignore[call-overload]
            lr=float(config["lr"]),  # type: ignore[arg-type]
            momentum=float(config["momentum"]),  # type: ignore[arg-type]
            weight_decay=float(config["weight-decay"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps
    steps: int
    examples: int  # samples the client trained on (its num-examples)
    batch: tuple[Tensor, Tensor] | None = None  # the one batch used, in fixed-batch mode


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from parts (Python's hash() of str is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_torch(seed: int) -> None:
    """Seed the generators that dropout and other implicit draws use: the CPU's, and CUDA's once
    CUDA is in use. `torch.manual_seed` does the same, but while CUDA is not initialised it queues
    lazy CUDA, XPU and MTIA seedings, each with a captured stack trace: ~1 ms a call, paid once per
    client per round (bench/RESULTS.md, issue 15)."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def set_threads(num_threads: int) -> None:
    """torch's intra-op threads, never more than the cores this process may use: an OpenMP thread
    without a core of its own spin-waits on the others (2 threads on 1 free core: a step 6x slower)."""
    num_threads = max(1, min(num_threads, usable_cores()))
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def pick_device(requested: str) -> torch.device:
    """The one place a device is chosen (`execution.device`, `--device`): "auto" is CUDA when
    torch sees a GPU, else the CPU; "cpu", "cuda" and "cuda:N" are taken as they are.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where torch sees no GPU.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                          "here; use auto or cpu")
    return device


def build_for(cfg: ExperimentConfig, data: DataBundle | None = None, seed: int | None = None) -> nn.Module:
    """The experiment's model on its device, normalised for its dataset (seeded init when given)."""
    data = data or load_data(cfg.dataset, cfg.seed)
    model = build_model(cfg.training.model, data.image_shape, data.num_classes, data.mean, data.std, seed)
    return model.to(pick_device(cfg.execution.device))


def state_of(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of the model's named tensors (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def load_state(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    return model


def batches(n: int, batch_size: int, gen: torch.Generator, steps: int | None, epochs: int) -> Iterator[Tensor]:
    """Index batches: `epochs` shuffled passes, or exactly `steps` batches when steps is set."""
    done = 0
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
            done += 1
            if steps is not None and done >= steps:
                return
        if steps is None and done >= epochs * ((n + batch_size - 1) // batch_size):
            return


def train_local(
    model: nn.Module,
    data: Split,
    hp: LocalHyperparams,
    gen: torch.Generator,
    poison: BatchTransform | None = None,
    fixed_batch: bool = False,
) -> TrainStats:
    """Plain local SGD (momentum, weight decay) on `data`; `poison` may rewrite each batch.

    With `fixed_batch` (a curious server's probe: "K steps on one batch of B"), one batch of
    `hp.batch_size` samples is drawn and poisoned once, then used for all `hp.steps` steps.

    On the CPU the steps run on `lab.fastpath`'s measured plan for this model and batch shape
    (memory layout, oneDNN, ReLU/pool order, threads: equal to the plain path within
    `fastpath.TOLERANCE`); the probe runs once per process on a copy and draws no random numbers.
    """
    if len(data) == 0:
        return TrainStats(loss=0.0, steps=0, examples=0)
    model.train()
    size = min(hp.batch_size, len(data))
    plan = training_plan(model, data.x[:size], data.y[:size], lr=hp.lr, momentum=hp.momentum,
                         weight_decay=hp.weight_decay)
    with prepared(model, plan) as forward:
        return _steps(model, forward, data, hp, gen, poison, fixed_batch)


def _steps(model: nn.Module, forward: Callable[[Tensor], Tensor], data: Split, hp: LocalHyperparams,
           gen: torch.Generator, poison: BatchTransform | None, fixed_batch: bool) -> TrainStats:
    """train_local's loop; `forward` is the model's forward under the chosen plan."""
    device = device_of(model)
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    total, steps, seen = 0.0, 0, 0
    fixed = None
    if fixed_batch:
        index = next(batches(len(data), hp.batch_size, gen, 1, 1))
        fixed = (data.x[index], data.y[index])
        if poison is not None:
            fixed = poison(*fixed, gen)
    schedule = ([None] * (hp.steps or hp.epochs) if fixed is not None
                else batches(len(data), hp.batch_size, gen, hp.steps, hp.epochs))
    for index in schedule:
        if fixed is not None:
            x, y = fixed
        else:
            x, y = data.x[index], data.y[index]
            if poison is not None:
                x, y = poison(x, y, gen)
        x, y = x.to(device), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
        seen += len(y)
    if fixed is not None:
        return TrainStats(loss=total / steps, steps=steps, examples=len(fixed[1]), batch=fixed)
    return TrainStats(loss=total / steps, steps=steps, examples=min(seen, len(data)) if hp.steps else len(data))
