"""Unlearning strategies and the fine-tuning loop, on a tiny backdoored digits CNN (16x16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lab.config import load_experiment
from lab.data import Split
from lab.metrics import evaluate
from lab.task import build_for, generator
from lab.triggers import make_trigger
from tests.tiny_backdoor import TINY, train_tiny_backdoor
from unlearning.methods import (
    STRATEGIES,
    Budget,
    Materials,
    StrategyError,
    accuracy,
    finetune,
    get_strategy,
    relabel_targets,
    row_loss,
    stamp_share,
    target_penalty,
    train_only,
)
from unlearning.trigger import target_margin


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    """A CNN trained 300 SGD steps with 20 % of every batch stamped and relabelled to the target."""
    cfg = load_experiment(TINY)
    data, trig, model = train_tiny_backdoor(cfg)
    return cfg, data, trig, model.eval()


def test_registry_names_are_exact_and_unknown_names_fail() -> None:
    assert set(STRATEGIES) == {"transplant", "relabel", "clean-finetune", "oracle"}
    assert STRATEGIES["oracle"].oracle and not STRATEGIES["transplant"].oracle
    with pytest.raises(StrategyError, match="known"):
        get_strategy("prune")
    with pytest.raises(StrategyError, match="--oracle"):
        STRATEGIES["oracle"].build(Materials(None, None, None))


def test_stamp_share_stamps_exactly_the_mix_ratio_and_keeps_labels() -> None:
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1
    trig = make_trigger(load_experiment(TINY).attack.trigger, 16, 16)
    x, y = torch.zeros(10, 1, 16, 16), torch.arange(10)
    xs, ys, anchored = stamp_share(trig, 0.3)(x, y, torch.Generator().manual_seed(0))
    stamped = (xs.flatten(1).sum(1) > 0)
    assert int(stamped.sum()) == 3 and torch.equal(ys, y) and bool(anchored.all())
    assert float(xs[stamped][0].sum()) == 9.0  # a 3x3 white patch
    assert float(x.sum()) == 0.0  # input untouched


def test_relabel_puts_reconstructions_first_and_marks_them_unanchored() -> None:
    recon = Split(torch.ones(2, 1, 4, 4), torch.tensor([7, 7]))
    t = STRATEGIES["relabel"].build(Materials(None, recon, mix_ratio=0.5))
    x, y, anchored = t(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    assert y.tolist() == [7, 7, 0, 0, 0, 0, 0, 0] and anchored.tolist() == [False] * 2 + [True] * 6
    assert float(x[:2].min()) == 1.0 and float(x[2:].max()) == 0.0


def test_row_loss_is_cross_entropy_at_alpha_0_and_kl_to_soft_targets_at_1() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    soft = logits.softmax(1)
    anchored = torch.tensor([True, True])
    assert torch.allclose(row_loss(logits, y, soft, anchored, 0.0), F.cross_entropy(logits, y))
    assert float(row_loss(logits, y, soft, anchored, 1.0)) == pytest.approx(0.0, abs=1e-6)
    # an unanchored row keeps its cross-entropy whatever alpha is
    mixed = row_loss(logits, y, soft, torch.tensor([True, False]), 1.0)
    assert float(mixed) == pytest.approx(float(F.cross_entropy(logits[1:], y[1:])) / 2, rel=1e-5)


def test_relabel_targets_occludes_the_trigger_then_falls_back(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data, trig, model = tiny
    ones = data.test.x[data.test.y == 1][:4]
    labels = relabel_targets(model, trig.stamp(ones), trig, data.server.x.mean(0), 0, torch.tensor([1, 0, 5, 0]))
    assert labels.tolist() == [1, 1, 1, 1]  # occluded trigger: the model sees the "1" again
    # with nothing occluded the model still says "target": the recovered label decides, or -1
    none = type(trig)(torch.zeros(16, 16), torch.zeros(16, 16))
    fallback = relabel_targets(model, trig.stamp(ones), none, data.server.x.mean(0), 0, torch.tensor([1, 0, 5, 0]))
    assert fallback.tolist() == [1, -1, 5, -1]


def test_true_trigger_transplant_removes_the_backdoor_at_small_accuracy_cost(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data, trig, model = tiny
    before = evaluate(model, data.test, trig, 0, 1)
    assert before.asr > 0.9 and before.accuracy > 0.85
    budget = Budget(steps=60, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0)
    res = finetune(model, data.server, data.server, stamp_share(trig, 0.2), budget,
                   generator(0, "order"), generator(0, "noise"))
    after_model = build_for(cfg, data)
    after_model.load_state_dict(res.state)
    after = evaluate(after_model.eval(), data.test, trig, 0, 1)
    assert before.asr - after.asr > 0.5
    assert before.accuracy - after.accuracy < 0.05
    assert res.steps == 60 and not res.stopped_early
    assert evaluate(model, data.test, trig, 0, 1) == before  # the original model was not touched


def test_head_only_unlearning_changes_only_the_last_linear_layer_and_removes_the_backdoor(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data, trig, model = tiny
    before = evaluate(model, data.test, trig, 0, 1)
    budget = Budget(steps=60, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0, layers="head")
    res = finetune(model, data.server, data.server, stamp_share(trig, 0.2), budget,
                   generator(0, "order"), generator(0, "noise"))
    head = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    original = model.state_dict()
    changed = {k for k, v in res.state.items() if not torch.equal(v, original[k])}
    assert changed == {f"{head}.weight", f"{head}.bias"}
    after_model = build_for(cfg, data)
    after_model.load_state_dict(res.state)
    after = evaluate(after_model.eval(), data.test, trig, 0, 1)
    assert before.asr - after.asr > 0.5 and before.accuracy - after.accuracy < 0.05


def test_train_only_refuses_an_unknown_choice_and_all_keeps_everything_trainable(tiny) -> None:  # type: ignore[no-untyped-def]
    import copy

    model = copy.deepcopy(tiny[3])
    train_only(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="layers must be one of"):
        train_only(model, "middle")


def test_clean_finetune_with_the_same_budget_leaves_the_backdoor(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data, trig, model = tiny
    budget = Budget(steps=60, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0)
    res = finetune(model, data.server, data.server, STRATEGIES["clean-finetune"].build(Materials(None, None)),
                   budget, generator(0, "order"), generator(0, "noise"))
    after = build_for(cfg, data)
    after.load_state_dict(res.state)
    assert evaluate(after.eval(), data.test, trig, 0, 1).asr > 0.5


def test_early_stop_keeps_the_last_checkpoint_within_budget(tiny) -> None:  # type: ignore[no-untyped-def]
    cfg, data, trig, model = tiny
    # lr 5 wrecks the model at once: every validation is below budget, so the original weights come back
    budget = Budget(steps=40, lr=5.0, momentum=0.9, batch_size=32, freeze_bn=True,
                    min_accuracy=accuracy(model, data.server) - 0.02, eval_every=5, patience=2, distill=0.0)
    res = finetune(model, data.server, data.server, stamp_share(trig, 0.2), budget,
                   generator(0, "order"), generator(0, "noise"))
    assert res.stopped_early and res.steps == 0 and res.steps_run == 10
    assert all(torch.equal(res.state[k], v) for k, v in model.state_dict().items())


def test_target_penalty_by_hand() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0], [4.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([1, 2, 0, 1])
    changed = torch.tensor([True, True, True, False])
    # row 0: 3 - 1 + 1 = 3; row 1: 0 - 2 + 1 < 0 -> 0; row 2 is labelled target, row 3 unchanged: left out
    pen = target_penalty(logits, y, changed, target=0, margin=1.0)
    assert float(pen.detach()) == pytest.approx(1.5)
    pen.backward()
    assert logits.grad is not None
    assert logits.grad[0].tolist() == pytest.approx([0.5, -0.5, 0.0]) and float(logits.grad[1:].abs().sum()) == 0.0
    none = target_penalty(logits, y, torch.zeros(4, dtype=torch.bool), 0, 1.0)
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_target_penalty_clears_stamped_images_sooner(tiny) -> None:  # type: ignore[no-untyped-def]
    """Same batches, same 3 steps: without the penalty most stamped test ones still fire (0.71 when
    written), with it none does."""
    cfg, data, trig, model = tiny
    stamped = trig.stamp(data.test.x[data.test.y == 1])
    firing = []
    for beta in (0.0, 0.3):
        budget = Budget(steps=3, lr=0.01, momentum=0.9, batch_size=32, freeze_bn=True, min_accuracy=0.0,
                        target_penalty=beta)
        res = finetune(model, data.server, data.server, stamp_share(trig, 0.2), budget,
                       generator(0, "order"), generator(0, "noise"), target=0)
        after = build_for(cfg, data)
        after.load_state_dict(res.state)
        with torch.no_grad():
            firing.append(float((target_margin(after.eval()(stamped), 0) > 0).float().mean()))
    assert firing[0] > 0.5 and firing[1] == 0.0
