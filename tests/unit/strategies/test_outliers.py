"""rfout-1d and iqr-filter: hand-checked cases, naive oracle, the n <= 10 warning, properties."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.outliers import iqr_filter, rfout_1d
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo


def info(n: int) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.ones(n))


def ctx(n: int) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(2)}), clients_per_round=n)


def naive_rfout(u: torch.Tensor, thr: float) -> torch.Tensor:
    n, d = u.shape
    out = []
    for k in range(d):
        col = [float(v) for v in u[:, k].double()]
        mu = sum(col) / n
        sd = (sum((v - mu) ** 2 for v in col) / n) ** 0.5
        out.append(sum(mu if abs(v - mu) > thr * sd else v for v in col) / n)
    return torch.tensor(out, dtype=torch.float64)


def test_rfout_hand_checked_n20() -> None:
    # 19 zeros and one 10: mu = 0.5, sigma = sqrt(19)/2, z = 9.5 / 2.18 = 4.36 > 3 -> replaced by 0.5
    u = torch.zeros(20, 2)
    u[0, 0] = 10.0
    agg = rfout_1d(u, info(20))
    # the 10 becomes mu = 0.5, the 19 zeros stay: mean = 0.5 / 20
    assert torch.allclose(agg.update, torch.tensor([0.025, 0.0]))
    assert agg.scores is not None and agg.scores[0] == 0.5 and agg.scores[1:].sum() == 0


def test_rfout_cannot_fire_for_n10_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    u = torch.zeros(10, 1)
    u[0, 0] = 1e6  # as extreme as it gets: |z| = sqrt(9) = 3, not > 3
    assert torch.allclose(rfout_1d(u, info(10)).update, u.mean(0))
    with caplog.at_level(logging.WARNING, logger="strategies.outliers"):
        build_aggregator("rfout-1d", {}, ctx(10))
    assert any("cannot ever be replaced" in r.message or "no coordinate" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="strategies.outliers"):
        build_aggregator("rfout-1d", {}, ctx(11))
    assert not caplog.records


def test_rfout_mad_fires_for_small_n() -> None:
    u = torch.tensor([[0.0], [0.1], [-0.1], [0.05], [100.0]])
    agg = rfout_1d(u, info(5), method="mad")
    assert float(agg.update) < 1.0  # 100 replaced by the median 0.05


@pytest.mark.parametrize("n", [12, 20, 33])
def test_rfout_matches_naive_loop(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    u = torch.randn(n, 200, generator=g)
    u[0, ::7] += 40.0
    assert torch.allclose(rfout_1d(u, info(n)).update.double(), naive_rfout(u, 3.0), atol=1e-5)


def test_rfout_chunks_agree_with_one_block() -> None:
    u = torch.randn(15, 70_001, generator=torch.Generator().manual_seed(0))
    u[3] *= 30
    mu, sd = u.mean(0), u.std(0, correction=0)
    want = torch.where((u - mu).abs() > 3 * sd, mu, u).mean(0)
    assert torch.allclose(rfout_1d(u, info(15)).update, want, atol=1e-6)


def test_iqr_filter_hand_checked() -> None:
    u = torch.tensor([[1.0], [2.0], [3.0], [4.0], [100.0]])  # fence 7
    agg = iqr_filter(u, info(5))
    assert agg.kept is not None and agg.kept.tolist() == [True] * 4 + [False]
    assert torch.allclose(agg.update, torch.tensor([2.5]))
    both = iqr_filter(torch.tensor([[0.0], [10.0], [11.0], [12.0], [13.0]]), info(5), sides="both")
    assert both.kept is not None and both.kept.tolist() == [False, True, True, True, True]


def test_errors() -> None:
    with pytest.raises(AggregationError):
        iqr_filter(torch.ones(3, 1), info(3))
    with pytest.raises(ConfigError):
        build_aggregator("iqr-filter", {}, ctx(3))
    with pytest.raises(ConfigError, match="threshold"):
        build_aggregator("rfout-1d", {"threshold": 0}, ctx(20))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 14), st.integers(0, 2**31 - 1))
def test_properties(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 5, generator=g) * 10
    perm = torch.randperm(n, generator=g)
    a = rfout_1d(u, info(n)).update
    assert torch.allclose(a, rfout_1d(u[perm], info(n)).update, atol=1e-5)
    assert bool(((a >= u.min(0).values - 1e-5) & (a <= u.max(0).values + 1e-5)).all())
    same = torch.stack([u[0]] * n)
    assert torch.allclose(rfout_1d(same, info(n)).update, u[0], atol=1e-5)
    if n >= 4:
        assert torch.allclose(iqr_filter(u, info(n)).update, iqr_filter(u[perm], info(n)).update, atol=1e-5)
        assert torch.allclose(iqr_filter(same, info(n)).update, u[0], atol=1e-5)
