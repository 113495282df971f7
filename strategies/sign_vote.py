"""Robust learning rate (RLR): a per-coordinate sign vote sets the sign of the server's step.

Ozdayi, Kantarcioglu, Gel, "Defending against Backdoors in Federated Learning with Robust
Learning Rate", AAAI 2021 (arXiv:2007.03767), eq. (4)-(5):

    eta_k = +eta  if |sum_i sgn(Delta_{i,k})| >= theta,  else  -eta
    update = eta (.) sum_i n_i Delta_i / sum_i n_i

Coordinates where too few clients agree on the direction are moved *against* the mean: a backdoor
needs coordinates the honest clients do not push, and those lose the vote. eta is the server's
`federated.server_lr`; this rule returns the signed mean.

Speed: one pass over column chunks (signs, vote, mean and each client's disagreement count per
chunk), no copy of the matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lab.errors import ConfigError
from strategies.geometric_median import client_weights
from strategies.kernels import require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

VOTE_CHUNK = 1 << 15  # columns per chunk: the (n, chunk) sign block stays in cache


def default_threshold(n: int) -> int:
    """theta when none is set: half the round's clients (at least 1)."""
    return max(1, n // 2)


def robust_learning_rate(
    updates: Tensor, info: RoundInfo, *, threshold: int | None = None, weighted: bool = False
) -> Aggregate:
    """RLR over `updates` (n, d).

    Args:
        threshold: theta, the net number of agreeing signs a coordinate needs to keep its step's
            sign (1 <= theta <= clients per round). Open choice: the paper sets theta by hand
            between the number of attackers f and n - 2f; None (default) takes n // 2, which
            flips the coordinates where the attackers' votes are needed for a majority.
        weighted: weight the mean by num-examples (the paper's n_i); off by default, as in the
            other robust rules (num-examples is client-reported).

    Returns:
        `suspicion` = `scores` = each client's share of coordinates where its sign opposes the
        vote's sign (sign disagreement); `kept`/`weights` are None (a coordinate-wise rule).
        stats: `agg.flipped`, the share of coordinates whose step was reversed.
    """
    n = require_clients(updates, info, 1, "rlr")
    theta = default_threshold(n) if threshold is None else threshold
    w = client_weights(info, n, weighted).to(updates.dtype)
    d = updates.shape[1]
    out = torch.empty(d, dtype=updates.dtype)
    against = torch.zeros(n, dtype=torch.float64)
    flipped = 0
    for c0 in range(0, d, VOTE_CHUNK):
        block = updates[:, c0 : c0 + VOTE_CHUNK]
        signs = torch.sign(block)  # (n, c)
        vote = signs.sum(dim=0)  # (c,) exact: small integers in float
        flip = vote.abs() < theta
        mean = w @ block  # (c,)
        out[c0 : c0 + VOTE_CHUNK] = torch.where(flip, -mean, mean)
        flipped += int(flip.sum())
        against += (signs * torch.sign(vote) < 0).sum(dim=1, dtype=torch.float64)
    share = against / max(d, 1)
    return Aggregate(
        update=out,
        scores=share.to(updates.dtype),
        suspicion=share.to(updates.dtype),
        stats={"agg.threshold": float(theta), "agg.flipped": flipped / max(d, 1)},
    )


def check_robust_learning_rate(ctx: AggregatorContext, *, threshold: int | None = None, **_: Any) -> None:
    """1 <= threshold <= clients_per_round (a larger theta flips every coordinate)."""
    if threshold is None:
        return
    n = ctx.clients_per_round
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= n:
        raise ConfigError(f"rlr: threshold must be an integer in [1, clients_per_round={n}], got {threshold!r}")
