"""FL-Defender: attackers flipping the output layer lose trust; accumulated history; edge cases."""

from __future__ import annotations

import pytest
import torch

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.fl_defender import FLDefender, round_scores, standardize_columns
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo


def ctx(n: int, out: slice | None = slice(0, 6)) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(8)}), clients_per_round=n, output_slice=out)


def info(ids: tuple[int, ...]) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=ids, num_examples=torch.ones(len(ids)))


def honest_and_flipped(n_honest: int, n_bad: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([1.0, -1.0, 0.5, 0.2, -0.3, 0.8, 0.0, 0.0])
    rows = [base + 0.1 * torch.randn(8, generator=g) for _ in range(n_honest)]
    rows += [-base + 0.1 * torch.randn(8, generator=g) for _ in range(n_bad)]
    return torch.stack(rows)


def test_standardize_like_sklearn() -> None:
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    z = standardize_columns(x)
    # population std of [1, 3, 5] is sqrt(8/3)
    assert torch.allclose(z[:, 0], torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64) / (8 / 3) ** 0.5)
    assert torch.equal(z[:, 1], torch.zeros(3, dtype=torch.float64))  # constant column: centred only


def test_flippers_get_no_trust() -> None:
    fd = FLDefender(ctx(7))
    for rnd in range(3):
        agg = fd(honest_and_flipped(5, 2, rnd), info(tuple(range(7))))
    assert agg.scores is not None and agg.kept is not None
    assert float(agg.scores[5:].max()) == 0.0
    assert bool(agg.kept[:5].any())
    assert set(fd.history) == set(range(7))
    assert fd.history[0] > fd.history[5]


def test_round_scores_sign_of_minority() -> None:
    s = round_scores(-honest_and_flipped(5, 2, 0)[:, :6].double())
    assert float(s[:5].min()) > float(s[5:].max())


def test_identical_updates_fall_back_to_mean() -> None:
    u = torch.ones(4, 8)
    agg = FLDefender(ctx(4))(u, info((1, 2, 3, 4)))
    assert torch.isfinite(agg.update).all()
    assert torch.allclose(agg.update, torch.ones(8))
    z = FLDefender(ctx(4))(torch.zeros(4, 8), info((1, 2, 3, 4)))
    assert torch.equal(z.update, torch.zeros(8))


def test_errors() -> None:
    with pytest.raises(AggregationError):
        FLDefender(ctx(3))(torch.ones(2, 8), info((1, 2)))
    with pytest.raises(ConfigError, match=">= 3"):
        build_aggregator("fl-defender", {}, ctx(2))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_aggregator("fl-defender", {"q": 1}, ctx(5))


def test_permutation_equivariant() -> None:
    u = honest_and_flipped(5, 2, 1)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    a = FLDefender(ctx(7))(u, info(tuple(range(7))))
    b = FLDefender(ctx(7))(u[perm], info(tuple(perm.tolist())))
    assert torch.allclose(a.update, b.update, atol=1e-5)


def test_state_dict_round_trip_continues_the_history() -> None:
    """A rule rebuilt from its checkpointed state (execution.resume) decides as the original."""
    rounds = [honest_and_flipped(4, 2, seed) for seed in range(3)]
    ids = (0, 1, 2, 3, 4, 5)
    original = FLDefender(ctx(6))
    for u in rounds[:2]:
        original(u, info(ids))
    restored, fresh = FLDefender(ctx(6)), FLDefender(ctx(6))
    restored.load_state_dict(original.state_dict())
    want = original(rounds[2], info(ids))
    assert torch.equal(restored(rounds[2], info(ids)).weights, want.weights)
    assert not torch.equal(fresh(rounds[2], info(ids)).weights, want.weights)  # the history matters
