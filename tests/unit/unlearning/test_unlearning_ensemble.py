"""Soup and blend of unlearning fine-tunes (`unlearning.ensemble`), by hand and on the tiny backdoored CNN."""

from __future__ import annotations

import pytest
import torch

from lab.config import load_experiment
from lab.task import generator
from tests.tiny_backdoor import TINY, train_tiny_backdoor
from unlearning.ensemble import average_states, blend_states, ensemble
from unlearning.methods import Budget, finetune, stamp_share


@pytest.fixture(scope="module")
def cured():  # type: ignore[no-untyped-def]
    """The tiny backdoored model and three 60-step transplant fine-tunes that differ only in their draws."""
    data, trig, model = train_tiny_backdoor(load_experiment(TINY))
    model.eval()
    budget = Budget(steps=60, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0)
    members = [finetune(model, data.server, data.server, stamp_share(trig, 0.2), budget, generator(0, "order", k),
                        generator(0, "noise", k), target=0, val_trigger=trig) for k in range(3)]
    return data, trig, model, members


def test_blend_and_average_by_hand() -> None:
    original = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    tuned = {"w": torch.tensor([10.0, 2.0]), "n": torch.tensor(5)}
    out = blend_states(original, tuned, 0.7)
    assert out["w"].tolist() == pytest.approx([7.0, 2.0]) and int(out["n"]) == 5  # counters are not blended
    assert original["w"].tolist() == [0.0, 2.0]  # inputs untouched
    mean = average_states([{"w": torch.tensor([1.0]), "n": torch.tensor(1)},
                           {"w": torch.tensor([3.0]), "n": torch.tensor(9)}])
    assert mean["w"].tolist() == [2.0] and int(mean["n"]) == 1


def test_one_member_at_alpha_one_is_the_single_fine_tune(cured) -> None:  # type: ignore[no-untyped-def]
    data, trig, model, members = cured
    out = ensemble(model, members[:1], data.server, trig, 0, 1.0)
    assert out.blend == 1.0 and out.members == 1
    assert all(torch.equal(out.state[k], v) for k, v in members[0].state.items())


def test_the_soup_blend_is_kept_when_the_trigger_stays_removed(cured) -> None:  # type: ignore[no-untyped-def]
    data, trig, model, members = cured
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = ensemble(model, members, data.server, trig, 0, 0.7)
    assert out.members == 3 and out.blend == 0.7
    expected = blend_states(model.state_dict(), average_states([m.state for m in members]), 0.7)
    assert all(torch.allclose(out.state[k].float(), v.float(), atol=1e-6) for k, v in expected.items())
    assert out.val_asr is not None and members[0].val_asr is not None and out.val_asr <= members[0].val_asr
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched


def test_a_blend_that_lets_the_trigger_fire_again_falls_back(cured) -> None:  # type: ignore[no-untyped-def]
    """5% of the change leaves the backdoor in place: the server's check must refuse that blend and
    return the first fine-tune as it is, never a model the trigger fires on more."""
    data, trig, model, members = cured
    out = ensemble(model, members, data.server, trig, 0, 0.05)
    assert out.blend == 1.0 and out.members == 1 and out.val_asr == members[0].val_asr
    assert all(torch.equal(out.state[k], v) for k, v in members[0].state.items())
