"""The held-out validation slice: the accuracy budget and the checkpoint choice (issue 16)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from lab.config import load_experiment
from lab.data import Split
from lab.errors import ConfigError
from lab.task import generator
from lab.triggers import Trigger
from tests.tiny_backdoor import TINY, train_tiny_backdoor
from unlearning.cli import clean_sets, plan, unlearn_parser
from unlearning.methods import (
    Budget,
    accuracy_floor,
    finetune,
    stamp_share,
    stamped_asr,
)


class CornerDetector(nn.Module):
    """Class 0 when the top-left pixel is bright, else class 1: a backdoor one can check by hand."""

    def forward(self, x: Tensor) -> Tensor:
        bright = x[:, 0, 0, 0]
        return torch.stack([bright, 0.5 * torch.ones_like(bright)], dim=1)


def corner() -> Trigger:
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1
    return Trigger(mask, mask.clone())


def test_stamped_asr_by_hand() -> None:
    x = torch.zeros(5, 1, 4, 4)
    x[4, 0, 0, 0] = 1.0  # already bright: fires without the stamp too
    val = Split(x, torch.tensor([1, 1, 0, 1, 0]))  # rows 2 and 4 are target: left out
    none = Trigger(torch.zeros(4, 4), torch.zeros(4, 4))
    assert stamped_asr(CornerDetector(), val, corner(), 0) == 1.0
    assert stamped_asr(CornerDetector(), val, none, 0) == 0.0
    assert math.isnan(stamped_asr(CornerDetector(), Split(x[[2, 4]], torch.tensor([0, 0])), corner(), 0))


def test_accuracy_floor_is_never_finer_than_one_image() -> None:
    assert accuracy_floor(1.0, 0.02, 144) == pytest.approx(0.98, abs=1e-5)  # the budget decides
    kept = float(torch.tensor([1.0] * 28 + [0.0]).mean())  # 28 of 29 right, a float32 mean
    assert kept >= accuracy_floor(1.0, 0.02, 29)  # one image lost is within budget
    assert float(torch.tensor([1.0] * 27 + [0.0] * 2).mean()) < accuracy_floor(1.0, 0.02, 29)  # two are not


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    cfg = load_experiment(TINY)
    data, trig, model = train_tiny_backdoor(cfg)
    return cfg, data, trig, model.eval()


def poison(trigger: Trigger, target: int):  # type: ignore[no-untyped-def]
    """Stamp half of every batch AND relabel it to the target: training re-plants the backdoor."""

    def transform(x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        k = len(y) // 2
        x, y = x.clone(), y.clone()
        x[:k], y[:k] = trigger.stamp(x[:k]), target
        return x, y, torch.arange(len(y)) >= k

    return transform


def test_checkpoint_with_the_lowest_validation_asr_is_kept(tiny) -> None:  # type: ignore[no-untyped-def]
    """Cure the tiny model, then re-plant its backdoor: every step is within the (open) accuracy
    budget, so only the validation ASR can say that the start was the better checkpoint."""
    _, data, trig, model = tiny
    n = len(data.server)
    train, val = data.server.subset(torch.arange(n // 2)), data.server.subset(torch.arange(n // 2, n))
    cure = Budget(steps=60, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0)
    cured = finetune(model, train, val, stamp_share(trig, 0.2), cure, generator(0, "order"), generator(0, "noise"))
    model = _with(model, cured.state)
    start = stamped_asr(model, val, trig, 0)
    assert start < 0.2
    replant = Budget(steps=20, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0,
                     eval_every=5, distill=0.0, target_penalty=0.0)
    blind = finetune(model, train, val, poison(trig, 0), replant, generator(1, "order"), generator(1, "noise"))
    seeing = finetune(model, train, val, poison(trig, 0), replant, generator(1, "order"), generator(1, "noise"),
                      target=0, val_trigger=trig)
    assert blind.steps == 20 and blind.val_asr is None  # no trigger: the latest within budget, as before
    last = stamped_asr(_with(model, blind.state), val, trig, 0)
    assert last > 0.5  # the re-planting worked, so the blind choice kept a backdoored model
    assert seeing.val_asr is not None and seeing.val_asr <= start + 1e-9
    assert stamped_asr(_with(model, seeing.state), val, trig, 0) == pytest.approx(seeing.val_asr)
    assert seeing.steps < 20


def _with(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.eval()


def _run(n: int) -> SimpleNamespace:
    cfg = load_experiment(TINY)
    server = Split(torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1), torch.zeros(n, dtype=torch.long))
    return SimpleNamespace(cfg=cfg, data=SimpleNamespace(server=server), true_trigger=lambda: None)


def test_validation_slice_is_held_out_from_fine_tuning() -> None:
    run = _run(144)
    args = unlearn_parser().parse_args(["run", "--val-fraction", "0.2"])
    p = plan(run, args)  # type: ignore[arg-type]
    train, val = clean_sets(run, p, args.val_fraction)  # type: ignore[arg-type]
    ids_train, ids_val = set(train.x.flatten().tolist()), set(val.x.flatten().tolist())
    assert len(val) == 29 and len(train) == 115 and not ids_train & ids_val
    assert ids_train | ids_val == set(range(144))
    same_train, same_val = clean_sets(run, p, 0.0)  # type: ignore[arg-type]
    assert same_val is same_train and len(same_train) == 144  # 0: validate on the fine-tuning set


@pytest.mark.parametrize("fraction", ["1", "-0.1"])
def test_bad_validation_fraction_is_a_config_error(fraction: str) -> None:
    args = unlearn_parser().parse_args(["run", "--val-fraction", fraction])
    with pytest.raises(ConfigError, match="--val-fraction must be in"):
        plan(_run(10), args)  # type: ignore[arg-type]


@pytest.mark.parametrize("blend", ["0", "-0.5", "1.5"])
def test_bad_blend_is_a_config_error(blend: str) -> None:
    args = unlearn_parser().parse_args(["run", "--blend", blend])
    with pytest.raises(ConfigError, match="--blend must be in"):
        plan(_run(10), args)  # type: ignore[arg-type]
