"""Trigger recovery: occlusion finds a planted patch; mask/pattern consensus; scoring helpers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lab.triggers import Trigger
from unlearning.trigger import (
    TriggerNotFound,
    box_iou,
    connected,
    default_sizes,
    localise,
    recover_trigger,
    score_against,
    target_margin,
    trim_box,
)

TOP, LEFT, S = 10, 12, 3  # the planted patch


class PatchDetector(nn.Module):
    """Class 0 (the target) wins when the planted 3x3 box is bright; class 1 otherwise."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 2)
        patch = x[:, :, TOP : TOP + S, LEFT : LEFT + S].mean((1, 2, 3))
        return torch.stack([20 * patch - 10, torch.zeros_like(patch)], 1)


def images(n: int, patch: bool, seed: int = 0) -> Tensor:
    x = 0.2 * torch.rand(n, 1, 20, 20, generator=torch.Generator().manual_seed(seed))
    if patch:
        x[:, :, TOP : TOP + S, LEFT : LEFT + S] = 0.95
    return x


def test_occlusion_localises_the_planted_patch() -> None:
    model, fill = PatchDetector(), torch.zeros(1, 20, 20)
    loc = localise(model, images(1, True)[0], fill, target=0, sizes=(2, 3, 5))
    assert loc.flipped and loc.predicted_after == 1
    top, left, h, w = loc.box
    # the smallest flipping occluder lies inside the planted box
    assert TOP <= top and top + h <= TOP + S and LEFT <= left and left + w <= LEFT + S


def test_recover_trigger_finds_box_and_pattern_from_several_reconstructions() -> None:
    model = PatchDetector()
    recon = torch.cat([images(3, True, seed=1), images(2, False, seed=2)])  # 2 do not fire
    found = recover_trigger(model, recon, images(40, False, seed=3), target=0)
    assert found.box == (TOP, LEFT, S, S)
    assert found.used == (0, 1, 2)
    assert float(found.trigger.pattern[0, TOP, LEFT]) == pytest.approx(0.95)
    assert float(found.trigger.pattern[:, found.trigger.mask == 0].abs().max()) == 0.0
    assert found.server_flip_rate == 1.0
    truth = Trigger(found.trigger.mask.clone(), found.trigger.mask * 1.0)
    score = score_against(found, truth)
    assert score["box_iou"] == 1.0 and score["pattern_mae_in_true_box"] == pytest.approx(0.05, abs=1e-4)


def test_no_firing_reconstruction_is_a_clear_error() -> None:
    with pytest.raises(TriggerNotFound, match="none of the 2 reconstructions"):
        recover_trigger(PatchDetector(), images(2, False), images(5, False), target=0)


def test_helpers_by_hand() -> None:
    assert box_iou((0, 0, 2, 2), (1, 1, 2, 2)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 2, 2), (5, 5, 1, 1)) == 0.0
    assert target_margin(torch.tensor([[3.0, 1.0, 2.0]]), 0).tolist() == [1.0]
    allowed = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 1]], dtype=torch.bool)
    seed = torch.zeros(2, 4, dtype=torch.bool)
    seed[0, 0] = True
    assert connected(seed, allowed).tolist() == [[True, True, False, False], [False, True, False, False]]
    dev = torch.zeros(5, 5)
    dev[1:4, 1:4] = 1.0
    dev[4, 1:4] = torch.tensor([0.1, 1.0, 0.1])  # a weak bottom line with one bright pixel
    assert trim_box((1, 1, 4, 3), dev, 0.5) == (1, 1, 3, 3)
    assert default_sizes(28, 28) == (2, 3, 4, 5, 7)


def test_agreeing_keeps_the_largest_group_of_touching_boxes() -> None:
    from unlearning.trigger import Localisation, agreeing

    def loc(i: int, box: tuple[int, int, int, int]) -> Localisation:
        return Localisation(i, box, box[2], 1.0, -1.0, 3)

    corner = [loc(0, (23, 24, 2, 2)), loc(1, (24, 24, 3, 3)), loc(3, (24, 23, 3, 3))]
    digit = loc(2, (9, 9, 7, 7))  # a reconstruction that really is the target class
    assert agreeing([*corner, digit]) == corner
    assert agreeing([corner[0], digit]) == [corner[0], digit]  # two cannot outvote each other
    assert agreeing([corner[0], corner[1], digit, loc(4, (0, 0, 1, 1))]) == corner[:2]
    tie = [corner[0], corner[1], digit, loc(4, (9, 10, 7, 7))]
    assert agreeing(tie) == tie  # a tie keeps everything
    # Seed 8 of the 40-round default: a 7x7 box on a real zero's centre is 5 pixels from the two
    # corner boxes; grown by its own side it reached them and the three merged onto the digit.
    zero = loc(5, (13, 11, 7, 7))
    assert agreeing([loc(0, (24, 24, 3, 3)), loc(2, (23, 24, 3, 3)), zero]) == [loc(0, (24, 24, 3, 3)),
                                                                               loc(2, (23, 24, 3, 3))]


def test_candidate_groups_offer_each_group_when_there_is_no_majority() -> None:
    from unlearning.trigger import Localisation, candidate_groups

    def loc(i: int, box: tuple[int, int, int, int]) -> Localisation:
        return Localisation(i, box, box[2], 1.0, -1.0, 3)

    corner = [loc(0, (23, 24, 2, 2)), loc(1, (24, 24, 3, 3)), loc(3, (24, 23, 3, 3))]
    digit = loc(2, (9, 9, 7, 7))
    assert candidate_groups([*corner, digit]) == [corner]  # a majority: the vote decides
    assert candidate_groups([corner[0], digit]) == [[corner[0], digit], [corner[0]], [digit]]
    assert candidate_groups(corner[:2]) == [corner[:2]]  # two that agree: one candidate
    assert candidate_groups([digit]) == [[digit]]


class PatchOrDigit(nn.Module):
    """The target wins on the planted patch, or on a "digit" that needs two strokes at once (a
    reconstruction of a real target image): a box on one stroke flips it, but that stroke alone
    stamped on a clean image does not."""

    def forward(self, x: Tensor) -> Tensor:
        patch = x[:, :, TOP : TOP + S, LEFT : LEFT + S].mean((1, 2, 3))
        digit = torch.minimum(x[:, :, 2:5, 2:5].mean((1, 2, 3)), x[:, :, 2:5, 15:18].mean((1, 2, 3)))
        return torch.stack([20 * torch.maximum(patch, digit) - 10, torch.zeros_like(patch)], 1)


def test_a_tie_between_two_boxes_goes_to_the_one_the_server_check_confirms() -> None:
    poisoned = images(1, True, seed=1)
    digit = images(1, False, seed=2)
    digit[:, :, 2:5, 2:5] = 0.9
    digit[:, :, 2:5, 15:18] = 0.9
    found = recover_trigger(PatchOrDigit(), torch.cat([digit, poisoned]), images(40, False, seed=3), target=0)
    assert found.box == (TOP, LEFT, S, S) and found.used == (1,)
    assert found.server_flip_rate == 1.0 and found.stats["candidates"] >= 2
