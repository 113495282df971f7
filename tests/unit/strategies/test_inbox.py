"""Reading a round's replies (strategies.inbox) and sizing cohorts (lab.cohort): the server keys a
cohort's rows by what it assigned, never by what a reply says."""

from __future__ import annotations

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from lab.cohort import (
    COHORT_KEY,
    MAX_COHORT_BYTES,
    arrays_key,
    clients_per_message,
    metrics_key,
    split_evenly,
)
from strategies.flower import cohort_orders
from strategies.inbox import open_replies
from strategies.replies import IdentityBook
from tests.integration.harness import set_task_identity


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def reply_from(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    order = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    order.metadata.__dict__["_message_id"] = f"m{node}"
    reply = Message(Error(code=0, reason=error), reply_to=order) if error else Message(content, reply_to=order)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def cohort_content(*partitions: int) -> RecordDict:
    content = RecordDict()
    for p in partitions:
        content[arrays_key(p)] = ArrayRecord({"w": torch.full((3,), float(p))})
        content[metrics_key(p)] = MetricRecord({"num-examples": 10, "partition-id": p})
    return content


def test_split_evenly_keeps_order_and_balances() -> None:
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([4, 9], 5) == [[4], [9]]  # no empty cohort
    assert [p for chunk in split_evenly(list(range(100)), 7) for p in chunk] == list(range(100))


@pytest.mark.parametrize(("mode", "round_size", "workers", "model_bytes", "expected"), [
    ("auto", 100, 2, 560_000, 50),  # the FLTrust CNN: half the round per worker
    ("auto", 4, 2, 560_000, 2),
    ("auto", 2, 2, 560_000, 1),  # no more messages than workers: nothing to save
    ("per-client", 100, 2, 560_000, 1),
    ("auto", 100, 2, 45_000_000, 5),  # ResNet-18: at most MAX_COHORT_BYTES of weights per message
    ("auto", 100, 2, MAX_COHORT_BYTES + 1, 1),  # one client's weights alone exceed it
    ("cohort", 100, 2, MAX_COHORT_BYTES + 1, 1),
    ("cohort", 3, 1, 1000, 3),
])
def test_clients_per_message(mode: str, round_size: int, workers: int, model_bytes: int, expected: int) -> None:
    assert clients_per_message(mode, round_size, workers, model_bytes) == expected  # type: ignore[arg-type]


def test_cohort_orders_assign_every_partition_once() -> None:
    arrays = ArrayRecord({"w": torch.zeros(3)})
    messages, assigned = cohort_orders([1, 3, 5, 7, 8], [20, 10], arrays, ConfigRecord({"lr": 0.1}))
    assert assigned == {10: [1, 3, 5], 20: [7, 8]}
    assert [m.metadata.dst_node_id for m in messages] == [10, 20]
    assert [list(m.content["config"][COHORT_KEY]) for m in messages] == [[1, 3, 5], [7, 8]]
    assert all(m.content["config"]["lr"] == 0.1 for m in messages)


def test_cohort_rows_come_from_the_assignment_not_the_reply() -> None:
    assigned = {10: [0, 1], 20: [2, 3]}
    honest = reply_from(10, cohort_content(0, 1))
    # Node 20 leaves out partition 3, adds partition 0 (node 10's) and claims partition-id 9 for 2.
    forged = cohort_content(2, 0)
    forged[metrics_key(2)] = MetricRecord({"num-examples": 10, "partition-id": 9})
    clients, failures = open_replies([reply_from(20, forged), honest], IdentityBook(), assigned)
    assert [(c.node_id, c.partition) for c in clients] == [(10, 0), (10, 1), (20, 2)]
    assert float(clients[0].arrays["w"].numpy()[0]) == 0.0  # node 10's own record, not node 20's
    reasons = [(f["node_id"], f["partition"], f["reason"]) for f in failures]
    assert (20, None, "records for partitions it was not asked to train: ['arrays.0', 'metrics.0']") in reasons
    assert any(n == 20 and p == 3 and "metrics.3" in r for n, p, r in reasons)


def test_a_failed_cohort_message_fails_each_of_its_clients() -> None:
    clients, failures = open_replies([reply_from(10, error="worker crashed"), reply_from(20, cohort_content(2))],
                                     IdentityBook(), {10: [0, 1], 20: [2]})
    assert [c.partition for c in clients] == [2]
    assert [(f["partition"], f["reason"]) for f in failures] == [(0, "worker crashed"), (1, "worker crashed")]


def test_a_reply_from_a_node_without_a_cohort_is_refused() -> None:
    clients, failures = open_replies([reply_from(30, cohort_content(0))], IdentityBook(), {10: [0]})
    assert clients == [] and failures[0]["node_id"] == 30 and "no cohort" in str(failures[0]["reason"])


def test_single_client_replies_still_go_through_the_identity_book() -> None:
    book = IdentityBook(4)
    one = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3)}),
                      "metrics": MetricRecord({"num-examples": 5, "partition-id": 2})})
    clients, failures = open_replies([reply_from(10, one)], book)
    assert [(c.node_id, c.partition) for c in clients] == [(10, 2)] and failures == []
    spoof = RecordDict({"arrays": one["arrays"], "metrics": MetricRecord({"num-examples": 5, "partition-id": 2})})
    clients, failures = open_replies([reply_from(11, spoof)], book)  # partition 2 is node 10's
    assert clients == [] and failures[0]["node_id"] == 11
