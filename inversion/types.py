"""What every inversion attack returns, and the protocol an attack implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from lab.capture import CapturedUpdate

Progress = Callable[[int, float], None]  # progress(iteration, best gradient loss so far)


@dataclass(frozen=True)
class Reconstruction:
    """Reconstructed images and how they were found.

    `images` is (B, C, H, W) in pixel space, inside the [0, 1] box; `labels` (B,) int64 are the
    labels the attack used (known or recovered). `loss` is the gradient-matching loss of the
    returned images (lower is better; 0 for the analytic attack), `restart_losses` the best loss
    of each restart, `interrupted` True when Ctrl-C stopped the optimisation early.
    """

    images: Tensor
    labels: Tensor
    loss: float
    iterations: int
    seconds: float
    restart_losses: tuple[float, ...] = ()
    interrupted: bool = False
    attack: str = ""
    stats: dict[str, float] = field(default_factory=dict)


class InversionAttack(Protocol):
    def reconstruct(self, target: CapturedUpdate, model: nn.Module) -> Reconstruction: ...
