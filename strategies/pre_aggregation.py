"""Pre-aggregators: transform the update matrix before any rule (`federated.aggregator.pre`).

- NNM, nearest-neighbour mixing: Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing
  by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023
  (arXiv:2302.01772). Row i becomes the mean of the n - f rows nearest to row i (itself included).
- Bucketing: Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022 (arXiv:2006.09365). Shuffle the rows, average consecutive groups of s;
  the last group holds the n mod s left over (ByzFL's convention), so there are ceil(n/s) rows.

How a rule's per-client decisions map back to clients (`Preaggregated`): every step says which
output row speaks for each client (`Mixing.owner`) and how the output rows mix the inputs
(`Mixing.mixing`, (m, n)). NNM's row i is client i's neighbourhood, so row i's `kept`, `clipped`,
`scores` and `suspicion` are client i's. A bucket's decisions go to each of its members. `weights`
are mapped exactly: client j's share of the update is sum_r w_r mixing[r, j] (exact when the rule
is a weighted mean of its rows; for other rules, an attribution by the same formula).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from lab.errors import AggregationError, ConfigError
from strategies.clipping import round_generator
from strategies.kernels import pairwise_sq_distances, require_clients
from strategies.spectral import largest_minority
from strategies.types import Aggregate, Aggregator, AggregatorContext, RoundInfo


@dataclass(frozen=True)
class Mixing:
    updates: Tensor  # (m, d) the rows the rule sees
    info: RoundInfo  # for those m rows
    mixing: Tensor  # (m, n) float64: updates = mixing @ input rows
    owner: Tensor  # (n,) int64: the output row that speaks for each input row's client


class PreAggregator(Protocol):
    def rows_out(self, n: int) -> int: ...

    def __call__(self, updates: Tensor, info: RoundInfo) -> Mixing: ...


def mix(updates: Tensor, info: RoundInfo, mixing: Tensor, owner: Tensor, client_ids: tuple[int, ...],
        num_examples: Tensor) -> Mixing:
    """Apply the (m, n) `mixing` to `updates` (n, d); one new (m, d) matrix."""
    rows = mixing.to(updates.dtype) @ updates
    return Mixing(rows, replace(info, client_ids=client_ids, num_examples=num_examples), mixing, owner)


class NearestNeighbourMixing:
    """NNM (Allouah et al. 2023): row i <- mean of the n - f nearest rows to row i (L2, itself
    included; ties to the lower row index). Needs 2f < n (checked at config time)."""

    def __init__(self, ctx: AggregatorContext, *, f: int | None = None) -> None:
        """Args: f, the number of Byzantine clients assumed; None = the largest minority, ceil(n/2) - 1."""
        n = ctx.clients_per_round
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0 or 2 * f >= n):
            raise ConfigError(f"nnm: f must be an integer with 0 <= f < clients_per_round / 2 = {n / 2:g}, got {f!r}")
        self.f = f

    def rows_out(self, n: int) -> int:
        return n

    def __call__(self, updates: Tensor, info: RoundInfo) -> Mixing:
        n = require_clients(updates, info, 1, "nnm")
        f = largest_minority(n) if self.f is None else self.f
        if f >= n:
            raise AggregationError(f"nnm: f={f} leaves no neighbour among the round's {n} clients")
        dist = pairwise_sq_distances(updates)
        near = torch.argsort(dist, dim=1, stable=True)[:, : n - f]  # (n, n - f), itself first (distance 0)
        mixing = torch.zeros(n, n, dtype=torch.float64)
        mixing.scatter_(1, near, 1.0 / (n - f))
        return mix(updates, info, mixing, torch.arange(n), info.client_ids, info.num_examples)


class Bucketing:
    """Bucketing (Karimireddy et al. 2022): a seeded shuffle, then means of s consecutive rows.

    The shuffle comes from a generator seeded by (experiment seed, round, "bucketing"). Bucket b
    gets client id b (0, 1, ...) and its members' summed num-examples; the ids are not clients, so
    rules that keep per-client histories cannot sit behind it (refused at config time).
    """

    def __init__(self, ctx: AggregatorContext, *, s: int = 2) -> None:
        """Args: s, the bucket size (>= 1; the paper's 2; 1 only shuffles)."""
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"bucketing: s (bucket size) must be an integer >= 1, got {s!r}")
        if s > ctx.clients_per_round:
            raise ConfigError(f"bucketing: s={s} exceeds clients_per_round={ctx.clients_per_round} "
                              f"(one bucket would be the plain mean)")
        self.s = s
        self.seed = ctx.seed

    def rows_out(self, n: int) -> int:
        return math.ceil(n / self.s)

    def __call__(self, updates: Tensor, info: RoundInfo) -> Mixing:
        n = require_clients(updates, info, 1, "bucketing")
        m = self.rows_out(n)
        order = torch.randperm(n, generator=round_generator(self.seed, info.server_round, "bucketing"))
        owner = torch.empty(n, dtype=torch.int64)
        owner[order] = torch.arange(n) // self.s
        mixing = torch.zeros(m, n, dtype=torch.float64)
        mixing[owner, torch.arange(n)] = 1.0
        members = mixing.sum(dim=1, keepdim=True)
        examples = (mixing @ info.num_examples.to(torch.float64)).to(info.num_examples.dtype)
        return mix(updates, info, mixing / members, owner, tuple(range(m)), examples)


PRE_AGGREGATORS: dict[str, type] = {"nnm": NearestNeighbourMixing, "bucketing": Bucketing}


def pre_spec(item: Any) -> tuple[str, Mapping[str, Any]]:
    """(name, params) of one `pre` entry: a name, a {name, params} mapping or a
    `lab.config.PreAggregatorConfig`."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, Mapping):
        return str(item.get("name", "")), dict(item.get("params") or {})
    return item.name, dict(item.params)


class Preaggregated:
    """A rule behind a chain of pre-aggregators; per-client fields mapped back (module docstring)."""

    def __init__(self, steps: Sequence[PreAggregator], rule: Aggregator) -> None:
        self.steps = tuple(steps)
        self.rule = rule

    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate:
        n = require_clients(updates, info, 1, "pre-aggregation")
        rows, stage = updates, info
        mixing = torch.eye(n, dtype=torch.float64)
        owner = torch.arange(n)
        for step in self.steps:
            out = step(rows, stage)
            rows, stage = out.updates, out.info
            mixing = out.mixing @ mixing
            owner = out.owner[owner]
        agg = self.rule(rows, stage)

        def per_client(field: Tensor | None) -> Tensor | None:
            return None if field is None else field[owner]

        weights = None if agg.weights is None else (mixing.T @ agg.weights.to(torch.float64)).to(updates.dtype)
        return Aggregate(
            update=agg.update, kept=per_client(agg.kept), clipped=per_client(agg.clipped), weights=weights,
            scores=per_client(agg.scores), suspicion=per_client(agg.suspicion),
            stats={**agg.stats, "agg.pre-rows": float(rows.shape[0])},
        )


class StatefulPreaggregated(Preaggregated):
    """`Preaggregated` over a `Checkpointable` rule: its state is the rule's."""

    def state_dict(self) -> dict[str, Tensor]:
        return self.rule.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.rule.load_state_dict(state)  # type: ignore[attr-defined]
