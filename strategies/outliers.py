"""Outlier-removal rules: RFOut-1d (per-coordinate z-score) and an IQR filter on update norms.

- RFOut-1d: Rodriguez-Barroso et al., "Backdoor attacks-resilient aggregation based on Robust
  Filtering of Outliers in federated learning for image classification", Knowledge-Based
  Systems 2022 (code: ari-dasci/S-RFOut).
- IQR filter: Tukey's fences (Tukey, "Exploratory Data Analysis", 1977) on the round's update
  norms; clients outside the fence are dropped (ClipAvg+IQR in `clipping.py` clips instead).

Both take client deltas `updates` (n_clients, n_params).

Suspicion (`Aggregate.suspicion`): RFOut-1d, the number of the client's coordinates it replaced,
plus a tie-break in [0, 1) that grows with the client's mean squared z-score (so the count decides
and, where it is equal, as when no coordinate can be replaced at n <= 10, the z-scores do); the
IQR filter, the update norm (sides="upper") or its distance to the median norm (sides="both").
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import Tensor

from lab.errors import ConfigError
from strategies.clipping import row_norms, tukey_upper_fence
from strategies.kernels import median_of_rows, require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

RFOUT_CHUNK = 1 << 15  # columns per chunk: the (n, chunk) temporaries stay in cache
MAD_TO_STD = 1.4826  # sigma = 1.4826 * MAD for Gaussian data
TIE_BREAK_MAX = 1.0 - 1e-9  # keeps the z-score tie-break strictly below one replaced coordinate


def rfout_1d(
    updates: Tensor,
    info: RoundInfo,
    *,
    threshold: float = 3.0,
    ddof: int = 0,
    method: Literal["std", "mad"] = "std",
) -> Aggregate:
    """RFOut-1d: replace per-coordinate outliers by the coordinate's centre, then average.

    For every coordinate k: mu_k = mean_i U_ik, sigma_k = population std (ddof = 0, as in the
    paper; ddof=1 for the sample std); U_ik -> mu_k where |U_ik - mu_k| > threshold * sigma_k;
    update = mean_i U_ik. `method="mad"` uses the median and sigma = 1.4826 * MAD instead, which
    is not bounded by the limit below. The paper's optional DP step is not part of this rule
    (compose with `norm-clip` for that).

    Limit (notes/formulas.md 3.8): with the mean/std z-score, max_i |z_i| <= sqrt(n - 1)
    (Samuelson's inequality), so at threshold 3 nothing can be replaced for n <= 10, and k identical
    colluders are replaced only if k < n / 10. The registry warns at build time.

    `updates` is (n, d). Processed in column chunks, so peak extra memory is a few chunks.

    Returns:
        `scores` = share of each client's coordinates that were replaced; stats
        `agg.replaced-fraction` over the whole matrix.

    Raises:
        AggregationError: when there are no clients.
    """
    n = require_clients(updates, info, 1, "rfout-1d")
    d = updates.shape[1]
    centre: Tensor | None = None
    spread: Tensor | None = None
    if method == "mad":
        centre = median_of_rows(updates)  # (d,)
        spread = median_of_rows((updates - centre).abs_()) * MAD_TO_STD  # (d,)
    out = torch.empty(d, dtype=updates.dtype)
    kept_count = torch.zeros(n, dtype=torch.float64)
    z2_sum = torch.zeros(n, dtype=torch.float64)  # sum over coordinates of z_ik^2 (suspicion tie-break)
    tiny = torch.finfo(updates.dtype).tiny
    # float 0/1 "keep" buffer: torch's comparisons into a float `out` run ~6x faster than into
    # bool tensors, and multiplying by it is faster than masked_fill / where
    keep_buf = torch.empty(n, min(RFOUT_CHUNK, d), dtype=updates.dtype)
    thr2 = threshold * threshold
    # Ties at the threshold are kept (the paper's strict `>`), and they are not rare: at Samuelson's
    # bound (n - 1 equal values) the odd one's |z| is exactly sqrt(n - 1), 3 at n = 10, and k equal
    # colluders among equal honest values have |z| = sqrt((n - k) / k) exactly. A relative slack of a
    # few roundings per client keeps the float test from flipping there (bench/RESULTS.md, issue 14).
    bound2 = thr2 * (1.0 + 8 * n * torch.finfo(updates.dtype).eps)
    for c0 in range(0, d, RFOUT_CHUNK):
        block = updates[:, c0 : c0 + RFOUT_CHUNK]  # (n, c)
        keep = keep_buf[:, : block.shape[1]]
        if centre is None or spread is None:
            mu = block.mean(dim=0)  # (c,)
            dev = block - mu  # (n, c)
            # one correction pass: mu's rounding shifts every deviation alike, which is a large
            # relative error when the deviations are small next to the values themselves
            shift = dev.mean(dim=0)
            mu += shift
            dev -= shift
            sq = dev.square()
            # population variance (ddof = 0) or sample variance (ddof = 1); n <= ddof: no spread
            limit = sq.sum(dim=0).mul_(bound2 / (n - ddof)) if n > ddof else torch.zeros_like(mu)
            torch.le(sq, limit, out=keep)  # (n, c): |dev| <= threshold * sigma, without a sqrt
            z2_sum += (sq / (limit / bound2).clamp_min_(tiny)).sum(dim=1, dtype=torch.float64)
        else:
            mu, sigma = centre[c0 : c0 + RFOUT_CHUNK], spread[c0 : c0 + RFOUT_CHUNK]
            dev = block - mu
            torch.le(dev.abs(), sigma * threshold, out=keep)
            z2_sum += (dev / sigma.clamp_min(tiny)).square_().sum(dim=1, dtype=torch.float64)
        kept_count += keep.sum(dim=1)
        # mean_i where(replaced, mu, U_i) = mu + mean_i (U_i - mu) over the kept entries
        piece = out[c0 : c0 + RFOUT_CHUNK]
        torch.sum(dev.mul_(keep), dim=0, out=piece)
        piece.div_(n).add_(mu)
    replaced = d - kept_count
    frac = replaced / max(d, 1)
    mean_z2 = z2_sum / max(d, 1)
    tie_break = (1.0 - 1.0 / (1.0 + mean_z2)).nan_to_num(TIE_BREAK_MAX).clamp_(0.0, TIE_BREAK_MAX)
    return Aggregate(
        update=out,
        scores=frac.to(updates.dtype),
        suspicion=replaced + tie_break,
        stats={"agg.replaced-fraction": float(replaced.sum()) / max(n * d, 1)},
    )


def iqr_filter(
    updates: Tensor,
    info: RoundInfo,
    *,
    iqr_k: float = 1.5,
    sides: Literal["upper", "both"] = "upper",
    weighted: bool = False,
) -> Aggregate:
    """Drop clients whose update norm lies outside Tukey's fence, average the rest.

    nu_i = ||U_i||; Q1, Q3 by linear interpolation (`torch.quantile`); kept iff
    nu_i <= Q3 + iqr_k * IQR (and, with `sides="both"`, nu_i >= Q1 - iqr_k * IQR, which also drops
    near-zero free-rider updates). At least one client is always kept (some norm lies in
    [Q1, Q3] for n >= 4). With identical norms (IQR = 0) everyone is kept.
    `updates` is (n, d).

    Raises:
        AggregationError: if fewer than 4 clients replied.
    """
    n = require_clients(updates, info, 4, "iqr-filter")
    norms = row_norms(updates)  # (n,)
    q1, q3, upper = tukey_upper_fence(norms, iqr_k)
    lower = q1 - iqr_k * (q3 - q1) if sides == "both" else float("-inf")
    kept = (norms <= upper) & (norms >= lower)
    w = info.num_examples.to(torch.float64) if weighted else torch.ones(n, dtype=torch.float64)
    w = torch.where(kept, w, torch.zeros_like(w))
    w = w / w.sum()
    log.debug("iqr-filter: norms=%s fence=[%.4g, %.4g]", norms.tolist(), lower, upper)
    return Aggregate(
        update=w.to(updates.dtype) @ updates,
        kept=kept,
        weights=w.to(updates.dtype),
        scores=norms.to(updates.dtype),
        suspicion=norms if sides == "upper" else (norms - torch.quantile(norms, 0.5)).abs(),
        stats={"agg.q1": q1, "agg.q3": q3, "agg.fence": upper, "agg.dropped": float((~kept).sum())},
    )


# ----------------------------------------------------------------------------------------------
# build-time checks


def check_rfout_1d(
    ctx: AggregatorContext, *, threshold: float = 3.0, ddof: int = 0, method: str = "std", **_: Any
) -> None:
    """threshold > 0, ddof in {0, 1}; warns when the z-score rule cannot fire at this round size."""
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0:
        raise ConfigError(f"rfout-1d: threshold must be > 0, got {threshold!r}")
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ConfigError(f"rfout-1d: ddof must be 0 or 1, got {ddof!r}")
    if method not in ("std", "mad"):
        raise ConfigError(f"rfout-1d: method must be 'std' or 'mad', got {method!r}")
    n = ctx.clients_per_round
    if method == "std":
        # Samuelson's bound: one value among n has |z| <= sqrt(n-1) (ddof=0) or (n-1)/sqrt(n) (ddof=1),
        # and the rule replaces only |z| > threshold
        max_z = (n - 1) ** 0.5 if ddof == 0 else (n - 1) / n**0.5
        if max_z <= threshold:
            log.warning(
                "rfout-1d: with clients_per_round=%d no coordinate can ever be replaced: a single value's "
                "|z| is at most %.3f (Samuelson: sqrt(n-1) for ddof=0) <= threshold %.3g, so the rule is "
                "the plain unweighted mean, FedAvg with weighted: false (use clients_per_round > "
                "threshold^2 + 1, or method='mad')",
                n, max_z, threshold,
            )


def check_iqr(rule: str) -> Any:
    """Build-time check for the IQR-based rules: quartiles need clients_per_round >= 4."""

    def check(ctx: AggregatorContext, *, iqr_k: float = 1.5, sides: str = "upper", **_: Any) -> None:
        if ctx.clients_per_round < 4:
            raise ConfigError(f"{rule}: quartiles need clients_per_round >= 4, got {ctx.clients_per_round}")
        if not isinstance(iqr_k, (int, float)) or isinstance(iqr_k, bool) or not 0 <= iqr_k < math.inf:
            raise ConfigError(f"{rule}: iqr_k must be >= 0, got {iqr_k!r}")
        if sides not in ("upper", "both"):
            raise ConfigError(f"{rule}: sides must be 'upper' or 'both', got {sides!r}")

    return check
