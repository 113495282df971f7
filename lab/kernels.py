"""Ways to run a model's step on the CPU that give the same numbers up to float rounding.

A `Plan` picks one value on each axis; `lab.fastpath` measures which plan is fastest.

- `channels_last`: NHWC activations and conv weights. oneDNN's convolutions and PyTorch's
  max-pool vectorise over channels in that layout (1.3-1.7x per training step for the small conv
  nets on this box's AVX-512 EPYC, one thread; bench/kernels.py).
- `onednn`: `torch.backends.mkldnn.enabled` on or off (off = ATen's own convolutions).
- `pool_first`: a ReLU followed by a max-pool runs as max-pool then ReLU. Both are monotone, so
  relu(max(x)) == max(relu(x)) exactly, and the gradient reaches the same arg-max with the same
  sign mask: bit-for-bit the same numbers, with the ReLU (and its backward) on a quarter of the
  memory. Module order, state-dict keys and values are untouched; only the call order changes.
- `threads`: where the caller asked for more than one thread, one thread is a candidate too
  (two OpenMP threads fighting another process for a core made a step 6x slower; here, at load
  4-5 on 2 cores, 2 threads ran 1.6-5x slower than 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise, product
from typing import Any

import torch
from torch import Tensor, nn

Forward = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Plan:
    """How to run a step; the default instance is the plain path."""

    channels_last: bool = False
    onednn: bool = True  # the DEFAULT plan leaves the process's own setting (normally on) alone
    pool_first: bool = False
    threads: int | None = None  # None: the caller's torch thread count

    @property
    def label(self) -> str:
        parts = ["channels-last" if self.channels_last else "nchw", "onednn" if self.onednn else "no-onednn"]
        parts += ["pool-first"] if self.pool_first else []
        parts += [f"{self.threads}-thread"] if self.threads is not None else []
        return "+".join(parts)


DEFAULT = Plan()


# -- applying a plan -------------------------------------------------------------------------------

@contextlib.contextmanager
def running(plan: Plan) -> Iterator[None]:
    """The plan's process-wide flags (oneDNN, threads) for the duration; restored afterwards.

    Assigning `torch.backends.mkldnn.enabled` rather than using `mkldnn.flags()`: the latter also
    sets oneDNN's TF32 switch, which warns on every entry in a CPU-only build.
    """
    if plan == DEFAULT:  # the plain path is whatever the process is set to: touch nothing
        yield
        return
    onednn, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = plan.onednn
    if plan.threads is not None and plan.threads != threads:
        torch.set_num_threads(plan.threads)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = onednn
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def chain(model: nn.Module) -> list[nn.Module] | None:
    """The leaves a plain (nested) nn.Sequential calls, in order; None for any other model or one
    with hooks on a Sequential, whose own forward must then run."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if type(model) is not nn.Sequential or any(getattr(model, h, None) for h in hooks):
        return None
    leaves: list[nn.Module] = []
    for child in model:
        inner = chain(child) if type(child) is nn.Sequential else [child]
        if inner is None:
            return None
        leaves += inner
    return leaves


def swappable(first: nn.Module, second: nn.Module) -> bool:
    """ReLU then max-pool (without returned indices): the pair pool_first may run the other way."""
    return type(first) is nn.ReLU and type(second) is nn.MaxPool2d and not second.return_indices


def pool_first_forward(leaves: list[nn.Module]) -> Forward:
    """The chain with every ReLU -> MaxPool2d pair called as MaxPool2d -> in-place ReLU (exact:
    both are monotone; in place is safe because max-pool's backward keeps its input and indices,
    not its output)."""
    calls: list[Callable[[Tensor], Tensor]] = []
    i = 0
    while i < len(leaves):
        if i + 1 < len(leaves) and swappable(leaves[i], leaves[i + 1]):
            calls += [leaves[i + 1], torch.relu_]
            i += 2
        else:
            calls.append(leaves[i])
            i += 1

    def forward(x: Tensor) -> Tensor:
        for call in calls:
            x = call(x)
        return x

    return forward


def arrange(model: nn.Module, plan: Plan) -> Forward:
    """Lay `model` out for `plan` (in place) and return the forward to call instead of it."""
    leaves = chain(model) if plan.pool_first else None
    forward: Forward = pool_first_forward(leaves) if leaves is not None else model
    if not plan.channels_last:
        return forward
    model.to(memory_format=torch.channels_last)
    inner = forward

    def nhwc(x: Tensor) -> Tensor:
        return inner(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return nhwc


@contextlib.contextmanager
def prepared(model: nn.Module, plan: Plan) -> Iterator[Forward]:
    """`model` arranged for `plan`, inside `running(plan)`; yields the forward to call. On exit the
    parameters are contiguous again (callers save them, and safetensors refuses strided tensors)."""
    forward = arrange(model, plan)
    try:
        with running(plan):
            yield forward
    finally:
        if plan.channels_last:
            model.to(memory_format=torch.contiguous_format)


def candidates(model: nn.Module) -> list[Plan]:
    """The default path first, then every combination of the layout axes that can matter for
    `model` (the thread count is probed on its own first: `lab.fastpath.probed_plan`)."""
    leaves = chain(model)
    convs = any(p.dim() == 4 for p in model.parameters())
    swaps = leaves is not None and any(swappable(a, b) for a, b in pairwise(leaves))
    axes = (
        (False, True) if convs else (False,),  # channels_last
        (True, False),  # onednn
        (False, True) if swaps else (False,),  # pool_first
    )
    return [Plan(*combo) for combo in product(*axes)]


def scoped(plan: Plan, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with every call inside `running(plan)` (for loops that are not one `with` block)."""
    if plan == DEFAULT:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        with running(plan):
            return fn(*args, **kwargs)

    return call
