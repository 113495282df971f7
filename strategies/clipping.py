"""Norm-clipping rules: norm clipping with weak DP noise, clip-avg with a decaying bound, ClipAvg+IQR.

- Norm clipping + weak DP: Sun et al., "Can You Really Backdoor Federated Learning?", 2019
  (arXiv:1911.07963): every update is scaled to norm <= M, the mean gets small Gaussian noise.
- Clip-avg: the same clip with a bound that decays over rounds, gamma_t = clip_gamma * (t+1)^(-clip_decay).
- ClipAvg+IQR: the project's rule (notes/formulas.md 3.9; no public reference): Tukey's upper
  fence over the round's update norms, combined with the decaying bound.

All rules take client deltas `updates` (n_clients, n_params). Clipping is a per-client scale
factor min(1, B / ||U_i||), so each rule is one pass over the matrix for the norms and one
mat-vec for the weighted mean: no clipped copy of the matrix is made.

Suspicion (`Aggregate.suspicion`): the update norm ||U_i||, the only thing these rules look at
(a client is clipped iff its norm is above the round's bound).
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Literal

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.kernels import require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo

log = logging.getLogger(__name__)

Bound = Literal["min", "fence", "flag"]
# The default bound gamma_t = 1.5 * (t+1)^-0.3 of clip-avg and clip-avg-iqr: the values every
# measured run of both rules used (experiments/sweeps/defenses.yaml and poison-ratio.yaml; results
# in bench/RESULTS.md: no-attack accuracy 0.978 / 0.981 against FedAvg's 0.981, and no protection
# from the unboosted backdoor, ASR >= 0.97). A starting point that keeps accuracy, not a tuned defense.
DEFAULT_CLIP_GAMMA = 1.5
DEFAULT_CLIP_DECAY = 0.3


def round_generator(seed: int, server_round: int, tag: str) -> torch.Generator:
    """A CPU generator seeded from (experiment seed, round, rule tag): reproducible, and
    independent across rounds and rules (a hash, so seed+round collisions cannot repeat noise)."""
    digest = hashlib.blake2b(f"{seed}:{server_round}:{tag}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def row_norms(updates: Tensor) -> Tensor:
    """(n,) float64 L2 norm of every row of `updates` (n, d)."""
    return torch.linalg.vector_norm(updates, dim=1).to(torch.float64)


def clip_factors(norms: Tensor, bound: Tensor | float) -> Tensor:
    """(n,) scale min(1, bound / norm); exactly 1 at or below the bound (zero norms never divide)."""
    bound_t = torch.as_tensor(bound, dtype=norms.dtype).expand_as(norms)
    over = norms > bound_t
    return torch.where(over, bound_t / torch.where(over, norms, torch.ones_like(norms)), torch.ones_like(norms))


def clipped_mean(
    updates: Tensor, info: RoundInfo, factors: Tensor, *, weighted: bool, stats: dict[str, float]
) -> Aggregate:
    """Mean of the rows of `updates` (n, d) scaled by `factors` (n,), optionally by num-examples."""
    n = updates.shape[0]
    w = info.num_examples.to(torch.float64) if weighted else torch.ones(n, dtype=torch.float64)
    if w.sum() <= 0:
        raise AggregationError("clients have zero total num-examples")
    w = w / w.sum()
    coef = w * factors  # (n,) effective weight of each client's raw update
    clipped = factors < 1.0
    return Aggregate(
        update=coef.to(updates.dtype) @ updates,
        kept=torch.ones(n, dtype=torch.bool),
        clipped=clipped,
        weights=coef.to(updates.dtype),
        stats={"agg.clipped": float(clipped.sum()), **stats},
    )


def decayed_bound(clip_gamma: float, clip_decay: float, server_round: int, round_origin: int) -> float:
    """gamma_t = clip_gamma * (t + 1)^(-clip_decay) with t = server_round - round_origin."""
    t = max(server_round - round_origin, 0)
    return float(clip_gamma * (t + 1) ** (-clip_decay))


# ----------------------------------------------------------------------------------------------
# norm clipping + weak DP


class NormClip:
    """Norm clipping with optional weak DP noise (Sun et al. 2019).

    U~_i = U_i / max(1, ||U_i|| / M); update = mean_i U~_i + N(0, noise_std^2 I).
    The noise is added once to the averaged update (not to the sum, not per client) and gives
    no formal privacy guarantee. It is drawn from a CPU generator seeded by (ctx.seed, round),
    so a run is reproducible.
    """

    def __init__(
        self, ctx: AggregatorContext, *, max_norm: float, noise_std: float = 0.0, weighted: bool = False
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            max_norm: M, the clip bound (> 0).
            noise_std: standard deviation of the noise added to each coordinate of the mean.
            weighted: weight clients by num-examples (off: it is client-reported).
        """
        if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not max_norm > 0:
            raise ConfigError(f"norm-clip: max_norm must be > 0, got {max_norm!r}")
        if not isinstance(noise_std, (int, float)) or not noise_std >= 0:
            raise ConfigError(f"norm-clip: noise_std must be >= 0, got {noise_std!r}")
        self.seed = ctx.seed
        self.max_norm = float(max_norm)
        self.noise_std = float(noise_std)
        self.weighted = weighted

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """Raises AggregationError when there are no clients."""
        require_clients(updates, info, 1, "norm-clip")
        norms = row_norms(updates)
        agg = clipped_mean(
            updates, info, clip_factors(norms, self.max_norm), weighted=self.weighted,
            stats={"agg.bound": self.max_norm, "agg.noise-std": self.noise_std},
        )
        if self.noise_std > 0:
            gen = round_generator(self.seed, info.server_round, "norm-clip")
            noise = torch.randn(agg.update.shape, generator=gen, dtype=agg.update.dtype)
            agg.update.add_(noise, alpha=self.noise_std)
        return Aggregate(update=agg.update, kept=agg.kept, clipped=agg.clipped, weights=agg.weights,
                         scores=norms.to(updates.dtype), suspicion=norms, stats=agg.stats)


