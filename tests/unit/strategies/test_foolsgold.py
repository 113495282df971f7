"""FoolsGold: hand-checked Sybil down-weighting, naive-loop oracle of the weight formula, state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.errors import AggregationError
from lab.records import ParamLayout
from strategies.foolsgold import FoolsGold, foolsgold_weights
from strategies.types import AggregatorContext, RoundInfo


def ctx(n: int, out: slice | None = None) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(4)}), clients_per_round=n, output_slice=out)


def info(ids: tuple[int, ...], rnd: int = 1) -> RoundInfo:
    return RoundInfo(server_round=rnd, client_ids=ids, num_examples=torch.ones(len(ids)))


def naive_weights(h: list[list[float]], kappa: float = 1.0) -> list[float]:
    n = len(h)

    def cos(a: list[float], b: list[float]) -> float:
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)

    cs = [[0.0 if i == j else cos(h[i], h[j]) for j in range(n)] for i in range(n)]
    v = [max(row) for row in cs]
    for i in range(n):
        for j in range(n):
            if v[i] < v[j]:
                cs[i][j] *= v[i] / v[j]
    a = [min(1.0, max(0.0, 1 - max(row))) for row in cs]
    top = max(a)
    a = [x / top for x in a] if top > 0 else a
    a = [0.99 if x == 1 else x for x in a]
    out = []
    for x in a:
        lg = -math.inf if x == 0 else kappa * (math.log(x / (1 - x)) + 0.5)
        out.append(1.0 if lg == math.inf or lg > 1 else max(lg, 0.0))
    return out


def test_sybils_get_zero_weight_honest_kept() -> None:
    u = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    agg = FoolsGold(ctx(4))(u, info((10, 11, 12, 13)))
    assert agg.scores is not None
    assert agg.scores[2] == 0 and agg.scores[3] == 0  # identical pair: cos 1 -> alpha 0
    assert agg.scores[0] == 1 and agg.scores[1] == 1  # orthogonal: alpha 0.99 -> logit > 1 -> 1
    assert torch.allclose(agg.update, torch.tensor([0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("seed", range(5))
def test_weights_match_naive_loop(seed: int) -> None:
    h = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed))
    h[1] = h[0] * 2 + 0.01  # a near-Sybil pair
    got = foolsgold_weights(h.double())
    assert torch.allclose(got, torch.tensor(naive_weights(h.tolist()), dtype=torch.float64), atol=1e-9)


def test_history_is_keyed_by_client_id_and_output_slice() -> None:
    fg = FoolsGold(ctx(3, out=slice(0, 2)))
    u1 = torch.tensor([[1.0, 0.0, 9.0, 9.0], [0.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    fg(u1, info((5, 6, 7)))
    fg(u1[[1, 0, 2]], info((6, 5, 7)))  # same clients, rows reordered
    assert torch.equal(fg.history[5], torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert torch.equal(fg.history[6], torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert set(fg.history) == {5, 6, 7}


def test_zero_update_and_all_sybils() -> None:
    fg = FoolsGold(ctx(2))
    z = fg(torch.zeros(2, 4), info((1, 2)))
    assert torch.isfinite(z.update).all()
    fg2 = FoolsGold(ctx(2))
    same = fg2(torch.ones(2, 4), info((1, 2)))  # two identical Sybils: both weight 0 -> zero update
    assert torch.equal(same.update, torch.zeros(4))
    assert same.kept is not None and not same.kept.any()


def test_unnormalised_variant() -> None:
    u = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    agg = FoolsGold(ctx(2), normalize="none")(u, info((1, 2)))
    assert torch.allclose(agg.update, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_duplicate_ids_raise() -> None:
    with pytest.raises(AggregationError):
        FoolsGold(ctx(2))(torch.ones(2, 4), info((1, 1)))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_permutation_equivariant(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 4, generator=g)
    perm = torch.randperm(n, generator=g)
    ids = tuple(range(n))
    a = FoolsGold(ctx(n))(u, info(ids))
    b = FoolsGold(ctx(n))(u[perm], info(tuple(perm.tolist())))
    assert torch.allclose(a.update, b.update, atol=1e-5)


def test_state_dict_round_trip_keeps_the_histories() -> None:
    fg = FoolsGold(ctx(3, out=slice(0, 2)))
    u1 = torch.tensor([[1.0, 0.0, 9.0, 9.0], [0.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
    fg(u1, info((5, 6, 7)))
    state = fg.state_dict()
    assert sorted(state) == ["history.5", "history.6", "history.7"]
    restored = FoolsGold(ctx(3, out=slice(0, 2)))
    restored.load_state_dict(state)
    u2 = torch.tensor([[1.0, 0.1, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(restored(u2, info((5, 6, 7), 2)).weights, fg(u2, info((5, 6, 7), 2)).weights)
    assert torch.allclose(restored.history[5], torch.tensor([2.0, 0.1], dtype=torch.float64))
