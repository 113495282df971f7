import torch

from client.attacks import (ATTACKS, AttackSpec, Boost, GaussianNoise, LabelFlip, NormBound, PixelBackdoor,
                            SignFlip, UpdateContext, attacks_this_round, build_attack)
from lab.config import AttackConfig, TriggerConfig, load_experiment
from lab.triggers import make_trigger

TRIG = make_trigger(TriggerConfig(size=1, margin=0), 3, 3)
CTX = UpdateContext(server_round=1, round_size=10, server_lr=0.5)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_registry_covers_every_attack_type_in_the_schema() -> None:
    import typing
    from lab.config import AttackType
    assert set(ATTACKS) == set(typing.get_args(AttackType))


def test_mix_mode_stamps_and_relabels_a_fraction_of_eligible_samples() -> None:
    x = torch.zeros(4, 1, 3, 3)
    y = torch.tensor([0, 1, 2, 3])
    bd = PixelBackdoor(TRIG, target=0, source=None, mode="mix", ratio=0.5)
    px, py = bd.poison_batch(x, y, gen())
    changed = torch.nonzero(py != y).flatten().tolist()
    assert len(changed) == 2 and 0 not in changed  # label-0 samples are not eligible (already target)
    for i in range(4):
        stamped = bool(px[i, 0, 2, 2] == 1.0)
        assert stamped == (i in changed)
    assert torch.equal(x, torch.zeros(4, 1, 3, 3))  # caller's batch untouched


def test_append_mode_adds_stamped_copies_from_the_source_pool() -> None:
    x = torch.rand(4, 1, 3, 3) * 0.5
    y = torch.tensor([2, 2, 3, 4])  # no source-class sample in this batch
    pool = torch.rand(3, 1, 3, 3) * 0.5
    bd = PixelBackdoor(TRIG, target=0, source=1, mode="append", ratio=0.5, pool=pool)
    px, py = bd.poison_batch(x, y, gen())
    assert px.shape[0] == 6 and py.tolist() == [2, 2, 3, 4, 0, 0]  # round(0.5 * 4) = 2 appended
    assert torch.equal(px[:4], x)
    assert bool((px[4:, 0, 2, 2] == 1.0).all())
    pool_rows = {tuple(p.flatten()[:-1].tolist()) for p in pool}
    assert all(tuple(px[i].flatten()[:-1].tolist()) in pool_rows for i in (4, 5))
    one = bd.poison_batch(x[:1], y[:1], gen())[1]
    assert one.tolist() == [2, 0]  # at least one poisoned sample, even in a batch of one
    assert PixelBackdoor(TRIG, 0, 1, "append", 0.5, pool=None).poison_batch(x, y, gen())[1].tolist() == y.tolist()


def test_label_flip() -> None:
    x, y = torch.zeros(3, 1, 3, 3), torch.tensor([1, 2, 9])
    assert LabelFlip(10, source=1, target=7).poison_batch(x, y, gen())[1].tolist() == [7, 2, 9]
    assert LabelFlip(10, source=None, target=0).poison_batch(x, y, gen())[1].tolist() == [8, 7, 0]


def test_update_transforms_follow_their_formulas() -> None:
    d = torch.tensor([3.0, 4.0])
    assert torch.equal(Boost(2.0).transform_update(d, CTX, gen()), torch.tensor([6.0, 8.0]))
    # model replacement: gamma = clients in the round / server lr = 10 / 0.5
    assert Boost(None).gamma(CTX) == 20.0
    assert torch.allclose(NormBound(1.0).transform_update(d, CTX, gen()), torch.tensor([0.6, 0.8]))
    assert torch.equal(NormBound(10.0).transform_update(d, CTX, gen()), d)
    assert torch.equal(SignFlip(2.0).transform_update(d, CTX, gen()), torch.tensor([-6.0, -8.0]))
    noise = GaussianNoise(3.0).transform_update(torch.zeros(20000), CTX, gen())
    assert abs(float(noise.std()) - 3.0) < 0.1


