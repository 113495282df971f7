"""Federated averaging of client updates (McMahan et al. 2017, arXiv:1602.05629)."""

from __future__ import annotations

from torch import Tensor

from strategies.types import Aggregate, RoundInfo


def weighted_mean(updates: Tensor, info: RoundInfo, *, weighted: bool = True) -> Aggregate:
    """Mean of the rows of `updates` (n, d), weighted by num-examples unless `weighted` is False."""
    n = updates.shape[0]
    w = info.num_examples.to(updates.dtype) if weighted else updates.new_ones(n)
    w = w / w.sum()
    return Aggregate(update=w @ updates, kept=updates.new_ones(n, dtype=bool), weights=w)
