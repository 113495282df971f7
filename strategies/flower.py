"""The thin Flower wrapper: FedAvg's sampling and messaging, our aggregation over client updates.

`RobustFedAvg` overrides `configure_train` (to remember the global model it sends, to add the
local hyperparameters to the ConfigRecord, and to sample the round's clients by partition with a
seeded `strategies.sampling.RoundSampler` instead of Flower's unseeded draw over node ids) and
`aggregate_train` (validate replies with the pure checks of `strategies.replies`, build the
(n_clients, n_params) update matrix with `strategies.ingest`, call the aggregator, apply the server
learning rate unless the result is not finite). It never mutates a reply or calls Flower's private methods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from torch import Tensor

from lab.cohort import COHORT_KEY, split_evenly
from lab.cost import measured
from lab.errors import AggregationError, LabError, ReplyError
from lab.records import ParamLayout
from strategies.inbox import ClientReply, open_replies
from strategies.ingest import IngestPlan, UpdateMatrix
from strategies.replies import IdentityBook, read_examples, read_loss, shorten
from strategies.sampling import RoundSampler
from strategies.types import Aggregate, Aggregator, IngestedRows, RoundInfo

log = logging.getLogger(__name__)


@dataclass
class RoundDecisions:
    """What happened in one round's aggregation, keyed by partition: the one each node holds
    (`strategies.replies.IdentityBook`), not what a reply claims."""

    server_round: int
    partitions: list[int] = field(default_factory=list)  # row order of the update matrix
    node_ids: list[int] = field(default_factory=list)
    norms: dict[int, float] = field(default_factory=dict)
    kept: list[int] | None = None
    dropped: list[int] | None = None
    clipped: list[int] | None = None
    weights: dict[int, float] | None = None
    scores: dict[int, float] | None = None
    suspicion: dict[int, float] | None = None  # higher = more suspicious; the recorder scores it
    stats: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)  # {"node_id", "partition", "reason"}
    train_loss: float | None = None
    aggregate_seconds: float = 0.0
    rule_seconds: float | None = None  # the aggregator call alone (`lab.cost`)
    rule_peak_mb: float | None = None  # memory the aggregator call needed beyond its inputs
    skipped: str | None = None  # why the model was left unchanged this round, if it was

    def as_metrics(self) -> dict[str, object]:
        return {
            "clients": self.partitions,
            "kept": self.kept,
            "dropped": self.dropped,
            "clipped": self.clipped,
            "weights": self.weights,
            "scores": self.scores,
            "update_norms": self.norms,
            "failures": self.failures,
            "train_loss": self.train_loss,
            "aggregate_seconds": self.aggregate_seconds,
            "rule_seconds": self.rule_seconds,
            "rule_peak_mb": self.rule_peak_mb,
            "skipped": self.skipped,
            **self.stats,  # the rules name their statistics "agg.<name>" themselves
        }


def to_tensors(record: ArrayRecord) -> dict[str, Tensor]:
    """Named tensors of a record; each `Array.numpy()` is a fresh array, so no extra copy."""
    return {k: torch.from_numpy(v.numpy()) for k, v in record.items()}


def cohort_orders(partitions: Sequence[int], nodes: Sequence[int], arrays: ArrayRecord,
                  config: ConfigRecord) -> tuple[list[Message], dict[int, list[int]]]:
    """One TRAIN message per node (ascending ids) with its share of `partitions`, and who got what."""
    assigned = dict(zip(sorted(nodes), split_evenly(list(partitions), len(nodes))))
    messages = []
    for node, share in assigned.items():
        order = ConfigRecord({**dict(config), COHORT_KEY: [int(p) for p in share]})
        messages.append(Message(content=RecordDict({"arrays": arrays, "config": order}),
                                message_type=MessageType.TRAIN, dst_node_id=node))
    return messages, assigned


class RobustFedAvg(FedAvg):
    """FedAvg whose aggregation step is any `Aggregator` over client updates.

    Args:
        aggregator: the rule, built by `strategies.registry.build_aggregator`.
        layout: parameter layout of the global model (checked against every reply).
        train_config: local hyperparameters sent to every client each round.
        server_lr: eta in G_{t+1} = G_t + eta * Agg(updates).
        reference_update: FLTrust's server update on its root set, from the flat global model.
        on_round: called with each round's `RoundDecisions` after aggregation.
        collude: experiment harness, not the defense: the simulation's full-knowledge adversary
            (`byzantine.collusion.Colluder`), called with (updates, row partitions, round) between
            building the update matrix and the aggregator; it may replace malicious rows. The
            aggregator still gets only the matrix.
        seed: seeds the per-round client sampling (`RoundSampler`).
        cohort: simulation only (`lab.cohort`): each round's sampled partitions are split over all
            connected nodes, several per message, instead of one message to each partition's node.
        malicious, attackers_per_round: `federated.attackers_per_round` (see `RoundSampler`): the
            ground truth, used only to draw exactly that many attackers per round, never to aggregate.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        layout: ParamLayout,
        *,
        clients_per_round: int,
        num_clients: int,
        train_config: dict[str, int | float | str | bool],
        server_lr: float = 1.0,
        reference_update: Callable[[Tensor, int], Tensor] | None = None,
        on_round: Callable[[RoundDecisions], None] | None = None,
        collude: Callable[[Tensor, tuple[int, ...], int], Tensor] | None = None,
        seed: int = 0,
        malicious: frozenset[int] = frozenset(),
        attackers_per_round: int | None = None,
        roll_call_timeout: float = 600.0,
        cohort: bool = False,
    ) -> None:
        super().__init__(
            # A hair above the exact share, so int(num_nodes * fraction) never rounds down.
            fraction_train=min(1.0, clients_per_round / num_clients + 1e-9),
            fraction_evaluate=0.0,  # evaluation is central (evaluate_fn), not on clients
            min_train_nodes=clients_per_round,
            min_available_nodes=clients_per_round,
        )
        self.aggregator = aggregator
        self.layout = layout
        self.clients_per_round = clients_per_round
        self.train_config = dict(train_config)
        self.server_lr = server_lr
        self.reference_update = reference_update
        self.on_round = on_round
        self.collude = collude
        self.identities = IdentityBook(num_clients)  # node id <-> partition, across rounds
        self.sampler = RoundSampler(num_clients, clients_per_round, seed, malicious, attackers_per_round)
        self.roll_call_timeout = roll_call_timeout
        self.cohort = cohort
        self._assigned: dict[int, list[int]] | None = None  # this round's cohorts: node -> partitions
        self._global: dict[str, Tensor] | None = None
        self._ingest = IngestPlan.of(layout)
        # Kept across rounds (its pages are touched once, not every round): no rule may keep the
        # matrix or a view of it past its round (FoolsGold clones what it remembers).
        self._matrix = UpdateMatrix(layout.num_params)
        self._sum = torch.empty(layout.num_params)  # the rows' num-examples-weighted sum (IngestedRows)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = to_tensors(arrays)
        for node in self.identities.release_absent(grid.get_node_ids()):
            log.warning("round %d: node %s is gone; its partition may be claimed again", server_round, node)
        merged = ConfigRecord({**self.train_config, **dict(config), "round-size": self.clients_per_round})
        if self.cohort:
            merged["server-round"] = server_round
            messages, self._assigned = cohort_orders(self.sampler.partitions(server_round),
                                                     list(grid.get_node_ids()), arrays, merged)
            log.info("round %d: %d clients in %d cohort messages", server_round, self.clients_per_round,
                     len(messages))
            return messages
        if self.sampler.everyone:  # every node trains: FedAvg's own messaging, nothing to draw
            return super().configure_train(server_round, arrays, merged, grid)
        chosen = self.sampler.partitions(server_round)
        nodes = self._nodes_holding(chosen, grid, server_round)
        log.info("round %d: sampled partitions %s", server_round, chosen)
        merged["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": merged})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node) for node in nodes]

    def _nodes_holding(self, partitions: list[int], grid: Grid, server_round: int) -> list[int]:
        """The connected nodes that hold `partitions`, in that order; nodes not heard from yet are
        asked first (`_roll_call`). A partition no connected node holds is left out, loudly."""
        deadline = time.monotonic() + self.roll_call_timeout  # a node that never comes must not hang the run
        while len(connected := list(grid.get_node_ids())) < len(partitions) and time.monotonic() < deadline:
            log.info("round %d: waiting for nodes: %d connected, %d needed", server_round, len(connected),
                     len(partitions))
            time.sleep(1)
        if any(p not in self.identities.node_of for p in partitions):
            unknown = [node for node in connected if node not in self.identities.partition_of]
            if unknown:
                self._roll_call(sorted(unknown), grid, server_round)
        missing = [p for p in partitions if p not in self.identities.node_of]
        if missing:
            log.warning("round %d: no connected node holds partition(s) %s; the round goes on without them",
                        server_round, missing)
        return [self.identities.node_of[p] for p in partitions if p in self.identities.node_of]

    def _roll_call(self, nodes: list[int], grid: Grid, server_round: int) -> None:
        """Ask `nodes` which partition they hold (a QUERY message; the ClientApp's `query` answers
        with its partition-id). The answer is a claim like any other: `IdentityBook` binds it."""
        config = ConfigRecord({"server-round": server_round, "query": "partition-id"})
        asks = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=node)
                for node in nodes]
        claims: list[tuple[int, object]] = []
        for msg in grid.send_and_receive(asks, timeout=self.roll_call_timeout):
            node = msg.metadata.src_node_id
            metrics = None if msg.has_error() else msg.content.metric_records.get("metrics")
            if metrics is None:
                why = shorten(str(msg.error.reason)) if msg.has_error() else "no 'metrics' MetricRecord"
                log.warning("round %d: roll call: node %s did not say its partition: %s", server_round, node, why)
                continue
            claims.append((node, metrics.get("partition-id")))
        settled = self.identities.settle(claims)
        log.info("round %d: roll call: %d of %d nodes named their partition", server_round,
                 len(settled.partition_of), len(nodes))
        for refusal in settled.refused:
            log.warning("round %d: roll call: %s", server_round, refusal.reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        decisions = RoundDecisions(server_round)
        start = time.perf_counter()
        global_flat = self.layout.flatten(self._global)
        updates, examples, losses, norms = self._accept(replies, decisions, global_flat)
        if updates.shape[0] == 0:
            # Keeping the previous model is the only sound choice; say so loudly.
            log.warning("round %d: no valid client reply; global model unchanged", server_round)
            decisions.skipped = "no valid client reply"
            self._emit(decisions)
            return None, MetricRecord({"num-valid": 0})
        if self.collude is not None:  # simulation harness (attack.knowledge: full), before the rule
            updates = self.collude(updates, tuple(decisions.partitions), server_round)
            norms = [float(v) for v in updates.norm(dim=1)]  # of the rows the rule sees
        info = RoundInfo(
            server_round=server_round,
            client_ids=tuple(decisions.partitions),
            num_examples=torch.tensor(examples, dtype=torch.float32),
            global_params=global_flat,
            reference_update=self._reference(global_flat, server_round),
            ingested=IngestedRows(updates, torch.tensor(norms, dtype=torch.float64),
                                  None if self.collude is not None else self._sum),
        )
        try:
            agg, cost = measured(lambda: self.aggregator(updates, info))
        except AggregationError as exc:
            # The rule cannot run on this round's replies (e.g. too few left after drops): keep
            # the model, and make the skip visible in the log and in metrics.jsonl.
            log.warning("round %d: aggregation skipped: %s", server_round, exc)
            decisions.skipped = str(exc)
            self._emit(decisions)
            return None, MetricRecord({"num-valid": len(examples)})
        decisions.norms = dict(zip(decisions.partitions, norms))
        decisions.rule_seconds, decisions.rule_peak_mb = cost.seconds, cost.peak_mb
        decisions.train_loss = float(sum(losses) / len(losses)) if losses else None
        new_flat = global_flat.add_(agg.update, alpha=self.server_lr)
        if not bool(torch.isfinite(new_flat).all()):
            # A NaN or inf model cannot be undone by later rounds: keep the previous one.
            bad = int((~torch.isfinite(new_flat)).sum())
            decisions.skipped = f"aggregate is not finite ({bad} of {new_flat.numel()} parameters)"
            log.warning("round %d: aggregation skipped: %s", server_round, decisions.skipped)
            self._emit(decisions)
            return None, MetricRecord({"num-valid": len(examples)})
        new_state = self.layout.unflatten(new_flat, self._global)
        decisions.aggregate_seconds = time.perf_counter() - start
        self._record(decisions, agg)
        self._emit(decisions)
        metrics = MetricRecord({"num-valid": len(examples), **{k: float(v) for k, v in agg.stats.items()}})
        return ArrayRecord(new_state), metrics

    # ----------------------------------------------------------------------------------------

    def _accept(
        self, replies: Iterable[Message], decisions: RoundDecisions, global_flat: Tensor
    ) -> tuple[Tensor, list[float], list[float], list[float]]:
        """The (n_valid, n_params) update matrix, rows in partition order, with each row's
        num-examples, the training losses reported and each row's norm; invalid replies go to
        `decisions.failures` with a reason.

        Each reply is read in place and written as (weights - global) into its row with its norm
        in one pass (`strategies.ingest`). A row's partition is the one its node holds
        (`IdentityBook`: the node id is the authenticated sender; the partition-id in the metrics
        only a claim), or in a cohort round the one the server assigned (`strategies.inbox`).
        """
        candidates, failures = self.client_replies(replies)
        decisions.failures.extend(failures)
        failures = decisions.failures
        readable: list[tuple[ClientReply, float, float | None]] = []  # metrics read, weights not yet
        for reply in candidates:
            try:
                n = read_examples(reply.metrics.get("num-examples"))
                loss = read_loss(reply.metrics.get("train-loss"))
                if reply.arrays is None:
                    raise ReplyError("reply lacks the 'arrays' record")
            except (LabError, KeyError, TypeError, ValueError) as exc:
                failures.append({"node_id": reply.node_id, "partition": reply.partition, "reason": shorten(str(exc))})
                continue
            readable.append((reply, n, loss))
        rows = self._matrix.rows(len(readable))
        # All replies at once (`ingest_many`): checks, copy, - global, norm and FedAvg's weighted
        # sum in one pass over each reply, each chunk of the global model read from memory once.
        results = self._ingest.ingest_many([r.arrays for r, _, _ in readable], global_flat, rows,  # type: ignore[misc]
                                           weights=[n for _, n, _ in readable], weighted_sum=self._sum)
        examples: list[float] = []
        losses: list[float] = []
        norms: list[float] = []  # of each accepted update, from the overflow check (one pass, not two)
        for (reply, n, loss), result in zip(readable, results):
            if isinstance(result, ReplyError):
                failures.append({"node_id": reply.node_id, "partition": reply.partition, "reason": shorten(str(result))})
                continue
            examples.append(n)
            norms.append(result)
            if loss is not None:
                losses.append(loss)
            decisions.partitions.append(reply.partition)
            decisions.node_ids.append(reply.node_id)
        failures.sort(key=lambda f: int(f["node_id"]))  # type: ignore[call-overload]  # not arrival order
        for f in failures:
            log.warning("round %d: dropped reply from node %s: %s", decisions.server_round, f["node_id"], f["reason"])
        return rows[: len(examples)], examples, losses, norms

    def client_replies(self, replies: Iterable[Message]) -> tuple[list[ClientReply], list[dict[str, object]]]:
        """This round's replies, one per client, and the failures (`strategies.inbox.open_replies`)."""
        return open_replies(replies, self.identities, self._assigned if self.cohort else None)

    def _reference(self, global_flat: Tensor, server_round: int) -> Callable[[], Tensor] | None:
        fn = self.reference_update
        return None if fn is None else (lambda: fn(global_flat, server_round))

    @staticmethod
    def _record(decisions: RoundDecisions, agg: Aggregate) -> None:
        ids = decisions.partitions

        def pick(mask: Tensor | None) -> list[int] | None:
            return None if mask is None else [p for p, m in zip(ids, mask.tolist()) if m]

        decisions.kept = pick(agg.kept)
        decisions.dropped = None if agg.kept is None else pick(~agg.kept)
        decisions.clipped = pick(agg.clipped)
        if agg.weights is not None:
            decisions.weights = {p: float(w) for p, w in zip(ids, agg.weights)}
        if agg.scores is not None:
            decisions.scores = {p: float(s) for p, s in zip(ids, agg.scores)}
        if agg.suspicion is not None:  # the recorder scores it against the ground truth
            decisions.suspicion = dict(zip(ids, agg.suspicion.double().tolist()))
        decisions.stats = {k: float(v) for k, v in agg.stats.items()}

    def _emit(self, decisions: RoundDecisions) -> None:
        log.info(
            "round %d: %d clients, kept %s, dropped %s, clipped %s, failures %d",
            decisions.server_round, len(decisions.partitions), decisions.kept, decisions.dropped,
            decisions.clipped, len(decisions.failures),
        )
        if self.on_round is not None:
            self.on_round(decisions)


class ShiftRounds(Strategy):
    """Runs `inner` as if Flower's round r were round r + `offset` (`execution.resume`).

    `Strategy.start` always counts rounds from 1; a resumed run continues after the last
    checkpointed round, so every round number the inner strategy (and, through the ConfigRecord's
    `server-round`, every client: seeds, attack schedules) sees is the true one.
    """

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
