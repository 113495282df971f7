"""Krum / Multi-Krum, median, trimmed mean, Bulyan: hand-checked cases, naive-loop oracles, properties."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.kernels import pairwise_sq_distances, prune_network, sorting_network
from strategies.registry import build_aggregator
from strategies.robust import bulyan, coordinate_median, krum, multi_krum, trimmed_mean
from strategies.types import AggregatorContext, RoundInfo


def info(n: int, examples: list[float] | None = None) -> RoundInfo:
    ex = torch.tensor(examples if examples is not None else [1.0] * n)
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=ex)


def ctx(n: int) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(2)}), clients_per_round=n)


def T(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- oracles


def naive_krum_scores(u: torch.Tensor, f: int) -> list[float]:
    n = u.shape[0]
    out = []
    for i in range(n):
        d = sorted(float(((u[i].double() - u[j].double()) ** 2).sum()) for j in range(n) if j != i)
        out.append(sum(d[: n - f - 2]))
    return out


def naive_trimmed(u: torch.Tensor, beta: float) -> torch.Tensor:
    n, d = u.shape
    b = int(beta * n)
    out = []
    for k in range(d):
        col = sorted(u[:, k].tolist())
        kept = col[b : n - b]
        out.append(sum(kept) / len(kept))
    return torch.tensor(out)


def naive_median(u: torch.Tensor) -> torch.Tensor:
    n = u.shape[0]
    out = []
    for k in range(u.shape[1]):
        col = sorted(u[:, k].tolist())
        out.append(col[n // 2] if n % 2 else (col[n // 2 - 1] + col[n // 2]) / 2)
    return torch.tensor(out)


def naive_bulyan_coord(values: list[float], beta: int) -> float:
    s = sorted(values)
    m = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
    closest = sorted(s, key=lambda v: abs(v - m))[:beta]
    return sum(closest) / beta


# ---------------------------------------------------------------------------------------------- sorting network


@pytest.mark.parametrize("n", range(1, 13))
def test_sorting_network_sorts_every_0_1_input(n: int) -> None:
    # 0-1 principle: a comparator network sorts everything iff it sorts all 2^n 0-1 sequences
    comps = sorting_network(n)
    for bits in itertools.product((0, 1), repeat=n):
        v = list(bits)
        for i, j in comps:
            if v[i] > v[j]:
                v[i], v[j] = v[j], v[i]
        assert v == sorted(bits)


@pytest.mark.parametrize("n", [17, 20, 33, 50])
def test_sorting_network_large_n_random(n: int) -> None:
    comps = sorting_network(n)
    g = torch.Generator().manual_seed(n)
    for _ in range(50):
        v = torch.randn(n, generator=g).tolist()
        w = list(v)
        for i, j in comps:
            if w[i] > w[j]:
                w[i], w[j] = w[j], w[i]
        assert w == sorted(v)


def test_pruned_network_is_smaller_and_still_finds_the_median() -> None:
    full = sorting_network(20)
    med = prune_network(full, {9, 10})
    assert len(med) < len(full)
    u = torch.randn(20, 1000)
    assert torch.allclose(coordinate_median(u, info(20)).update, naive_median(u), atol=1e-6)


# ---------------------------------------------------------------------------------------------- hand-checked


def test_median_hand_checked() -> None:
    assert coordinate_median(T([[1], [2], [100]]), info(3)).update.tolist() == [2.0]
    assert coordinate_median(T([[1, 5], [2, 6], [100, -1], [4, 0]]), info(4)).update.tolist() == [3.0, 2.5]


def test_trimmed_mean_hand_checked() -> None:
    u = T([[1], [2], [3], [4], [100]])
    assert trimmed_mean(u, info(5), beta=0.2).update.tolist() == [3.0]  # drops 1 and 100
    assert trimmed_mean(u, info(5), beta=0.0).update.tolist() == [22.0]  # plain mean
    assert trimmed_mean(u, info(5), beta=0.49).update.tolist() == [3.0]  # b = 2


def test_krum_selects_honest_row() -> None:
    u = T([[0.0, 0.1], [0.1, 0.0], [0.0, -0.1], [100.0, 100.0]])
    agg = krum(u, info(4), num_byzantine=0)
    assert agg.kept is not None and not bool(agg.kept[3])
    assert agg.update.abs().max() <= 0.1 + 1e-6
    assert agg.scores is not None and int(agg.scores.argmax()) == 3


def test_multi_krum_default_keeps_n_minus_f_and_averages() -> None:
    u = T([[0.0], [1.0], [2.0], [3.0], [1000.0]])
    agg = multi_krum(u, info(5), num_byzantine=1)  # m = n - f = 4, neighbours = 2
    assert agg.kept is not None and agg.kept.tolist() == [True, True, True, True, False]
    assert agg.update.tolist() == [1.5]


def test_multi_krum_weighted_by_examples() -> None:
    u = T([[0.0], [1.0], [2.0], [3.0], [1000.0]])
    agg = multi_krum(u, info(5, [1, 1, 1, 5, 100]), num_byzantine=1, weighted=True)
    assert agg.update.tolist() == pytest.approx([(0 + 1 + 2 + 15) / 8])


def test_bulyan_hand_checked() -> None:
    # n = 7, f = 1: theta = 5 picks by recursive Krum, beta = 3 closest to the median.
    # Picks (by hand): 2 (score 10), then 1 (tie 14 with 3: lower index), 3, 0 (tie 16 with 4),
    # then 10 (tie 36 with 4, one neighbour each: lower index). 500 is never picked.
    u = T([[0.0], [1.0], [2.0], [3.0], [10.0], [4.0], [500.0]])
    agg = bulyan(u, info(7), num_byzantine=1, selection="recursive")
    assert agg.kept is not None and agg.kept.tolist() == [True, True, True, True, True, False, False]
    # selected {0,1,2,3,4}: median 2, three closest {1,2,3} -> 2
    assert agg.update.tolist() == [2.0]


# ---------------------------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("n,f", [(5, 1), (7, 2), (10, 3), (20, 2)])
def test_krum_scores_match_naive_loop(n: int, f: int) -> None:
    u = torch.randn(n, 37, generator=torch.Generator().manual_seed(n))
    agg = multi_krum(u, info(n), num_byzantine=f, num_selected=2)
    assert agg.scores is not None
    assert torch.allclose(agg.scores.double(), torch.tensor(naive_krum_scores(u, f), dtype=torch.float64), rtol=1e-5)
    best = sorted(range(n), key=lambda i: naive_krum_scores(u, f)[i])[:2]
    assert torch.allclose(agg.update, u[best].mean(0), atol=1e-6)


def test_pairwise_distances_match_cdist_with_chunking() -> None:
    u = torch.randn(6, 200_001, generator=torch.Generator().manual_seed(0))  # spans several Gram chunks
    ref = torch.cdist(u.double(), u.double()) ** 2
    assert torch.allclose(pairwise_sq_distances(u), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 11, 20, 33])
def test_median_and_trimmed_match_naive_loop(n: int) -> None:
    u = torch.randn(n, 300, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(coordinate_median(u, info(n)).update, naive_median(u), atol=1e-6)
    for beta in (0.1, 0.25, 0.4):
        assert torch.allclose(trimmed_mean(u, info(n), beta=beta).update, naive_trimmed(u, beta), atol=1e-5)


@pytest.mark.parametrize("n", [4, 7])
def test_median_and_trimmed_across_chunk_boundaries(n: int) -> None:
    # wider than one network chunk (32768 columns) with a ragged last chunk; reference: a full sort
    u = torch.randn(n, 70_001, generator=torch.Generator().manual_seed(n))
    s = u.sort(dim=0).values
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    assert torch.allclose(coordinate_median(u, info(n)).update, med, atol=1e-6)
    assert torch.allclose(trimmed_mean(u, info(n), beta=0.25).update, s[1 : n - 1].mean(0), atol=1e-5)


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (15, 3), (20, 4)])
def test_bulyan_matches_naive_loop(n: int, f: int) -> None:
    u = torch.randn(n, 40, generator=torch.Generator().manual_seed(n))
    agg = bulyan(u, info(n), num_byzantine=f, selection="multi-krum")
    theta, beta = n - 2 * f, n - 4 * f
    sel = sorted(range(n), key=lambda i: naive_krum_scores(u, f)[i])[:theta]
    assert agg.kept is not None and sorted(agg.kept.nonzero().squeeze(1).tolist()) == sorted(sel)
    want = torch.tensor([naive_bulyan_coord(u[sel, k].tolist(), beta) for k in range(u.shape[1])])
    assert torch.allclose(agg.update, want, atol=1e-6)


def test_bulyan_recursive_selection_matches_naive_recursion() -> None:
    n, f = 11, 2
    u = torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
    u[0] += 5.0
    remaining, picked = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = u[remaining]
        k = max(1, min(len(remaining) - f - 2, len(remaining) - 1))
        scores = []
        for i in range(len(remaining)):
            d = sorted(float(((sub[i] - sub[j]) ** 2).sum()) for j in range(len(remaining)) if j != i)
            scores.append(sum(d[:k]))
        picked.append(remaining.pop(min(range(len(scores)), key=scores.__getitem__)))
    agg = bulyan(u, info(n), num_byzantine=f, selection="recursive")
    assert agg.kept is not None and sorted(agg.kept.nonzero().squeeze(1).tolist()) == sorted(picked)
    assert not bool(agg.kept[0])


# ---------------------------------------------------------------------------------------------- properties

matrices = st.integers(1, 9).flatmap(
    lambda n: st.lists(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=3, max_size=3), min_size=n, max_size=n
    )
)


@settings(max_examples=60, deadline=None)
@given(matrices, st.randoms(use_true_random=False))
def test_coordinatewise_rules_permutation_invariant_and_within_range(rows: list[list[float]], rnd) -> None:
    u = T(rows)
    n = u.shape[0]
    perm = list(range(n))
    rnd.shuffle(perm)
    lo, hi = u.min(0).values, u.max(0).values
    for fn in (lambda x: coordinate_median(x, info(n)), lambda x: trimmed_mean(x, info(n), beta=0.2)):
        a, b = fn(u).update, fn(u[perm]).update
        assert torch.allclose(a, b, atol=1e-3)
        assert bool(((a >= lo - 1e-3) & (a <= hi + 1e-3)).all())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=4), st.integers(1, 9))
def test_identical_clients_give_that_update(row: list[float], n: int) -> None:
    u = T([row] * n)
    assert torch.equal(coordinate_median(u, info(n)).update, u[0])
    assert torch.allclose(trimmed_mean(u, info(n), beta=0.3).update, u[0], atol=1e-3)
    if n >= 3:
        assert torch.equal(krum(u, info(n)).update, u[0])
        assert torch.allclose(multi_krum(u, info(n)).update, u[0], atol=1e-3)
    if n >= 3:
        assert torch.allclose(bulyan(u, info(n)).update, u[0], atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 9), st.integers(0, 2**31 - 1))
def test_krum_scores_permutation_equivariant(n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 4, generator=g)
    perm = torch.randperm(n, generator=g)
    a, b = multi_krum(u, info(n), num_byzantine=1), multi_krum(u[perm], info(n), num_byzantine=1)
    assert a.scores is not None and b.scores is not None
    assert torch.allclose(a.scores[perm], b.scores, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- edge cases


def test_zero_and_sybil_updates() -> None:
    u = T([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.1, 0.9], [0.9, 1.1]])
    for agg in (krum(u, info(5)), multi_krum(u, info(5), num_byzantine=1), bulyan(u, info(5)),
                coordinate_median(u, info(5)), trimmed_mean(u, info(5))):
        assert torch.isfinite(agg.update).all()
    # two identical Sybils are each other's nearest neighbour at distance exactly 0
    assert krum(T([[5.0], [5.0], [0.0], [100.0]]), info(4)).update.tolist() == [5.0]


def test_too_few_clients_raise_aggregation_error() -> None:
    with pytest.raises(AggregationError):
        krum(T([[0.0], [1.0], [2.0], [3.0]]), info(4), num_byzantine=1)  # needs n > 4
    with pytest.raises(AggregationError):
        bulyan(T([[0.0]] * 6), info(6), num_byzantine=1)  # needs n > 6
    with pytest.raises(AggregationError):
        coordinate_median(torch.zeros(0, 3), info(0))


def test_build_time_checks() -> None:
    with pytest.raises(ConfigError, match="2\\*num_byzantine"):
        build_aggregator("krum", {"num_byzantine": 4}, ctx(10))
    build_aggregator("krum", {"num_byzantine": 3}, ctx(9))
    with pytest.raises(ConfigError, match="4\\*num_byzantine"):
        build_aggregator("bulyan", {"num_byzantine": 2}, ctx(10))
    build_aggregator("bulyan", {"num_byzantine": 2}, ctx(11))
    with pytest.raises(ConfigError, match="beta"):
        build_aggregator("trimmed-mean", {"beta": 0.5}, ctx(10))
    with pytest.raises(ConfigError, match="num_selected"):
        build_aggregator("multi-krum", {"num_byzantine": 1, "num_selected": 11}, ctx(10))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_aggregator("median", {"beta": 0.1}, ctx(10))


# ---------------------------------------------------------------------------------------------- every registered rule

ALL_RULES = {
    "fedavg": {}, "krum": {"num_byzantine": 1}, "multi-krum": {"num_byzantine": 1}, "median": {},
    "trimmed-mean": {"beta": 0.2}, "bulyan": {"num_byzantine": 1}, "foolsgold": {}, "fl-defender": {},
    "fltrust": {}, "norm-clip": {"max_norm": 1.0, "noise_std": 0.01}, "rfout-1d": {}, "iqr-filter": {},
    "clip-avg": {"clip_gamma": 1.0}, "clip-avg-iqr": {"clip_gamma": 1.0}, "flame": {},
    "geomed": {}, "centered-clipping": {}, "rlr": {}, "dnc": {}, "signguard": {},  # issue 18, defenses A
    "freqfed": {}, "fldetector": {}, "multi-metrics": {},  # issue 18, defenses B
}
# Rules that run the server's model (ModelSpec) and need a 2-D output layer: tested in their own files.
MODEL_RULES = {"deepsight"}


def test_registry_has_exactly_the_documented_names() -> None:
    from strategies.registry import AGGREGATORS

    assert set(AGGREGATORS) == set(ALL_RULES) | MODEL_RULES


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_every_rule_is_finite_on_zero_and_sybil_rows(name: str) -> None:
    n, d = 7, 6
    c = AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(d)}), clients_per_round=n, output_slice=slice(0, 4))
    u = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    u[0] = 0.0  # an all-zero update
    u[2] = u[1]  # two identical Sybils
    g0 = torch.randn(d, generator=torch.Generator().manual_seed(2))
    ri = RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.ones(n),
                   global_params=torch.zeros(d), reference_update=lambda: g0)
    agg = build_aggregator(name, ALL_RULES[name], c)(u, ri)
    assert agg.update.shape == (d,) and bool(torch.isfinite(agg.update).all())
    for field in (agg.kept, agg.clipped, agg.weights, agg.scores, agg.suspicion):
        assert field is None or (field.shape == (n,) and bool(torch.isfinite(field.double()).all()))
    # identical clients give that update (noise-free rules; FoolsGold zeroes Sybils by design)
    if name not in ("foolsgold", "norm-clip", "flame", "fltrust"):
        same = torch.stack([u[3]] * n)
        big = dict(ALL_RULES[name])
        if "clip_gamma" in big:
            big["clip_gamma"] = 1e3
        got = build_aggregator(name, big, c)(same, ri).update
        assert torch.allclose(got, u[3], atol=1e-5), name
