"""FoolsGold: down-weight clients whose update histories look alike (Sybils).

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020
(arXiv:1808.04866). Known failure mode: with IID data honest clients also look alike and are
down-weighted.

Suspicion (`Aggregate.suspicion`): the client's largest pardoned cosine similarity to another
client's history, max_j cs_ij after step 2 of `foolsgold_weights`. The weight is a non-increasing
function of it (1 - it, rescaled, then the clipped logit), so it ranks clients as 1 - weight
does, without the ties that the clipping to [0, 1] makes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.kernels import require_clients
from strategies.types import (
    Aggregate,
    AggregatorContext,
    RoundInfo,
    history_from_state,
    history_state,
)

log = logging.getLogger(__name__)

EPS = 1e-12


def cosine_matrix(x: Tensor, eps: float = EPS) -> Tensor:
    """(n, n) float64 cosine similarities of the rows of `x` (n, k); a zero row has cosine 0 with all."""
    x = x.to(torch.float64)
    unit = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)
    return unit @ unit.T


def pardoned_similarity(history: Tensor) -> Tensor:
    """(n,) max_j cs_ij, FoolsGold's Sybil evidence, from the clients' histories `history` (n, k).

    1. cs = cos(H_i, H_j) with the diagonal set to 0 (cos - I); v_i = max_j cs_ij.
    2. Pardoning: cs_ij *= v_i / v_j where v_i < v_j.
    A single client has similarity 0 (no one to look like).
    """
    cs = cosine_matrix(history)
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values  # (n,) >= 0 because the diagonal 0 is included
    pardon = v[:, None] < v[None, :]  # (i, j): v_i < v_j, hence v_j > 0
    cs = torch.where(pardon, cs * v[:, None] / torch.where(pardon, v[None, :], 1.0), cs)
    return cs.max(dim=1).values if history.shape[0] > 1 else torch.zeros(1, dtype=torch.float64)


def foolsgold_weights(history: Tensor, kappa: float = 1.0, similarity: Tensor | None = None) -> Tensor:
    """(n,) FoolsGold weights alpha from the clients' histories `history` (n, k).

    1-2. s_i = `pardoned_similarity(history)` (pass `similarity` when already computed).
    3. alpha_i = clip(1 - s_i, 0, 1); alpha /= max alpha; alpha_i = 0.99 where alpha_i = 1.
    4. alpha = kappa * (ln(alpha / (1 - alpha)) + 0.5); +inf or > 1 -> 1; < 0 (and -inf) -> 0.
    """
    n = history.shape[0]
    sim = pardoned_similarity(history) if similarity is None else similarity
    alpha = (1.0 - sim).clamp(0.0, 1.0) if n > 1 else torch.ones(1, dtype=torch.float64)
    top = alpha.max()
    alpha = alpha / top if top > 0 else alpha  # all-zero (every client a Sybil) stays all-zero
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    logit = kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)  # alpha = 0 gives -inf, never NaN
    logit = torch.where(torch.isposinf(logit) | (logit > 1.0), torch.ones_like(logit), logit)
    return logit.clamp_min(0.0)  # also maps -inf to 0


class FoolsGold:
    """FoolsGold with per-client history H_i = sum of the client's past updates.

    State: `history`, a dict keyed by the stable client id (partition-id) with the client's
    summed update features (float64). Features are the output layer's weight slice
    (`ctx.output_slice`), as in both reference implementations; without it, the full update
    (memory: one d-vector per client ever seen).

    Open choice, `normalize`: "sum" (default, FL-Defender's variant) gives
    update = sum_i alpha_i U_i / sum_i alpha_i; "none" gives sum_i alpha_i U_i (the original code
    and FLPoison: the scale then depends on how many clients are trusted). If every alpha is 0
    (all clients look like Sybils of one another, e.g. two identical updates), the update is zero
    and a WARNING is logged.
    """

    def __init__(
        self, ctx: AggregatorContext, *, kappa: float = 1.0, normalize: Literal["sum", "none"] = "sum",
        use_output_layer: bool = True,
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            kappa: confidence of the logit step (> 0).
            normalize: "sum" or "none", see the class docstring.
            use_output_layer: restrict the history to `ctx.output_slice` when it is set.
        """
        if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or not kappa > 0:
            raise ConfigError(f"foolsgold: kappa must be > 0, got {kappa!r}")
        if normalize not in ("sum", "none"):
            raise ConfigError(f"foolsgold: normalize must be 'sum' or 'none', got {normalize!r}")
        self.kappa = float(kappa)
        self.normalize = normalize
        self.features = ctx.output_slice if use_output_layer else None
        if self.features is None:
            log.info("foolsgold: no output-layer slice; keeping full-update histories per client")
        self.history: dict[int, Tensor] = {}

    def state_dict(self) -> dict[str, Tensor]:
        return history_state(self.history)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.history = history_from_state(state)

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError on no clients or duplicate client ids."""
        n = require_clients(updates, info, 1, "foolsgold")
        if len(set(info.client_ids)) != n:
            raise AggregationError(f"foolsgold: duplicate client ids in one round: {info.client_ids}")
        feats = updates if self.features is None else updates[:, self.features]  # (n, k)
        for i, cid in enumerate(info.client_ids):
            row = feats[i].to(torch.float64)
            prev = self.history.get(cid)
            self.history[cid] = row.clone() if prev is None else prev + row
        hist = torch.stack([self.history[cid] for cid in info.client_ids])  # (n, k)
        similarity = pardoned_similarity(hist)  # (n,)
        alpha = foolsgold_weights(hist, self.kappa, similarity)  # (n,)
        total = float(alpha.sum())
        if total <= 0:
            log.warning("foolsgold: every client got weight 0 (all look like Sybils); the update is zero")
            coef = torch.zeros_like(alpha)
        else:
            coef = alpha / total if self.normalize == "sum" else alpha
        return Aggregate(
            update=coef.to(updates.dtype) @ updates,
            kept=alpha > 0,
            weights=coef.to(updates.dtype),
            scores=alpha.to(updates.dtype),
            suspicion=similarity,
            stats={"agg.weight-sum": total, "agg.zero-weight": float((alpha == 0).sum())},
        )
