"""norm-clip, clip-avg, clip-avg-iqr: hand-checked bounds, naive oracles, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.clipping import NormClip, clip_avg, clip_avg_iqr, decayed_bound
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo


def info(n: int, rnd: int = 1, examples: list[float] | None = None) -> RoundInfo:
    ex = torch.tensor(examples if examples is not None else [1.0] * n)
    return RoundInfo(server_round=rnd, client_ids=tuple(range(n)), num_examples=ex)


def ctx(n: int = 5, seed: int = 0) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(2)}), clients_per_round=n, seed=seed)


def naive_clip_mean(u: torch.Tensor, bound: float) -> torch.Tensor:
    rows = []
    for r in u.double():
        norm = math.sqrt(sum(float(v) ** 2 for v in r))
        rows.append(r * (bound / norm if norm > bound else 1.0))
    return torch.stack(rows).mean(0)


def test_norm_clip_hand_checked() -> None:
    u = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # norms 5, 0.5, 0
    agg = NormClip(ctx(3), max_norm=1.0)(u, info(3))
    # 5 -> 1: (0.6, 0.8); others unchanged; mean = (0.9, 1.2) / 3
    assert torch.allclose(agg.update, torch.tensor([0.3, 0.4]))
    assert agg.clipped is not None and agg.clipped.tolist() == [True, False, False]


def test_norm_clip_noise_is_seeded_and_sized() -> None:
    u = torch.zeros(4, 20_000)
    a = NormClip(ctx(4, seed=3), max_norm=1.0, noise_std=0.01)(u, info(4, rnd=2)).update
    b = NormClip(ctx(4, seed=3), max_norm=1.0, noise_std=0.01)(u, info(4, rnd=2)).update
    c = NormClip(ctx(4, seed=3), max_norm=1.0, noise_std=0.01)(u, info(4, rnd=3)).update
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.std()) - 0.01) < 0.0005


def test_clip_avg_decaying_bound() -> None:
    # gamma_t = 2 * (t+1)^-1, t = round - 1: round 1 -> 2, round 4 -> 0.5
    assert decayed_bound(2.0, 1.0, 1, 1) == 2.0
    assert decayed_bound(2.0, 1.0, 4, 1) == 0.5
    assert decayed_bound(2.0, 1.0, 4, 0) == pytest.approx(0.4)
    u = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    agg = clip_avg(u, info(2, rnd=4), clip_gamma=2.0, clip_decay=1.0)
    assert torch.allclose(agg.update, torch.tensor([0.25, 0.25]))
    assert agg.stats["agg.bound"] == 0.5


def test_clip_avg_iqr_hand_checked() -> None:
    # norms 1, 2, 3, 4, 100 -> Q1 = 2, Q3 = 4, fence = 4 + 1.5 * 2 = 7
    u = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])
    fence = clip_avg_iqr(u, info(5), bound="fence")
    assert fence.stats["agg.fence"] == 7.0
    assert torch.allclose(fence.update, torch.tensor([(1 + 2 + 3 + 4 + 7) / 5]))
    mn = clip_avg_iqr(u, info(5), clip_gamma=2.5, bound="min")  # B = min(7, 2.5)
    assert torch.allclose(mn.update, torch.tensor([(1 + 2 + 2.5 + 2.5 + 2.5) / 5]))
    flag = clip_avg_iqr(u, info(5), clip_gamma=2.5, bound="flag")  # only 100 is flagged -> 2.5
    assert torch.allclose(flag.update, torch.tensor([(1 + 2 + 3 + 4 + 2.5) / 5]))
    assert flag.clipped is not None and flag.clipped.tolist() == [False] * 4 + [True]


def test_identical_norms_iqr_zero_and_zero_updates() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    agg = clip_avg_iqr(u, info(4), bound="fence")
    assert agg.clipped is not None and not agg.clipped.any()
    z = torch.zeros(4, 3)
    for a in (clip_avg_iqr(z, info(4), clip_gamma=1.0), clip_avg(z, info(4), clip_gamma=1.0),
              NormClip(ctx(4), max_norm=1.0)(z, info(4))):
        assert torch.equal(a.update, torch.zeros(3))


def test_runtime_and_build_errors() -> None:
    with pytest.raises(AggregationError):
        clip_avg_iqr(torch.ones(3, 2), info(3), clip_gamma=1.0)
    with pytest.raises(ConfigError, match=">= 4"):
        build_aggregator("clip-avg-iqr", {"clip_gamma": 1.0}, ctx(3))
    with pytest.raises(ConfigError, match="clip_gamma"):
        build_aggregator("clip-avg-iqr", {"clip_gamma": None}, ctx(5))  # no gamma: only with bound=fence
    build_aggregator("clip-avg-iqr", {}, ctx(5))  # the seed study's gamma and decay by default
    build_aggregator("clip-avg-iqr", {"bound": "fence"}, ctx(5))
    with pytest.raises(ConfigError, match="max_norm"):
        build_aggregator("norm-clip", {"max_norm": 0}, ctx(5))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_aggregator("norm-clip", {"max_norm": 1.0, "sigma": 1}, ctx(5))
    with pytest.raises(ConfigError, match="clip_gamma"):
        build_aggregator("clip-avg", {"clip_gamma": -1.0}, ctx(5))


rows = st.integers(1, 7).flatmap(
    lambda n: st.lists(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=3, max_size=3),
                       min_size=n, max_size=n))


@settings(max_examples=60, deadline=None)
@given(rows, st.floats(0.01, 50))
def test_clip_never_raises_a_norm_and_matches_oracle(data: list[list[float]], bound: float) -> None:
    u = torch.tensor(data)
    n = u.shape[0]
    agg = clip_avg(u, info(n), clip_gamma=bound)
    assert float(agg.update.norm()) <= bound * (1 + 1e-5) + 1e-6
    assert torch.allclose(agg.update.double(), naive_clip_mean(u, bound), atol=1e-4)
    # per-client effective scale never exceeds 1/n: clipping never raises a norm
    assert agg.weights is not None and bool((agg.weights <= 1.0 / n + 1e-7).all())
    perm = torch.randperm(n)
    assert torch.allclose(clip_avg(u[perm], info(n), clip_gamma=bound).update, agg.update, atol=1e-4)
    if n >= 4:
        iq = clip_avg_iqr(u, info(n), clip_gamma=bound)
        assert float(iq.update.norm()) <= bound * (1 + 1e-5) + 1e-6


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=4), st.integers(4, 8))
def test_identical_clients_within_bound_give_that_update(row: list[float], n: int) -> None:
    u = torch.tensor([row] * n)
    big = float(u[0].norm()) + 1.0
    assert torch.allclose(clip_avg(u, info(n), clip_gamma=big).update, u[0], atol=1e-5)
    assert torch.allclose(clip_avg_iqr(u, info(n), clip_gamma=big).update, u[0], atol=1e-5)
