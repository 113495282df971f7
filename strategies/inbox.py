"""A round's reply messages as one `ClientReply` per client, whoever carried them.

Two message shapes reach the server. One message per client (Flower's way, and every deployment):
the client is the partition its node holds, settled by `strategies.replies.IdentityBook` from the
node's claim. A cohort message (`lab.cohort`, simulation only) carries several clients: they are the
partitions the server itself assigned to that node, so nothing in the reply is taken on its word;
a partition the server did not ask for is refused, and one it asked for but did not get is a
failure (the orders themselves: `strategies.flower.cohort_orders`). The aggregation
(`strategies.flower.RobustFedAvg`) and the capture hook
(`server.capture.CaptureUpdates`) both read replies through `open_replies`, so they agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lab.cohort import arrays_key, metrics_key
from strategies.replies import IdentityBook, shorten

# Flower's Message and records are read by attribute: only the thin wrapper (strategies.flower)
# imports flwr.
Message = Any


@dataclass(frozen=True)
class ClientReply:
    node_id: int  # the node that carried it (several clients share one in a cohort)
    partition: int  # the client, as the server knows it (never a bare claim)
    metrics: Any  # the client's MetricRecord
    arrays: Any  # its ArrayRecord, or None when the reply has none


def failure(node: int, partition: int | None, reason: str) -> dict[str, object]:
    return {"node_id": node, "partition": partition, "reason": shorten(reason)}


def open_replies(replies: Iterable[Message], identities: IdentityBook,
                 assigned: Mapping[int, Sequence[int]] | None = None
                 ) -> tuple[list[ClientReply], list[dict[str, object]]]:
    """The round's clients in ascending partition order, and the failures (`{"node_id", "partition",
    "reason"}`). `assigned` (node -> partitions) marks a cohort round; None, a round of one message
    per client."""
    failures: list[dict[str, object]] = []
    out: list[ClientReply] = []
    single: list[tuple[int, Message]] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            lost = list(assigned.get(node, ())) if assigned is not None else [None]
            failures.extend(failure(node, p, str(msg.error.reason)) for p in lost)
            continue
        if assigned is not None:
            out += _open_cohort(node, msg, assigned.get(node, ()), failures)
            continue
        if msg.content.metric_records.get("metrics") is None:
            failures.append(failure(node, None, "no 'metrics' MetricRecord"))
            continue
        single.append((node, msg))
    settled = identities.settle([(node, msg.content.metric_records["metrics"].get("partition-id"))
                                 for node, msg in single])
    failures.extend(r.as_failure() for r in settled.refused)
    for node, msg in single:
        if node in settled.partition_of:
            out.append(ClientReply(node, settled.partition_of[node], msg.content.metric_records["metrics"],
                                   msg.content.array_records.get("arrays")))
    # Partition order: arrival order is random, and float sums depend on row order.
    out.sort(key=lambda r: r.partition)
    return out, failures


def _open_cohort(node: int, msg: Message, share: Sequence[int],
                 failures: list[dict[str, object]]) -> list[ClientReply]:
    if not share:
        failures.append(failure(node, None, "a reply from a node that was sent no cohort this round"))
        return []
    metrics_records, array_records = msg.content.metric_records, msg.content.array_records
    expected = {metrics_key(p) for p in share} | {arrays_key(p) for p in share}
    extra = sorted((set(metrics_records) | set(array_records)) - expected)
    if extra:
        failures.append(failure(node, None, f"records for partitions it was not asked to train: {extra[:3]}"))
    out = []
    for p in share:
        metrics = metrics_records.get(metrics_key(p))
        if metrics is None:
            failures.append(failure(node, p, f"no {metrics_key(p)!r} MetricRecord"))
            continue
        out.append(ClientReply(node, p, metrics, array_records.get(arrays_key(p))))
    return out
