"""rfout-1d at Samuelson's bound: where n - 1 values are equal, the odd one's |z| is exactly sqrt(n - 1).

At n = 10 and threshold 3 that is |z| = 3, which the paper's strict `> 3` keeps; the float test must
not flip on rounding (it did on 0.4-1.8 % of a 10-client run's coordinates, bench/RESULTS.md, issue 14),
or the start-up warning "the rule is plain FedAvg" is not true.
"""

from __future__ import annotations

import pytest
import torch

from strategies.outliers import rfout_1d
from strategies.types import RoundInfo


def info(n: int) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.ones(n))


def at_the_bound(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """n - 1 equal rows and one odd row that differs by 1e-6 to 10 (as a run's coordinates do)."""
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(d, generator=g, dtype=torch.float64) * 1e-3
    scale = 10.0 ** torch.empty(d, dtype=torch.float64).uniform_(-6, 1, generator=g)
    sign = torch.randint(0, 2, (d,), generator=g, dtype=torch.float64) * 2 - 1
    odd = honest + sign * scale
    return torch.cat([honest.expand(n - 1, d), odd[None]]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nothing_is_replaced_at_the_bound_at_n10(dtype: torch.dtype) -> None:
    u = at_the_bound(10, 50_000, dtype)
    agg = rfout_1d(u, info(10))
    assert agg.stats["agg.replaced-fraction"] == 0.0
    assert agg.scores is not None and float(agg.scores.abs().sum()) == 0.0
    atol = 16 * torch.finfo(dtype).eps * float(u.abs().max())  # a few roundings of the largest value
    assert torch.allclose(agg.update, u.mean(0), rtol=0, atol=atol)


def test_just_below_the_bound_everything_odd_is_replaced() -> None:
    # threshold 2.99 < sqrt(9): the odd value of every coordinate goes (the slack is not a wider threshold)
    u = at_the_bound(10, 50_000, torch.float32)
    agg = rfout_1d(u, info(10), threshold=2.99)
    assert agg.scores is not None and float(agg.scores[9]) == 1.0 and float(agg.scores[:9].sum()) == 0.0
    want = (u[:9].sum(0) + u.mean(0)) / 10  # each odd value replaced by its coordinate's mean
    assert torch.allclose(agg.update, want, rtol=0, atol=16 * torch.finfo(u.dtype).eps * float(u.abs().max()))


def test_above_the_bound_the_rule_still_fires() -> None:
    # n = 11: |z| = sqrt(10) = 3.16 > 3, every odd value is replaced
    u = at_the_bound(11, 10_000, torch.float32)
    agg = rfout_1d(u, info(11))
    assert agg.scores is not None and float(agg.scores[10]) == 1.0


def test_k_equal_colluders_at_k_equal_n_over_10_are_kept() -> None:
    # 2 equal colluders among 18 equal honest values: |z| = sqrt((20 - 2) / 2) = 3 exactly, a tie
    one = at_the_bound(10, 20_000, torch.float32, seed=1)
    u = torch.cat([one[:9], one[:9], one[9:], one[9:]])  # (20, d)
    agg = rfout_1d(u, info(20))
    assert agg.stats["agg.replaced-fraction"] == 0.0
