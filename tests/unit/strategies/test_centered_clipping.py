"""centered-clipping: hand-checked clipping, ByzFL over several rounds, the checkpointed centre."""

from __future__ import annotations

from pathlib import Path

import byzfl
import pytest
import torch

from lab.artifacts import load_tensors, save_tensors
from lab.errors import AggregationError, ConfigError
from strategies.centered_clipping import CenteredClipping
from strategies.registry import build_aggregator
from strategies.types import Checkpointable
from tests.unit.strategies.rounds import check_permutation, ctx, info, rows


def test_first_round_clips_around_zero() -> None:
    cc = CenteredClipping(ctx(2), tau=1.0)
    agg = cc(torch.tensor([[3.0, 0.0], [0.0, 0.5]]), info(2))
    # factors min(1, 1/3) and 1: v = mean([1, 0], [0, 0.5])
    assert torch.allclose(agg.update, torch.tensor([0.5, 0.25]))
    assert agg.clipped.tolist() == [True, False] and agg.kept.all()
    assert torch.allclose(agg.weights, torch.tensor([1 / 6, 0.5]))
    assert torch.allclose(agg.update, agg.weights @ torch.tensor([[3.0, 0.0], [0.0, 0.5]]))


def test_second_round_clips_around_the_last_aggregate() -> None:
    cc = CenteredClipping(ctx(2), tau=1.0)
    cc(torch.tensor([[3.0, 0.0], [0.0, 0.5]]), info(2))  # centre = [0.5, 0.25]
    agg = cc(torch.tensor([[0.5, 3.25], [0.5, 0.75]]), info(2, rnd=2))
    # differences [0, 3] (clipped to [0, 1]) and [0, 0.5]: v = centre + [0, 0.75]
    assert torch.allclose(agg.update, torch.tensor([0.5, 1.0]))
    assert agg.suspicion.tolist() == pytest.approx([2.25, 0.25])  # distances to v_L


def test_momentum_blends_the_centre() -> None:
    cc = CenteredClipping(ctx(3), tau=100.0, momentum=0.5)
    r = torch.tensor([1.0, 2.0])
    first = cc(r.expand(3, 2).clone(), info(3))
    assert torch.allclose(first.update, 0.5 * r)  # 0.5 * zero centre + 0.5 * r
    second = cc(r.expand(3, 2).clone(), info(3, rnd=2))
    assert torch.allclose(second.update, 0.75 * r)


def test_default_tau_is_the_median_distance() -> None:
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, 40.0], [5.0, 0.0]])
    agg = CenteredClipping(ctx(5))(u, info(5))
    assert agg.stats["agg.tau"] == pytest.approx(3.0)
    assert agg.clipped.tolist() == [False, False, False, True, True]
    assert int(agg.suspicion.argmax()) == 3


def test_matches_byzfl_over_three_rounds() -> None:
    """ByzFL `CenteredClipping(m=None, L, tau)` keeps its centre m across calls and starts at zero,
    as ours does with momentum = 0. Mapping: L -> iterations, tau -> tau."""
    theirs = byzfl.CenteredClipping(L=3, tau=0.8)
    ours = CenteredClipping(ctx(6), tau=0.8, iterations=3)
    for rnd in range(1, 4):
        u = rows(rnd, 6, 5)  # float32: ByzFL computes in float32
        u[0] *= 10.0
        assert torch.allclose(ours(u, info(6, rnd=rnd)).update, theirs(u.clone()), atol=1e-5)


def test_state_round_trip_through_safetensors_continues_the_centre(tmp_path: Path) -> None:
    original = CenteredClipping(ctx(4), tau=0.5)
    assert isinstance(original, Checkpointable) and original.state_dict() == {}
    for rnd in (1, 2):
        original(rows(rnd, 4, 3), info(4, rnd=rnd))
    save_tensors(tmp_path / "cc.safetensors", original.state_dict())
    restored, fresh = CenteredClipping(ctx(4), tau=0.5), CenteredClipping(ctx(4), tau=0.5)
    restored.load_state_dict(load_tensors(tmp_path / "cc.safetensors"))
    u = rows(3, 4, 3)
    want = original(u, info(4, rnd=3)).update
    assert torch.equal(restored(u, info(4, rnd=3)).update, want)
    assert not torch.allclose(fresh(u, info(4, rnd=3)).update, want)  # the centre matters


@pytest.mark.parametrize("seed", range(3))
def test_permutation_invariant(seed: int) -> None:
    check_permutation(lambda: CenteredClipping(ctx(6), iterations=2), rows(seed, 6, 4), seed)


def test_identical_clients_give_that_update() -> None:
    row = torch.tensor([0.5, -2.0, 3.0])
    agg = CenteredClipping(ctx(5), tau=0.1, iterations=200)(row.expand(5, 3).clone(), info(5))
    assert torch.allclose(agg.update, row, atol=1e-4)  # L steps of length <= tau reach it
    assert torch.allclose(CenteredClipping(ctx(5))(row.expand(5, 3).clone(), info(5)).update, row)


def test_bad_inputs() -> None:
    for params, key in (({"tau": 0.0}, "tau"), ({"iterations": 0}, "iterations"), ({"momentum": 1.0}, "momentum"),
                        ({"beta": 0.9}, "unexpected keyword")):
        with pytest.raises(ConfigError, match=key):
            build_aggregator("centered-clipping", params, ctx(4))
    cc = CenteredClipping(ctx(2))
    cc.load_state_dict({"centre": torch.zeros(5)})
    with pytest.raises(AggregationError, match="saved centre"):
        cc(torch.ones(2, 3), info(2))
    with pytest.raises(AggregationError, match="unexpected state"):
        cc.load_state_dict({"history.1": torch.zeros(3)})
