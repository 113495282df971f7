"""The federation settings papers differ in: per-round client sampling (`strategies.sampling`),
FedAvg's divisor (`strategies.mean`), their validation with key paths, the evaluation cadence and
the `settings` that summary.json records (`ExperimentConfig.settings`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lab.config import ExperimentConfig, load_experiment
from lab.errors import ConfigError
from lab.records import ParamLayout
from server.recorder import evaluates
from strategies.mean import weighted_mean, weighted_sum_over_total
from strategies.registry import build_aggregator
from strategies.sampling import RoundSampler
from strategies.types import AggregatorContext, RoundInfo

ROOT = Path(__file__).resolve().parents[2]


def problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_experiment(ROOT / "experiments/smoke.yaml", list(overrides))
    return "\n".join(err.value.problems)


# --- sampling ------------------------------------------------------------------------------------


def test_everyone_is_every_partition_in_order() -> None:
    s = RoundSampler(num_clients=5, size=5, seed=0)
    assert s.everyone and s.partitions(1) == s.partitions(7) == [0, 1, 2, 3, 4]


def test_sampling_is_seeded_per_round_and_differs_between_rounds_and_seeds() -> None:
    s = RoundSampler(num_clients=20, size=5, seed=3)
    rounds = [s.partitions(r) for r in range(1, 11)]
    assert rounds == [RoundSampler(num_clients=20, size=5, seed=3).partitions(r) for r in range(1, 11)]
    assert all(len(p) == 5 == len(set(p)) and p == sorted(p) and 0 <= p[0] and p[-1] < 20 for p in rounds)
    assert len({tuple(p) for p in rounds}) > 1
    assert rounds != [RoundSampler(num_clients=20, size=5, seed=4).partitions(r) for r in range(1, 11)]


def test_attackers_are_drawn_like_everyone_when_unset() -> None:
    # 100 rounds of 5 of 20 clients, 4 malicious: the attacker count varies (hypergeometric, mean 1).
    s = RoundSampler(num_clients=20, size=5, seed=0, malicious=frozenset({0, 1, 2, 3}))
    counts = [len(set(s.partitions(r)) & s.malicious) for r in range(1, 101)]
    assert len(set(counts)) > 1 and 0.6 < sum(counts) / 100 < 1.4


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_exactly_k_attackers_per_round(k: int) -> None:
    bad = frozenset({2, 5, 11, 17})
    s = RoundSampler(num_clients=20, size=5, seed=1, malicious=bad, attackers=k)
    for r in range(1, 51):
        chosen = s.partitions(r)
        assert len(chosen) == 5 == len(set(chosen)) and len(set(chosen) & bad) == k
    seen = set().union(*(s.partitions(r) for r in range(1, 51)))
    assert k == 0 or bad <= seen  # every attacker takes part sometime (4 of 4 at k = 4)


def test_impossible_attacker_counts_fail_when_built() -> None:
    with pytest.raises(ConfigError, match="attackers_per_round"):
        RoundSampler(num_clients=10, size=5, seed=0, malicious=frozenset({1}), attackers=2)
    with pytest.raises(ConfigError, match="attackers_per_round"):  # 9 honest places, 8 honest clients
        RoundSampler(num_clients=10, size=10, seed=0, malicious=frozenset({1, 2}), attackers=1)


# --- FedAvg's divisor ----------------------------------------------------------------------------


def info(*examples: float) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=tuple(range(len(examples))), num_examples=torch.tensor(examples))


def test_total_divisor_hand_checked() -> None:
    updates = torch.tensor([[8.0, 0.0], [16.0, 4.0]])
    # sampled: (1*[8,0] + 3*[16,4]) / 4 = [14, 3]
    assert weighted_mean(updates, info(1, 3)).update.tolist() == [14.0, 3.0]
    # total: the same sum, [56, 12], over all clients' weight 8 (two more clients with 2 each)
    agg = weighted_sum_over_total(updates, info(1, 3), total_weight=8.0)
    assert agg.update.tolist() == [7.0, 1.5]
    assert agg.weights is not None and agg.weights.tolist() == [0.125, 0.375]
    assert agg.stats["agg.weight-share"] == 0.5
    # unweighted (Bagdasaryan et al.): sum / number of all clients = [24, 4] / 4
    assert weighted_sum_over_total(updates, info(1, 3), total_weight=4.0, weighted=False).update.tolist() == [6.0, 1.0]


def test_total_equals_sampled_when_every_client_is_sampled() -> None:
    updates = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    i = info(3, 5, 7, 9)
    assert torch.allclose(weighted_sum_over_total(updates, i, total_weight=24.0).update,
                          weighted_mean(updates, i).update)


def test_registry_picks_the_divisor_from_the_context() -> None:
    layout = ParamLayout.of({"w": torch.zeros(2)})
    updates = torch.tensor([[8.0, 0.0], [16.0, 4.0]])
    sampled = build_aggregator("fedavg", {}, AggregatorContext(layout=layout, clients_per_round=2))
    total = build_aggregator("fedavg", {}, AggregatorContext(layout=layout, clients_per_round=2,
                                                             all_examples=(1.0, 3.0, 2.0, 2.0)))
    flat = build_aggregator("fedavg", {"weighted": False}, AggregatorContext(
        layout=layout, clients_per_round=2, all_examples=(1.0, 3.0, 2.0, 2.0)))
    assert sampled(updates, info(1, 3)).update.tolist() == [14.0, 3.0]
    assert total(updates, info(1, 3)).update.tolist() == [7.0, 1.5]
    assert flat(updates, info(1, 3)).update.tolist() == [6.0, 1.0]
    with pytest.raises(ConfigError, match="unexpected keyword 'total_weight'"):
        build_aggregator("fedavg", {"total_weight": 3.0}, AggregatorContext(layout=layout, clients_per_round=2))


# --- validation, cadence, recorded settings -------------------------------------------------------


@pytest.mark.parametrize(("overrides", "expected"), [
    (("federated.bias_h=1.5",), "federated.bias_h: must be in [0, 1]"),
    (("federated.bias_h=-0.1",), "federated.bias_h: must be in [0, 1]"),
    (("federated.partitioning=bias",), "federated.num_clients: the bias partitioning needs at least one client"),
    (("federated.attackers_per_round=3", "federated.clients_per_round=2"),
     "federated.attackers_per_round: must be in [0, clients_per_round=2]"),
    (("federated.attackers_per_round=2",), "only 1 malicious clients"),
    (("federated.attackers_per_round=1", "attack.type=none", "attack.attackers_ratio=0.0"), "(attack.type is none)"),
    (("federated.attackers_per_round=0",), "leaves 4 honest places per round, but only 3 honest clients"),
    (("training.eval_every=0",), "training.eval_every: must be >= 1"),
    (("federated.fedavg_divisor=all",), "federated.fedavg_divisor"),
    (("federated.fedavg_divisor=total", "federated.aggregator.name=median"),
     "federated.fedavg_divisor: 'total' changes FedAvg's mean only"),
])
def test_impossible_values_are_named_with_key_paths(overrides: tuple[str, ...], expected: str) -> None:
    assert expected in problems(*overrides)


def test_attackers_per_round_checked_for_every_ratio_of_a_list() -> None:
    text = problems("federated.num_clients=10", "federated.clients_per_round=5", "federated.attackers_per_round=2",
                    "attack.attackers_ratio=[0.1,0.3]")
    assert "attack.attackers_ratio[0]=0.1" in text and "[1]" not in text


def test_possible_settings_load() -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [
        "federated.num_clients=10", "federated.partitioning=bias", "federated.bias_h=0.5",
        "federated.clients_per_round=5", "federated.attackers_per_round=1", "federated.fedavg_divisor=total",
        "training.eval_every=3"])
    assert cfg.federated.bias_h == 0.5 and cfg.federated.attackers_per_round == 1
    assert cfg.training.eval_every == 3 and cfg.federated.fedavg_divisor == "total"


def test_eval_cadence_always_has_round_zero_and_the_last() -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=7", "training.eval_every=3"])
    assert [r for r in range(8) if evaluates(cfg, r)] == [0, 3, 6, 7]
    every = load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=3"])
    assert all(evaluates(every, r) for r in range(4))


def test_settings_name_the_partitioning_parameter_in_use() -> None:
    base = load_experiment(ROOT / "experiments/smoke.yaml")
    s = ExperimentConfig.settings(base)
    assert s["federated.partitioning"] == "iid" and "federated.bias_h" not in s and "federated.dirichlet_alpha" not in s
    assert s["federated.clients_per_round"] == 4 and s["federated.attackers_per_round"] is None
    assert s["federated.fedavg_divisor"] == "sampled" and s["federated.server_lr"] == 1.0
    assert s["training.local_epochs"] == 1 and s["training.local_steps"] is None
    assert s["training.eval_every"] == 1 and s["training.model"] == "cnn" and s["dataset.name"] == "digits"
    biased = ExperimentConfig.settings(load_experiment(ROOT / "experiments/smoke.yaml", [
        "federated.num_clients=10", "federated.partitioning=bias", "federated.bias_h=0.7", "training.local_steps=1"]))
    assert biased["federated.bias_h"] == 0.7 and "federated.dirichlet_alpha" not in biased
    assert biased["training.local_steps"] == 1 and biased["training.local_epochs"] is None
    alpha = ExperimentConfig.settings(load_experiment(ROOT / "experiments/smoke.yaml", ["federated.partitioning=dirichlet"]))
    assert alpha["federated.dirichlet_alpha"] == 0.5
