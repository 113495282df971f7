"""Multi-Metrics: score each client by three distances at once, whitened; keep the lowest scores.

Huang, Li, Chen, Shi, Gao, "Multi-Metrics Adaptively Identifies Backdoors in Federated Learning",
ICCV 2023 (arXiv:2410.10855; code: siquanhuang/Multi-metrics).

For client i, x_i = (sum_j cosine distance, sum_j Manhattan distance, sum_j Euclidean distance)
over the other clients j of the round. The three columns have wildly different scales (the
Manhattan sum grows with d); the paper's dynamic weighting whitens them with the inverse of their
covariance over the round's clients: score_i = x_i^T Sigma^-1 x_i (Sigma singular, e.g. identical
clients: the pseudo-inverse). The `keep_fraction` p of the clients with the lowest scores are
averaged (the paper's p = 0.3).

Deviations of the public code, named: it takes the distances between local *models* (the paper
writes gradients; the Manhattan and Euclidean distances are the same for both, the cosine is not),
squares the cosine distance and uses |‖a‖ - ‖b‖| as its "Euclidean" distance. This module follows
the paper: updates, 1 - cos, ‖a - b‖.

Cost: the Manhattan distances have no Gram-matrix shortcut: n (n - 1) / 2 row differences over
d, chunked by columns (O(n^2 d); see bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.flame import cosine_distances
from strategies.kernels import gram_matrix, require_clients, sq_distances_from_gram
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

DEFAULT_KEEP = 0.3  # the paper's p
MANHATTAN_CHUNK = 1 << 14  # columns per chunk: the (n, chunk) block and one difference stay in cache


def manhattan_distances(updates: Tensor, chunk: int = MANHATTAN_CHUNK) -> Tensor:
    """(n, n) float64 pairwise L1 distances of the rows of `updates` (n, d), one column pass."""
    n, d = updates.shape
    total = torch.zeros(n, n, dtype=torch.float64)
    for c0 in range(0, d, chunk):
        block = updates[:, c0 : c0 + chunk].contiguous()  # (n, c)
        for i in range(n - 1):
            part = (block[i + 1 :] - block[i]).abs_().sum(dim=1, dtype=torch.float64)  # (n - i - 1,)
            total[i, i + 1 :] += part
    return total + total.T


def metric_features(updates: Tensor) -> Tensor:
    """(n, 3) float64: each client's summed cosine, Manhattan and Euclidean distances to the others."""
    gram = gram_matrix(updates)
    cos = cosine_distances(gram)
    euclid = sq_distances_from_gram(gram).sqrt()
    manhattan = manhattan_distances(updates)
    return torch.stack([cos.sum(1), manhattan.sum(1), euclid.sum(1)], dim=1)


def whitened_scores(x: Tensor) -> Tensor:
    """(n,) x_i^T Sigma^-1 x_i with Sigma the (3, 3) covariance of the rows of `x` (n, 3)
    (ddof 1, as numpy's cov; the pseudo-inverse when singular or n = 1)."""
    if x.shape[0] < 2:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    # scale each column first: the Manhattan sums are ~d times the cosine sums, which would make
    # Sigma ill-conditioned; x^T Sigma^-1 x is invariant to that rescaling
    scale = x.abs().amax(dim=0).clamp_min(1e-300)
    z = x / scale
    sigma = torch.cov(z.T)
    inv = torch.linalg.pinv(sigma, hermitian=True)
    return ((z @ inv) * z).sum(dim=1).clamp_min(0.0)


def multi_metrics(
    updates: Tensor, info: RoundInfo, *, keep_fraction: float = DEFAULT_KEEP, weighted: bool = False,
) -> Aggregate:
    """Average the max(1, floor(p n)) clients with the lowest whitened multi-metric scores.

    `updates` is (n, d). Ties in the score keep the lower row first.

    Args:
        keep_fraction: p in (0, 1], the share of the round's clients averaged.
        weighted: weight the kept clients by num-examples (off: the count is client-reported).

    Returns:
        `kept`, `weights`, `scores` = the whitened scores, `suspicion` = the same scores (the rule
        keeps the lowest).

    Raises:
        AggregationError: no clients, or zero total num-examples among the kept.
    """
    n = require_clients(updates, info, 1, "multi-metrics")
    feats = metric_features(updates)  # (n, 3)
    scores = whitened_scores(feats)
    m = max(1, math.floor(keep_fraction * n + 1e-9))
    order = torch.argsort(scores, stable=True)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order[:m]] = True
    w = info.num_examples.to(torch.float64) if weighted else torch.ones(n, dtype=torch.float64)
    w = torch.where(kept, w, torch.zeros_like(w))
    if not float(w.sum()) > 0:
        raise AggregationError("multi-metrics: the kept clients have zero total num-examples")
    w = w / w.sum()
    log.debug("multi-metrics: scores=%s kept=%s", scores.tolist(), kept.nonzero().squeeze(1).tolist())
    return Aggregate(
        update=w.to(updates.dtype) @ updates,
        kept=kept,
        weights=w.to(updates.dtype),
        scores=scores.to(updates.dtype),
        suspicion=scores,
        stats={"agg.selected": float(m)},
    )


def check_multi_metrics(ctx: AggregatorContext, *, keep_fraction: float = DEFAULT_KEEP, **_: Any) -> None:
    """keep_fraction must be in (0, 1]."""
    if not isinstance(keep_fraction, (int, float)) or isinstance(keep_fraction, bool) \
            or not 0 < keep_fraction <= 1:
        raise ConfigError(f"multi-metrics: keep_fraction must be in (0, 1], got {keep_fraction!r}")