def test_build_attack_composes_boost_then_projection() -> None:
    spec = AttackSpec(AttackConfig(type="backdoor", attackers_ratio=0.3, boost="auto", norm_bound=1.0),
                      TRIG, target=0, source=None, num_classes=10)
    attack = build_attack(spec)
    assert [type(p).__name__ for p in attack.parts] == ["PixelBackdoor", "Boost", "NormBound"]
    out = attack.transform_update(torch.tensor([0.03, 0.04]), CTX, gen())
    assert torch.allclose(out.norm(), torch.tensor(1.0))  # boosted x20 to norm 1.0, at the bound


def test_behaviour_rate_and_round_window() -> None:
    cfg = load_experiment({"attack": {"type": "backdoor", "attackers_ratio": 0.3, "start_round": 3,
                                      "end_round": 5, "malicious_behavior_rate": 1.0}})
    assert [attacks_this_round(cfg, 0, r) for r in range(1, 8)] == [False, False, True, True, True, False, False]
    half = load_experiment({"attack": {"type": "backdoor", "attackers_ratio": 0.3, "malicious_behavior_rate": 0.5}})
    draws = [attacks_this_round(half, p, r) for p in range(10) for r in range(1, 41)]
    assert 0.35 < sum(draws) / len(draws) < 0.65
    assert draws == [attacks_this_round(half, p, r) for p in range(10) for r in range(1, 41)]  # deterministic


def test_mix_with_ratio_one_poisons_every_eligible_sample() -> None:
    y = torch.tensor([1, 2, 3])
    _, py = PixelBackdoor(TRIG, 0, None, "mix", 1.0).poison_batch(torch.zeros(3, 1, 3, 3), y, gen())
    assert py.tolist() == [0, 0, 0]


def test_label_flip_without_source_is_foundationfls_l_to_9_minus_l() -> None:
    y = torch.arange(10)
    flipped = LabelFlip(10, source=None, target=0).poison_batch(torch.zeros(10, 1, 3, 3), y, gen())[1]
    assert flipped.tolist() == [9 - label for label in range(10)]


def test_scaling_is_the_backdoor_boosted_by_the_round_size() -> None:
    from lab.data import Split

    local = Split(torch.rand(6, 1, 3, 3), torch.tensor([0, 1, 2, 0, 3, 4]))
    spec = AttackSpec(AttackConfig(type="scaling", attackers_ratio=0.3, poison_mode="append"), TRIG, target=0,
                      source=None, num_classes=10, local=local)
    attack = build_attack(spec)
    assert [type(p).__name__ for p in attack.parts] == ["PixelBackdoor", "Boost"]
    backdoor, boost = attack.parts
    assert isinstance(backdoor, PixelBackdoor) and backdoor.pool is not None
    assert len(backdoor.pool) == 4  # all-to-one append copies the attacker's non-target images
    assert isinstance(boost, Boost) and boost.gamma(CTX) == 20.0  # n / eta = 10 / 0.5
    same = build_attack(AttackSpec(AttackConfig(type="backdoor", attackers_ratio=0.3, poison_mode="append",
                                                boost="auto"), TRIG, 0, None, 10, local))
    d = torch.tensor([0.1, -0.2])
    assert torch.equal(attack.transform_update(d, CTX, gen()), same.transform_update(d, CTX, gen()))


def test_update_matrix_attacks_in_the_client_follow_the_knowledge() -> None:
    from client.attacks import OwnUpdateAttack

    full = build_attack(AttackSpec(AttackConfig(type="alie", attackers_ratio=0.3), TRIG, 0, None, 10))
    assert full.parts == () and not full.transforms_update  # the server-side colluder crafts the row
    partial = build_attack(AttackSpec(AttackConfig(type="ipm", attackers_ratio=0.3, knowledge="partial",
                                                   ipm_epsilon=0.5), TRIG, 0, None, 10))
    assert [type(p) for p in partial.parts] == [OwnUpdateAttack]
    d = torch.tensor([2.0, -4.0])
    assert torch.equal(partial.transform_update(d, CTX, gen()), torch.tensor([-1.0, 2.0]))  # -eps * own
