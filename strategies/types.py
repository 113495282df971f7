"""The aggregation contract: an (n_clients, n_params) update matrix in, one update and the
rule's per-client decisions out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from lab.records import ParamLayout


@dataclass(frozen=True)
class RoundInfo:
    server_round: int
    # Row i of `updates` came from client_ids[i]: the partition bound to the authenticated node that
    # sent it (strategies.replies.IdentityBook), stable across rounds (the node id is not: it changes
    # when a SuperNode restarts).
    client_ids: tuple[int, ...]
    num_examples: Tensor  # (n_clients,) float
    global_params: Tensor | None = None  # (n_params,) flat global model the updates start from
    # Server-side reference update on its clean root set (FLTrust); computed lazily, only if asked.
    reference_update: Callable[[], Tensor] | None = None


@dataclass(frozen=True)
class Aggregate:
    update: Tensor  # (n_params,)
    kept: Tensor | None = None  # (n_clients,) bool; None for coordinate-wise rules
    clipped: Tensor | None = None  # (n_clients,) bool
    weights: Tensor | None = None  # (n_clients,) effective weight of each client in `update`
    scores: Tensor | None = None  # (n_clients,) the rule's own score (Krum score, trust, ...)
    stats: dict[str, float] = field(default_factory=dict)  # named "agg.<name>": metrics.jsonl keys as they are


@dataclass(frozen=True)
class AggregatorContext:
    """What the server knows when it builds a rule (before round 1)."""

    layout: ParamLayout
    clients_per_round: int
    seed: int = 0
    # Flat-vector slice of the output layer's weight (FoolsGold, FL-Defender look only there).
    output_slice: slice | None = None
    # federated.fedavg_divisor total: the num-examples of every client (sampled or not) in a round,
    # whose sum FedAvg divides by; None = divide by the sampled clients' weight.
    all_examples: tuple[float, ...] | None = None


class Aggregator(Protocol):
    def __call__(self, updates: Tensor, info: RoundInfo) -> Aggregate: ...


@runtime_checkable
class Checkpointable(Protocol):
    """A rule whose decisions depend on earlier rounds (FoolsGold, FL-Defender keep per-client
    histories). The server checkpoints `state_dict()` beside the model so that a resumed run
    continues with the history, not an empty one."""

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None: ...


def history_state(history: Mapping[int, Tensor]) -> dict[str, Tensor]:
    """Per-client history -> flat tensors named "history.<client id>"."""
    return {f"history.{cid}": value for cid, value in history.items()}


def history_from_state(state: Mapping[str, Tensor]) -> dict[int, Tensor]:
    """Inverse of `history_state` (float64, the precision the rules accumulate in)."""
    return {int(key.removeprefix("history.")): value.to(torch.float64)
            for key, value in state.items() if key.startswith("history.")}
