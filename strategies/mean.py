"""Federated averaging of client updates (McMahan et al. 2017, arXiv:1602.05629).

Two divisors for the weighted sum of the sampled clients' updates (`federated.fedavg_divisor`):
`sampled` (FedAvg's mean, the weights of the round's clients sum to one) and `total` (the sum over
the sampled clients divided by the weight of *all* clients, as Bagdasaryan et al., AISTATS 2020,
write G + eta/n * sum_i (L_i - G) with n the total number of participants). With every client
sampled the two are the same.
"""

from __future__ import annotations

from torch import Tensor

from strategies.types import Aggregate, RoundInfo


def weighted_mean(updates: Tensor, info: RoundInfo, *, weighted: bool = True) -> Aggregate:
    """Mean of the rows of `updates` (n, d), weighted by num-examples unless `weighted` is False."""
    n = updates.shape[0]
    w = info.num_examples.to(updates.dtype) if weighted else updates.new_ones(n)
    w = w / w.sum()
    return Aggregate(update=w @ updates, kept=updates.new_ones(n, dtype=bool), weights=w)


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
    return Aggregate(update=(w @ updates) / total_weight, kept=updates.new_ones(n, dtype=bool), weights=share,
                     stats={"agg.weight-share": float(share.sum())})
