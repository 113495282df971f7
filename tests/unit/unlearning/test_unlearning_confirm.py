"""The server's own check on a recovered trigger: refuse to unlearn with one that flips nothing."""

from __future__ import annotations

import pytest
import torch

from lab.triggers import Trigger
from unlearning.materials import TriggerNotConfirmed, confirm
from unlearning.trigger import RecoveredTrigger


def recovered(flip_rate: float) -> RecoveredTrigger:
    mask = torch.zeros(28, 28)
    mask[1:9, 17] = 1.0  # the 8x1 box found on Fashion-MNIST (issue 16)
    return RecoveredTrigger(Trigger(mask, mask.clone()), used=(0,), localisations=(), server_flip_rate=flip_rate)


def test_a_trigger_that_flips_almost_nothing_is_refused_with_one_line() -> None:
    with pytest.raises(TriggerNotConfirmed) as err:
        confirm(recovered(0.001), 0.05, target=0)
    msg = str(err.value)
    assert "\n" not in msg and "--force" in msg and "8x1 at (1, 17)" in msg and "0.1%" in msg and "class 0" in msg
    assert err.value.exit_code == 3


@pytest.mark.parametrize("rate", [0.05, 0.16, 1.0, float("nan")])
def test_a_trigger_at_or_above_the_threshold_passes(rate: float) -> None:
    confirm(recovered(rate), 0.05, target=0)  # NaN: no non-target clean image to judge by


def test_threshold_zero_never_refuses() -> None:
    confirm(recovered(0.0), 0.0, target=0)


def test_the_refusal_reports_what_the_mask_search_found() -> None:
    with pytest.raises(TriggerNotConfirmed) as err:
        confirm(recovered(0.001), 0.05, 0, "; a mask search near it flipped 2.0% (its mirror-image controls: 1.5%)")
    msg = str(err.value)
    assert "\n" not in msg and "mask search near it flipped 2.0%" in msg and "--force" in msg
