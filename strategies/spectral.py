"""Divide-and-Conquer (DnC): spectral outlier scores on random coordinate subsets.

Shejwalkar, Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
Defenses for Federated Learning", NDSS 2021, Algorithm 2. Each of `num_iters` times:

    r  = a random subset of b coordinates
    C  = U[:, r] - mean_i U[i, r]                  (n, b) centred sub-updates
    v  = the top right singular vector of C
    s_i = <C_i, v>^2                                 outlier score
    good <- good  intersected with  {the n - ceil(c f) lowest s_i}

and the update is the mean of the `good` rows. Defaults (b = 10000, one iteration, c = 1) are the
paper's, as in Blades' and FLPoison's implementations.

Randomness: the subsets come from a generator seeded by (experiment seed, round, "dnc"), so a run
is reproducible, and they do not depend on the order of the rows: permuting the clients permutes
the scores and the decisions with them and leaves the update unchanged (up to float rounding).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.clipping import round_generator
from strategies.geometric_median import client_weights
from strategies.kernels import require_clients
from strategies.types import Aggregate, AggregatorContext, RoundInfo


def random_coordinates(d: int, k: int, gen: torch.Generator) -> Tensor:
    """(min(k, d),) sorted distinct coordinates in [0, d), a uniform random subset.

    Drawing 2k with replacement and keeping k of the distinct ones needs O(k) memory, where
    `randperm(d)` would hold d int64 (90 MB at d = 11.2M) for a 10000-coordinate sample.
    """
    if k >= d:
        return torch.arange(d)
    if d > 4 * k:
        distinct = torch.unique(torch.randint(0, d, (2 * k,), generator=gen))
        if distinct.numel() >= k:
            return distinct[torch.randperm(distinct.numel(), generator=gen)[:k]].sort().values
    return torch.randperm(d, generator=gen)[:k].sort().values


def largest_minority(n: int) -> int:
    """The most clients a majority rule can call Byzantine: ceil(n/2) - 1."""
    return max(0, (n - 1) // 2)


def spectral_scores(sub: Tensor) -> Tensor:
    """(n,) float64 DnC outlier scores <C_i, v>^2 of the sub-updates `sub` (n, b)."""
    centred = sub.to(torch.float64)
    centred = centred - centred.mean(dim=0)
    if sub.shape[0] < 2:
        return torch.zeros(sub.shape[0], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).square()


class DivideAndConquer:
    """DnC (Shejwalkar & Houmansadr 2021); see the module docstring.

    `suspicion` = `scores`: each client's outlier score divided by the round's largest, averaged
    over the iterations (scale-free, so iterations weigh alike). `kept` = the good set.
    """

    def __init__(
        self, ctx: AggregatorContext, *, num_byzantine: int | None = None, filter_frac: float = 1.0,
        num_iters: int = 1, subset_size: int = 10000, weighted: bool = False,
    ) -> None:
        """Check the hyperparameters (ConfigError) and set up the rule.

        Args:
            num_byzantine: f. Open choice: None takes the largest minority, ceil(n/2) - 1, which
                drops nearly half the clients; set f when it is known.
            filter_frac: c > 0; ceil(c f) clients are removed per iteration (< clients per round).
            num_iters: subsets drawn (>= 1); a client must pass every one to be kept.
            subset_size: b, coordinates per subset (>= 1; all of them when d <= b).
            weighted: weight the mean of the good rows by num-examples (off by default).
        """
        n = ctx.clients_per_round
        if num_byzantine is not None and (isinstance(num_byzantine, bool) or not isinstance(num_byzantine, int)
                                          or num_byzantine < 0):
            raise ConfigError(f"dnc: num_byzantine must be an integer >= 0 or null, got {num_byzantine!r}")
        if not (isinstance(filter_frac, (int, float)) and not isinstance(filter_frac, bool)
                and math.isfinite(filter_frac) and filter_frac > 0):
            raise ConfigError(f"dnc: filter_frac must be > 0, got {filter_frac!r}")
        for name, value in (("num_iters", num_iters), ("subset_size", subset_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dnc: {name} must be an integer >= 1, got {value!r}")
        f = largest_minority(n) if num_byzantine is None else num_byzantine
        if math.ceil(filter_frac * f) >= n:
            raise ConfigError(f"dnc: removes ceil(filter_frac * num_byzantine) = {math.ceil(filter_frac * f)} "
                              f"clients of clients_per_round={n}; at least one must stay")
        self.seed = ctx.seed
        self.num_byzantine = num_byzantine
        self.filter_frac = float(filter_frac)
        self.num_iters = num_iters
        self.subset_size = subset_size
        self.weighted = weighted

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        """`updates` is (n, d). Raises AggregationError when this round removes every client."""
        n = require_clients(updates, info, 1, "dnc")
        f = largest_minority(n) if self.num_byzantine is None else self.num_byzantine
        removed = math.ceil(self.filter_frac * f)
        if removed >= n:
            raise AggregationError(f"dnc: would remove {removed} of the round's {n} clients")
        gen = round_generator(self.seed, info.server_round, "dnc")
        good = torch.ones(n, dtype=torch.bool)
        suspicion = torch.zeros(n, dtype=torch.float64)
        for _ in range(self.num_iters):
            cols = random_coordinates(updates.shape[1], self.subset_size, gen)
            scores = spectral_scores(updates.index_select(1, cols))
            top = float(scores.max())
            suspicion += scores / top if top > 0 else scores
            passed = torch.zeros(n, dtype=torch.bool)
            passed[torch.argsort(scores, stable=True)[: n - removed]] = True
            good &= passed
        if not bool(good.any()):  # iterations that disagree can leave nobody
            raise AggregationError(f"dnc: no client passed all {self.num_iters} iterations")
        w = client_weights(info, n, self.weighted)
        w = torch.where(good, w, torch.zeros_like(w))
        if float(w.sum()) <= 0:
            raise AggregationError("dnc: the kept clients have zero total num-examples")
        w = (w / w.sum()).to(updates.dtype)
        suspicion = (suspicion / self.num_iters).to(updates.dtype)
        return Aggregate(
            update=w @ updates,
            kept=good,
            weights=w,
            scores=suspicion,
            suspicion=suspicion,
            stats={"agg.removed-per-iteration": float(removed), "agg.kept": float(good.sum())},
        )

