"""The 2025 backdoors (issue 18): DBA, Blended, Neurotoxin, A3FL. Each test shows the mechanism."""

import math

import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from client.a3fl import A3FLBudget, adapted_copy, optimise_trigger
from client.attacks import (
    AttackSpec,
    MaskProjection,
    PixelBackdoor,
    UpdateContext,
    build_attack,
)
from client.round_knowledge import attacker_rank, global_change
from lab.attack_triggers import trigger_for
from lab.config import AttackConfig, TriggerConfig, load_experiment
from lab.data import Split, malicious_partitions
from lab.errors import ConfigError
from lab.triggers import blended_trigger, make_trigger
from lab.update_masks import least_changed_mask

CTX = UpdateContext(server_round=2, round_size=6, server_lr=1.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smoke(*overrides: str):  # type: ignore[no-untyped-def]
    return load_experiment("experiments/smoke.yaml", ["federated.num_clients=6", *overrides])


# ---- DBA -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4, 9])
def test_dba_global_trigger_is_the_disjoint_union_of_the_local_ones(k: int) -> None:
    full = make_trigger(TriggerConfig(shape="checkerboard", size=3, margin=1), 8, 8)
    parts = full.parts(k)
    assert len(parts) == k
    masks = torch.stack([p.mask for p in parts])  # (k, H, W)
    assert torch.equal(masks.sum(0), full.mask)  # union, and no pixel in two parts
    assert all(bool(p.mask.any()) for p in parts)
    x = torch.rand(2, 1, 8, 8)
    stamped = x
    for p in parts:  # all local triggers stamped in turn = the global trigger
        stamped = p.stamp(stamped)
    assert torch.equal(stamped, full.stamp(x))
    assert not torch.equal(parts[0].stamp(x), full.stamp(x))


def test_dba_parts_of_a_square_are_row_bands() -> None:
    full = make_trigger(TriggerConfig(size=2, margin=0, position="top-left"), 4, 4)
    top, bottom = full.parts(2)
    assert torch.nonzero(top.mask).tolist() == [[0, 0], [0, 1]]
    assert torch.nonzero(bottom.mask).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="4-pixel trigger into 5 parts"):
        full.parts(5)


def test_dba_attackers_plant_different_parts_and_the_server_evaluates_the_whole() -> None:
    cfg = smoke("attack.type=dba", "attack.attackers_ratio=0.34")
    attack = cfg.attack
    full = trigger_for(attack, 16, 16)
    assert torch.equal(full.mask, make_trigger(attack.trigger, 16, 16).mask)  # ASR: the full trigger
    attackers = malicious_partitions(6, 0.34, cfg.seed)
    planted = []
    for p in attackers:
        spec = AttackSpec(attack, full, 0, 1, 10, dba_rank=attacker_rank(cfg, p), dba_parts=2)
        (backdoor,) = build_attack(spec).parts
        assert isinstance(backdoor, PixelBackdoor)
        planted.append(backdoor.trigger.mask)
    assert [attacker_rank(cfg, p) for p in attackers] == [0, 1]
    assert not torch.equal(planted[0], planted[1])
    assert torch.equal(planted[0] + planted[1], full.mask)


def test_dba_parts_default_to_the_attackers_and_fewer_attackers_than_parts_fail_at_config_time() -> None:
    from lab.backdoor_validation import dba_parts

    assert dba_parts(smoke("attack.type=dba", "attack.attackers_ratio=0.5"), 0.5) == 3
    with pytest.raises(ConfigError, match=r"attack\.dba_parts: .*4 trigger parts.*2 attacker"):
        smoke("attack.type=dba", "attack.attackers_ratio=0.34", "attack.dba_parts=4")
    with pytest.raises(ConfigError, match=r"attack\.dba_parts: .*DBA needs at least 2 attackers"):
        smoke("attack.type=dba", "attack.attackers_ratio=0.17")  # one attacker: k = 2 > 1
    with pytest.raises(ConfigError, match=r"attack\.dba_parts: DBA splits the trigger into at least 2"):
        smoke("attack.type=dba", "attack.attackers_ratio=0.34", "attack.dba_parts=1")
    with pytest.raises(ConfigError, match=r"attack\.dba_parts: 3 parts of a 1x1 trigger"):
        smoke("attack.type=dba", "attack.attackers_ratio=0.5", "attack.trigger.size=1")
    with pytest.raises(ConfigError, match=r"attack\.dba_parts: is DBA's setting"):
        smoke("attack.type=backdoor", "attack.dba_parts=2")


