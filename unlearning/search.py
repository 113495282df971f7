"""A second look when the located box fails the server's check: search mask and pattern near it.

Seed 9 of the 40-round default (bench/RESULTS.md, issue 16): its poisoned reconstructions were the
poorest of the set and showed the trigger faint and a pixel off, so the consensus box (3x2, IoU 0.22
with the true 4x4) sent 1.5 % of the server's clean images to the target and the server's check
refused it, rightly. The reconstructions still said WHERE to look. Here the server optimises a soft
mask and a pattern inside a window around that box, Neural Cleanse-style (Wang et al., IEEE S&P
2019: the smallest mask and a pattern that send clean images to the target, an L1 penalty on the
mask), on its own clean images and model only.

A search can also find a natural adversarial patch: on the digits, a 7x7 window on the digit itself
flips ~30 % of the images to any target, on a clean model too (measured: the no-attack model flips
0.29 there, 0.00 in the corners). So a found mask counts only when it flips clearly more than the
same search run in the window's three mirror images (left-right, up-down, both): a backdoor's
corner is anomalous, a digit's centre is not. The caller still applies its flip-rate floor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lab.triggers import Trigger
from unlearning.family import flip_rates, frozen, non_target
from unlearning.trigger import target_margin

Box = tuple[int, int, int, int]  # (top, left, height, width)


@dataclass(frozen=True)
class Searched:
    trigger: Trigger  # hard (0/1) mask inside the window, the optimised pattern there
    window: Box
    flip_rate: float  # of the server's non-target clean images, with the hard mask
    control_flip_rates: tuple[float, ...]  # the same search in the mirrored windows
    ratio: float  # flip_rate must be at least this many times the best control to count

    @property
    def box(self) -> Box | None:
        """The mask's bounding box (None: the search kept no pixel)."""
        return self.trigger.box if bool(self.trigger.mask.any()) else None

    @property
    def anomalous(self) -> bool:
        return self.box is not None and self.flip_rate > self.ratio * max(self.control_flip_rates, default=0.0)

    def summary(self) -> dict[str, object]:
        return {"box": list(self.box) if self.box else None, "window": list(self.window),
                "flip_rate": round(self.flip_rate, 4),
                "control_flip_rates": [round(f, 4) for f in self.control_flip_rates],
                "anomalous": self.anomalous}


def window_around(box: Box, grow: int, height: int, width: int) -> Box:
    top, left, h, w = box
    t, lft = max(0, top - grow), max(0, left - grow)
    return t, lft, min(height, top + h + grow) - t, min(width, left + w + grow) - lft


def mirrors(window: Box, height: int, width: int) -> list[Box]:
    """The window reflected left-right, up-down and both (duplicates of itself left out)."""
    top, left, h, w = window
    right, low = width - left - w, height - top - h  # the window's left / top edge once reflected
    flipped = {(top, right, h, w), (low, left, h, w), (low, right, h, w)}
    return sorted(flipped - {window})


def fit_mask(model: nn.Module, pool: Tensor, target: int, window: Box, *, steps: int = 200, lr: float = 0.1,
             l1: float = 0.03) -> Trigger:
    """Adam on sigmoid(mask) inside `window` and sigmoid(pattern): the target margin (capped at 5,
    so images already flipped stop pulling) minus `l1` x the mask's size; then the mask > 0.5."""
    _, channels, height, width = pool.shape
    inside = torch.zeros(height, width)
    top, left, h, w = window
    inside[top : top + h, left : left + w] = 1
    mask_logit = torch.zeros(height, width, requires_grad=True)
    pattern_logit = torch.zeros(channels, height, width, requires_grad=True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr)
    with frozen(model):
        for _ in range(steps):
            mask = torch.sigmoid(mask_logit) * inside
            logits = model(pool * (1 - mask) + mask * torch.sigmoid(pattern_logit))
            loss = -target_margin(logits, target).clamp(max=5.0).mean() + l1 * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    hard = ((torch.sigmoid(mask_logit) * inside) > 0.5).float().detach()
    return Trigger(hard, torch.sigmoid(pattern_logit).detach() * hard)  # pattern (C, H, W), as refine_pattern's


def _flip(model: nn.Module, trigger: Trigger, pool: Tensor, target: int) -> float:
    """`flip_rates` of one trigger; an empty mask flips nothing."""
    return float(flip_rates(model, [trigger], pool, target)[0]) if bool(trigger.mask.any()) else 0.0


def search_near(model: nn.Module, box: Box, clean: Tensor, target: int, *, grow: int = 2, steps: int = 200,
                ratio: float = 3.0) -> Searched:
    """Fit a mask in the window `grow` px around `box`, and in its mirror images as controls.

    clean: (M, C, H, W) the server's clean images; those the model already calls `target` are left out.
    """
    pool = non_target(model, clean, target)
    height, width = clean.shape[-2:]
    window = window_around(box, grow, height, width)
    found = fit_mask(model, pool, target, window, steps=steps)
    controls = tuple(_flip(model, fit_mask(model, pool, target, w, steps=steps), pool, target)
                     for w in mirrors(window, height, width))
    return Searched(found, window, _flip(model, found, pool, target), controls, ratio)
