"""SignGuard: norm thresholding and sign-statistics clustering, then a norm-clipped mean.

Xu, Huang, Xu, Lu, Li, "SignGuard: Byzantine-robust Federated Learning through Collaborative
Malicious Gradient Filtering", ICDCS 2022 (arXiv:2109.05872), Algorithm 1:

1. Norm filter: M = median_i ||g_i||; S1 = {i : lower <= ||g_i|| / M <= upper} (0.1 and 3.0).
2. Sign clustering: on a random subset of coordinates (10%), each client's feature is the share
   of positive, zero and negative entries; MeanShift clusters the features; S2 = the largest
   cluster.
3. update = (1 / |S|) sum_{i in S} g_i min(1, M / ||g_i||) with S = S1 n S2.

Open choices, pinned here: MeanShift's bandwidth is sklearn's `estimate_bandwidth` at
`bandwidth_quantile` (0.5: with few clients, sklearn's 0.3 counts only the point itself and gives
a zero bandwidth), floored at 1e-6; a tie for the largest cluster goes to the one whose members'
lowest row index is smallest. The coordinates come from a generator seeded by (experiment seed,
round, "signguard"), independent of the row order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.cluster import MeanShift, estimate_bandwidth
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.clipping import clip_factors, round_generator, row_norms
from strategies.kernels import require_clients
from strategies.spectral import random_coordinates
from strategies.types import Aggregate, AggregatorContext, RoundInfo

MIN_BANDWIDTH = 1e-6


def sign_features(sub: Tensor) -> Tensor:
    """(n, 3) float64 shares of positive, zero and negative entries of each row of `sub` (n, k)."""
    k = max(sub.shape[1], 1)
    return torch.stack([(sub > 0).sum(1), (sub == 0).sum(1), (sub < 0).sum(1)], dim=1).to(torch.float64) / k


def largest_cluster(features: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """(members (n,) bool, centre (3,)) of the largest MeanShift cluster of `features` (n, 3)."""
    x = features.numpy()
    n = x.shape[0]
    if n == 1 or bool(np.all(x == x[0])):
        return torch.ones(n, dtype=torch.bool), features[0].clone()
    bandwidth = max(float(estimate_bandwidth(x, quantile=quantile)), MIN_BANDWIDTH)
    labels = torch.from_numpy(MeanShift(bandwidth=bandwidth).fit(x).labels_.astype(np.int64))
    sizes = torch.bincount(labels)
    biggest = [c for c in range(sizes.numel()) if sizes[c] == sizes.max()]
    label = min(biggest, key=lambda c: int((labels == c).nonzero()[0]))  # row-order-free for distinct sizes
    members = labels == label
    return members, features[members].mean(dim=0)


class SignGuard:
    """SignGuard (Xu et al. 2022); see the module docstring.

    `kept` = S; `clipped` = kept clients above the median norm; `weights` = each client's share of
    the update; `suspicion` = (not in the largest sign cluster) + (outside the norm band) + a
    tie-breaker below 0.5, the feature's distance to the largest cluster's centre over the largest
    such distance. So any client outside S ranks above every client in S.
    """

    def __init__(
        self, ctx: AggregatorContext, *, lower: float = 0.1, upper: float = 3.0, coord_frac: float = 0.1,
        bandwidth_quantile: float = 0.5,
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            lower, upper: the norm band, as multiples of the median norm (0 <= lower <= 1 <= upper).
            coord_frac: share of coordinates the sign statistics use (0 < coord_frac <= 1).
            bandwidth_quantile: MeanShift bandwidth estimate's quantile (0 < q <= 1).
        """
        def number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (number(lower) and number(upper) and 0 <= lower <= 1 <= upper):
            raise ConfigError(f"signguard: needs 0 <= lower <= 1 <= upper, got lower={lower!r}, upper={upper!r}")
        for name, value in (("coord_frac", coord_frac), ("bandwidth_quantile", bandwidth_quantile)):
            if not (number(value) and 0 < value <= 1):
                raise ConfigError(f"signguard: {name} must be in (0, 1], got {value!r}")
        self.seed = ctx.seed
        self.lower, self.upper = float(lower), float(upper)
        self.coord_frac = float(coord_frac)
        self.quantile = float(bandwidth_quantile)

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError when no client passes both filters."""
        require_clients(updates, info, 1, "signguard")
        d = updates.shape[1]
        norms = row_norms(updates)
        median = float(torch.quantile(norms, 0.5))
        ratio = norms / median if median > 0 else torch.ones_like(norms)
        in_band = (ratio >= self.lower) & (ratio <= self.upper)
        gen = round_generator(self.seed, info.server_round, "signguard")
        cols = random_coordinates(d, max(1, math.ceil(self.coord_frac * d)), gen)
        feats = sign_features(updates.index_select(1, cols))
        in_cluster, centre = largest_cluster(feats, self.quantile)
        kept = in_band & in_cluster
        if not bool(kept.any()):
            raise AggregationError("signguard: no client is both in the norm band and the largest sign cluster")
        factors = clip_factors(norms, median) if median > 0 else torch.ones_like(norms)
        coef = torch.where(kept, factors, torch.zeros_like(factors)) / float(kept.sum())
        spread = torch.linalg.vector_norm(feats - centre, dim=1)
        top = float(spread.max())
        suspicion = (~in_cluster).double() + (~in_band).double() + (0.5 * spread / top if top > 0 else 0.0)
        return Aggregate(
            update=coef.to(updates.dtype) @ updates,
            kept=kept,
            clipped=kept & (factors < 1),
            weights=coef.to(updates.dtype),
            scores=suspicion.to(updates.dtype),
            suspicion=suspicion.to(updates.dtype),
            stats={"agg.median-norm": median, "agg.out-of-band": float((~in_band).sum()),
                   "agg.outside-cluster": float((~in_cluster).sum())},
        )
