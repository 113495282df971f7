"""Recover a backdoor trigger from the curious server's reconstructions (never from the truth).

Two steps, both using only what the server has: the final global model, the reconstructions and
its held-out clean set.

1. *Localisation by occlusion* (Zeiler & Fergus 2014, "Visualizing and Understanding
   Convolutional Networks"; the trigger-occlusion probe of the reference prototype, notes/
   inversion.md §5.3). For every reconstruction the model classifies as the backdoor target, an
   s x s occluder filled with the clean set's mean image is slid over every position; the
   position where the target margin (target logit minus the best other logit) falls most is
   where the trigger sits. Several sizes are tried; per image the smallest size whose best
   occlusion flips the prediction away from the target wins (a larger patch always hides more,
   so "largest drop" alone would prefer the biggest occluder). The located boxes then vote
   (`agreeing`): a reconstruction that fires because it really shows the target class puts its
   box on the digit, away from the others. Without a majority (a tie, or two boxes apart) every
   group is estimated and the server's flip rate on its clean images picks one (`candidate_groups`).
2. *Mask and pattern by consensus.* Inside the union of the located boxes (dilated by one pixel),
   a pixel belongs to the trigger when the median over the firing reconstructions of
   |recon - clean mean| (channel mean) exceeds `threshold`: a trigger is the same pixels in every
   poisoned image, unlike the digit underneath. The mask is the filled bounding box of those
   pixels (Neural Cleanse's mask + pattern parametrisation, Wang et al., IEEE S&P 2019), the
   pattern the per-pixel median of the reconstructions inside it.

The true trigger enters only through `score_against`, which measures what was found (IoU of the
boxes, pattern error) and is labelled as scoring everywhere it is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lab.errors import LabError
from lab.metrics import predict
from lab.triggers import Trigger

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # (top, left, height, width)


class TriggerNotFound(LabError):
    """No reconstruction fires the target, or occlusion finds no trigger region."""


@dataclass(frozen=True)
class Localisation:
    """Where occlusion put the trigger in one reconstruction."""

    index: int  # row in the reconstruction batch
    box: Box
    size: int  # occluder side in pixels
    margin_before: float  # target logit minus the best other logit, unoccluded
    margin_after: float  # the same with the box occluded (< 0: the prediction flipped)
    predicted_after: int  # class predicted with the box occluded (the image's "true" class)

    @property
    def flipped(self) -> bool:
        return self.margin_after < 0


@dataclass(frozen=True)
class RecoveredTrigger:
    """The trigger as found from reconstructions.

    `trigger.mask` is (H, W) in {0, 1}; `trigger.pattern` is (C, H, W) in [0, 1] (it broadcasts
    like lab's (H, W) patterns in `Trigger.stamp`).
    """

    trigger: Trigger
    used: tuple[int, ...]  # reconstruction rows the estimate comes from
    localisations: tuple[Localisation, ...]
    server_flip_rate: float  # share of clean, non-target server images the recovered trigger sends to target
    stats: dict[str, Any] = field(default_factory=dict)
    median: Tensor | None = None  # (C, H, W) the used reconstructions' per-pixel median

    @property
    def box(self) -> Box:
        return self.trigger.box

    def summary(self) -> dict[str, Any]:
        top, left, h, w = self.box
        m = self.trigger.mask.bool()
        pattern = self.trigger.pattern[:, m]  # (C, n_mask)
        return {
            "box": {"top": top, "left": left, "height": h, "width": w},
            "mask_pixels": int(m.sum()),
            "pattern_mean": [round(float(v), 4) for v in pattern.mean(1)],
            "pattern": [[round(float(v), 3) for v in row] for row in
                        self.trigger.pattern.mean(0)[top : top + h, left : left + w]],
            "used_reconstructions": list(self.used),
            "localisations": [
                {"index": loc.index, "box": list(loc.box), "occluder": loc.size, "flipped": loc.flipped,
                 "margin_before": round(loc.margin_before, 4), "margin_after": round(loc.margin_after, 4),
                 "predicted_occluded": loc.predicted_after}
                for loc in self.localisations
            ],
            "server_flip_rate": self.server_flip_rate,
            **self.stats,
        }


def target_margin(logits: Tensor, target: int) -> Tensor:
    """(N,) target logit minus the largest other logit; < 0 means the target is not predicted."""
    others = logits.clone()
    others[:, target] = float("-inf")
    return logits[:, target] - others.max(1).values


def occlusion_map(model: nn.Module, image: Tensor, fill: Tensor, size: int, target: int,
                  stride: int = 1, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Target margin with an s x s box replaced by `fill`, at every box position.

    Args:
        image: (C, H, W) in [0, 1].
        fill: (C, H, W) what an occluded pixel becomes (the clean set's mean image).

    Returns:
        margins (P, Q) and predicted classes (P, Q) for the box whose top-left corner is
        (i * stride, j * stride); P = (H - size) // stride + 1, likewise Q.
    """
    _, h, w = image.shape
    tops = range(0, h - size + 1, stride)
    lefts = range(0, w - size + 1, stride)
    masks = torch.zeros(len(tops), len(lefts), h, w)
    for i, t in enumerate(tops):
        for j, left in enumerate(lefts):
            masks[i, j, t : t + size, left : left + size] = 1
    masks = masks.flatten(0, 1).unsqueeze(1)  # (P*Q, 1, H, W)
    occluded = image * (1 - masks) + fill * masks  # (P*Q, C, H, W)
    logits = predict(model, occluded, batch_size)
    return (target_margin(logits, target).view(len(tops), len(lefts)),
            logits.argmax(1).view(len(tops), len(lefts)))


def localise(model: nn.Module, image: Tensor, fill: Tensor, target: int, sizes: tuple[int, ...],
             index: int = 0) -> Localisation:
    """The trigger box in one reconstruction: smallest occluder size that flips the target.

    Without any flip, the size and position with the lowest occluded margin are returned (and
    `flipped` is False).
    """
    before = float(target_margin(predict(model, image[None]), target)[0])
    best: Localisation | None = None
    for s in sorted(sizes):
        if s > min(image.shape[-2:]):
            continue
        margins, preds = occlusion_map(model, image, fill, s, target)
        flat = int(margins.argmin())
        i, j = divmod(flat, margins.shape[1])
        loc = Localisation(index, (i, j, s, s), s, before, float(margins[i, j]), int(preds[i, j]))
        if loc.flipped:
            return loc
        if best is None or loc.margin_after < best.margin_after:
            best = loc
    if best is None:
        raise TriggerNotFound(f"no occluder size in {sizes} fits a {tuple(image.shape[-2:])} image")
    return best


def default_sizes(height: int, width: int) -> tuple[int, ...]:
    """Occluder sides from ~7 % to ~25 % of the image side (2, 3, 4, 5, 7 at 28 px)."""
    side = min(height, width)
    return tuple(sorted({max(1, round(side * f)) for f in (0.07, 0.11, 0.14, 0.18, 0.25)}))


def recover_trigger(
    model: nn.Module,
    images: Tensor,
    clean: Tensor,
    target: int,
    *,
    sizes: tuple[int, ...] | None = None,
    threshold: float = 0.25,
    relative: float = 0.75,
    dilate: int = 1,
) -> RecoveredTrigger:
    """Estimate the trigger's mask and pattern from reconstructions that fire the target.

    Args:
        model: the final (backdoored) global model; [0, 1] inputs.
        images: (N, C, H, W) reconstructions in [0, 1].
        clean: (M, C, H, W) the server's clean images; their mean is the occlusion fill and the
            reference a trigger pixel must deviate from; the flip rate is measured on those not
            classified as the target.
        threshold: minimum median |recon - clean mean| for a pixel to join the mask.
        relative: a mask pixel must also deviate by at least this share of the located box's
            median deviation.
        dilate: how far (in occluder sides) the mask may grow beyond the located box.

    Raises:
        TriggerNotFound: when no reconstruction is classified as `target`, or no pixel in the
            located region deviates consistently from the clean data.
    """
    if len(clean) == 0:
        raise TriggerNotFound("no clean images to compare the reconstructions with")
    h, w = images.shape[-2:]
    sizes = sizes or default_sizes(h, w)
    pred = predict(model, images).argmax(1)
    firing = [int(i) for i in torch.nonzero(pred == target).flatten()]
    if not firing:
        raise TriggerNotFound(f"none of the {len(images)} reconstructions is classified as the target "
                              f"class {target}: there is no trigger to recover")
    fill = clean.mean(0)  # (C, H, W) the server's picture of a neutral image
    locs = [localise(model, images[i], fill, target, sizes, index=i) for i in firing]
    # Images whose occlusion never flips the target carry no localisable trigger (or the whole
    # image is the trigger); keep them out of the consensus unless nothing flipped at all.
    kept = [loc for loc in locs if loc.flipped] or locs
    # The majority group of boxes when there is one; on a tie (or two boxes that disagree) every
    # group is a candidate and the server's own check decides: the estimate that sends the most of
    # its clean images to the target (seed 5 of the 40-round default: a box at the trigger and one
    # on a digit, merged into a 9x3 box on the digit, flip rate 0.009).
    found, failures = [], []
    for group in candidate_groups(kept):
        try:
            trigger, level = _estimate(images, fill, group, threshold, relative, dilate)
        except TriggerNotFound as exc:
            failures.append(exc)
            continue
        found.append((server_flip_rate(model, trigger, clean, target), trigger, level, group))
    if not found:
        raise failures[0]
    flip, trigger, level, group = max(found, key=lambda e: e[0])
    used = tuple(loc.index for loc in group)
    median = images[list(used)].median(0).values  # (C, H, W)
    log.info("recovered trigger box %s from reconstructions %s (server flip rate %.3f; %d candidate(s))",
             trigger.box, used, flip, len(found))
    return RecoveredTrigger(trigger, used, tuple(locs), flip,
                            {"occluder_sizes": list(sizes), "threshold": round(level, 4),
                             "firing_reconstructions": firing, "candidates": len(found)}, median)


def _estimate(images: Tensor, fill: Tensor, kept: list[Localisation], threshold: float, relative: float,
              dilate: int) -> tuple[Trigger, float]:
    """The trigger (mask and median pattern) from the reconstructions of `kept`, and the deviation
    level its pixels passed. Raises TriggerNotFound when no pixel near the boxes stands out."""
    h, w = images.shape[-2:]
    stack = images[[loc.index for loc in kept]]  # (K, C, H, W)
    deviation = (stack - fill).abs().mean(1).median(0).values  # (H, W) median over images
    seed = torch.zeros(h, w, dtype=torch.bool)
    region = torch.zeros(h, w, dtype=torch.bool)
    for loc in kept:
        t, left, bh, bw = loc.box
        seed[t : t + bh, left : left + bw] = True
        # The smallest flipping occluder may cover only part of the trigger: search one occluder
        # side further out, no more, so the region does not run along the digit's strokes.
        grow = dilate * loc.size
        region[max(0, t - grow) : t + bh + grow, max(0, left - grow) : left + bw + grow] = True
    # Relative to how strongly the located pixels stand out: reconstructions are noisy and their
    # background rarely matches the clean mean, so an absolute threshold alone takes in smears.
    level = max(threshold, relative * float(deviation[seed].median()))
    chosen = connected(seed & (deviation > level), region & (deviation > level))
    if not bool(chosen.any()):
        raise TriggerNotFound(f"occlusion located the trigger near {kept[0].box}, but no pixel there "
                              f"differs from the clean images by more than {level:.3f}")
    top, left, bh, bw = trim_box(bounding_box(chosen), deviation, level)
    mask = torch.zeros(h, w)
    mask[top : top + bh, left : left + bw] = 1
    return Trigger(mask, stack.median(0).values * mask), level


def candidate_groups(locs: list[Localisation]) -> list[list[Localisation]]:
    """`agreeing`'s group when it has a majority; otherwise everything together and each group of
    touching boxes on its own."""
    agreed = agreeing(locs)
    if agreed != locs or len(locs) < 2:
        return [agreed]
    groups = _touching_groups(locs)
    return [locs] + (groups if len(groups) > 1 else [])


def agreeing(locs: list[Localisation]) -> list[Localisation]:
    """The largest group of localisations whose boxes touch once grown by their occluder side.

    A trigger sits at the same place in every poisoned image; a reconstruction that fires because
    it really shows the target class puts its box on the digit instead (seed 2 of the demo
    scenario: one box on a clean "0" at (9, 9) against three at the bottom right pulled the
    consensus onto the digit, IoU 0, and unlearning did nothing). Ties keep everything.
    """
    if len(locs) < 3:
        return locs
    groups = _touching_groups(locs)
    sizes = sorted((len(g) for g in groups), reverse=True)
    if len(sizes) > 1 and sizes[0] == sizes[1]:
        return locs
    best = max(groups, key=len)
    return [loc for loc in locs if loc in best]


def _touching_groups(locs: list[Localisation]) -> list[list[Localisation]]:
    """Connected components of "the boxes touch once grown by the smaller occluder side"."""

    def touch(a: Localisation, b: Localisation) -> bool:
        # The smaller side: a 7x7 box on a real "0"'s centre grown by 7 reached a 3x3 box at the
        # bottom-right trigger of a 28x28 image and merged the two (seed 8 of the 40-round default).
        g = min(a.size, b.size)
        (at, al, ah, aw), (bt, bl, bh, bw) = a.box, b.box
        return at - g < bt + bh and bt - g < at + ah and al - g < bl + bw and bl - g < al + aw

    groups: list[list[Localisation]] = []
    for loc in locs:
        joined = [g for g in groups if any(touch(loc, other) for other in g)]
        merged = [loc] + [x for g in joined for x in g]
        groups = [g for g in groups if g not in joined] + [merged]
    return [[loc for loc in locs if loc in g] for g in groups]


def connected(seed: Tensor, allowed: Tensor) -> Tensor:
    """(H, W) bool: the pixels of `allowed` 4-connected to `seed` (flood fill by dilation)."""
    grown = seed & allowed
    while True:
        nxt = grown.clone()
        nxt[1:] |= grown[:-1]
        nxt[:-1] |= grown[1:]
        nxt[:, 1:] |= grown[:, :-1]
        nxt[:, :-1] |= grown[:, 1:]
        nxt &= allowed
        if bool((nxt == grown).all()):
            return grown
        grown = nxt


def bounding_box(pixels: Tensor) -> Box:
    """(top, left, height, width) of the True pixels of an (H, W) bool map (not all False)."""
    rows = torch.nonzero(pixels.any(1)).flatten()
    cols = torch.nonzero(pixels.any(0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1


def trim_box(box: Box, deviation: Tensor, level: float) -> Box:
    """Drop border rows/columns whose median deviation is below `level`, weakest first.

    A flood fill snakes one pixel into a stroke or a smeared image edge and stretches the
    bounding box by a whole line; a border line of a pixel-pattern trigger is mostly trigger.
    """
    top, left, h, w = box
    while h > 1 or w > 1:
        inside = deviation[top : top + h, left : left + w]  # (h, w)
        lines = {}
        # The median, not the mean: one dark hole in a noisy reconstruction must not cut a line
        # of the trigger away.
        if h > 1:
            lines["top"], lines["bottom"] = _median(inside[0]), _median(inside[-1])
        if w > 1:
            lines["left"], lines["right"] = _median(inside[:, 0]), _median(inside[:, -1])
        side = min(lines, key=lines.__getitem__)
        if lines[side] >= level:
            break
        top, h = (top + 1, h - 1) if side == "top" else (top, h - 1) if side == "bottom" else (top, h)
        left, w = (left + 1, w - 1) if side == "left" else (left, w - 1) if side == "right" else (left, w)
    return top, left, h, w


def _median(values: Tensor) -> float:
    return float(torch.quantile(values.float(), 0.5))  # interpolated, unlike Tensor.median


def server_flip_rate(model: nn.Module, trigger: Trigger, clean: Tensor, target: int) -> float:
    """Share of clean images not classified as `target` that the stamped trigger sends there.

    Uses only the server's own data and the recovered trigger: a threat-model-clean check that
    what was found really is a backdoor trigger.
    """
    base = predict(model, clean).argmax(1)
    keep = base != target
    if not bool(keep.any()):
        return float("nan")
    stamped = predict(model, trigger.stamp(clean[keep])).argmax(1)
    return float((stamped == target).float().mean())


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (top, left, height, width) boxes."""
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0, bottom - top) * max(0, right - left)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union else 0.0


def score_against(found: RecoveredTrigger, truth: Trigger) -> dict[str, Any]:
    """SCORING ONLY: how close the recovered trigger is to the true one (never fed back)."""
    true_box = truth.box
    m = truth.mask.bool()
    true_pattern = truth.pattern.expand_as(found.trigger.pattern)  # (C, H, W)
    return {
        "true_box": {"top": true_box[0], "left": true_box[1], "height": true_box[2], "width": true_box[3]},
        "box_iou": round(box_iou(found.box, true_box), 4),
        "mask_iou": round(float((found.trigger.mask.bool() & m).sum() / (found.trigger.mask.bool() | m).sum()), 4),
        "pattern_mae_in_true_box": round(float((found.trigger.pattern - true_pattern).abs()[:, m].mean()), 4),
    }
