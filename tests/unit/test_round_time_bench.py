"""bench/round_time.py --paper-scale: the setting it builds and the rounds its statistic uses."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def rt() -> ModuleType:
    return load_bench("round_time")


def test_paper_config_is_the_card_at_n_clients(rt: ModuleType) -> None:
    cfg = rt.paper_config(100, 4, [])
    f, t = cfg.federated, cfg.training
    assert (f.num_clients, f.round_size, f.partitioning, f.bias_h) == (100, 100, "bias", 0.5)
    assert (t.model, t.local_steps, t.batch_size, t.lr, t.momentum) == ("fltrust-cnn", 1, 32, 0.01, 0.0)
    assert (t.rounds, t.eval_every) == (4, 4)  # central evaluation on the last round only
    assert (cfg.attack.type, f.aggregator.name, cfg.dataset.name) == ("none", "fedavg", "fashion-mnist")


def test_lab_set_passes_through_last(rt: ModuleType) -> None:
    cfg = rt.paper_config(10, 3, ["execution.client_cpus=1", "federated.partitioning=iid"])
    assert cfg.execution.client_cpus == 1.0
    assert cfg.federated.partitioning == "iid"


def test_steady_skips_round_one_and_evaluated_rounds(rt: ModuleType) -> None:
    rows = [
        {"round": 0, "accuracy": 0.1, "round_seconds": 9.0},
        {"round": 1, "accuracy": None, "round_seconds": 5.0},  # start-up
        {"round": 2, "accuracy": None, "round_seconds": 1.0},
        {"round": 3, "accuracy": None, "round_seconds": 2.0},
        {"round": 4, "accuracy": 0.5, "round_seconds": 7.0},  # the one central evaluation
    ]
    assert rt.steady(rows) == [1.0, 2.0]


def test_steady_refuses_too_few_rounds(rt: ModuleType) -> None:
    rows = [{"round": 1, "accuracy": None, "round_seconds": 5.0}, {"round": 2, "accuracy": 0.5, "round_seconds": 7.0}]
    with pytest.raises(SystemExit, match="--rounds >= 3"):
        rt.steady(rows)


def test_floor_workers_follow_the_lab_concurrency(rt: ModuleType) -> None:
    cores = rt.usable_cores()
    # One message per client: Ray's actors, cores // client_cpus.
    assert rt.floor_workers(rt.paper_config(10, 3, [f"execution.client_cpus={cores}"]), 1) == 1
    assert rt.floor_workers(rt.paper_config(10, 3, ["execution.client_cpus=1"]), 1) == cores
    # Cohort messages: the launcher's worker nodes.
    assert rt.floor_workers(rt.paper_config(10, 3, []), 5) == cores
    assert rt.floor_workers(rt.paper_config(10, 3, ["execution.workers=3"]), 5) == 3
