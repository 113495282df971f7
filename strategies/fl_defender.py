"""FL-Defender: trust from the geometry of the clients' output-layer updates, accumulated over rounds.

Jebreel and Domingo-Ferrer, "FL-Defender: Combating Targeted Attacks in Federated Learning",
Knowledge-Based Systems 2023 (arXiv:2207.00872; code: najeebjebreel/FL-Defender).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.foolsgold import EPS, cosine_matrix
from strategies.kernels import require_clients
from strategies.types import (
    Aggregate,
    AggregatorContext,
    RoundInfo,
    history_from_state,
    history_state,
)

log = logging.getLogger(__name__)


def pca_2d(x: Tensor) -> Tensor:
    """(n, 2) projection of `x` (n, k) on its first two principal components (x is centred here)."""
    centred = x - x.mean(dim=0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    proj = u[:, :2] * s[:2]
    if proj.shape[1] < 2:  # fewer than two components exist
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 2 - proj.shape[1])], dim=1)
    return proj


def standardize_columns(x: Tensor) -> Tensor:
    """(x - column mean) / column std (population std; a constant column is only centred), like
    sklearn's StandardScaler."""
    centred = x - x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    return centred / torch.where(std > 0, std, torch.ones_like(std))


def round_scores(grads: Tensor) -> Tensor:
    """(n,) FL-Defender round scores from the output-layer "gradients" `grads` (n, k).

    C = cos(g) - I (n, n); standardise C's columns; PCA to 2 components c_i; score_i =
    cos(coordinate-wise median of {c_i}, c_i). A zero vector has cosine 0 (eps guard).
    """
    sims = cosine_matrix(grads)
    sims -= torch.eye(sims.shape[0], dtype=sims.dtype)
    points = pca_2d(standardize_columns(sims))  # (n, 2)
    centroid = torch.quantile(points, 0.5, dim=0)  # even n: mean of the two middle values
    num = points @ centroid
    den = (torch.linalg.vector_norm(points, dim=1) * torch.linalg.vector_norm(centroid)).clamp_min(EPS)
    return num / den


class FLDefender:
    """FL-Defender (Jebreel and Domingo-Ferrer 2022).

    1. g_i = W_last(G_t) - W_last(W_i) = -U_i restricted to the output layer (`ctx.output_slice`;
       the full update when it is not set).
    2-3. Round score s_i (`round_scores`).
    4. History h[id] += s_i, keyed by the stable client id (partition-id); q1 = the `percentile`-th
       percentile (linear interpolation) of h over every client seen so far.
    5. trust_i = max(0, (h_i - q1) / max_j (h_j - q1)), the max over this round's clients.
    6. update = sum_i trust_i U_i / sum_i trust_i.

    Suspicion (`Aggregate.suspicion`): max_j h_j - h_i over the round's clients, the gap of the
    client's accumulated score to the most trusted one. Trust is (h_i - q1) / (max_j h_j - q1)
    clipped at 0, so this ranks clients as 1 - trust does, without the ties of trust 0.

    Choice: when no client of the round is above q1 (e.g. all histories are equal, as for
    identical updates), the evidence cannot tell clients apart and every client gets trust 1
    (plain mean); `stats["agg.uniform-fallback"]` is 1 then.
    """

    def __init__(self, ctx: AggregatorContext, *, percentile: float = 25.0) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            percentile: the history percentile q1 that trust is measured from (0 <= p < 100).
        """
        if ctx.clients_per_round < 3:
            raise ConfigError(f"fl-defender: needs clients_per_round >= 3 (PCA to 2 components), "
                              f"got {ctx.clients_per_round}")
        if not isinstance(percentile, (int, float)) or isinstance(percentile, bool) or not 0 <= percentile < 100:
            raise ConfigError(f"fl-defender: percentile must be in [0, 100), got {percentile!r}")
        self.q = float(percentile) / 100.0
        self.features = ctx.output_slice
        self.history: dict[int, float] = {}

    def state_dict(self) -> dict[str, Tensor]:
        return history_state({cid: torch.tensor([h], dtype=torch.float64) for cid, h in self.history.items()})

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.history = {cid: float(h.item()) for cid, h in history_from_state(state).items()}

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError for n < 3 or duplicate client ids."""
        n = require_clients(updates, info, 3, "fl-defender")
        if len(set(info.client_ids)) != n:
            raise AggregationError(f"fl-defender: duplicate client ids in one round: {info.client_ids}")
        feats = updates if self.features is None else updates[:, self.features]
        scores = round_scores(-feats.to(torch.float64))  # (n,)
        for cid, s in zip(info.client_ids, scores.tolist()):
            self.history[cid] = self.history.get(cid, 0.0) + s
        everyone = torch.tensor(list(self.history.values()), dtype=torch.float64)
        q1 = float(torch.quantile(everyone, self.q))
        h = torch.tensor([self.history[c] for c in info.client_ids], dtype=torch.float64) - q1
        top = float(h.max())
        fallback = top <= 0
        trust = torch.ones(n, dtype=torch.float64) if fallback else (h / top).clamp_min(0.0)
        if fallback:
            log.warning("fl-defender: no client above the history percentile; averaging all %d clients", n)
        w = trust / trust.sum()
        return Aggregate(
            update=w.to(updates.dtype) @ updates,
            kept=trust > 0,
            weights=w.to(updates.dtype),
            scores=trust.to(updates.dtype),
            suspicion=h.max() - h,
            stats={"agg.q1": q1, "agg.uniform-fallback": float(fallback)},
        )
