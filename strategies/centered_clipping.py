"""Centered clipping: clip every update around the previous round's aggregate.

Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust Optimization", ICML 2021
(arXiv:2012.10333), eq. (CC):

    v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||),   l = 0 .. L-1

with v_0 the previous round's aggregate: the history is the server's state. The paper's workers
send momenta; Flower clients send deltas, so here the server carries the momentum: with
`momentum` beta the applied update is m_t = beta m_{t-1} + (1 - beta) v_L, and m_t is the next
round's centre (beta = 0, the default: the centre is the last aggregate, as ByzFL's
`CenteredClipping`). Round 1 starts from a zero centre, i.e. plain norm clipping to tau.

Speed: the iterates are combinations of the rows and the centre, so the distances come from one
(n+1, n+1) Gram matrix (`geometric_median.distances_to_combination`): one pass to build it, one
to form v_L, whatever L.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.geometric_median import distances_to_combination
from strategies.kernels import gram_matrix, require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo


def augmented_gram(updates: Tensor, centre: Tensor) -> Tensor:
    """(n+1, n+1) float64 Gram matrix of the rows of `updates` (n, d) and `centre` (d,) as row n."""
    n = updates.shape[0]
    out = torch.empty(n + 1, n + 1, dtype=torch.float64)
    out[:n, :n] = gram_matrix(updates)
    cross = (updates @ centre).to(torch.float64)
    out[:n, n] = cross
    out[n, :n] = cross
    out[n, n] = float(centre.to(torch.float64) @ centre.to(torch.float64))
    return out


def clip_iterations(gram: Tensor, tau: float | None, iterations: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """CC iterations in coefficient space over the n rows and the centre (last row of `gram`).

    Returns (coef (n+1,), distances (n,) to v_L, clipped (n,) bool at the last step, tau used).
    `tau` None: the median distance of the clients to the centre v_0 (an open choice, see
    `CenteredClipping`).
    """
    n = gram.shape[0] - 1
    coef = torch.zeros(n + 1, dtype=torch.float64)
    coef[n] = 1.0  # v_0 = centre
    dist = distances_to_combination(gram, coef)[:n]
    radius = float(dist.median()) if tau is None else tau
    clipped = torch.zeros(n, dtype=torch.bool)
    for _ in range(iterations):
        over = dist > radius
        factor = torch.where(over, radius / torch.where(over, dist, 1.0), 1.0)  # min(1, tau/dist), no 0/0
        clipped = over
        # v + mean_i f_i (x_i - v) = (1 - mean f) v + sum_i (f_i / n) x_i
        coef = coef * (1.0 - float(factor.mean()))
        coef[:n] += factor / n
        dist = distances_to_combination(gram, coef)[:n]
    return coef, dist, clipped, radius


class CenteredClipping:
    """Centered clipping with the previous aggregate (server momentum) as the centre.

    State: `centre` (d,), the last applied update m_t; checkpointed through `state_dict` so that a
    resumed run clips around the same centre.

    Open choice, `tau`: the paper and ByzFL take a fixed radius (ByzFL's default 100 is far from
    the scale of a model delta). None, the default, takes each round's median distance of the
    clients to the centre: at least half the clients (the honest majority) are never clipped,
    whatever the scale of the model's updates.
    """

    def __init__(
        self, ctx: AggregatorContext, *, tau: float | None = None, iterations: int = 1, momentum: float = 0.0
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            tau: the clipping radius (> 0), or None for the round's median distance to the centre.
            iterations: L, clipping steps per round (>= 1; the paper's L = 1).
            momentum: beta in [0, 1), the server momentum of the centre.
        """
        if tau is not None and not (isinstance(tau, (int, float)) and not isinstance(tau, bool)
                                    and math.isfinite(tau) and tau > 0):
            raise ConfigError(f"centered-clipping: tau must be > 0 or null, got {tau!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"centered-clipping: iterations must be an integer >= 1, got {iterations!r}")
        if not (isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum < 1):
            raise ConfigError(f"centered-clipping: momentum must be in [0, 1), got {momentum!r}")
        self.tau = None if tau is None else float(tau)
        self.iterations = iterations
        self.momentum = float(momentum)
        self.centre: Tensor | None = None  # None until the first round: a zero centre

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.centre is None else {"centre": self.centre.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        unknown = set(state) - {"centre"}
        if unknown:
            raise AggregationError(f"centered-clipping: unexpected state keys {sorted(unknown)}")
        centre = state.get("centre")
        self.centre = None if centre is None else centre.detach().clone()

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError on no clients or a centre of another size."""
        n = require_clients(updates, info, 1, "centered-clipping")
        d = updates.shape[1]
        centre = updates.new_zeros(d) if self.centre is None else self.centre.to(updates.dtype)
        if centre.shape != (d,):
            raise AggregationError(f"centered-clipping: the saved centre has shape {tuple(centre.shape)}, "
                                   f"the updates have {d} parameters")
        coef, dist, clipped, radius = clip_iterations(augmented_gram(updates, centre), self.tau, self.iterations)
        update = coef[:n].to(updates.dtype) @ updates
        update.add_(centre, alpha=float(coef[n]))  # v_L
        if self.momentum > 0:
            update.mul_(1.0 - self.momentum).add_(centre, alpha=self.momentum)
        self.centre = update.clone()
        share = (1.0 - self.momentum) * coef[:n]
        return Aggregate(
            update=update,
            kept=torch.ones(n, dtype=torch.bool),
            clipped=clipped,
            weights=share.to(updates.dtype),
            scores=dist.to(updates.dtype),
            suspicion=dist.to(updates.dtype),
            stats={"agg.tau": radius, "agg.clipped": float(clipped.sum()), "agg.centre-weight": float(coef[n])},
        )