# ---- Blended -------------------------------------------------------------------------------------

def test_blended_stamp_is_the_alpha_blend_of_a_fixed_full_image_pattern() -> None:
    trig = trigger_for(AttackConfig(type="blended", blend_alpha=0.2), 5, 5)
    again = blended_trigger(5, 5, 0.2)
    assert torch.equal(trig.pattern, again.pattern)  # fixed: the attackers and the server agree
    x = torch.rand(3, 1, 5, 5)
    assert torch.allclose(trig.stamp(x), 0.2 * trig.pattern + 0.8 * x)
    assert trig.box == (0, 0, 5, 5)
    assert float(trig.pattern.std()) > 0.2  # noise, not a flat colour
    assert torch.allclose(blended_trigger(5, 5, 1.0).stamp(x), trig.pattern.expand_as(x))
    (backdoor,) = build_attack(AttackSpec(AttackConfig(type="blended", attackers_ratio=0.3), trig, 0, None, 10)).parts
    assert isinstance(backdoor, PixelBackdoor) and backdoor.trigger is trig


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5])
def test_blended_alpha_outside_0_1_fails_at_config_time(alpha: float) -> None:
    with pytest.raises(ConfigError, match=r"attack\.blend_alpha: must be in \(0, 1\]"):
        smoke("attack.type=blended", f"attack.blend_alpha={alpha}")


# ---- Neurotoxin ----------------------------------------------------------------------------------

def test_least_changed_mask_leaves_out_the_top_k_percent() -> None:
    change = torch.tensor([0.1, -5.0, 0.2, 3.0])
    assert least_changed_mask(change, 0.5).tolist() == [True, False, True, False]
    assert least_changed_mask(change, 0.25).tolist() == [True, False, True, True]
    assert least_changed_mask(change, 0.3).tolist() == [True, False, True, False]  # ceil(1.2) = 2 left out
    assert least_changed_mask(change, 0.0).all()
    big = torch.randn(1000)
    keep = least_changed_mask(big, 0.05)
    assert int((~keep).sum()) == math.ceil(0.05 * 1000)
    assert float(big.abs()[~keep].min()) >= float(big.abs()[keep].max())
    with pytest.raises(ValueError):
        least_changed_mask(big, 1.0)


def test_neurotoxin_update_is_zero_outside_its_mask() -> None:
    d = 200
    change = torch.randn(d, generator=gen(1))
    attack = AttackConfig(type="neurotoxin", attackers_ratio=0.3, neurotoxin_topk=0.1, boost=3.0)
    trig = make_trigger(TriggerConfig(size=1, margin=0), 3, 3)
    composite = build_attack(AttackSpec(attack, trig, 0, None, 10, global_change=change))
    assert [type(p).__name__ for p in composite.parts] == ["PixelBackdoor", "MaskProjection", "Boost"]
    projection = composite.parts[1]
    assert isinstance(projection, MaskProjection)
    delta = torch.randn(d, generator=gen(2))
    out = composite.transform_update(delta, CTX, gen())
    keep = least_changed_mask(change, 0.1)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum())))
    assert torch.allclose(out[keep], 3.0 * delta[keep])
    assert int((~keep).sum()) == 20 and bool(change.abs()[~keep].min() >= change.abs()[keep].max())
    # No previous change known yet (the attacker's first round): the plain backdoor.
    first = build_attack(AttackSpec(attack, trig, 0, None, 10))
    assert [type(p).__name__ for p in first.parts] == ["PixelBackdoor", "Boost"]


def test_neurotoxin_node_memory_gives_the_change_since_the_last_global_seen() -> None:
    memory = RecordDict()
    g1 = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    g2 = {"w": torch.tensor([1.5, 2.0]), "b": torch.tensor([0.0])}
    assert global_change(memory, 3, g1) is None
    assert global_change(memory, 4, g2) is None  # memory is per partition
    assert torch.equal(global_change(memory, 3, g2), torch.tensor([0.5, 0.0, -0.5]))  # type: ignore[arg-type]
    assert torch.equal(global_change(memory, 3, g2), torch.zeros(3))  # type: ignore[arg-type]


