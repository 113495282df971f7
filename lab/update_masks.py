"""Coordinate masks over a flat update: Neurotoxin's "the coordinates the benign clients change least".

Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022 (arXiv:2206.10341),
Algorithm 1: the attacker takes the benign update (approximated by the previous round's change of
the global model), finds its top-k% coordinates by magnitude, and projects its own update onto the
others, so the backdoor lives where benign training seldom writes and is not overwritten.
"""

from __future__ import annotations

import torch
from torch import Tensor


def least_changed_mask(change: Tensor, topk: float) -> Tensor:
    """(d,) bool: True on every coordinate except the ceil(topk * d) with the largest |change|.

    Ties at the cut are broken by index (torch.topk's order), so exactly ceil(topk * d) coordinates
    are excluded. `change` is (d,); topk in [0, 1).

    Raises:
        ValueError: topk outside [0, 1).
    """
    if not 0 <= topk < 1:
        raise ValueError(f"topk must be in [0, 1), got {topk}")
    d = change.numel()
    excluded = min(d, int(torch.tensor(topk * d).ceil()))
    keep = torch.ones(d, dtype=torch.bool)
    if excluded:
        keep[change.abs().flatten().topk(excluded).indices] = False
    return keep
