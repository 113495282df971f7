"""nnm and bucketing in front of a rule: hand-checked mixing, ByzFL oracles, the per-client mapping,
config-time errors for impossible settings, and the YAML forms."""

from __future__ import annotations

import inspect
from dataclasses import replace

import byzfl
import pytest
import torch

from commands.preflight import check_experiment
from lab.errors import ConfigError
from strategies.pre_aggregation import Bucketing, NearestNeighbourMixing, Preaggregated
from strategies.registry import build_aggregator
from strategies.types import Checkpointable
from tests.unit.strategies.rounds import check_permutation, ctx, info, rows


def test_nnm_hand_checked() -> None:
    u = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    out = NearestNeighbourMixing(ctx(4), f=1)(u, info(4))
    assert out.updates.squeeze(1).tolist() == pytest.approx([1.0, 1.0, 1.0, 13 / 3])
    assert out.owner.tolist() == [0, 1, 2, 3]
    assert torch.allclose(out.mixing.sum(1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("f", [0, 1, 3])
def test_nnm_matches_byzfl(f: int) -> None:
    """ByzFL `NNM(f)`: row i -> mean of the n - f rows nearest to row i (itself included). Mapping: f -> f."""
    u = rows(f, 7, 5)
    want = byzfl.NNM(f=f)(u.clone())
    got = NearestNeighbourMixing(ctx(7), f=f)(u, info(7)).updates
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("n", "s"), [(7, 3), (6, 2), (5, 1), (4, 4)])
def test_bucketing_matches_byzfl(monkeypatch: pytest.MonkeyPatch, n: int, s: int) -> None:
    """ByzFL `Bucketing(s)`: shuffle, means of s consecutive rows, the last bucket takes the n mod s
    left over. Mapping: s -> s. ByzFL shuffles with torch's global RNG, ours with a seeded
    generator: its shuffle is patched to the identity and it gets the rows in our bucket order."""
    pre = inspect.getmodule(byzfl.Bucketing)  # byzfl.aggregators.preaggregators (the name is shadowed)

    class Identity:
        @staticmethod
        def permutation(vectors: torch.Tensor) -> torch.Tensor:
            return vectors

    monkeypatch.setattr(pre, "random_tool", lambda vectors: Identity)
    u = rows(n, n, 4)
    out = Bucketing(ctx(n, seed=3), s=s)(u, info(n, rnd=2))
    order = torch.argsort(out.owner, stable=True)
    assert torch.allclose(out.updates, pre.Bucketing(s=s)(u[order].clone()), atol=1e-6)


def test_bucketing_is_seeded_and_sums_the_examples() -> None:
    u = rows(0, 7, 3)
    b = Bucketing(ctx(7, seed=1), s=3)
    one, again, other = b(u, info(7, examples=range(1, 8))), b(u, info(7)), b(u, info(7, rnd=2))
    assert torch.equal(one.owner, again.owner) and not torch.equal(one.owner, other.owner)
    assert sorted(torch.bincount(one.owner).tolist()) == [1, 3, 3]
    assert one.info.client_ids == (0, 1, 2) and float(one.info.num_examples.sum()) == 28.0


def test_weights_and_decisions_map_back_to_clients() -> None:
    u = rows(4, 7, 5)
    u[2] += 30.0
    mk = build_aggregator("multi-krum", {"num_byzantine": 0, "num_selected": 2}, ctx(3), )
    wrapped = Preaggregated([Bucketing(ctx(7), s=3)], mk)
    agg = wrapped(u, info(7))
    inner = Bucketing(ctx(7), s=3)(u, info(7))
    assert agg.kept.shape == (7,) and torch.equal(agg.kept, mk(inner.updates, inner.info).kept[inner.owner])
    assert not bool(agg.kept[2])  # the far client's bucket is dropped, with every member
    assert torch.allclose(agg.update, agg.weights @ u, atol=1e-5)  # the client weights are exact
    fed = build_aggregator("fedavg", {"weighted": False}, ctx(7), pre=[{"name": "bucketing", "params": {"s": 3}}])
    out = fed(u, info(7))
    assert torch.allclose(out.update, out.weights @ u, atol=1e-5) and float(out.weights.sum()) == pytest.approx(1.0)


def test_nnm_rows_keep_their_clients_suspicion() -> None:
    u = rows(5, 8, 6)
    u[6] += 40.0
    agg = build_aggregator("geomed", {}, ctx(8), pre=["nnm"])(u, info(8))
    assert int(agg.suspicion.argmax()) == 6 and agg.stats["agg.pre-rows"] == 8.0


@pytest.mark.parametrize("seed", range(3))
def test_nnm_then_median_is_permutation_invariant(seed: int) -> None:
    check_permutation(lambda: build_aggregator("median", {}, ctx(7), pre=[{"name": "nnm", "params": {"f": 2}}]),
                      rows(seed, 7, 5), seed, atol=1e-6)


@pytest.mark.parametrize("pre", [["nnm"], ["bucketing"], ["bucketing", "nnm"]])
def test_identical_clients_stay_identical(pre: list[str]) -> None:
    row = torch.tensor([0.5, -2.0, 3.0])
    got = build_aggregator("median", {}, ctx(6), pre=pre)(row.expand(6, 3).clone(), info(6)).update
    assert torch.allclose(got, row)


def test_a_stateful_rule_stays_checkpointable_behind_pre() -> None:
    cc = build_aggregator("centered-clipping", {"tau": 1.0}, ctx(6), pre=["nnm"])
    assert isinstance(cc, Checkpointable)
    cc(rows(0, 6, 3), info(6))
    assert set(cc.state_dict()) == {"centre"}
    assert not isinstance(build_aggregator("median", {}, ctx(6), pre=["nnm"]), Checkpointable)


@pytest.mark.parametrize(("pre", "name", "key"), [
    ([{"name": "nnm", "params": {"f": 3}}], "median", r"pre\[0\]: nnm: f must"),
    ([{"name": "bucketing", "params": {"s": 0}}], "median", r"pre\[0\]: bucketing: s"),
    ([{"name": "bucketing", "params": {"s": 7}}], "median", "exceeds"),
    (["mixer"], "median", r"pre\[0\].name: unknown pre-aggregator"),
    ([{"name": "nnm", "params": {"k": 1}}], "median", r"pre\[0\].params: unexpected keyword 'k'"),
    ([{"name": "nnm", "params": {"f": 1.5}}], "median", r"pre\[0\].params.f: expected int"),
    (["bucketing"], "foolsgold", "per-client histories"),
    (["bucketing"], "krum", "rows after federated.aggregator.pre"),
    (["bucketing", {"name": "nnm", "params": {"f": 2}}], "median", r"pre\[1\]: nnm"),  # 3 buckets: f < 1.5
])
def test_impossible_settings_fail_at_build_time(pre: list, name: str, key: str) -> None:
    params = {"num_byzantine": 1} if name == "krum" else {}
    with pytest.raises(ConfigError, match=key):
        build_aggregator(name, params, ctx(6), pre=pre)


def test_yaml_forms_through_preflight() -> None:
    base = ["federated.num_clients=6"]
    cfg = check_experiment("experiments/smoke.yaml", [*base, "federated.aggregator={name: median, pre: [nnm]}"])
    assert cfg.federated.aggregator.pre == ("nnm",)
    cfg = check_experiment("experiments/smoke.yaml",
                           [*base, "federated.aggregator={name: median, pre: [{name: nnm, params: {f: 2}}]}"])
    assert cfg.federated.aggregator.pre[0].params == {"f": 2}
    with pytest.raises(ConfigError, match=r"federated.aggregator.pre\[0\]: nnm: f must"):
        check_experiment("experiments/smoke.yaml", [*base, "federated.aggregator={name: median, pre: [{name: nnm, params: {f: 3}}]}"])
    with pytest.raises(ConfigError, match="federated.aggregator.pre: expected a list"):
        check_experiment("experiments/smoke.yaml", [*base, "federated.aggregator={name: median, pre: nnm}"])


def test_total_divisor_is_refused_behind_pre() -> None:
    total = replace(ctx(6), all_examples=(1.0,) * 6)
    with pytest.raises(ConfigError, match="fedavg_divisor"):
        build_aggregator("fedavg", {}, total, pre=["bucketing"])
