"""Federated averaging of client updates (McMahan et al. 2017, arXiv:1602.05629).

Two divisors for the weighted sum of the sampled clients' updates (`federated.fedavg_divisor`):
`sampled` (FedAvg's mean, the weights of the round's clients sum to one) and `total` (the sum over
the sampled clients divided by the weight of *all* clients, as Bagdasaryan et al., AISTATS 2020,
write G + eta/n * sum_i (L_i - G) with n the total number of participants). With every client
sampled the two are the same.

Suspicion (`Aggregate.suspicion`): FedAvg defends nothing, so its suspicion is the "no-defense"
baseline a defense must beat: each update's L2 norm, what any server sees of a boosted update. The
server measured it while writing the matrix (`RoundInfo.ingested`), and the weighted sum too, so
FedAvg reads the matrix no more than Flower's own FedAvg does (a distance to the mean would cost a
pass more, ~0.14-0.24 CPU-s at n = 20, d = 11.2M: as much as the round itself).
"""

from __future__ import annotations

import torch
from torch import Tensor

from strategies.types import Aggregate, RoundInfo

DISTANCE_CHUNK = 1 << 15  # columns per chunk: the (n, chunk) difference stays in cache


def distances_to(updates: Tensor, centre: Tensor) -> Tensor:
    """(n,) float64 L2 distance of every row of `updates` (n, d) to `centre` (d,).

    One pass over column chunks: exact (no ||a||^2 - 2ab + ||b||^2 cancellation), and the only
    temporary is one (n, chunk) block.
    """
    n, d = updates.shape
    total = torch.zeros(n, dtype=torch.float64)
    block = updates.new_empty((n, min(d, DISTANCE_CHUNK)))
    for c0 in range(0, d, DISTANCE_CHUNK):
        part = updates[:, c0 : c0 + DISTANCE_CHUNK]
        diff = torch.sub(part, centre[c0 : c0 + DISTANCE_CHUNK], out=block[:, : part.shape[1]])
        # float32 norms of 32K columns (pairwise sums: ~1e-7 relative), added up in float64;
        # 1.7x faster than a float64 sum of squares over the same block
        total += torch.linalg.vector_norm(diff, dim=1).double().square()
    return total.sqrt_()


def weighted_sum(updates: Tensor, info: RoundInfo, w: Tensor, weighted: bool) -> Tensor:
    """sum_i w_i * updates[i]: the server's, taken during ingest, when it describes these rows and
    these weights (num-examples); else one mat-vec."""
    seen = info.ingested
    if weighted and seen is not None and seen.weighted_sum is not None and seen.describes(updates):
        return seen.weighted_sum
    return w @ updates


def update_norms(updates: Tensor, info: RoundInfo) -> Tensor:
    """(n,) float64 L2 norms of the rows: the server's, taken during ingest, when it describes them."""
    seen = info.ingested
    if seen is not None and seen.describes(updates):
        return seen.norms
    return torch.linalg.vector_norm(updates, dim=1).double()


def weighted_mean(updates: Tensor, info: RoundInfo, *, weighted: bool = True) -> Aggregate:
    """Mean of the rows of `updates` (n, d), weighted by num-examples unless `weighted` is False."""
    n = updates.shape[0]
    w = info.num_examples.to(updates.dtype) if weighted else updates.new_ones(n)
    total = w.sum()
    update = weighted_sum(updates, info, w, weighted) / total
    return Aggregate(update=update, kept=updates.new_ones(n, dtype=bool), weights=w / total,
                     suspicion=update_norms(updates, info))


def weighted_sum_over_total(updates: Tensor, info: RoundInfo, *, total_weight: float,
                            weighted: bool = True) -> Aggregate:
    """sum_i w_i * updates[i] / total_weight over the sampled rows of `updates` (n, d).

    w_i is num-examples (1 when `weighted` is False); `total_weight` is the weight of all clients,
    sampled or not (num_clients when unweighted), so the effective weights sum to less than one
    when not every client is sampled.

    Raises:
        ValueError: if `total_weight` is not > 0.
    """
    if not total_weight > 0:
        raise ValueError(f"total_weight must be > 0, got {total_weight}")
    n = updates.shape[0]
    w = info.num_examples.to(updates.dtype) if weighted else updates.new_ones(n)
    share = w / total_weight  # (n,) effective weights, summing to <= 1
    update = weighted_sum(updates, info, w, weighted) / total_weight
    return Aggregate(update=update, kept=updates.new_ones(n, dtype=bool), weights=share,
                     suspicion=update_norms(updates, info), stats={"agg.weight-share": float(share.sum())})
