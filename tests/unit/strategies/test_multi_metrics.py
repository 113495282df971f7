"""Multi-Metrics: distances and whitening against naive loops, an outlier dropped, the kept count,
permutation and identical-client properties, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.errors import ConfigError
from strategies.multi_metrics import (
    manhattan_distances,
    metric_features,
    multi_metrics,
    whitened_scores,
)
from strategies.registry import build_aggregator
from tests.unit.strategies.rounds import ctx, info, rows


def naive_features(u: torch.Tensor) -> np.ndarray:
    x = u.double().numpy()
    out = np.zeros((len(x), 3))
    for i, a in enumerate(x):
        for j, b in enumerate(x):
            if i != j:
                cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                out[i] += (1 - cos, np.abs(a - b).sum(), np.linalg.norm(a - b))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_distances_and_features_match_naive_loops(seed: int) -> None:
    u = rows(seed, 5, 37)
    assert torch.allclose(manhattan_distances(u, chunk=8), torch.cdist(u.double(), u.double(), p=1), atol=1e-9)
    assert np.allclose(metric_features(u).numpy(), naive_features(u), rtol=1e-6)


def test_whitening_matches_numpy_inverse_covariance() -> None:
    x = rows(3, 6, 3, dtype=torch.float64).abs() * torch.tensor([1.0, 1e4, 10.0], dtype=torch.float64)
    inv = np.linalg.inv(np.cov(x.numpy().T))
    want = np.einsum("ij,jk,ik->i", x.numpy(), inv, x.numpy())
    assert np.allclose(whitened_scores(x).numpy(), want, rtol=1e-8)


def test_outlier_among_identical_clients_is_dropped_and_p_sets_the_count() -> None:
    row = torch.tensor([1.0, -2.0, 0.5, 3.0])
    u = row.repeat(5, 1)
    u[2] = torch.tensor([-4.0, 1.0, 9.0, -2.0])
    agg = multi_metrics(u, info(5), keep_fraction=0.8)  # floor(0.8 * 5) = 4 kept
    assert agg.kept is not None and agg.kept.tolist() == [True, True, False, True, True]
    assert torch.allclose(agg.update, row)
    assert agg.suspicion is not None and int(agg.suspicion.argmax()) == 2
    one = multi_metrics(u, info(5))  # p = 0.3: floor(1.5) = 1 client
    assert one.kept is not None and int(one.kept.sum()) == 1 and not bool(one.kept[2])
    assert one.stats["agg.selected"] == 1


def test_identical_clients_give_their_update() -> None:
    row = torch.tensor([0.3, -1.0, 2.0, 0.0])
    agg = build_aggregator("multi-metrics", {"keep_fraction": 0.5}, ctx(4))(row.repeat(4, 1), info(4))
    assert torch.allclose(agg.update, row)
    assert agg.suspicion is not None and bool(torch.isfinite(agg.suspicion).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_invariant(seed: int) -> None:
    u = rows(seed, 7, 20)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(seed))
    a = multi_metrics(u, info(7), keep_fraction=0.5)
    b = multi_metrics(u[perm], info(7), keep_fraction=0.5)
    assert torch.allclose(a.update, b.update, atol=1e-6)
    assert a.kept is not None and b.kept is not None and torch.equal(a.kept[perm], b.kept)
    assert a.suspicion is not None and b.suspicion is not None
    assert torch.allclose(a.suspicion[perm], b.suspicion, rtol=1e-6)


@pytest.mark.parametrize("p", [0, -0.1, 1.2, True, "half"])
def test_bad_keep_fraction_fails_at_build(p: object) -> None:
    with pytest.raises(ConfigError, match="keep_fraction"):
        build_aggregator("multi-metrics", {"keep_fraction": p}, ctx(5))
