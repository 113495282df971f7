"""FLAME: clustering admits the majority, median-norm clipping, seeded adaptive noise."""

from __future__ import annotations

import pytest
import torch

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.flame import Flame, cosine_distances
from strategies.kernels import gram_matrix
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo

LAYOUT = ParamLayout.of({"fc.weight": torch.zeros(2, 2), "bn.running_mean": torch.zeros(2), "bn.num_batches_tracked": torch.zeros((), dtype=torch.int64)})


def ctx(n: int, seed: int = 0) -> AggregatorContext:
    return AggregatorContext(layout=LAYOUT, clients_per_round=n, seed=seed)


def info(n: int, rnd: int = 1, g: torch.Tensor | None = None) -> RoundInfo:
    return RoundInfo(server_round=rnd, client_ids=tuple(range(n)), num_examples=torch.ones(n), global_params=g)


def majority(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    honest = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.3]) + 0.05 * torch.randn(5, 6, generator=gen)
    bad = torch.tensor([-1.0, 0.0, 2.0, 0.0, 0.0, 0.0]) * 10 + 0.05 * torch.randn(2, 6, generator=gen)
    return torch.cat([honest, bad])


def test_cosine_distances_hand_checked() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 0.0]])
    d = cosine_distances(gram_matrix(u))
    assert torch.allclose(d[0], torch.tensor([0.0, 1.0, 2.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(d).all()


def test_admits_majority_and_clips_to_median_norm() -> None:
    u = majority()
    agg = Flame(ctx(7), noise="none")(u, info(7))
    assert agg.kept is not None and agg.kept.tolist() == [True] * 5 + [False] * 2
    norms = u.norm(dim=1)
    s_t = float(norms.median())  # n = 7: the middle value
    assert agg.stats["agg.median-norm"] == pytest.approx(s_t, rel=1e-6)
    want = torch.stack([r * min(1.0, s_t / float(r.norm())) for r in u[:5]]).mean(0)
    assert torch.allclose(agg.update, want, atol=1e-6)


def test_noise_is_seeded_skips_bn_stats_and_has_lambda_s_t_scale() -> None:
    u = majority()
    a = Flame(ctx(7, seed=1), noise_lambda=0.5)(u, info(7, rnd=3))
    b = Flame(ctx(7, seed=1), noise_lambda=0.5)(u, info(7, rnd=3))
    c = Flame(ctx(7, seed=1), noise_lambda=0.5)(u, info(7, rnd=4))
    clean = Flame(ctx(7), noise="none")(u, info(7)).update
    assert torch.equal(a.update, b.update) and not torch.equal(a.update, c.update)
    assert torch.equal(a.update[4:6], clean[4:6])  # bn.running_mean: no noise
    assert not torch.equal(a.update[:4], clean[:4])
    assert a.stats["agg.noise-sigma"] == pytest.approx(0.5 * a.stats["agg.median-norm"])


def test_identical_and_zero_updates() -> None:
    same = torch.ones(4, 6)
    agg = Flame(ctx(4), noise="none")(same, info(4))
    assert torch.allclose(agg.update, torch.ones(6))
    z = Flame(ctx(4))(torch.zeros(4, 6), info(4))
    assert torch.equal(z.update, torch.zeros(6))  # S_t = 0: sigma = 0


def test_distance_on_models_and_layer_std_need_global() -> None:
    u = majority()
    with pytest.raises(AggregationError, match="global_params"):
        Flame(ctx(7), distance_on="models")(u, info(7))
    agg = Flame(ctx(7), distance_on="models", noise="layer-std")(u, info(7, g=torch.ones(6) * 0.01))
    assert torch.isfinite(agg.update).all()


def test_errors() -> None:
    with pytest.raises(AggregationError):
        Flame(ctx(2))(torch.ones(1, 6), info(1))
    with pytest.raises(ConfigError):
        build_aggregator("flame", {"noise": "gauss"}, ctx(5))
    with pytest.raises(ConfigError):
        build_aggregator("flame", {}, ctx(1))


def test_permutation_invariant_without_noise() -> None:
    u = majority(2)
    perm = torch.tensor([6, 2, 0, 4, 1, 5, 3])
    a = Flame(ctx(7), noise="none")(u, info(7)).update
    b = Flame(ctx(7), noise="none")(u[perm], info(7)).update
    assert torch.allclose(a, b, atol=1e-6)