# ----------------------------------------------------------------------------------------------
# clip-avg with a decaying bound


def clip_avg(
    updates: Tensor,
    info: RoundInfo,
    *,
    clip_gamma: float = DEFAULT_CLIP_GAMMA,
    clip_decay: float = DEFAULT_CLIP_DECAY,
    round_origin: int = 1,
    weighted: bool = False,
) -> Aggregate:
    """Mean of the updates after clipping each to the decaying bound gamma_t.

    gamma_t = clip_gamma * (t + 1)^(-clip_decay), t = server_round - round_origin. Open choice
    for t's start: Flower's first round is 1 and `round_origin=1` (default) makes it t = 0, so
    round 1 uses gamma_0 = clip_gamma. `updates` is (n, d).

    Args:
        clip_gamma: the round-0 bound (> 0; default 1.5, the seed study's value, see
            DEFAULT_CLIP_GAMMA).
        clip_decay: decay exponent (>= 0; 0 = a fixed bound; default 0.3, the seed study's).
        round_origin: the server round that counts as t = 0.
        weighted: weight clients by num-examples.

    Raises:
        AggregationError: when there are no clients.
    """
    require_clients(updates, info, 1, "clip-avg")
    bound = decayed_bound(clip_gamma, clip_decay, info.server_round, round_origin)
    norms = row_norms(updates)
    agg = clipped_mean(updates, info, clip_factors(norms, bound), weighted=weighted, stats={"agg.bound": bound})
    return Aggregate(update=agg.update, kept=agg.kept, clipped=agg.clipped, weights=agg.weights,
                     scores=norms.to(updates.dtype), suspicion=norms, stats=agg.stats)


# ----------------------------------------------------------------------------------------------
# ClipAvg + IQR


def tukey_upper_fence(norms: Tensor, k: float) -> tuple[float, float, float]:
    """(Q1, Q3, Q3 + k * IQR) of `norms` (n,), quartiles by linear interpolation (torch.quantile)."""
    q1, q3 = torch.quantile(norms, torch.tensor([0.25, 0.75], dtype=norms.dtype)).tolist()
    return q1, q3, q3 + k * (q3 - q1)


