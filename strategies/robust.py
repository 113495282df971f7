"""Byzantine-robust aggregation rules: Krum / Multi-Krum, coordinate-wise median, trimmed mean, Bulyan.

- Krum / Multi-Krum: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017.
- Coordinate-wise median and trimmed mean: Yin et al., "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018 (arXiv:1803.01498).
- Bulyan: El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in Byzantium",
  ICML 2018 (arXiv:1802.07927).

All rules take client deltas `updates` (n_clients, n_params) and a `RoundInfo`.

Suspicion (`Aggregate.suspicion`, higher = more suspicious): Krum / Multi-Krum and Bulyan report
the Krum score (the quantity their selection ranks by; for Bulyan's recursive selection too, the
one-shot score over all n clients); the coordinate-wise median and trimmed mean report each
client's L2 distance to the aggregate they produced (they judge coordinates, not clients, so the
distance to their robust centre is the per-client view of what they discarded).

Speed: the distances and order statistics come from the shared kernels of `strategies.kernels`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.kernels import (
    median_of_rows,
    network_reduce,
    pairwise_sq_distances,
    prune_network,
    require_clients,
    sorting_network,
)
from strategies.mean import distances_to
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

DEFAULT_TRIM_BETA = 0.2  # Flower's FedTrimmedAvg default


# ----------------------------------------------------------------------------------------------
# Krum / Multi-Krum


def krum_scores(dist: Tensor, num_byzantine: int) -> Tensor:
    """(n,) Krum scores: sum of squared distances to the n - f - 2 nearest other clients.

    `dist` is the (n, n) squared-distance matrix. The client itself is excluded explicitly
    (diagonal set to +inf), so two identical Sybil rows count each other at distance 0.
    """
    n = dist.shape[0]
    k = max(1, min(n - num_byzantine - 2, n - 1))
    if n == 1:
        return dist.new_zeros(1)
    others = dist.clone()
    others.fill_diagonal_(float("inf"))
    return torch.topk(others, k, dim=1, largest=False).values.sum(dim=1)


def _mean_of(updates: Tensor, info: RoundInfo, mask: Tensor, weighted: bool) -> tuple[Tensor, Tensor]:
    """Mean of the rows in `mask` (n,) bool; returns (update (d,), weights (n,))."""
    w = info.num_examples.to(torch.float64) if weighted else torch.ones(mask.shape[0], dtype=torch.float64)
    w = torch.where(mask, w, torch.zeros_like(w))
    total = w.sum()
    if total <= 0:
        raise AggregationError("selected clients have zero total num-examples")
    w = w / total
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 1:
        return updates[idx[0]].clone(), w
    if 2 * idx.numel() < mask.shape[0]:
        # few rows: copying them (m row passes) and averaging (m more) beats reading all n
        return w[idx].to(updates.dtype) @ updates.index_select(0, idx), w
    # one mat-vec over all rows; unselected rows have weight 0 (rows are finite: the wrapper
    # drops non-finite replies), and no copy of the matrix is made
    return w.to(updates.dtype) @ updates, w


def multi_krum(
    updates: Tensor,
    info: RoundInfo,
    *,
    num_byzantine: int = 0,
    num_selected: int | None = None,
    weighted: bool = False,
) -> Aggregate:
    """Multi-Krum: average the m clients with the lowest Krum scores (Blanchard et al. 2017).

    Score s(i) = sum of ||U_i - U_j||^2 over the n - f - 2 nearest neighbours j != i of client i.
    `updates` is (n, d). Requires n > 2f + 2.

    Args:
        num_byzantine: f, the assumed number of Byzantine clients per round.
        num_selected: m, clients averaged. Open choice: None (the default) means m = n - f, the
            common choice (Flower's `num_nodes_to_keep`); m = 1 is Krum.
        weighted: weight the selected clients by their reported num-examples (Flower's
            convention). Off by default: num-examples is client-reported, so a robust rule
            should not let an attacker claim a large weight.

    Returns:
        `kept` = the selected clients, `scores` = Krum scores (lower is more central).

    Raises:
        AggregationError: if n <= 2f + 2 this round.
    """
    n = require_clients(updates, info, 2 * num_byzantine + 3, "multi-krum")
    m = n - num_byzantine if num_selected is None else num_selected
    if not 1 <= m <= n:
        raise AggregationError(f"multi-krum: num_selected={m} not in [1, {n}]")
    scores = krum_scores(pairwise_sq_distances(updates), num_byzantine)  # (n,)
    order = torch.argsort(scores, stable=True)  # ties: lower row index first
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order[:m]] = True
    update, weights = _mean_of(updates, info, kept, weighted)
    log.debug("multi-krum: scores=%s kept=%s", scores.tolist(), kept.nonzero().squeeze(1).tolist())
    return Aggregate(
        update=update,
        kept=kept,
        weights=weights.to(updates.dtype),
        scores=scores.to(updates.dtype),
        suspicion=scores,
        stats={"agg.selected": float(m), "agg.neighbours": float(max(1, n - num_byzantine - 2))},
    )


def krum(updates: Tensor, info: RoundInfo, *, num_byzantine: int = 0) -> Aggregate:
    """Krum: the single client with the lowest Krum score (Blanchard et al. 2017); see `multi_krum`.

    Raises:
        AggregationError: if n <= 2f + 2 this round.
    """
    return multi_krum(updates, info, num_byzantine=num_byzantine, num_selected=1)


# ----------------------------------------------------------------------------------------------
# coordinate-wise median and trimmed mean


def coordinate_median(updates: Tensor, info: RoundInfo) -> Aggregate:
    """Coordinate-wise median of `updates` (n, d) (Yin et al. 2018); even n averages the middle two.

    Raises:
        AggregationError: if there are no clients.
    """
    require_clients(updates, info, 1, "median")
    update = median_of_rows(updates)
    return Aggregate(update=update, suspicion=distances_to(updates, update))


def trimmed_mean(updates: Tensor, info: RoundInfo, *, beta: float = DEFAULT_TRIM_BETA) -> Aggregate:
    """Coordinate-wise mean after dropping b = floor(beta * n) values from each tail (Yin et al. 2018).

    `updates` is (n, d). Needs 0 <= beta < 0.5 (checked at build time), so n - 2b >= 1.

    Raises:
        AggregationError: if there are no clients.
    """
    n = require_clients(updates, info, 1, "trimmed-mean")
    b = int(beta * n)
    if n - 2 * b < 1:
        raise AggregationError(f"trimmed-mean: beta={beta} trims all {n} clients")
    stats = {"agg.trimmed-per-tail": float(b)}
    if b == 0:
        mean = updates.mean(dim=0)
        return Aggregate(update=mean, suspicion=distances_to(updates, mean), stats=stats)
    keep = range(b, n - b)
    comps = prune_network(sorting_network(n), set(keep))
    scale = 1.0 / (n - 2 * b)

    def reduce(rows: list[Tensor], out: Tensor) -> None:
        out.copy_(rows[b])
        for r in keep[1:]:
            out.add_(rows[r])
        out.mul_(scale)

    update = network_reduce(updates, comps, reduce)
    return Aggregate(update=update, suspicion=distances_to(updates, update), stats=stats)


# ----------------------------------------------------------------------------------------------
# Bulyan


def _recursive_krum(dist: Tensor, num_byzantine: int, count: int) -> list[int]:
    """Apply Krum `count` times, each time to the clients not picked yet (El Mhamdi et al. 2018).

    The neighbour count shrinks with the remaining set R: max(1, |R| - f - 2), capped at |R| - 1.
    """
    remaining = list(range(dist.shape[0]))
    picked: list[int] = []
    for _ in range(count):
        sub = dist[remaining][:, remaining]
        scores = krum_scores(sub, num_byzantine)
        best = int(torch.argmin(scores))  # first minimum: lowest remaining index on ties
        picked.append(remaining.pop(best))
    return picked


def bulyan(
    updates: Tensor,
    info: RoundInfo,
    *,
    num_byzantine: int = 0,
    selection: Literal["multi-krum", "recursive"] = "multi-krum",
) -> Aggregate:
    """Bulyan (El Mhamdi et al. 2018): Krum selection, then a trimmed mean around the median.

    1. Select theta = n - 2f clients with Krum. Open choice, `selection`: "multi-krum" (default,
       as Flower's `Bulyan`) takes the theta lowest one-shot Krum scores (n - f - 2 neighbours);
       "recursive" (the paper) applies Krum theta times to the clients not yet picked, with
       max(1, |R| - f - 2) neighbours. Near the end |R| is 2f + 1, i.e. a single neighbour for
       f <= 3, so two colluders that are each other's nearest neighbour get picked: that is why
       one-shot is the default.
    2. For every coordinate, average the beta = theta - 2f selected values closest to the
       coordinate's median over the selected clients. Those values are a contiguous window of
       the sorted values; when moving the window right or not is a tie, it stays left.

    `updates` is (n, d). Requires n > 4f + 2.

    Raises:
        AggregationError: if n <= 4f + 2 this round.
    """
    f = num_byzantine
    n = require_clients(updates, info, 4 * f + 3, "bulyan")
    theta = n - 2 * f
    beta = theta - 2 * f
    dist = pairwise_sq_distances(updates)
    if selection == "recursive":
        picked = _recursive_krum(dist, f, theta)
        scores = krum_scores(dist, f)
    else:
        scores = krum_scores(dist, f)
        picked = torch.argsort(scores, stable=True)[:theta].tolist()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[picked] = True
    rows_idx = torch.tensor(sorted(picked))  # (theta,) the network sorts only these rows

    comps = sorting_network(theta)
    mid = theta // 2
    slack = theta - beta  # = 2f: the window starts at lo in [0, slack]

    def reduce(rows: list[Tensor], out: Tensor) -> None:
        med = rows[mid] if theta % 2 else (rows[mid - 1] + rows[mid]) * 0.5
        # lo = number of window shifts: shift while the value entering on the right is strictly
        # closer to the median than the one leaving on the left (monotone in the start index)
        lo = torch.zeros_like(med, dtype=torch.int64)
        for s in range(slack):
            lo += (rows[s + beta] - med) < (med - rows[s])
        # window = sorted positions [lo, lo + beta); positions [slack, beta) are in every window
        out.zero_()
        for r in range(theta):
            if slack <= r < beta:
                out.add_(rows[r])
            else:
                out.add_(torch.where((lo <= r) & (lo > r - beta), rows[r], 0.0))
        out.mul_(1.0 / beta)

    update = network_reduce(updates, comps, reduce, rows_idx=rows_idx)
    return Aggregate(
        update=update,
        kept=kept,
        scores=scores.to(updates.dtype),
        suspicion=scores,
        stats={"agg.selected": float(theta), "agg.trimmed-mean-size": float(beta)},
    )


# ----------------------------------------------------------------------------------------------
# build-time checks (called by the registry with the raw hyperparameters)


def _check_f(rule: str, f: Any) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"{rule}: num_byzantine must be an integer >= 0, got {f!r}")
    return f


def check_krum(ctx: AggregatorContext, *, num_byzantine: int = 0, **_: Any) -> None:
    """Krum needs n > 2f + 2 with n = clients_per_round."""
    f = _check_f("krum", num_byzantine)
    n = ctx.clients_per_round
    if n <= 2 * f + 2:
        raise ConfigError(
            f"krum: needs clients_per_round > 2*num_byzantine + 2 = {2 * f + 2}, got {n} "
            f"(use at most num_byzantine={max((n - 3) // 2, 0)} or more clients per round)"
        )


def check_multi_krum(
    ctx: AggregatorContext, *, num_byzantine: int = 0, num_selected: int | None = None, **_: Any
) -> None:
    """Multi-Krum: the Krum condition and 1 <= num_selected <= clients_per_round."""
    check_krum(ctx, num_byzantine=num_byzantine)
    if num_selected is not None and (
        isinstance(num_selected, bool) or not isinstance(num_selected, int)
        or not 1 <= num_selected <= ctx.clients_per_round
    ):
        raise ConfigError(
            f"multi-krum: num_selected must be an integer in [1, clients_per_round={ctx.clients_per_round}], "
            f"got {num_selected!r}"
        )


def check_trimmed_mean(ctx: AggregatorContext, *, beta: float = DEFAULT_TRIM_BETA, **_: Any) -> None:
    """Trimmed mean needs 0 <= beta < 0.5."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta < 0.5:
        raise ConfigError(f"trimmed-mean: beta must be in [0, 0.5), got {beta!r}")


def check_bulyan(
    ctx: AggregatorContext, *, num_byzantine: int = 0, selection: str = "multi-krum", **_: Any
) -> None:
    """Bulyan needs n > 4f + 2 with n = clients_per_round."""
    f = _check_f("bulyan", num_byzantine)
    n = ctx.clients_per_round
    if n <= 4 * f + 2:
        raise ConfigError(
            f"bulyan: needs clients_per_round > 4*num_byzantine + 2 = {4 * f + 2}, got {n} "
            f"(use at most num_byzantine={max((n - 3) // 4, 0)} or more clients per round)"
        )
    if selection not in ("recursive", "multi-krum"):
        raise ConfigError(f"bulyan: selection must be 'recursive' or 'multi-krum', got {selection!r}")
