"""DeepSight: NEUPs and threshold exceedings by hand, the cluster-distance matrix, DDifs of the
global model itself, backdoor-like clients rejected on a real model, permutation and
identical-client properties, bad settings and inputs."""

from __future__ import annotations

import pytest
import torch

from lab.errors import AggregationError, ConfigError
from lab.models import build_model
from lab.records import ParamLayout
from strategies.deepsight import DeepSight, apart, neups_and_te, output_layer
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, ModelSpec, RoundInfo

SHAPE, P = (1, 4, 4), 10


def net() -> torch.nn.Module:
    return build_model("softmax", SHAPE, P, (0.5,), (0.5,), seed=0)


STATE = {k: v.detach().clone() for k, v in net().state_dict().items()}
LAYOUT = ParamLayout.of(STATE)
GLOBAL = LAYOUT.flatten(STATE)
W, B, _ = output_layer(LAYOUT)


def ctx(n: int, model: bool = True) -> AggregatorContext:
    spec = ModelSpec(net, SHAPE, P) if model else None
    return AggregatorContext(layout=LAYOUT, clients_per_round=n, seed=0, model=spec)


def info(n: int, g: torch.Tensor | None = GLOBAL) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.ones(n), global_params=g)


def federation(seed: int, honest: int = 6, bad: int = 2) -> torch.Tensor:
    """Honest clients move every output neuron a little (all labels in their data); backdoor
    clients pour their energy into class 0's neuron and bias (one label), alike."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(honest + bad, LAYOUT.num_params)
    for i in range(honest + bad):
        w = 0.05 * torch.randn(P, 16, generator=g)
        b = 0.05 * torch.randn(P, generator=g)
        if i >= honest:
            w, b = w * 0.1, b * 0.1
            w[0] += 1.0 + 0.01 * torch.randn(16, generator=g)
            b[0] += 1.0
        u[i, W] = w.reshape(-1)
        u[i, B] = b
    return u


def test_output_layer_found_by_name() -> None:
    assert (W.stop - W.start, B is not None and B.stop - B.start) == (P * 16, P)


def test_neups_and_threshold_exceedings_by_hand() -> None:
    w = torch.zeros(2, 4, 3)
    b = torch.zeros(2, 4)
    w[0, 2] = 1.0  # all energy on neuron 2: e = (0, 0, 3, 0)
    w[1] = 1.0  # e = (3, 3, 3, 3) + |b|
    b[1, 0] = 1.0  # e_0 = 4: c = (16, 9, 9, 9) / 43
    neups, te = neups_and_te(w, b)
    assert torch.allclose(neups[0], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(neups[1], torch.tensor([16, 9, 9, 9], dtype=torch.float64) / 43)
    assert te.tolist() == [1, 4]  # xi = max(0.01, 1/4) * max c: 9/43 > 4/43
    zero, te0 = neups_and_te(torch.zeros(1, 4, 3), torch.zeros(1, 4))
    # a client that did not move spreads no energy anywhere: uniform NEUPs, not a suspicious label
    assert torch.allclose(zero, torch.full((1, 4), 0.25, dtype=torch.float64)) and te0.tolist() == [4]


def test_cluster_labels_to_distances() -> None:
    d = apart(torch.tensor([0, 0, -1, 1, -1, 1]))
    assert d[0, 1] == 0 and d[3, 5] == 0 and d[0, 3] == 1
    assert d[2, 4] == 1  # two noise points are not one cluster
    assert torch.equal(d.diagonal(), torch.zeros(6, dtype=torch.float64))


def test_ddifs_of_the_global_model_are_one() -> None:
    rule = DeepSight(ctx(2), num_seeds=2, num_samples=50)
    dd = rule.ddifs(torch.zeros(2, LAYOUT.num_params), GLOBAL)
    assert dd.shape == (2, 2, P) and torch.allclose(dd, torch.ones_like(dd))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backdoor_like_clients_are_rejected(seed: int) -> None:
    u = federation(seed)
    agg = DeepSight(ctx(8), num_samples=300)(u, info(8))
    assert agg.kept is not None and agg.kept.tolist() == [True] * 6 + [False] * 2
    assert agg.stats["agg.labelled-suspicious"] == 2
    assert agg.suspicion is not None and float(agg.suspicion[6:].min()) > float(agg.suspicion[:6].max())
    norms = u.norm(dim=1)
    s_t = float(torch.quantile(norms, 0.5))  # even n: the mean of the two middle norms
    want = torch.stack([r * min(1.0, s_t / float(r.norm())) for r in u[:6]]).mean(0)
    assert torch.allclose(agg.update, want, atol=1e-6)


def test_permutation_invariant() -> None:
    u = federation(3)
    perm = torch.tensor([7, 2, 0, 6, 1, 5, 3, 4])
    a = DeepSight(ctx(8), num_samples=200)(u, info(8))
    b = DeepSight(ctx(8), num_samples=200)(u[perm], info(8))
    assert torch.allclose(a.update, b.update, atol=1e-6)
    assert a.kept is not None and b.kept is not None and torch.equal(a.kept[perm], b.kept)
    assert a.suspicion is not None and b.suspicion is not None
    assert torch.allclose(a.suspicion[perm], b.suspicion, atol=1e-9)


def test_identical_clients_give_their_update() -> None:
    row = federation(4)[0]
    agg = DeepSight(ctx(4), num_samples=100)(row.repeat(4, 1), info(4))
    assert agg.kept is not None and bool(agg.kept.all())
    assert torch.allclose(agg.update, row, atol=1e-6)


@pytest.mark.parametrize("hp", [{"tau": 0}, {"tau": 1.5}, {"num_seeds": 0}, {"num_samples": -1},
                                {"num_samples": 2.5}, {"seeds": 3}])
def test_bad_settings_fail_at_build(hp: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        build_aggregator("deepsight", hp, ctx(5))


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_aggregator("deepsight", {}, ctx(1))
    with pytest.raises(ConfigError, match="2-D output layer"):
        DeepSight(AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(3)}), clients_per_round=3))
    u = federation(0, honest=2, bad=1)
    with pytest.raises(AggregationError, match="AggregatorContext.model"):
        build_aggregator("deepsight", {}, ctx(3, model=False))(u, info(3))  # builds: config checks have no model
    with pytest.raises(AggregationError, match="global_params"):
        DeepSight(ctx(3))(u, info(3, g=None))


def test_a_model_that_outputs_nan_is_an_outlier_not_a_crash() -> None:
    """Finite weights can still give non-finite outputs (here logits beyond float32): the rule must
    not fail the round over one hostile client."""
    u = federation(5)
    u[1, W] = 3e38  # finite, but x @ W overflows: softmax of inf logits is NaN
    rule = DeepSight(ctx(8), num_samples=100)
    assert float(rule.ddifs(u[1:2], GLOBAL).max()) == 1e12  # NaN probabilities -> the largest ratio
    agg = rule(u, info(8))
    # its NEUPs look honest (every neuron moved alike), so it may be accepted: clipping then bounds it
    assert agg.kept is not None and agg.clipped is not None
    assert not bool(agg.kept[1]) or bool(agg.clipped[1])
    assert bool(torch.isfinite(agg.update).all()) and agg.suspicion is not None
    assert bool(torch.isfinite(agg.suspicion).all())
