"""rlr (robust learning rate): a hand-checked vote, a whole-matrix oracle across chunks, properties."""

from __future__ import annotations

import pytest
import torch

from lab.errors import AggregationError, ConfigError
from strategies.registry import build_aggregator
from strategies.sign_vote import VOTE_CHUNK, robust_learning_rate
from tests.unit.strategies.rounds import check_permutation, ctx, info, rows

U = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, -1.0], [-5.0, 1.0]])


def naive_rlr(u: torch.Tensor, theta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's eq. (4)-(5) on the whole matrix at once, and each client's opposing-sign share."""
    vote = torch.sign(u).sum(0)
    mean = u.mean(0)
    update = torch.where(vote.abs() >= theta, mean, -mean)
    against = (torch.sign(u) * torch.sign(vote) < 0).double().mean(1)
    return update, against


def test_hand_checked_vote() -> None:
    # coordinate 0: signs + + + -, net 2; mean -0.5. coordinate 1: net 0; mean 0
    kept = robust_learning_rate(U, info(4), threshold=2)
    assert kept.update.tolist() == pytest.approx([-0.5, 0.0])
    flipped = robust_learning_rate(U, info(4), threshold=3)
    assert flipped.update.tolist() == pytest.approx([0.5, 0.0])
    assert flipped.stats["agg.flipped"] == 1.0
    # client 3 opposes the vote on coordinate 0; coordinate 1's vote is a tie (sign 0): nobody opposes
    assert flipped.suspicion.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5])
    assert flipped.kept is None and flipped.weights is None


def test_default_threshold_is_half_the_round() -> None:
    assert robust_learning_rate(U, info(4)).stats["agg.threshold"] == 2.0


def test_weighted_mean_uses_num_examples() -> None:
    agg = robust_learning_rate(U, info(4, examples=[1, 1, 1, 5]), threshold=1, weighted=True)
    # weighted means -22/8 and 4/8; coordinate 1's net vote 0 < 1 reverses it
    assert agg.update.tolist() == pytest.approx([-22 / 8, -4 / 8])


@pytest.mark.parametrize("theta", [1, 3, 5])
def test_matches_the_whole_matrix_oracle_across_chunks(theta: int) -> None:
    u = rows(theta, 7, 2 * VOTE_CHUNK + 17)
    u[:, ::5] = 0.0  # zeros vote neither way
    want, against = naive_rlr(u, theta)
    got = robust_learning_rate(u, info(7), threshold=theta)
    assert torch.allclose(got.update, want, atol=1e-6)
    assert torch.allclose(got.suspicion.double(), against, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_permutation_invariant(seed: int) -> None:
    check_permutation(lambda: robust_learning_rate, rows(seed, 6, 50), seed, atol=1e-6)


def test_identical_clients_give_that_update() -> None:
    row = torch.tensor([0.5, -2.0, 0.0, 3.0])
    agg = robust_learning_rate(row.expand(5, 4).clone(), info(5), threshold=5)
    assert torch.equal(agg.update, row) and agg.stats["agg.flipped"] == 0.25  # the 0 coordinate: -0 = 0
    assert torch.equal(agg.suspicion, torch.zeros(5))


def test_bad_inputs() -> None:
    for threshold in (0, 5, True, 1.5):
        with pytest.raises(ConfigError, match="threshold"):
            build_aggregator("rlr", {"threshold": threshold}, ctx(4))
    with pytest.raises(AggregationError):
        robust_learning_rate(torch.zeros(3), info(3))
