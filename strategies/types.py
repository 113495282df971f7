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
class IngestedRows:
    """What the server learned of the update matrix while it wrote it (`strategies.ingest`): each
    row's L2 norm and the num-examples-weighted sum of the rows (FedAvg's numerator), so that no
    rule pays another pass over the matrix for them. It describes `rows` only, that very tensor
    object: a rule handed other rows (a pre-aggregator's mix, an attack's) must not use it, which
    `describes(updates)` checks by identity."""

    rows: Tensor  # (n, d): the matrix it describes
    norms: Tensor  # (n,) float64
    weighted_sum: Tensor | None = None  # (d,) sum_i num_examples[i] * rows[i]; None: not taken

    def describes(self, updates: Tensor) -> bool:
        return updates is self.rows


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
    # The rows' norms and weighted sum, when the server took them during ingest (IngestedRows).
    ingested: IngestedRows | None = None


@dataclass(frozen=True)
class Aggregate:
    update: Tensor  # (n_params,)
    kept: Tensor | None = None  # (n_clients,) bool; None for coordinate-wise rules
    clipped: Tensor | None = None  # (n_clients,) bool
    weights: Tensor | None = None  # (n_clients,) effective weight of each client in `update`
    scores: Tensor | None = None  # (n_clients,) the rule's own score (Krum score, trust, ...)
    # (n_clients,) how suspicious each client looks to the rule, higher = more suspicious, in the
    # rule's own units (a Krum score, 1 - trust, distance to the median, ...). Only its ranking is
    # scored (ROC AUC against the ground truth the evaluation knows), so any monotone map is fine.
    suspicion: Tensor | None = None
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
    # The trained network, for rules that run the model (DeepSight's probe inputs); None where the
    # server has no model to give (config checks, benchmarks).
    model: ModelSpec | None = None


@dataclass(frozen=True)
class ModelSpec:
    """How a rule can run the server's model: a fresh instance (`build()`, the experiment's
    architecture with its Normalize layer, on the CPU) whose `state_dict` the rule fills from
    `ParamLayout.unflatten`, and the shape of one input in [0, 1] pixel space."""

    build: Callable[[], torch.nn.Module]
    input_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int


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
