"""Run the ServerApp and ClientApp in-process: a fake Grid that calls the ClientApp directly.

Flower ships no public test harness; `Grid` is an ABC, so this is enough (no Ray, no network,
messages passed as Python objects). Flower >= 1.41 reads the run/node/task identity of the current
process when a Message is created; outside a runtime we set it ourselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity  # internal (flwr >= 1.41)


def set_task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class FakeGrid(Grid):
    """Node i has node config `node_configs[i]`; `fail(node_id, msg)` may turn a reply into an error."""

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any],
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        set_task_identity()
        self._client_app = client_app
        self._ids = itertools.count(1)
        self._nodes = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=cfg, state=RecordDict(), run_config=run_config)
            for i, cfg in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
        self._tamper = tamper
        self._run: Any = None
        self.sent: list[int] = []  # messages per push, in order (a cohort round sends fewer than its clients)

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        messages = list(messages)
        self.sent.append(len(messages))
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid  # the SuperLink assigns it in a real run
            node = msg.metadata.dst_node_id
            reply = self._client_app(msg, self._nodes[node])
            reply.metadata.__dict__["_src_node_id"] = node
            if self._tamper is not None:
                reply = self._tamper(node, reply)
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(run_config: dict[str, Any], num_nodes: int, **grid_kwargs: Any) -> FakeGrid:
    from client.app import app as client_app
    from server.app import app as server_app

    grid = FakeGrid(client_app, [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)],
                    run_config, **grid_kwargs)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


def forge(reply: Message, content: RecordDict) -> Message:
    """A reply with `content` from the same node: what a malicious ClientApp can send. The
    content is the client's to choose; the sender (`src_node_id`, the authenticated channel) is not."""
    instruction = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type)
    instruction.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return Message(content, reply_to=instruction)