@pytest.mark.parametrize("topk", [-0.1, 1.0])
def test_neurotoxin_topk_outside_0_1_fails_at_config_time(topk: float) -> None:
    with pytest.raises(ConfigError, match=r"attack\.neurotoxin_topk"):
        smoke("attack.type=neurotoxin", "attack.attackers_ratio=0.34", f"attack.neurotoxin_topk={topk}")


# ---- A3FL ----------------------------------------------------------------------------------------

def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def _target_loss(model: nn.Module, trig, x: torch.Tensor, target: int) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(trig.stamp(x)), torch.full((len(x),), target)))


def test_a3fl_trigger_moves_toward_the_target_on_both_models_inside_its_mask_only() -> None:
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(40, 1, 6, 6), torch.randint(1, 3, (40,))
    start = make_trigger(TriggerConfig(size=2, margin=0, value=0.5), 6, 6)
    budget = A3FLBudget(trigger_steps=30, trigger_lr=0.05, adversary_steps=5, adversary_weight=1.0, batch_size=16,
                        adversary_lr=0.1)
    found = optimise_trigger(model, start, x, y, 0, budget, gen(3))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the global model is untouched
    assert torch.equal(found.mask, start.mask)
    assert torch.equal(found.pattern[start.mask == 0], start.pattern[start.mask == 0])
    assert float(found.pattern.min()) >= 0 and float(found.pattern.max()) <= 1
    assert not torch.equal(found.pattern, start.pattern)
    adversary = adapted_copy(model, start, x, y, 5, 0.1, 16, gen(3))  # the same draws as inside
    assert _target_loss(model, found, x, 0) < _target_loss(model, start, x, 0)
    assert _target_loss(adversary, found, x, 0) < _target_loss(adversary, start, x, 0)
    again = optimise_trigger(model, start, x, y, 0, budget, gen(3))
    assert torch.equal(again.pattern, found.pattern)  # a function of the global model, the data and the seed


def test_a3fl_adapted_copy_unlearns_the_trigger_and_leaves_the_model() -> None:
    model = _tiny_model()
    x, y = torch.rand(40, 1, 6, 6), torch.randint(1, 3, (40,))
    trig = make_trigger(TriggerConfig(size=2, margin=0), 6, 6)
    copy = adapted_copy(model, trig, x, y, 20, 0.2, 40, gen())
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(copy(trig.stamp(x)), y)) < float(loss(model(trig.stamp(x)), y))


def test_a3fl_builds_a_backdoor_with_the_optimised_trigger() -> None:
    model = _tiny_model()
    local = Split(torch.rand(20, 1, 6, 6), torch.tensor([0, 1, 2, 1] * 5))
    start = make_trigger(TriggerConfig(size=2, margin=0, value=0.5), 6, 6)
    spec = AttackSpec(AttackConfig(type="a3fl", attackers_ratio=0.3), start, 0, 1, 3, local=local,
                      global_model=model, seed=5, batch_size=8, lr=0.1)
    (backdoor,) = build_attack(spec).parts
    assert isinstance(backdoor, PixelBackdoor)
    assert torch.equal(backdoor.trigger.mask, start.mask) and not torch.equal(backdoor.trigger.pattern, start.pattern)


@pytest.mark.parametrize("setting", ["a3fl_trigger_steps=0", "a3fl_trigger_lr=0", "a3fl_adversary_steps=-1",
                                     "a3fl_adversary_weight=-1"])
def test_a3fl_bad_budget_fails_at_config_time(setting: str) -> None:
    key = setting.split("=")[0]
    with pytest.raises(ConfigError, match=rf"attack\.{key}: must be"):
        smoke("attack.type=a3fl", "attack.attackers_ratio=0.34", f"attack.{setting}")


