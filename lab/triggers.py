"""Pixel-pattern triggers: a mask and a pattern stamped onto [0, 1] images.

stamp(x) = (1 - mask) * x + mask * pattern, applied to every channel (Gu et al. 2017, BadNets;
the ClipAvg study's 3x3 white square in a corner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lab.config import TriggerConfig


@dataclass(frozen=True)
class Trigger:
    mask: Tensor  # (H, W) float in {0, 1}
    pattern: Tensor  # (H, W) float in [0, 1]

    def stamp(self, x: Tensor) -> Tensor:
        """Stamped copy of `x` (..., C, H, W); the input is not modified."""
        m = self.mask.to(x.dtype)
        return x * (1 - m) + m * self.pattern.to(x.dtype)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the mask's bounding box."""
        rows = torch.nonzero(self.mask.sum(1)).flatten()
        cols = torch.nonzero(self.mask.sum(0)).flatten()
        top, left = int(rows[0]), int(cols[0])
        return top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1


def make_trigger(cfg: TriggerConfig, height: int, width: int) -> Trigger:
    s, m = cfg.size, cfg.margin
    if s + m > min(height, width):
        raise ValueError(f"trigger size {s} + margin {m} does not fit a {height}x{width} image")
    top = {"top": m, "bottom": height - m - s, "center": (height - s) // 2}[cfg.position.split("-")[0]]
    left = {"left": m, "right": width - m - s, "center": (width - s) // 2}[cfg.position.split("-")[-1]]
    patch = torch.ones(s, s)
    if cfg.shape == "checkerboard":
        patch = ((torch.arange(s)[:, None] + torch.arange(s)[None, :]) % 2 == 0).float()
    elif cfg.shape == "cross":
        patch = torch.zeros(s, s)
        patch[s // 2, :] = 1
        patch[:, s // 2] = 1
    mask = torch.zeros(height, width)
    mask[top : top + s, left : left + s] = 1.0
    pattern = torch.zeros(height, width)
    # Checkerboard/cross: the off cells are stamped black, so the pattern is visible on any image.
    pattern[top : top + s, left : left + s] = patch * cfg.value
    return Trigger(mask, pattern)
