"""FLAME: cluster out dissimilar updates, clip to the median norm, add adaptive noise.

Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022
(arXiv:2101.02281).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from sklearn.cluster import HDBSCAN
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.clipping import clip_factors, round_generator
from strategies.kernels import gram_matrix, require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

EPS = 1e-12
# Floating entries that are statistics, not weights: FLAME adds no noise to them.
NO_NOISE_SUFFIXES = ("running_mean", "running_var")
DEFAULT_LAMBDA = {"paper": 1e-3, "layer-std": 1.2e-5}


def cosine_distances(gram: Tensor) -> Tensor:
    """(n, n) 1 - cos from a Gram matrix; zero vectors have cosine 0 (distance 1); range [0, 2]."""
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(EPS)
    dist = (1.0 - cos).clamp_(0.0, 2.0)
    dist.fill_diagonal_(0.0)
    return dist


def hdbscan_admitted(dist: Tensor) -> tuple[Tensor, int]:
    """(n,) bool: members of the largest HDBSCAN cluster on the precomputed `dist` (n, n).

    min_cluster_size = n // 2 + 1 (so at most one cluster exists), min_samples = 1,
    allow_single_cluster = True. If every point is noise, everyone is admitted (zhmzm's choice).
    Returns (admitted, number of clusters found).
    """
    n = dist.shape[0]
    if n < 2:
        return torch.ones(n, dtype=torch.bool), 1
    labels = HDBSCAN(
        min_cluster_size=max(2, n // 2 + 1), min_samples=1, allow_single_cluster=True,
        metric="precomputed", copy=True,
    ).fit(dist.numpy()).labels_
    lab = torch.from_numpy(labels).to(torch.int64)
    clusters = lab[lab >= 0]
    if clusters.numel() == 0:
        return torch.ones(n, dtype=torch.bool), 0
    counts = torch.bincount(clusters)
    return lab == int(torch.argmax(counts)), int((counts > 0).sum())


class Flame:
    """FLAME (Nguyen et al. 2022) over client deltas.

    1. Filter: c_ij = 1 - cos(x_i, x_j) with x = the updates (default) or the local models
       W_i = G_t + U_i (`distance_on="models"`, the paper's choice; needs info.global_params).
       Both come from one Gram matrix of the updates. HDBSCAN (`hdbscan_admitted`) admits the
       largest cluster.
    2. Clip: e_i = ||U_i||, S_t = median_i e_i over *all* clients (even n: mean of the two middle
       values); admitted U_i are scaled by min(1, S_t / e_i).
    3. update = mean over admitted of the clipped U_i.
    4. Noise, open choice `noise`: "paper" (default) adds N(0, (lambda S_t)^2) to every
       coordinate, lambda = 0.001 (image classification); "layer-std" (FLPoison) uses
       sigma = lambda * S_t * std(global layer) per layer, lambda = 1.2e-5; "none" skips it.
       BatchNorm running statistics get no noise (integer buffers are not in the vector). The
       noise comes from a CPU generator seeded by (ctx.seed, round): reproducible.

    Suspicion (`Aggregate.suspicion`): cluster membership first, then the norm:
    1[not admitted] + e_i / (e_i + S_t). The second term is in [0, 1), so every client the
    clustering left out ranks above every admitted one, and within each group a larger update
    (the one clipping acts on) is more suspicious.
    """

    def __init__(
        self,
        ctx: AggregatorContext,
        *,
        noise: Literal["paper", "layer-std", "none"] = "paper",
        noise_lambda: float | None = None,
        distance_on: Literal["updates", "models"] = "updates",
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            noise: the noise variant, see the class docstring.
            noise_lambda: lambda; None takes the variant's default.
            distance_on: "updates" or "models" for the cosine distances.
        """
        if noise not in ("paper", "layer-std", "none"):
            raise ConfigError(f"flame: noise must be 'paper', 'layer-std' or 'none', got {noise!r}")
        if distance_on not in ("updates", "models"):
            raise ConfigError(f"flame: distance_on must be 'updates' or 'models', got {distance_on!r}")
        lam = DEFAULT_LAMBDA.get(noise, 0.0) if noise_lambda is None else noise_lambda
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not 0 <= lam < math.inf:
            raise ConfigError(f"flame: noise_lambda must be >= 0, got {noise_lambda!r}")
        if ctx.clients_per_round < 2:
            raise ConfigError(f"flame: clustering needs clients_per_round >= 2, got {ctx.clients_per_round}")
        self.seed = ctx.seed
        self.noise = noise
        self.lam = float(lam)
        self.distance_on = distance_on
        slices = ctx.layout.slices()
        # (start, stop) of the flat-vector pieces that get noise, and the per-layer pieces
        self.layers = [(s.start, s.stop) for k, s in slices.items() if not k.endswith(NO_NOISE_SUFFIXES)]
        self.num_params = ctx.layout.num_params

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError for n < 2, or a missing global model
        when distance_on="models" or noise="layer-std" need it."""
        require_clients(updates, info, 2, "flame")
        gram = gram_matrix(updates)  # (n, n) float64
        norms = gram.diagonal().clamp_min(0.0).sqrt()  # (n,) e_i
        if self.distance_on == "models":
            g = self._global(info)
            gu = (updates @ g).to(torch.float64)  # (n,) G . U_i
            gram = gram + gu[:, None] + gu[None, :] + float(g.double() @ g.double())
        admitted, clusters = hdbscan_admitted(cosine_distances(gram))
        s_t = float(torch.quantile(norms, 0.5))
        factors = torch.where(admitted, clip_factors(norms, s_t), torch.zeros_like(norms))
        coef = factors / admitted.sum()
        update = coef.to(updates.dtype) @ updates
        sigma = self._add_noise(update, s_t, info)
        log.debug("flame: admitted=%s S_t=%.4g sigma=%.4g", admitted.tolist(), s_t, sigma)
        return Aggregate(
            update=update,
            kept=admitted,
            clipped=admitted & (norms > s_t),
            weights=coef.to(updates.dtype),
            scores=norms.to(updates.dtype),
            suspicion=(~admitted).to(torch.float64) + norms / (norms + s_t).clamp_min(EPS),
            stats={"agg.admitted": float(admitted.sum()), "agg.clusters": float(clusters),
                   "agg.median-norm": s_t, "agg.noise-sigma": sigma},
        )

    def _global(self, info: RoundInfo) -> Tensor:
        if info.global_params is None:
            raise AggregationError("flame: needs RoundInfo.global_params for distance_on='models' / noise='layer-std'")
        return info.global_params.reshape(-1).to(torch.float32)

    def _add_noise(self, update: Tensor, s_t: float, info: RoundInfo) -> float:
        """Add the round's noise to `update` in place; returns the (base) sigma used."""
        if self.noise == "none" or self.lam == 0.0:
            return 0.0
        if update.shape[0] != self.num_params:
            raise AggregationError(f"flame: updates have {update.shape[0]} params, layout has {self.num_params}")
        gen = round_generator(self.seed, info.server_round, "flame")
        sigma = self.lam * s_t
        g = self._global(info) if self.noise == "layer-std" else None
        for start, stop in self.layers:
            piece = update[start:stop]
            std = sigma if g is None else sigma * float(g[start:stop].std(correction=0))
            piece.add_(torch.randn(piece.shape, generator=gen, dtype=piece.dtype), alpha=std)
        return sigma
