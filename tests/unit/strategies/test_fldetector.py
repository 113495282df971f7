"""FLDetector: L-BFGS and the gap statistic by hand and against brute force, detection on a
quadratic federation, resume (state_dict through safetensors) with the same decisions,
permutation and identical-client properties, bad settings and inputs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.fldetector import FLDetector, lbfgs_hvp
from strategies.gap_statistic import gap_clusters, kmeans_1d
from strategies.registry import build_aggregator
from strategies.types import Aggregate, AggregatorContext, RoundInfo

D, N, ATTACKERS = 6, 8, (2, 5)  # attackers in the middle: no rule may rank by row order


def ctx(n: int = N) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(D)}), clients_per_round=n, seed=0)


# ---------------------------------------------------------------------------------------- math


def test_lbfgs_secant_and_one_pair_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    s, y, v = (torch.randn(3, D, generator=g, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(lbfgs_hvp(s, y, s[-1]), y[-1], atol=1e-9)  # B s_last = y_last
    s1, y1, v1 = s[:1], y[:1], v[0]
    want = float(y1[0] @ s1[0]) / float(s1[0] @ s1[0]) * (v1 - s1[0] * float(s1[0] @ v1) / float(s1[0] @ s1[0])) \
        + y1[0] * float(y1[0] @ v1) / float(s1[0] @ y1[0])
    assert torch.allclose(lbfgs_hvp(s1, y1, v1), want, atol=1e-9)


def test_lbfgs_of_a_scaled_identity_is_exact() -> None:
    s = torch.randn(4, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(lbfgs_hvp(s, -0.3 * s, v), -0.3 * v, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_1d_is_the_brute_force_optimum(seed: int) -> None:
    x = torch.randn(7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for k in (1, 2, 3):
        labels, w = kmeans_1d(x, k)
        best = min(sum(float(((x[[i for i in range(7) if a[i] == c]] - x[[i for i in range(7) if a[i] == c]].mean())
                               ** 2).sum()) for c in set(a))
                   for a in itertools.product(range(k), repeat=7))
        assert w == pytest.approx(best, abs=1e-9)
        assert len(set(labels.tolist())) == k
        means = [float(x[labels == c].mean()) for c in range(k)]
        assert means == sorted(means)  # label order follows value order


def test_gap_statistic_counts_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    two = torch.tensor([0.10, 0.11, 0.12, 0.10, 0.11, 0.9, 0.91], dtype=torch.float64)
    assert gap_clusters(two, gen) >= 2
    assert gap_clusters(torch.full((6,), 0.2, dtype=torch.float64), gen) == 1
    spread = torch.linspace(0, 1, 12, dtype=torch.float64)
    assert gap_clusters(spread, torch.Generator().manual_seed(0)) == 1


# ---------------------------------------------------------------------------------------- federation


def honest_update(cid: int, w: torch.Tensor) -> torch.Tensor:
    """-eta (A w - b_i): a gradient step on a client's quadratic; non-IID through b_i."""
    a = torch.diag(torch.linspace(1.0, 3.0, D))
    b = torch.randn(D, generator=torch.Generator().manual_seed(100 + cid))
    return -0.1 * (a @ w - b)


def round_updates(t: int, w: torch.Tensor, ids: tuple[int, ...], attackers: tuple[int, ...] = ATTACKERS) -> torch.Tensor:
    rows = []
    for cid in ids:
        if cid in attackers:  # fresh noise every round: no Hessian predicts it
            rows.append(0.5 * torch.randn(D, generator=torch.Generator().manual_seed(1000 * t + cid)))
        else:
            rows.append(honest_update(cid, w))
    return torch.stack(rows).to(torch.float32)


def federate(rule: FLDetector, rounds: range, w: torch.Tensor, perm: list[int] | None = None,
             attackers: tuple[int, ...] = ATTACKERS) -> tuple[torch.Tensor, list[Aggregate]]:
    """Run `rounds` of a federation with all N clients (rows in `perm` order); returns the final
    global model and each round's Aggregate with its per-row tensors put back in client order."""
    out = []
    ids = tuple(perm or range(N))
    for t in rounds:
        u = round_updates(t, w, ids, attackers)
        agg = rule(u, RoundInfo(server_round=t, client_ids=ids, num_examples=torch.ones(N), global_params=w.clone()))
        back = torch.argsort(torch.tensor(ids))
        assert agg.kept is not None and agg.suspicion is not None
        out.append(Aggregate(update=agg.update, kept=agg.kept[back], suspicion=agg.suspicion[back], stats=agg.stats))
        w = w + agg.update
    return w, out


