"""signguard: the norm band, the sign cluster, the median-norm clip, properties, bad settings."""

from __future__ import annotations

import pytest
import torch

from lab.errors import ConfigError
from strategies.registry import build_aggregator
from strategies.signguard import SignGuard, largest_cluster, sign_features
from tests.unit.strategies.rounds import check_permutation, ctx, info


def honest_and_two_attackers(seed: int = 0) -> torch.Tensor:
    """Six honest rows around a mostly-positive direction, a sign flipper (4) and a huge one (7)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(200, generator=g) + 0.2
    honest = base + 0.3 * torch.randn(6, 200, generator=g)
    u = torch.cat([honest[:4], -honest[4:5], honest[5:], 50.0 * base[None]])
    return u


def test_sign_features_hand_checked() -> None:
    feats = sign_features(torch.tensor([[1.0, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, -1.0]]))
    assert feats.tolist() == [[0.5, 0.25, 0.25], [0.0, 0.75, 0.25]]


def test_filters_the_flipper_and_the_huge_update() -> None:
    u = honest_and_two_attackers()
    agg = SignGuard(ctx(7), coord_frac=1.0)(u, info(7))
    assert agg.kept.tolist() == [True, True, True, True, False, True, False]
    assert set(torch.argsort(agg.suspicion, descending=True)[:2].tolist()) == {4, 6}
    norms = torch.linalg.vector_norm(u, dim=1)
    median = float(torch.quantile(norms.double(), 0.5))
    factors = torch.clamp(median / norms, max=1.0)
    want = (u[agg.kept] * factors[agg.kept, None]).sum(0) / 5
    assert torch.allclose(agg.update, want, atol=1e-5)
    assert torch.allclose(agg.update, agg.weights @ u, atol=1e-5)


def test_largest_cluster_tie_goes_to_the_lowest_row() -> None:
    feats = torch.tensor([[0.9, 0.0, 0.1], [0.1, 0.0, 0.9], [0.9, 0.0, 0.1], [0.1, 0.0, 0.9]], dtype=torch.float64)
    members, _ = largest_cluster(feats, 0.5)
    assert members.tolist() == [True, False, True, False]


@pytest.mark.parametrize("seed", range(3))
def test_permutation_invariant(seed: int) -> None:
    a, b, perm = check_permutation(lambda: SignGuard(ctx(7)), honest_and_two_attackers(seed), seed)
    assert torch.equal(a.kept[perm], b.kept)


def test_identical_clients_give_that_update() -> None:
    row = torch.tensor([0.5, -2.0, 3.0])
    agg = SignGuard(ctx(5))(row.expand(5, 3).clone(), info(5))
    assert torch.allclose(agg.update, row) and agg.kept.all()


def test_bad_settings() -> None:
    for params, key in (({"lower": 1.5}, "lower"), ({"upper": 0.5}, "upper"), ({"coord_frac": 0.0}, "coord_frac"),
                        ({"bandwidth_quantile": 1.5}, "bandwidth_quantile"), ({"coord_frac": "all"}, "coord_frac")):
        with pytest.raises(ConfigError, match=key):
            build_aggregator("signguard", params, ctx(5))
