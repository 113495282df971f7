"""The curious server: keep what clients send, and optionally probe them.

`CaptureUpdates` wraps any Flower strategy (ours or a built-in) by composition, as Flower's DP
wrappers do. In the capture rounds it writes, for each selected client, the global weights it was
sent, its update (reply - global), the hyperparameters the server sent, num-examples, round, node id
and partition id, as one safetensors entry plus a line in `captures/manifest.jsonl`. Replies are
captured *before* the inner strategy sees them (Flower's FedMedian pops arrays out of replies).

A probe round is the curious server setting local training itself: every client sampled in that
round is asked for `local_steps` SGD steps on one fixed batch of `batch_size` images (FedSGD when
steps is 1). Before the first replies the server cannot tell which node holds which partition, so
the probe goes to the whole round, like a real FedSGD round would. With `probe.model_round` the
probe carries the global model of that earlier round (kept in memory, or read back from its
checkpoint after a resume); each reply's change is then added to the current model before the
inner strategy aggregates it, so the run trains on as it would with a plain probe.

An entry is filed under the partition its node holds (`strategies.replies.IdentityBook`, shared
with `RobustFedAvg` so both agree), never under a partition a reply merely claims.

Whom to keep (`capture.clients`): `suspects` (the default) keeps the `top_k` clients the server
itself suspects (`server.suspects.SuspectBook`: the rule's drops, its suspicion, the similarity of
update histories), decided after the round's aggregation so the rule's verdict on this round counts;
`all` keeps everyone; a list keeps those partitions. `malicious` keeps the attackers by their true
identity, which no real server knows: an UPPER BOUND, and every manifest row says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from lab.artifacts import append_jsonl, load_tensors, read_jsonl, write_json
from lab.capture import UPPER_BOUND_NOTE, CapturedUpdate, evidence_path, write_entry
from lab.config import CaptureConfig
from lab.errors import LabError
from lab.task import LocalHyperparams
from server.suspects import SuspectBook
from strategies.flower import to_tensors
from strategies.inbox import ClientReply, open_replies
from strategies.replies import IdentityBook, read_examples

ReadReplies = Callable[[list[Message]], tuple[list[ClientReply], list[dict[str, object]]]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapturePlan:
    rounds: frozenset[int]
    select: Callable[[int], bool]  # partition-id -> capture it?
    probe: LocalHyperparams | None
    max_bytes: int
    image_shape: tuple[int, int, int]
    mode: str = "listed"  # suspects | all | malicious | listed
    top_k: int = 3
    probe_model_round: int | None = None  # the round whose global model the probe sends (None: current)

    @property
    def selection(self) -> dict[str, object]:
        """How the entries were chosen, for every manifest row (the upper bound says so)."""
        if self.mode == "malicious":
            return {"mode": "malicious", "upper_bound": True, "note": UPPER_BOUND_NOTE}
        return {"mode": self.mode, "upper_bound": False, **({"top_k": self.top_k} if self.mode == "suspects" else {})}

    @classmethod
    def of(cls, cfg: CaptureConfig, base: LocalHyperparams, malicious: frozenset[int],
           image_shape: tuple[int, int, int]) -> CapturePlan:
        if cfg.top_k < 1:
            raise LabError(f"capture.top_k must be >= 1, got {cfg.top_k}")
        mode = cfg.clients if isinstance(cfg.clients, str) else "listed"
        if cfg.clients in ("all", "suspects"):  # suspects: chosen after the round (`CaptureUpdates`)
            select: Callable[[int], bool] = lambda p: True
        elif cfg.clients == "malicious":
            # The lab's experiment bookkeeping picks whom to record; the capture never affects training.
            select = malicious.__contains__
        else:
            select = frozenset(cfg.clients).__contains__
        probe = None
        if cfg.probe is not None:
            probe = LocalHyperparams(epochs=1, steps=cfg.probe.local_steps, batch_size=cfg.probe.batch_size,
                                     lr=cfg.probe.lr, momentum=base.momentum, weight_decay=base.weight_decay)
        return cls(frozenset(cfg.rounds), select, probe, cfg.max_bytes, image_shape, mode, cfg.top_k,
                   cfg.probe.model_round if cfg.probe is not None else None)


@dataclass(frozen=True)
class _Pending:
    node: int
    partition: int
    num_examples: int
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]


class CaptureUpdates(Strategy):
    """Delegates everything to `inner`; records raw client updates in the planned rounds.

    `read_replies` is the inner strategy's (`RobustFedAvg.client_replies`: its `IdentityBook` and
    its cohorts), so both file a reply under the same partition; without one (a built-in Flower
    strategy) the hook keeps its own `IdentityBook`.
    """

    def __init__(self, inner: Strategy, out_dir: Path, plan: CapturePlan,
                 read_replies: ReadReplies | None = None) -> None:
        self.inner = inner
        self.out_dir = out_dir
        self.plan = plan
        self.identities = IdentityBook()
        self.read_replies: ReadReplies = read_replies or (lambda msgs: open_replies(msgs, self.identities))
        self.written = sum(int(r.get("bytes", 0)) for r in read_jsonl(out_dir / "manifest.jsonl"))
        self.full = False
        self._sent: dict[int, tuple[dict[str, object], LocalHyperparams]] = {}
        self._global: ArrayRecord | None = None  # what the clients were sent (an earlier model in a probe)
        self._current: ArrayRecord | None = None  # the round's global model
        self._earlier: ArrayRecord | None = None  # the global model of `plan.probe_model_round`
        self._sent_round: int | None = None  # the round `_global` belongs to
        self.book = SuspectBook() if plan.mode == "suspects" else None
        self._probing = False
        if self.book is not None and hasattr(inner, "on_round"):
            # The rule's verdicts reach the book through the inner strategy's own per-round
            # callback (chained, so the recorder still gets every round).
            previous = inner.on_round

            def observe(decisions: object) -> None:
                if not self._probing and self.book is not None:
                    self.book.observe_decisions(getattr(decisions, "partitions", []), getattr(decisions, "dropped", None),
                                                getattr(decisions, "suspicion", None))
                if previous is not None:
                    previous(decisions)

            inner.on_round = observe

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.identities.release_absent(grid.get_node_ids())  # the default reader's own book
        if server_round == self.plan.probe_model_round:
            self._earlier = ArrayRecord(to_tensors(arrays))  # its own copy (`to_tensors` reads fresh arrays)
        self._global, self._current, self._sent_round = arrays, arrays, server_round
        self._sent = {}
        if server_round in self.plan.rounds and self.plan.probe is not None:
            self._global, self._sent_round = self._probe_model(server_round, arrays)
            messages = [self._probe(m, self._global) for m in messages]
        for m in messages:
            sent = dict(m.content["config"])
            self._sent[m.metadata.dst_node_id] = (sent, LocalHyperparams.from_config(sent))
        return messages

    def _probe_model(self, server_round: int, current: ArrayRecord) -> tuple[ArrayRecord, int]:
        """The model a probe sends, and its round: `plan.probe_model_round`'s, else the current one."""
        wanted = self.plan.probe_model_round
        if wanted is None or wanted == server_round:
            return current, server_round
        if self._earlier is None:  # a resumed run: the model sent in round R is round R-1's checkpoint
            path = self.out_dir.parent / "checkpoints" / f"round_{wanted - 1:04d}.safetensors"
            try:
                self._earlier = ArrayRecord(load_tensors(path))
            except (LabError, OSError) as exc:
                log.warning("round %d: probing with the current model: round %d's is not kept (%s)",
                            server_round, wanted, exc)
                return current, server_round
        return self._earlier, wanted

    def _probe(self, msg: Message, arrays: ArrayRecord) -> Message:
        assert self.plan.probe is not None
        config = ConfigRecord({**dict(msg.content["config"]), **self.plan.probe.to_config(), "fixed-batch": True})
        content = RecordDict({"arrays": arrays, "config": config})
        return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

    def _rebase(self, replies: list[Message]) -> None:
        """Each reply's change from the earlier model, added to the current one (in place)."""
        assert self._global is not None and self._current is not None
        sent, current = to_tensors(self._global), to_tensors(self._current)
        for msg in replies:
            if msg.has_error():
                continue
            for key, record in list(msg.content.array_records.items()):
                try:
                    state = to_tensors(record)
                    if state.keys() != sent.keys() or any(state[k].shape != sent[k].shape for k in sent):
                        continue  # malformed: left for the aggregation to refuse
                    rebased = {k: current[k] + (v - sent[k]) if v.is_floating_point() else v
                               for k, v in state.items()}
                except (LabError, RuntimeError, TypeError, ValueError):
                    continue  # unreadable: the same
                msg.content[key] = ArrayRecord(rebased)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        capture = server_round in self.plan.rounds and not self.full
        self._probing = server_round in self.plan.rounds and self.plan.probe is not None
        pending = self._collect(server_round, replies) if capture else []
        if self.book is not None and not self._probing:
            self._observe(pending or self._collect(server_round, replies, quiet=True))
        if self._sent_round != server_round:  # probed with an earlier model
            self._rebase(replies)
        result = self.inner.aggregate_train(server_round, replies)  # may pop arrays: read first
        if capture:
            self._write(server_round, pending)
        return result

    def _observe(self, pending: list[_Pending]) -> None:
        assert self.book is not None
        self.book.observe_updates({p.partition: torch.cat([u.flatten() for u in p.update.values() if u.is_floating_point()])
                                   for p in pending})

    def _collect(self, server_round: int, replies: list[Message], quiet: bool = False) -> list[_Pending]:
        """Each selectable reply's update (reply - global), before the inner strategy sees it."""
        assert self._global is not None
        global_state = to_tensors(self._global)
        clients, _ = self.read_replies(replies)  # the failures are the aggregation's to report
        pending = []
        for reply in clients:
            node, partition = reply.node_id, reply.partition
            if not self.plan.select(partition):
                continue
            try:
                if reply.arrays is None:
                    raise KeyError("arrays")
                num_examples = int(read_examples(reply.metrics.get("num-examples")))
                state = to_tensors(reply.arrays)
                update = {k: state[k] - v if v.is_floating_point() else torch.zeros_like(v)
                          for k, v in global_state.items()}
            except (LabError, KeyError, RuntimeError, TypeError, ValueError) as exc:
                if not quiet:
                    log.warning("round %d: not capturing node %s (%s)", server_round, node, exc)
                continue
            pending.append(_Pending(int(node), partition, num_examples, global_state, update))
        return pending

    def _write(self, server_round: int, pending: list[_Pending]) -> None:
        selection: dict[int, dict[str, object]] = {p.partition: {} for p in pending}
        if self.book is not None:
            partitions = [p.partition for p in pending]
            scores = self.book.scores(partitions)
            ranked = self.book.rank(partitions)
            selection = {p: {"suspect_rank": i + 1, **scores[p]} for i, p in enumerate(ranked[: self.plan.top_k])}
            log.info("round %d: capturing the server's top-%d suspects %s", server_round, self.plan.top_k,
                     ranked[: self.plan.top_k])
            # Every client's scores, not only the kept ones: how far the suspects stood out.
            write_json(self.out_dir / f"suspects_round_{server_round:04d}.json",
                       {"round": server_round, "top_k": self.plan.top_k, "ranking": ranked,
                        "scores": {str(p): v for p, v in scores.items()}})
            pending = sorted((p for p in pending if p.partition in selection),
                             key=lambda p: selection[p.partition]["suspect_rank"])  # type: ignore[arg-type,return-value]
        for item in pending:
            node, partition, global_state = item.node, item.partition, item.global_state
            size = 2 * sum(t.numel() * t.element_size() for t in global_state.values())
            if self.written + size > self.plan.max_bytes:
                log.warning("capture budget of %d bytes reached: capturing stops (%d bytes written)",
                            self.plan.max_bytes, self.written)
                self.full = True
                return
            sent, hp = self._sent.get(node, ({}, None))
            if hp is None:
                continue
            entry_id = f"round_{server_round:04d}/partition_{partition:03d}"
            path = self.out_dir / f"{entry_id}.safetensors"
            write_entry(path, CapturedUpdate(global_state, item.update, item.num_examples,
                                             server_round, int(node), partition, hp,
                                             image_shape=self.plan.image_shape))
            size = path.stat().st_size
            self.written += size
            evidence = evidence_path(self.out_dir, server_round, partition)
            append_jsonl(self.out_dir / "manifest.jsonl", {
                "id": entry_id, "file": f"{entry_id}.safetensors", "round": server_round, "node_id": int(node),
                "partition_id": partition, "num_examples": item.num_examples,
                "hyperparams": {k: v for k, v in sent.items() if k != "server-round"},
                "probe": bool(sent.get("fixed-batch", False)), "model_round": self._sent_round, "bytes": size,
                "evidence": str(evidence.relative_to(self.out_dir)) if evidence.exists() else None,
                "selection": {**self.plan.selection, **selection[partition]},
            })
            log.info("captured %s (%d bytes)", entry_id, size)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
