"""FreqFed: the DCT against scipy, a low-frequency-identical cluster kept whatever its high
frequencies, an outlier dropped, permutation and identical-client properties, bad settings."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft as sf
import torch

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.freqfed import FreqFed, dct_low, low_frequency_block, weight_matrices
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, RoundInfo

# a conv weight (4 x 2x3x3 -> a 4 x 18 matrix), BN statistics (not features), an output layer
LAYOUT = ParamLayout.of({"conv.weight": torch.zeros(4, 2, 3, 3), "bn.running_mean": torch.zeros(4),
                         "fc.weight": torch.zeros(3, 6), "fc.bias": torch.zeros(3)})
D = LAYOUT.num_params  # 72 + 4 + 18 + 3 = 97


def ctx(n: int) -> AggregatorContext:
    return AggregatorContext(layout=LAYOUT, clients_per_round=n, seed=0)


def info(n: int, g: torch.Tensor | None = None) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.ones(n), global_params=g)


def from_spectrum(low: np.ndarray, high_scale: float, rng: np.random.Generator) -> torch.Tensor:
    """A flat update whose weight matrices have the 2-D DCT block `low` (their top-left halves,
    concatenated as FreqFed orders them) plus random coefficients of size `high_scale` everywhere else."""
    out = np.zeros(D)
    offset = 0
    for s, rows, cols in weight_matrices(LAYOUT, "all"):
        kh, kw = -(-rows // 2), -(-cols // 2)
        coeff = rng.normal(scale=high_scale, size=(rows, cols))
        coeff[:kh, :kw] = low[offset : offset + kh * kw].reshape(kh, kw)
        offset += kh * kw
        out[s] = sf.idctn(coeff, norm="ortho").reshape(-1)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("keep", [1, 4, 5, 9])
def test_dct_matches_scipy(keep: int) -> None:
    x = torch.randn(3, 5, 9, dtype=torch.float64)
    want = sf.dct(x.numpy(), norm="ortho", axis=-1)[..., :keep]
    assert np.allclose(dct_low(x, keep).numpy(), want, atol=1e-12)
    block = low_frequency_block(x, 0.5).numpy()
    assert np.allclose(block, sf.dctn(x.numpy(), axes=(1, 2), norm="ortho")[:, :3, :5].reshape(3, -1), atol=1e-12)


def test_features_skip_bn_statistics_and_can_take_the_output_layer_only() -> None:
    assert [(rows, cols) for _, rows, cols in weight_matrices(LAYOUT, "all")] == [(4, 18), (3, 6), (1, 3)]
    assert [(rows, cols) for _, rows, cols in weight_matrices(LAYOUT, "output")] == [(3, 6)]
    u = torch.zeros(1, D)
    u[0, 72:76] = 100.0  # bn.running_mean moves: no feature sees it
    assert torch.equal(FreqFed(ctx(2)).features(u), torch.zeros(1, 2 * 9 + 2 * 3 + 1 * 2, dtype=torch.float32))


def test_low_frequency_identical_cluster_is_kept_whatever_its_high_frequencies() -> None:
    """Five clients share their low-frequency block and differ wildly above it (high-frequency
    energy 10x the low one); two attackers have a different low block with a *small* L2 change.
    FreqFed admits exactly the five: it looks only at low frequencies."""
    rng = np.random.default_rng(0)
    n_low = 2 * 9 + 2 * 3 + 1 * 2
    low = rng.normal(size=n_low)
    honest = [from_spectrum(low, 3.0, rng) for _ in range(5)]
    shifted = low + rng.normal(scale=1.0, size=n_low)
    bad = [from_spectrum(shifted, 0.0, rng) for _ in range(2)]
    u = torch.stack(honest + bad)
    agg = FreqFed(ctx(7))(u, info(7))
    assert agg.kept is not None and agg.kept.tolist() == [True] * 5 + [False] * 2
    assert torch.allclose(agg.update, u[:5].mean(0), atol=1e-6)
    assert agg.suspicion is not None and float(agg.suspicion[5:].min()) > float(agg.suspicion[:5].max())
    # the attackers are closer in L2 to an honest client than the honest clients are to each other
    d = torch.cdist(u, u)
    assert float(d[5, :5].min()) < float(d[:5, :5][~torch.eye(5, dtype=torch.bool)].min())


def test_one_outlier_among_identical_clients_is_dropped() -> None:
    row = torch.linspace(-1.0, 1.0, D)
    u = row.repeat(5, 1)
    u[3] = -4 * row + 0.3
    agg = build_aggregator("freqfed", {}, ctx(5))(u, info(5))
    assert agg.kept is not None and agg.kept.tolist() == [True, True, True, False, True]
    assert torch.allclose(agg.update, row, atol=1e-6)
    assert agg.suspicion is not None and int(agg.suspicion.argmax()) == 3


def test_identical_clients_give_their_update() -> None:
    row = torch.randn(D, generator=torch.Generator().manual_seed(1))
    agg = FreqFed(ctx(4))(row.repeat(4, 1), info(4))
    assert agg.kept is not None and bool(agg.kept.all())
    assert torch.allclose(agg.update, row, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_invariant(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=g)
    u = torch.cat([base + 0.2 * torch.randn(5, D, generator=g), -3 * base + 0.2 * torch.randn(2, D, generator=g)])
    perm = torch.randperm(7, generator=g)
    a = FreqFed(ctx(7))(u, info(7))
    b = FreqFed(ctx(7))(u[perm], info(7))
    assert torch.allclose(a.update, b.update, atol=1e-6)
    assert a.kept is not None and b.kept is not None and torch.equal(a.kept[perm], b.kept)
    assert a.suspicion is not None and b.suspicion is not None
    assert torch.allclose(a.suspicion[perm], b.suspicion, atol=1e-9)


def test_distance_on_models_adds_the_global_spectrum() -> None:
    u = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    g = torch.randn(D, generator=torch.Generator().manual_seed(4))
    with pytest.raises(AggregationError, match="global_params"):
        FreqFed(ctx(4), distance_on="models")(u, info(4))
    agg = FreqFed(ctx(4), distance_on="models")(u, info(4, g))
    assert torch.isfinite(agg.update).all() and agg.kept is not None


@pytest.mark.parametrize("hp", [{"low_fraction": 0}, {"low_fraction": 1.5}, {"low_fraction": True},
                                {"layers": "middle"}, {"distance_on": "weights"}, {"window": 3}])
def test_bad_settings_fail_at_build(hp: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        build_aggregator("freqfed", hp, ctx(5))


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_aggregator("freqfed", {}, ctx(1))
    with pytest.raises(ConfigError, match="no output-layer"):
        FreqFed(AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(3)}), clients_per_round=3),
                layers="output")
    with pytest.raises(AggregationError, match="params"):
        FreqFed(ctx(3))(torch.zeros(3, D + 1), info(3))
    with pytest.raises(AggregationError, match="at least 2"):
        FreqFed(ctx(3))(torch.zeros(1, D), info(1))
