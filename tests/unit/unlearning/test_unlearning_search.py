"""The mask search near a refused box (`unlearning.search`), on the tiny backdoored digits CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lab.config import load_experiment
from tests.tiny_backdoor import TINY, train_tiny_backdoor
from unlearning.family import _iou
from unlearning.search import mirrors, search_near, window_around


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    data, trig, model = train_tiny_backdoor(load_experiment(TINY))
    return data, trig, model.eval()


def test_window_is_clipped_to_the_image_and_mirrors_by_hand() -> None:
    assert window_around((12, 13, 3, 2), 2, 16, 16) == (10, 11, 6, 5)
    assert window_around((0, 0, 2, 2), 2, 16, 16) == (0, 0, 4, 4)
    assert mirrors((10, 11, 6, 5), 16, 16) == [(0, 0, 6, 5), (0, 11, 6, 5), (10, 0, 6, 5)]
    assert mirrors((5, 5, 6, 6), 16, 16) == []  # the centre window is its own mirror image


def test_search_finds_the_planted_patch_from_a_box_a_pixel_off(tiny) -> None:  # type: ignore[no-untyped-def]
    data, trig, model = tiny
    true_box = trig.box
    top, left, h, w = true_box
    off = (top + 1, left + 1, h - 1, w - 1)  # the reconstructions' box: a corner of the patch
    found = search_near(model, off, data.server.x, 0, steps=100)
    assert found.anomalous and found.flip_rate >= 0.5
    assert found.box is not None and _iou(found.box, true_box) >= 0.3
    assert max(found.control_flip_rates) * 3 < found.flip_rate


def test_a_model_that_ignores_its_input_yields_nothing_anomalous() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.arange(10.0))  # always class 9: no patch can make it say 0
    clean = torch.rand(20, 1, 16, 16)
    found = search_near(model, (12, 12, 3, 3), clean, 0, steps=20)
    assert found.flip_rate == 0.0 and not found.anomalous
