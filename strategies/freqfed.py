"""FreqFed: cluster the clients by the low frequencies of their updates, average the majority.

Fereidooni, Pegoraro, Rieger, Dmitrienko, Sadeghi, "FreqFed: A Frequency Analysis-Based Approach
for Mitigating Poisoning Attacks in Federated Learning", NDSS 2024 (arXiv:2312.04432).

Each weight tensor is read as a matrix (rows = output units, columns = everything else: a conv
kernel's (in, kh, kw) flattened; a vector is one row), transformed with the orthonormal 2-D
DCT-II, and only its low-frequency corner is kept: the top-left block of ceil(rows * f) x
ceil(cols * f) coefficients (f = `low_fraction`, 1/2 by default). The clients' concatenated blocks
are compared by cosine distance, clustered with HDBSCAN (FLAME's settings: min_cluster_size =
n // 2 + 1, min_samples = 1, a single cluster allowed; `strategies.flame.hdbscan_admitted`) and the
largest cluster is averaged. BatchNorm running statistics are data statistics, not weights: they
are left out of the features (they are still averaged like every coordinate).

Speed: the DCT runs through the FFT (Makhoul 1980: reorder, one complex FFT, one twiddle), one
axis at a time, keeping only the needed columns before the second axis: O(d log d) per client,
not O(d) (see bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from lab.records import ParamLayout
from strategies.flame import cosine_distances, hdbscan_admitted
from strategies.kernels import gram_matrix, require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

STATISTICS = ("running_mean", "running_var")  # BatchNorm buffers: not weights, not features


def dct_low(x: Tensor, keep: int) -> Tensor:
    """The first `keep` coefficients of the orthonormal DCT-II of `x` (..., N) along its last axis.

    Makhoul's algorithm: v = (x_0, x_2, x_4, ..., x_5, x_3, x_1), V = FFT(v),
    X_k = Re(exp(-i pi k / 2N) V_k), scaled by sqrt(1/N) for k = 0 and sqrt(2/N) otherwise
    (scipy.fft.dct(x, norm="ortho")).
    """
    n = x.shape[-1]
    v = torch.cat([x[..., 0::2], x[..., 1::2].flip(-1)], dim=-1)
    # v is real: rfft's half spectrum holds every V_k with k <= n // 2, the only ones f <= 1/2 needs
    fft = torch.fft.rfft if keep <= n // 2 + 1 else torch.fft.fft
    spectrum = fft(v, dim=-1)[..., :keep]
    k = torch.arange(keep, dtype=torch.float64)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n)).to(spectrum.dtype)
    out = (spectrum * twiddle).real * math.sqrt(2.0 / n)
    out[..., 0] *= math.sqrt(0.5)
    return out


def low_frequency_block(x: Tensor, fraction: float) -> Tensor:
    """(n, ceil(h f) * ceil(w f)) top-left block of the 2-D orthonormal DCT-II of each (h, w)
    matrix of `x` (n, h, w), flattened; f = `fraction`."""
    _, h, w = x.shape
    kh, kw = max(1, math.ceil(h * fraction)), max(1, math.ceil(w * fraction))
    cols = dct_low(x, kw)  # (n, h, kw): along the rows' length first, keeping kw
    block = dct_low(cols.transpose(1, 2), kh)  # (n, kw, kh)
    return block.transpose(1, 2).reshape(x.shape[0], kh * kw)


def weight_matrices(layout: ParamLayout, which: Literal["all", "output"]) -> list[tuple[slice, int, int]]:
    """(flat slice, rows, cols) of every weight tensor read as a matrix; "output" = the output
    layer's weight only (`ParamLayout.output_slice`)."""
    slices = layout.slices()
    out_slice = layout.output_slice()
    found = []
    for e in layout.entries:
        if not e.floating or e.key.endswith(STATISTICS) or e.numel == 0:
            continue
        s = slices[e.key]
        if which == "output" and s != out_slice:
            continue
        rows = e.shape[0] if len(e.shape) >= 2 else 1
        found.append((s, rows, e.numel // rows))
    return found


class FreqFed:
    """FreqFed (Fereidooni et al., NDSS 2024) over client deltas: see the module docstring.

    Suspicion (`Aggregate.suspicion`): 1[not in the majority cluster] + half the client's mean
    cosine distance (in the low-frequency space) to the cluster's members, so every client left
    out ranks above every admitted one, and within each group the farther one ranks higher.
    """

    def __init__(
        self,
        ctx: AggregatorContext,
        *,
        low_fraction: float = 0.5,
        layers: Literal["all", "output"] = "all",
        distance_on: Literal["updates", "models"] = "updates",
        weighted: bool = False,
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            low_fraction: f in (0, 1]: the share of each axis's frequencies kept.
            layers: "all" weight tensors (the paper: the whole model) or the "output" layer only.
            distance_on: cluster the updates' spectra or the local models' (W_i = G + U_i; the
                DCT is linear, so that adds the global model's spectrum; needs global_params).
            weighted: average the cluster by num-examples (off: the count is client-reported).
        """
        if not isinstance(low_fraction, (int, float)) or isinstance(low_fraction, bool) \
                or not 0 < low_fraction <= 1:
            raise ConfigError(f"freqfed: low_fraction must be in (0, 1], got {low_fraction!r}")
        if layers not in ("all", "output"):
            raise ConfigError(f"freqfed: layers must be 'all' or 'output', got {layers!r}")
        if distance_on not in ("updates", "models"):
            raise ConfigError(f"freqfed: distance_on must be 'updates' or 'models', got {distance_on!r}")
        if ctx.clients_per_round < 2:
            raise ConfigError(f"freqfed: clustering needs clients_per_round >= 2, got {ctx.clients_per_round}")
        self.fraction = float(low_fraction)
        self.distance_on = distance_on
        self.weighted = weighted
        self.matrices = weight_matrices(ctx.layout, layers)
        if not self.matrices:
            raise ConfigError(f"freqfed: the model has no {'output-layer ' if layers == 'output' else ''}"
                              f"weight tensor to transform")
        self.num_params = ctx.layout.num_params

    def features(self, updates: Tensor) -> Tensor:
        """(n, F) float64 low-frequency features of the rows of `updates` (n, d)."""
        if updates.shape[1] != self.num_params:
            raise AggregationError(f"freqfed: updates have {updates.shape[1]} params, layout has {self.num_params}")
        n = updates.shape[0]
        blocks = [low_frequency_block(updates[:, s].reshape(n, rows, cols), self.fraction)
                  for s, rows, cols in self.matrices]
        return torch.cat(blocks, dim=1)

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError for n < 2, a layout mismatch, or a missing
        global model with distance_on="models"."""
        n = require_clients(updates, info, 2, "freqfed")
        feats = self.features(updates)  # (n, F)
        if self.distance_on == "models":
            if info.global_params is None:
                raise AggregationError("freqfed: distance_on='models' needs RoundInfo.global_params")
            feats = feats + self.features(info.global_params.reshape(1, -1).to(updates.dtype))
        dist = cosine_distances(gram_matrix(feats))  # (n, n) in [0, 2]
        admitted, clusters = hdbscan_admitted(dist)
        w = info.num_examples.to(torch.float64) if self.weighted else torch.ones(n, dtype=torch.float64)
        w = torch.where(admitted, w, torch.zeros_like(w))
        if not float(w.sum()) > 0:
            raise AggregationError("freqfed: the admitted clients have zero total num-examples")
        w = w / w.sum()
        members = admitted.to(torch.float64)
        others = (members.sum() - members).clamp_min(1.0)  # an admitted client is not its own neighbour
        spread = (dist @ members) / torch.where(admitted, others, members.sum())
        log.debug("freqfed: admitted=%s clusters=%d", admitted.tolist(), clusters)
        return Aggregate(
            update=w.to(updates.dtype) @ updates,
            kept=admitted,
            weights=w.to(updates.dtype),
            scores=spread.to(updates.dtype),
            suspicion=(~admitted).to(torch.float64) + spread / 2,
            stats={"agg.admitted": float(admitted.sum()), "agg.clusters": float(clusters),
                   "agg.features": float(feats.shape[1])},
        )