def test_detects_the_unpredictable_clients_and_removes_them_for_good() -> None:
    rule = FLDetector(ctx(), window=5, warmup=2)
    _, aggs = federate(rule, range(1, 11), torch.zeros(D))
    assert rule.banned == set(ATTACKERS)
    last = aggs[-1]
    assert last.kept is not None and last.suspicion is not None
    assert [i for i in range(N) if not last.kept[i]] == list(ATTACKERS)
    top = set(torch.argsort(last.suspicion, descending=True)[:2].tolist())
    assert top == set(ATTACKERS)
    assert aggs[0].stats["agg.predicted"] == 0 and aggs[-1].stats["agg.predicted"] == N
    assert all(a.kept is not None and bool(a.kept.all()) for a in aggs[:3])  # no prediction, then warm-up


def test_resume_from_state_dict_makes_the_same_decisions(tmp_path: Path) -> None:
    first = FLDetector(ctx(), window=4, warmup=2)
    w, _ = federate(first, range(1, 5), torch.zeros(D))
    path = tmp_path / "fldetector.safetensors"
    save_file(first.state_dict(), str(path))
    resumed = FLDetector(ctx(), window=4, warmup=2)
    resumed.load_state_dict(load_file(str(path)))
    _, a = federate(first, range(5, 9), w)
    _, b = federate(resumed, range(5, 9), w)
    for x, y in zip(a, b):
        assert x.kept is not None and y.kept is not None and torch.equal(x.kept, y.kept)
        assert x.suspicion is not None and y.suspicion is not None and torch.allclose(x.suspicion, y.suspicion)
        assert torch.allclose(x.update, y.update)
    assert resumed.banned == first.banned == set(ATTACKERS)
    fresh = FLDetector(ctx(), window=4, warmup=2)  # without the history nothing is detected in time
    _, c = federate(fresh, range(5, 9), w)
    assert c[0].stats["agg.predicted"] == 0


def test_permutation_of_rows_gives_the_same_decisions_per_client() -> None:
    _, a = federate(FLDetector(ctx(), window=5, warmup=2), range(1, 9), torch.zeros(D))
    _, b = federate(FLDetector(ctx(), window=5, warmup=2), range(1, 9), torch.zeros(D), perm=[6, 1, 4, 0, 7, 2, 5, 3])
    for x, y in zip(a, b):
        assert x.kept is not None and y.kept is not None and torch.equal(x.kept, y.kept)
        assert x.suspicion is not None and y.suspicion is not None
        assert torch.allclose(x.suspicion, y.suspicion, atol=1e-6)
        assert torch.allclose(x.update, y.update, atol=1e-5)


def test_identical_honest_clients_are_never_flagged() -> None:
    rule = FLDetector(ctx(), window=3, warmup=1)
    w = torch.zeros(D)
    for t in range(1, 8):
        u = honest_update(0, w).repeat(N, 1)
        agg = rule(u, RoundInfo(server_round=t, client_ids=tuple(range(N)), num_examples=torch.ones(N),
                                global_params=w.clone()))
        assert agg.kept is not None and bool(agg.kept.all())
        assert torch.allclose(agg.update, u[0])
        w = w + agg.update
    assert not rule.banned


@pytest.mark.parametrize("hp", [{"window": 0}, {"warmup": 0}, {"ban": "yes"}, {"references": 1},
                                {"window": 2.5}, {"alpha": 1}])
def test_bad_settings_fail_at_build(hp: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        build_aggregator("fldetector", hp, ctx())


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_aggregator("fldetector", {}, ctx(2))
    rule = FLDetector(ctx(3))
    u = torch.zeros(3, D)
    with pytest.raises(AggregationError, match="global_params"):
        rule(u, RoundInfo(server_round=1, client_ids=(0, 1, 2), num_examples=torch.ones(3)))
    with pytest.raises(AggregationError, match="duplicate"):
        rule(u, RoundInfo(server_round=1, client_ids=(0, 1, 1), num_examples=torch.ones(3), global_params=torch.zeros(D)))
    with pytest.raises(AggregationError, match="params"):
        rule(torch.zeros(3, D + 1), RoundInfo(server_round=1, client_ids=(0, 1, 2), num_examples=torch.ones(3),
                                             global_params=torch.zeros(D + 1)))
