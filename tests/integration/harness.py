"""Run the ServerApp and ClientApp in-process (server/local_grid.py), with a hook that lets a test
tamper with the replies the server receives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Message, RecordDict

from server.local_grid import LocalGrid, run_local, set_task_identity

__all__ = ["FakeGrid", "forge", "run_in_process", "set_task_identity"]


class FakeGrid(LocalGrid):
    """The lab's in-process grid; `tamper(node_id, reply)` may replace a reply (a forger, an error)."""

    def __init__(self, client_app: Callable[[Message, Any], Message], node_configs: list[dict[str, Any]],
                 run_config: dict[str, Any], tamper: Callable[[int, Message], Message] | None = None) -> None:
        super().__init__(client_app, node_configs, run_config)
        self._tamper = tamper

    def deliver(self, node_id: int, reply: Message) -> Message:
        return reply if self._tamper is None else self._tamper(node_id, reply)


def run_in_process(run_config: dict[str, Any], num_nodes: int, **grid_kwargs: Any) -> FakeGrid:
    from client.app import app as client_app

    grid = run_local(client_app, run_config, num_nodes, FakeGrid, **grid_kwargs)
    assert isinstance(grid, FakeGrid)
    return grid


def forge(reply: Message, content: RecordDict) -> Message:
    """A reply with `content` from the same node: what a malicious ClientApp can send. The
    content is the client's to choose; the sender (`src_node_id`, the authenticated channel) is not."""
    instruction = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type)
    instruction.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return Message(content, reply_to=instruction)
