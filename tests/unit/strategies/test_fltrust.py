"""FLTrust: hand-checked trust and rescaling, naive oracle, zero-trust choices, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.fltrust import fltrust
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo


def info(n: int, g0: torch.Tensor | None) -> RoundInfo:
    ref = None if g0 is None else (lambda: g0)
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.ones(n), reference_update=ref)


def naive(u: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    gn = math.sqrt(sum(float(v) ** 2 for v in g0))
    num = torch.zeros(u.shape[1], dtype=torch.float64)
    den = 0.0
    for r in u.double():
        rn = math.sqrt(sum(float(v) ** 2 for v in r))
        ts = max(0.0, float(r @ g0.double()) / (rn * gn)) if rn > 0 else 0.0
        num += ts * (gn / rn if rn > 0 else 0.0) * r
        den += ts
    return num / den


def test_hand_checked() -> None:
    g0 = torch.tensor([1.0, 0.0])
    u = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-3.0, 0.0], [1.0, 1.0]])
    agg = fltrust(u, info(4, g0))
    # trust: 1, 0, 0 (ReLU), 1/sqrt2; rescaled to norm 1: (1,0), -, -, (1,1)/sqrt2
    want = (torch.tensor([1.0, 0.0]) + (2**-0.5) * torch.tensor([1.0, 1.0]) / 2**0.5) / (1 + 2**-0.5)
    assert torch.allclose(agg.update, want, atol=1e-6)
    assert agg.kept is not None and agg.kept.tolist() == [True, False, False, True]


def test_zero_trust_choices_and_zero_update() -> None:
    g0 = torch.tensor([1.0, 0.0])
    u = torch.tensor([[-1.0, 0.0], [0.0, 0.0]])
    assert torch.equal(fltrust(u, info(2, g0)).update, torch.zeros(2))
    uni = fltrust(u, info(2, g0), on_zero_trust="uniform").update
    assert torch.allclose(uni, torch.tensor([-0.5, 0.0]))
    assert torch.isfinite(fltrust(u, info(2, torch.zeros(2))).update).all()


def test_errors() -> None:
    with pytest.raises(AggregationError, match="reference_update"):
        fltrust(torch.ones(2, 2), info(2, None))
    with pytest.raises(AggregationError, match="params"):
        fltrust(torch.ones(2, 2), info(2, torch.ones(3)))
    ctx = AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(2)}), clients_per_round=3)
    with pytest.raises(ConfigError):
        build_aggregator("fltrust", {"on_zero_trust": "skip"}, ctx)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_oracle_and_properties(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 4, generator=g)
    g0 = torch.randn(4, generator=g)
    agg = fltrust(u, info(n, g0))
    if agg.stats["agg.trust-sum"] > 0:
        assert torch.allclose(agg.update.double(), naive(u, g0), atol=1e-5)
        # a convex combination of vectors of norm ||g0||
        assert float(agg.update.norm()) <= float(g0.norm()) * (1 + 1e-5)
    perm = torch.randperm(n, generator=g)
    assert torch.allclose(fltrust(u[perm], info(n, g0)).update, agg.update, atol=1e-5)
    same = torch.stack([g0 * 3] * n)
    assert torch.allclose(fltrust(same, info(n, g0)).update, g0, atol=1e-5)
