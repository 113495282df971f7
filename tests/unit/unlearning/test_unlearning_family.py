"""The recovered trigger's family of nearby boxes, confirmed by the model on clean images."""

from __future__ import annotations

import torch

from lab.triggers import Trigger
from tests.unit.unlearning.test_unlearning_trigger import (
    LEFT,
    TOP,
    PatchDetector,
    S,
    images,
)
from unlearning.family import (
    boxed_trigger,
    flip_rates,
    near_boxes,
    refine_pattern,
    trigger_family,
)
from unlearning.methods import stamp_family


def test_near_boxes_moves_each_side_by_up_to_slack_inside_the_image() -> None:
    boxes = near_boxes((5, 5, 4, 4), 1, 20, 20)
    assert len(boxes) == 81 and (5, 5, 4, 4) in boxes and (4, 4, 6, 6) in boxes and (6, 6, 2, 2) in boxes
    assert near_boxes((5, 5, 4, 4), 0, 20, 20) == [(5, 5, 4, 4)]
    corner = near_boxes((0, 0, 1, 1), 1, 3, 3)  # top/left cannot go below 0, sides cannot vanish
    assert all(t >= 0 and left >= 0 and h >= 1 and w >= 1 for t, left, h, w in corner)
    assert len(corner) == 9 and (0, 0, 2, 2) in corner and (0, 1, 1, 1) in corner  # 3 row spans x 3 column spans


def test_flip_rates_by_hand() -> None:
    clean = images(10, False)
    full = boxed_trigger((TOP, LEFT, S, S), torch.ones(1, 20, 20))
    half = boxed_trigger((TOP, LEFT, S, 1), torch.ones(1, 20, 20))  # a third of the patch: mean 0.33+, < 0.5
    assert flip_rates(PatchDetector(), [full, half], clean, 0).tolist() == [1.0, 0.0]


def test_family_from_a_box_off_by_one_column_contains_the_true_box() -> None:
    median = images(1, True)[0]  # the firing reconstructions' median shows the bright patch
    off = (TOP, LEFT + 1, S, S)  # consensus off by a column
    fam = trigger_family(PatchDetector(), median, off, images(30, False, seed=4), target=0)
    assert (TOP, LEFT, S, S) in fam.boxes
    assert all(f >= max(fam.flip_rates) - 0.05 for f in fam.flip_rates)
    assert list(fam.flip_rates) == sorted(fam.flip_rates, reverse=True)
    assert len(fam.members) == len(fam.boxes) <= 81


def test_stamp_family_stamps_the_mix_ratio_with_members_only() -> None:
    a = Trigger(torch.zeros(4, 4).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(1.0)), torch.ones(4, 4))
    b = Trigger(torch.zeros(4, 4).index_put_((torch.tensor([3]), torch.tensor([3])), torch.tensor(1.0)), torch.ones(4, 4))
    x, y = torch.zeros(10, 1, 4, 4), torch.arange(10)
    xs, ys, anchored = stamp_family((a, b), 0.5)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ys, y) and bool(anchored.all())
    changed = (xs != x).flatten(1).sum(1)
    assert int((changed == 1).sum()) == 5 and int((changed > 1).sum()) == 0
    on_a, on_b = int(xs[:, 0, 0, 0].sum()), int(xs[:, 0, 3, 3].sum())
    assert on_a + on_b == 5 and on_a > 0 and on_b > 0


def test_refine_pattern_brightens_a_dim_stamp_until_the_model_fires_and_keeps_the_mask() -> None:
    model = PatchDetector()  # fires when the patch's mean exceeds 0.5
    mask = torch.zeros(20, 20)
    mask[TOP : TOP + S, LEFT : LEFT + S] = 1
    dim = Trigger(mask, 0.3 * mask.expand(1, 20, 20))  # the reconstructions' washed-out values
    clean = images(20, False, seed=5)
    assert flip_rates(model, [dim], clean, 0).item() == 0.0
    refined = refine_pattern(model, dim, clean, 0, steps=60)
    assert torch.equal(refined.mask, mask)
    assert float(refined.pattern[:, mask.bool()].mean()) > 0.6
    assert float(refined.pattern[:, ~mask.bool()].abs().max()) == 0.0
    assert flip_rates(model, [refined], clean, 0).item() == 1.0
    assert all(p.requires_grad for p in model.parameters()) or not list(model.parameters())
