"""The ServerApp and the ClientApp of one run in one process: a Grid that calls the ClientApp itself.

The same two apps `flwr run` starts, with Flower's messages passed as Python objects instead of
through a SuperLink, Ray actors and gRPC. What is left out is the transport, and with it Flower's
per-run start-up and per-message cost (the digits default at 15 rounds: 57 s through `flwr run`, 26 s
here, bench/RESULTS.md issue 18), so a grid of small runs finishes in half the time; a run's
numbers are those of `flwr run` with the same seed (tests/integration/test_local_executor.py). Each node keeps its own Context (and
so its state) across rounds, as a SuperNode does; messages are delivered one at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity  # internal (flwr >= 1.41)

ClientApp = Callable[[Message, Context], Message]


def set_task_identity() -> None:
    """Flower >= 1.41 stamps every new Message with the run/node/task of its process, which a
    runtime sets; outside one, this process plays all three."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LocalGrid(Grid):
    """Node 1000 + i has node config `node_configs[i]`; a pushed message is answered at once."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any]) -> None:
        set_task_identity()
        self._client_app = client_app
        self._ids = itertools.count(1)
        self._nodes = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=cfg, state=RecordDict(), run_config=run_config)
            for i, cfg in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
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

    def deliver(self, node_id: int, reply: Message) -> Message:
        """What the server receives for `reply` (the reply itself; tests put a forger here)."""
        return reply

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
            self._replies[mid] = self.deliver(node, reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_local(client_app: ClientApp, run_config: dict[str, Any], num_nodes: int,
              grid_type: type[LocalGrid] = LocalGrid, **grid_kwargs: Any) -> LocalGrid:
    """Run the lab's ServerApp over `num_nodes` in-process copies of `client_app` (one per
    partition), with the run config `flwr run` would pass; returns the grid (its `sent` counts the
    messages). The caller names the ClientApp: one app does not import the other."""
    from server.app import app as server_app

    grid = grid_type(client_app, [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)],
                     run_config, **grid_kwargs)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid
