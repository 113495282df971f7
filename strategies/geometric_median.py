"""Geometric median by the smoothed Weiszfeld algorithm (RFA).

Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE Transactions on
Signal Processing 70, 2022 (arXiv:1912.13445), Algorithm 2 (smoothed Weiszfeld):

    v_0 = sum_i a_i w_i,   beta_i = a_i / max(nu, ||v_t - w_i||),   v_{t+1} = sum_i beta_i w_i / sum_i beta_i

stopped after `max_iter` steps or when the objective g(v) = sum_i a_i ||v - w_i|| improves by less
than `ftol * g(v)`.

Speed: every iterate is a combination v = sum_j c_j w_j of the rows, so ||w_i - v||^2 =
G_ii - 2 (G c)_i + c^T G c with G the (n, n) Gram matrix. One pass over the matrix builds G; the
iterations then cost O(n^2) each, and one more pass forms the final combination. At d = 11.2M
that is two passes whatever the number of iterations. The Gram form loses precision when a
distance is tiny next to the norms (float32 partial sums, float64 total); the smoothing nu is what
makes such distances harmless.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.kernels import gram_matrix, require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo


def distances_to_combination(gram: Tensor, coef: Tensor) -> Tensor:
    """(m,) float64 L2 distance of each of the m rows behind `gram` (m, m) to sum_j coef_j row_j."""
    g_c = gram @ coef
    sq = gram.diagonal() - 2.0 * g_c + coef @ g_c
    return sq.clamp_min(0.0).sqrt()


def client_weights(info: RoundInfo, n: int, weighted: bool) -> Tensor:
    """(n,) float64 weights a_i summing to 1: num-examples when `weighted`, else uniform."""
    a = info.num_examples.to(torch.float64) if weighted else torch.ones(n, dtype=torch.float64)
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()) or float(a.sum()) <= 0:
        raise AggregationError(f"client weights must be finite, >= 0 and not all 0, got {a.tolist()}")
    return a / a.sum()


def weiszfeld(gram: Tensor, alpha: Tensor, *, nu: float, max_iter: int, ftol: float) -> tuple[Tensor, Tensor, int]:
    """Smoothed Weiszfeld in coefficient space.

    Returns (coef (n,), distances (n,) of every row to the result, iterations run); the geometric
    median is coef @ rows.
    """
    coef = alpha.clone()
    dist = distances_to_combination(gram, coef)
    objective = float(alpha @ dist)
    steps = 0
    for steps in range(1, max_iter + 1):
        beta = alpha / dist.clamp_min(nu)
        coef = beta / beta.sum()
        dist = distances_to_combination(gram, coef)
        previous, objective = objective, float(alpha @ dist)
        if abs(previous - objective) <= ftol * objective:
            break
    return coef, dist, steps


def geometric_median(
    updates: Tensor,
    info: RoundInfo,
    *,
    nu: float = 1e-6,
    max_iter: int = 100,
    ftol: float = 1e-7,
    weighted: bool = False,
) -> Aggregate:
    """RFA: the (smoothed) geometric median of the rows of `updates` (n, d).

    Args:
        nu: smoothing, the least distance a client's weight is divided by (> 0).
        max_iter: Weiszfeld steps at most (>= 1); each is O(n^2), not a pass over the matrix.
        ftol: stop when the objective improves by less than ftol times itself (>= 0; 0 runs
            all max_iter steps).
        weighted: a_i proportional to num-examples (the paper's weights). Off by default, as in the
            other robust rules: num-examples is client-reported.

    Returns:
        `weights` = the final Weiszfeld coefficients (each client's share of the update),
        `scores` = `suspicion` = each client's distance to the geometric median. `kept` is None:
        nobody is dropped, outliers are down-weighted.

    Raises:
        AggregationError: no clients, or weights that are not usable.
    """
    n = require_clients(updates, info, 1, "geomed")
    alpha = client_weights(info, n, weighted)
    coef, dist, steps = weiszfeld(gram_matrix(updates), alpha, nu=nu, max_iter=max_iter, ftol=ftol)
    return Aggregate(
        update=coef.to(updates.dtype) @ updates,
        weights=coef.to(updates.dtype),
        scores=dist.to(updates.dtype),
        suspicion=dist.to(updates.dtype),
        stats={"agg.iterations": float(steps), "agg.objective": float(alpha @ dist)},
    )


def check_geometric_median(
    ctx: AggregatorContext, *, nu: float = 1e-6, max_iter: int = 100, ftol: float = 1e-7, **_: Any
) -> None:
    """nu > 0, max_iter >= 1, ftol >= 0."""
    if not (isinstance(nu, (int, float)) and not isinstance(nu, bool) and math.isfinite(nu) and nu > 0):
        raise ConfigError(f"geomed: nu must be > 0, got {nu!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"geomed: max_iter must be an integer >= 1, got {max_iter!r}")
    if not (isinstance(ftol, (int, float)) and not isinstance(ftol, bool) and ftol >= 0):
        raise ConfigError(f"geomed: ftol must be >= 0, got {ftol!r}")