def test_neurotoxin_in_the_clientapp_projects_from_its_second_round_on() -> None:
    """The ClientApp's own path: the node state carries the last global model between rounds."""
    from flwr.app import ConfigRecord

    from client.app import _train_partition
    from lab.data import load_data
    from lab.records import ParamLayout
    from lab.task import LocalHyperparams, build_for, state_of

    cfg = smoke("attack.type=neurotoxin", "attack.attackers_ratio=0.34")
    data = load_data(cfg.dataset, cfg.seed)
    model = build_for(cfg, data, seed=0)
    p = malicious_partitions(6, 0.34, cfg.seed)[0]
    node = {"partition-id": p, "num-partitions": 6}
    memory = RecordDict()
    hp = LocalHyperparams.of(cfg).to_config()

    def train(global_state, server_round):  # type: ignore[no-untyped-def]
        config = ConfigRecord({**hp, "server-round": server_round})
        arrays, _ = _train_partition(cfg, data, model, global_state, config, {}, node, p, 6, memory)
        return arrays.to_torch_state_dict()

    g1 = state_of(model)
    layout = ParamLayout.of(g1)
    g2 = train(g1, 1)  # round 1: no previous global yet, the update is unprojected
    assert int((layout.flatten(g2) - layout.flatten(g1) == 0).sum()) < 10
    g3 = train(g2, 2)
    delta = layout.flatten(g3) - layout.flatten(g2)
    keep = least_changed_mask(layout.flatten(g2) - layout.flatten(g1), cfg.attack.neurotoxin_topk)
    assert bool((delta[~keep] == 0).all()) and int((~keep).sum()) > 0
    assert float(delta[keep].abs().sum()) > 0


# ---- Edge-case -----------------------------------------------------------------------------------

def test_edge_case_poison_swaps_in_out_of_distribution_images_labelled_as_the_target() -> None:
    from client.attacks import EdgeCasePoison

    pool = torch.full((5, 1, 4, 4), 0.7)
    x, y = torch.zeros(8, 1, 4, 4), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    px, py = EdgeCasePoison(pool, target=0, ratio=0.25).poison_batch(x, y, gen())
    swapped = py == 0
    assert int(swapped.sum()) == 2
    assert bool((px[swapped] == 0.7).all()) and bool((px[~swapped] == 0).all())
    assert torch.equal(py[~swapped], y[~swapped]) and torch.equal(x, torch.zeros(8, 1, 4, 4))


def test_edge_case_asr_is_measured_on_the_held_out_fashion_images() -> None:
    from lab.edge_case import edge_case_images
    from lab.metrics import evaluate

    attack = AttackConfig(type="edge-case", edge_case_class=1)
    trig = trigger_for(attack, 16, 16)
    assert trig.stamp(torch.zeros(3, 1, 16, 16)).shape == (1000, 1, 16, 16)  # Fashion-MNIST's test trousers
    train = edge_case_images(attack, 16, "train")
    assert train.shape == (6000, 1, 16, 16) and not torch.equal(train[:1000], trig.stamp(train[:1]))

    class Says(nn.Module):  # predicts class 0 for bright images (trousers are), else 5
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = (x.mean(dim=(1, 2, 3)) > 0.3).float()
            return torch.stack([bright] + [torch.zeros_like(bright)] * 4 + [1 - bright]
                               + [torch.zeros_like(bright)] * 4, dim=1)

    test = Split(torch.zeros(4, 1, 16, 16), torch.tensor([1, 1, 2, 3]))
    ev = evaluate(Says(), test, trig, target=0, source=1)
    expected = float((trig.stamp(test.x).mean(dim=(1, 2, 3)) > 0.3).float().mean())
    assert ev.asr == pytest.approx(expected) and 0 < expected < 1


def test_edge_case_needs_a_digits_task_and_a_fashion_class() -> None:
    with pytest.raises(ConfigError, match=r"attack\.type: edge-case uses Fashion-MNIST .* 'cifar10'"):
        load_experiment({"dataset": {"name": "cifar10"}, "attack": {"type": "edge-case", "attackers_ratio": 0.3}})
    with pytest.raises(ConfigError, match=r"attack\.edge_case_class: must be a Fashion-MNIST class"):
        smoke("attack.type=edge-case", "attack.attackers_ratio=0.34", "attack.edge_case_class=10")
