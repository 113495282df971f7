"""Triggers: a mask and a pattern stamped onto [0, 1] images.

stamp(x) = (1 - mask) * x + mask * pattern, applied to every channel. A 0/1 mask is a pixel
pattern (Gu et al. 2017, BadNets; the ClipAvg study's 3x3 white square in a corner); a constant
mask alpha over a full-image pattern is a blended trigger, x' = alpha * pattern + (1 - alpha) * x
(Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
arXiv:1712.05526). `Trigger.parts(k)` splits a trigger into DBA's k local triggers (Xie et al.,
ICLR 2020), whose union is the global one. Which trigger an attack type uses: `lab.attack_triggers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lab.config import TriggerConfig

# The blended pattern is fixed, so the attackers and the server's evaluation draw the same one.
BLEND_PATTERN_SEED = 20171215


@dataclass(frozen=True)
class Trigger:
    mask: Tensor  # (H, W) float in [0, 1]: 1 replaces the pixel, alpha in (0, 1) blends
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

    def parts(self, k: int) -> tuple[Trigger, ...]:
        """DBA's k local triggers: the mask's pixels in row-major order, cut into k contiguous runs
        (row bands when k divides the rows), each with the global pattern. They are disjoint and
        their union is this trigger.

        Raises:
            ValueError: k < 1, or more parts than the mask has pixels.
        """
        on = torch.nonzero(self.mask.flatten()).flatten()  # (P,) flat indices of the mask's pixels
        if not 1 <= k <= len(on):
            raise ValueError(f"cannot split a {len(on)}-pixel trigger into {k} parts")
        out = []
        for chunk in torch.tensor_split(on, k):
            mask = torch.zeros_like(self.mask).flatten()
            mask[chunk] = self.mask.flatten()[chunk]
            out.append(Trigger(mask.view_as(self.mask), self.pattern))
        return tuple(out)


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


def blended_trigger(height: int, width: int, alpha: float) -> Trigger:
    """Chen et al.'s blended injection with a random-noise key: a fixed uniform pattern over the
    whole image, blended at opacity `alpha`."""
    gen = torch.Generator().manual_seed(BLEND_PATTERN_SEED)
    return Trigger(torch.full((height, width), float(alpha)), torch.rand(height, width, generator=gen))
