"""dnc (Divide-and-Conquer): hand-checked filtering, a naive Algorithm 2 oracle, the seeded subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.errors import AggregationError, ConfigError
from strategies.clipping import round_generator
from strategies.registry import build_aggregator
from strategies.spectral import DivideAndConquer, random_coordinates
from tests.unit.strategies.rounds import check_permutation, ctx, info, rows


def naive_dnc(u: np.ndarray, removed: int) -> tuple[set[int], np.ndarray]:
    """Algorithm 2 with every coordinate in the subset (one iteration), in numpy."""
    centred = u - u.mean(0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    scores = (centred @ vh[0]) ** 2
    good = set(np.argsort(scores, kind="stable")[: len(u) - removed].tolist())
    return good, u[sorted(good)].mean(0)


def test_hand_checked_outlier_is_removed() -> None:
    u = torch.tensor([[1.0, 0.0, 0.1], [1.1, 0.1, 0.0], [0.9, -0.1, 0.0], [1.0, 0.0, -0.1], [-9.0, 8.0, 0.0]])
    agg = DivideAndConquer(ctx(5), num_byzantine=1)(u, info(5))
    assert agg.kept.tolist() == [True, True, True, True, False]
    assert torch.allclose(agg.update, u[:4].mean(0))
    assert int(agg.suspicion.argmax()) == 4 and float(agg.suspicion.max()) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_algorithm_on_all_coordinates(seed: int) -> None:
    u = rows(seed, 9, 12, torch.float64)
    u[:2] += 3.0 * torch.randn(12, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    agg = DivideAndConquer(ctx(9), num_byzantine=2, subset_size=1000)(u, info(9))
    good, mean = naive_dnc(u.numpy(), 2)
    assert set(agg.kept.nonzero().squeeze(1).tolist()) == good
    assert np.allclose(agg.update.numpy(), mean, atol=1e-10)


def test_filter_frac_and_iterations_shrink_the_good_set() -> None:
    u = rows(5, 10, 400)
    one = DivideAndConquer(ctx(10), num_byzantine=2, filter_frac=1.5, subset_size=50)(u, info(10))
    assert int(one.kept.sum()) == 7  # ceil(1.5 * 2) = 3 removed
    many = DivideAndConquer(ctx(10), num_byzantine=2, num_iters=4, subset_size=50)(u, info(10))
    assert int(many.kept.sum()) <= 8 and many.stats["agg.kept"] == float(many.kept.sum())


def test_default_f_is_the_largest_minority() -> None:
    agg = DivideAndConquer(ctx(6))(rows(0, 6, 20), info(6))
    assert agg.stats["agg.removed-per-iteration"] == 2.0 and int(agg.kept.sum()) == 4


def test_random_coordinates_are_distinct_sorted_and_seeded() -> None:
    for d, k in ((100, 10), (100, 60), (10**6, 1000), (5, 10)):
        cols = random_coordinates(d, k, torch.Generator().manual_seed(0))
        assert cols.numel() == min(k, d) and int(cols.unique().numel()) == cols.numel()
        assert torch.equal(cols, cols.sort().values) and 0 <= int(cols.min()) and int(cols.max()) < d
        again = random_coordinates(d, k, torch.Generator().manual_seed(0))
        assert torch.equal(cols, again)
    a = random_coordinates(10**6, 1000, round_generator(0, 1, "dnc"))
    b = random_coordinates(10**6, 1000, round_generator(0, 2, "dnc"))
    assert not torch.equal(a, b)  # a new subset each round


@pytest.mark.parametrize("seed", range(3))
def test_fixed_seed_permutation_equivariant(seed: int) -> None:
    """The subset depends on (seed, round), not on the row order: the decisions permute with the rows
    and the update is the same."""
    u = rows(seed, 8, 3000)
    u[3] += 1.0
    a, b, perm = check_permutation(
        lambda: DivideAndConquer(ctx(8), num_byzantine=1, subset_size=100, num_iters=2), u, seed, atol=1e-6)
    assert torch.equal(a.kept[perm], b.kept)


def test_identical_clients_give_that_update() -> None:
    row = torch.tensor([0.5, -2.0, 3.0])
    assert torch.allclose(DivideAndConquer(ctx(5))(row.expand(5, 3).clone(), info(5)).update, row)


def test_bad_inputs() -> None:
    for params, key in (({"num_byzantine": 3}, "at least one must stay"), ({"num_byzantine": -1}, "num_byzantine"),
                        ({"filter_frac": 0.0}, "filter_frac"), ({"num_iters": 0}, "num_iters"),
                        ({"subset_size": 0}, "subset_size"), ({"c": 1.0}, "unexpected keyword")):
        with pytest.raises(ConfigError, match=key):
            build_aggregator("dnc", params, ctx(3))
    with pytest.raises(AggregationError, match="remove"):
        DivideAndConquer(ctx(6), num_byzantine=2)(rows(0, 2, 4), info(2))
