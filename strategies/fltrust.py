"""FLTrust: trust each client by the cosine of its update with the server's own root-set update.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021 (arXiv:2012.13995). Known issue: effective early, weaker near convergence.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.clipping import row_norms
from strategies.kernels import require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

EPS = 1e-12


def fltrust(
    updates: Tensor,
    info: RoundInfo,
    *,
    on_zero_trust: Literal["zero", "uniform"] = "zero",
) -> Aggregate:
    """FLTrust (Cao et al. 2021) over client deltas `updates` (n, d).

    g0 = info.reference_update() (d,), the server's update on its clean root set.
    TS_i = ReLU(cos(U_i, g0)); U_i is rescaled to ||g0||: Ubar_i = (||g0|| / ||U_i||) U_i;
    update = sum_i TS_i Ubar_i / sum_i TS_i. A zero update (or a zero g0) has cosine 0, so
    trust 0 (eps guard, never NaN).

    Suspicion (`Aggregate.suspicion`): 1 - cos(U_i, g0), in [0, 2]. It ranks clients as 1 - TS_i
    does, and also orders the clients that ReLU maps to trust 0 (an opposed update is more
    suspicious than an orthogonal one).

    Args:
        on_zero_trust: when sum TS = 0. "zero" (the paper: skip the update, i.e. a zero delta,
            logged at WARNING) or "uniform" (FLPoison: the plain mean of the rescaled updates).

    Raises:
        AggregationError: with no clients, without a reference update, or when g0 has the wrong shape.
    """
    n = require_clients(updates, info, 1, "fltrust")
    if info.reference_update is None:
        raise AggregationError("fltrust: RoundInfo.reference_update is not set (the server root set is needed)")
    g0 = info.reference_update().to(updates.dtype).reshape(-1)
    if g0.shape[0] != updates.shape[1]:
        raise AggregationError(f"fltrust: reference update has {g0.shape[0]} params, updates have {updates.shape[1]}")
    g0_norm = float(torch.linalg.vector_norm(g0))
    norms = row_norms(updates)  # (n,)
    cos = (updates @ g0).to(torch.float64) / (norms * g0_norm).clamp_min(EPS)  # (n,)
    trust = cos.clamp_min(0.0)
    scale = g0_norm / norms.clamp_min(EPS)  # ||g0|| / ||U_i||; a zero row stays zero
    total = float(trust.sum())
    if total > 0:
        coef = trust * scale / total
    elif on_zero_trust == "uniform":
        log.warning("fltrust: every trust score is 0; falling back to the mean of the rescaled updates")
        coef = scale / n
    else:
        log.warning("fltrust: every trust score is 0; skipping the update (zero delta)")
        coef = torch.zeros_like(scale)
    return Aggregate(
        update=coef.to(updates.dtype) @ updates,
        kept=trust > 0,
        weights=coef.to(updates.dtype),
        scores=trust.to(updates.dtype),
        suspicion=1.0 - cos,
        stats={"agg.trust-sum": total, "agg.reference-norm": g0_norm},
    )


def check_fltrust(ctx: AggregatorContext, *, on_zero_trust: str = "zero", **_: object) -> None:
    """on_zero_trust must be 'zero' or 'uniform'."""
    if on_zero_trust not in ("zero", "uniform"):
        raise ConfigError(f"fltrust: on_zero_trust must be 'zero' or 'uniform', got {on_zero_trust!r}")
