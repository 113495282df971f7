"""geomed (RFA, smoothed Weiszfeld): hand-checked medians, a naive one-step oracle, ByzFL, properties."""

from __future__ import annotations

import byzfl
import pytest
import torch

from lab.errors import AggregationError, ConfigError
from strategies.geometric_median import distances_to_combination, geometric_median
from strategies.kernels import gram_matrix
from strategies.registry import build_aggregator
from tests.unit.strategies.rounds import check_permutation, ctx, info, rows


def test_collinear_points_give_the_middle_one() -> None:
    u = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1000.0, 0.0]], dtype=torch.float64)
    agg = geometric_median(u, info(3), ftol=0.0, max_iter=500)
    assert torch.allclose(agg.update, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-3)
    assert int(agg.suspicion.argmax()) == 2 and agg.kept is None
    assert float(agg.weights.sum()) == pytest.approx(1.0)


def test_symmetric_square_gives_its_centre_with_equal_weights() -> None:
    u = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    agg = geometric_median(u, info(4))
    assert torch.allclose(agg.update, torch.zeros(2), atol=1e-6)
    assert torch.allclose(agg.weights, torch.full((4,), 0.25))
    assert torch.allclose(agg.suspicion, torch.full((4,), 2.0**0.5))


def test_one_step_matches_the_naive_weiszfeld_formula() -> None:
    u = rows(1, 6, 5, torch.float64)
    mean = u.mean(0)
    beta = 1.0 / torch.stack([torch.linalg.vector_norm(r - mean).clamp_min(1e-6) for r in u])
    want = (beta[:, None] * u).sum(0) / beta.sum()
    got = geometric_median(u, info(6), max_iter=1).update
    assert torch.allclose(got, want, atol=1e-10)


def test_weighted_starts_and_steps_with_num_examples() -> None:
    u = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    agg = geometric_median(u, info(3, examples=[1.0, 1.0, 10.0]), weighted=True, ftol=0.0, max_iter=300)
    assert float(agg.update) == pytest.approx(2.0, abs=1e-3)  # a weighted median: the heavy point


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_byzfl_geometric_median(seed: int) -> None:
    """ByzFL `GeometricMedian(nu, T)`: beta_i = (1/n) / max(nu, ||z - x_i||), z <- sum beta x / sum beta,
    started from z = 0. Ours starts from the mean; run both to convergence (ours: ftol = 0, the same
    T steps) and they reach the same smoothed median. Mapping: nu -> nu, T -> max_iter, uniform
    weights (weighted=False)."""
    u = rows(seed, 7, 5, torch.float64)
    u[:2] += 20.0  # two far outliers
    theirs = byzfl.GeometricMedian(nu=1e-6, T=3000)(u.clone())
    ours = geometric_median(u, info(7), nu=1e-6, max_iter=3000, ftol=0.0)
    assert torch.allclose(ours.update, theirs.to(torch.float64), atol=1e-5)  # ByzFL returns float32


def test_gram_distances_match_direct_norms() -> None:
    u = rows(3, 5, 9, torch.float64)
    coef = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    v = coef @ u
    want = torch.linalg.vector_norm(u - v, dim=1)
    assert torch.allclose(distances_to_combination(gram_matrix(u), coef), want, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_permutation_invariant_and_suspicion_equivariant(seed: int) -> None:
    check_permutation(lambda: geometric_median, rows(seed, 6, 4), seed)


def test_identical_clients_give_that_update_and_no_suspicion() -> None:
    row = torch.tensor([0.5, -2.0, 3.0])
    agg = geometric_median(row.expand(5, 3).clone(), info(5))
    assert torch.allclose(agg.update, row) and torch.allclose(agg.suspicion, torch.zeros(5), atol=1e-3)


def test_bad_inputs() -> None:
    for params in ({"nu": 0.0}, {"max_iter": 0}, {"ftol": -1.0}, {"max_iter": True}):
        with pytest.raises(ConfigError, match=next(iter(params))):
            build_aggregator("geomed", params, ctx(5))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_aggregator("geomed", {"tau": 1.0}, ctx(5))
    with pytest.raises(AggregationError):
        geometric_median(torch.zeros(0, 3), info(0))
    with pytest.raises(AggregationError, match="weights"):
        geometric_median(torch.ones(2, 3), info(2, examples=[0.0, 0.0]), weighted=True)
