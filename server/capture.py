"""The curious server: keep what clients send, and optionally probe them.

`CaptureUpdates` wraps any Flower strategy (ours or a built-in) by composition, as Flower's DP
wrappers do. In the capture rounds it writes, for each selected client, the global weights it was
sent, its update (reply - global), the hyperparameters the server sent, num-examples, round, node id
and partition id, as one safetensors entry plus a line in `captures/manifest.jsonl`. Replies are
captured *before* the inner strategy sees them (Flower's FedMedian pops arrays out of replies).

A probe round is the curious server setting local training itself: every client sampled in that
round is asked for `local_steps` SGD steps on one fixed batch of `batch_size` images (FedSGD when
steps is 1). Before the first replies the server cannot tell which node holds which partition, so
the probe goes to the whole round, like a real FedSGD round would.

An entry is filed under the partition its node holds (`strategies.replies.IdentityBook`, shared
with `RobustFedAvg` so both agree), never under a partition a reply merely claims.
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

from lab.artifacts import append_jsonl, read_jsonl
from lab.capture import CapturedUpdate, evidence_path, write_entry
from lab.config import CaptureConfig
from lab.errors import LabError
from lab.task import LocalHyperparams
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

    @classmethod
    def of(cls, cfg: CaptureConfig, base: LocalHyperparams, malicious: frozenset[int],
           image_shape: tuple[int, int, int]) -> CapturePlan:
        if cfg.clients == "all":
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
        return cls(frozenset(cfg.rounds), select, probe, cfg.max_bytes, image_shape)


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
        self._global: ArrayRecord | None = None

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.identities.release_absent(grid.get_node_ids())  # the default reader's own book
        self._global = arrays
        self._sent = {}
        if server_round in self.plan.rounds and self.plan.probe is not None:
            messages = [self._probe(m) for m in messages]
        for m in messages:
            sent = dict(m.content["config"])
            self._sent[m.metadata.dst_node_id] = (sent, LocalHyperparams.from_config(sent))
        return messages

    def _probe(self, msg: Message) -> Message:
        assert self.plan.probe is not None
        config = ConfigRecord({**dict(msg.content["config"]), **self.plan.probe.to_config(), "fixed-batch": True})
        content = RecordDict({"arrays": msg.content["arrays"], "config": config})
        return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if server_round in self.plan.rounds and not self.full:
            self._capture(server_round, replies)
        return self.inner.aggregate_train(server_round, replies)

    def _capture(self, server_round: int, replies: list[Message]) -> None:
        assert self._global is not None
        global_state = to_tensors(self._global)
        clients, _ = self.read_replies(replies)  # the failures are the aggregation's to report
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
                log.warning("round %d: not capturing node %s (%s)", server_round, node, exc)
                continue
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
            write_entry(path, CapturedUpdate(global_state, update, num_examples,
                                             server_round, int(node), partition, hp,
                                             image_shape=self.plan.image_shape))
            size = path.stat().st_size
            self.written += size
            evidence = evidence_path(self.out_dir, server_round, partition)
            append_jsonl(self.out_dir / "manifest.jsonl", {
                "id": entry_id, "file": f"{entry_id}.safetensors", "round": server_round, "node_id": int(node),
                "partition_id": partition, "num_examples": num_examples,
                "hyperparams": {k: v for k, v in sent.items() if k != "server-round"},
                "probe": bool(sent.get("fixed-batch", False)), "bytes": size,
                "evidence": str(evidence.relative_to(self.out_dir)) if evidence.exists() else None,
            })
            log.info("captured %s (%d bytes)", entry_id, size)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