def clip_avg_iqr(
    updates: Tensor,
    info: RoundInfo,
    *,
    clip_gamma: float | None = DEFAULT_CLIP_GAMMA,
    clip_decay: float = DEFAULT_CLIP_DECAY,
    iqr_k: float = 1.5,
    bound: Bound = "min",
    round_origin: int = 1,
    weighted: bool = False,
) -> Aggregate:
    """ClipAvg+IQR: clip update norms against Tukey's fence and the decaying bound, then average.

    nu_i = ||U_i||; Q1, Q3 are the linear-interpolation quartiles of {nu_i} (`torch.quantile`,
    numpy's default); U_t = Q3 + iqr_k * IQR; gamma_t as in `clip_avg`. The decisions that
    notes/formulas.md 3.9 leaves open, pinned here:

    1. `bound` chooses B_t. "min" (default): every client is clipped to B_t = min(U_t, gamma_t).
       "fence": B_t = U_t, IQR only (gamma is ignored and may be null). "flag": the IQR flags
       clients with nu_i > U_t and only those are clipped, to gamma_t. gamma defaults to the seed
       study's 1.5 * (t+1)^-0.3 (DEFAULT_CLIP_GAMMA, DEFAULT_CLIP_DECAY), as in `clip_avg`.
    2. t = server_round - round_origin, so round 1 is t = 0 by default.
    3. Breakdown: Q3 is set by the attacker once >= 25% of the round is malicious; then the
       fence no longer bounds the attack (gamma_t still does under "min" and "flag").
    4. n < 4 raises AggregationError (quartiles of fewer than 4 norms are not meaningful);
       build time rejects clients_per_round < 4. IQR = 0 (identical norms) needs no special case:
       the fence is Q3 and only norms strictly above it are clipped, so identical clients pass.
    5. Clipping never raises a norm; a zero update stays zero.

    Raises:
        AggregationError: if fewer than 4 clients replied.
    """
    require_clients(updates, info, 4, "clip-avg-iqr")
    norms = row_norms(updates)
    q1, q3, fence = tukey_upper_fence(norms, iqr_k)
    gamma = (decayed_bound(clip_gamma, clip_decay, info.server_round, round_origin)
             if clip_gamma is not None else float("inf"))
    flagged = norms > fence
    if bound == "min":
        factors = clip_factors(norms, min(fence, gamma))
    elif bound == "fence":
        factors = clip_factors(norms, fence)
    else:  # "flag"
        factors = torch.where(flagged, clip_factors(norms, gamma), torch.ones_like(norms))
    agg = clipped_mean(
        updates, info, factors, weighted=weighted,
        stats={"agg.q1": q1, "agg.q3": q3, "agg.fence": fence, "agg.gamma": gamma,
               "agg.flagged": float(flagged.sum())},
    )
    log.debug("clip-avg-iqr: norms=%s fence=%.4g gamma=%.4g", norms.tolist(), fence, gamma)
    return Aggregate(update=agg.update, kept=agg.kept, clipped=agg.clipped, weights=agg.weights,
                     scores=norms.to(updates.dtype), suspicion=norms, stats=agg.stats)


# ----------------------------------------------------------------------------------------------
# build-time checks


def _positive(rule: str, name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{rule}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_clip_avg(
    ctx: AggregatorContext, *, clip_gamma: float = DEFAULT_CLIP_GAMMA, clip_decay: float = DEFAULT_CLIP_DECAY,
    **_: Any
) -> None:
    """clip_gamma > 0, clip_decay >= 0, both finite."""
    _positive("clip-avg", "clip_gamma", clip_gamma)
    _positive("clip-avg", "clip_decay", clip_decay, allow_zero=True)


def check_clip_avg_iqr(
    ctx: AggregatorContext,
    *,
    clip_gamma: float | None = DEFAULT_CLIP_GAMMA,
    clip_decay: float = DEFAULT_CLIP_DECAY,
    iqr_k: float = 1.5,
    bound: str = "min",
    **_: Any,
) -> None:
    """Quartiles need clients_per_round >= 4; gamma > 0 unless bound='fence' (where it may be null)."""
    rule = "clip-avg-iqr"
    if ctx.clients_per_round < 4:
        raise ConfigError(f"{rule}: quartiles need clients_per_round >= 4, got {ctx.clients_per_round}")
    if bound not in ("min", "fence", "flag"):
        raise ConfigError(f"{rule}: bound must be 'min', 'fence' or 'flag', got {bound!r}")
    if bound != "fence" or clip_gamma is not None:
        _positive(rule, "clip_gamma", clip_gamma)
    _positive(rule, "clip_decay", clip_decay, allow_zero=True)
    _positive(rule, "iqr_k", iqr_k, allow_zero=True)
