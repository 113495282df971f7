"""What the server takes from a client reply: checked numbers, and who the reply is from.

Pure checks, no Flower: the thin wrapper (`strategies.flower`) and the capture hook call them.
A reply is the client's to write, so every value may have any type; a check that fails raises
`ReplyError` with a reason for `failures` in metrics.jsonl.

Identity. A reply's SuperNode id (`msg.metadata.src_node_id`) comes from the authenticated
channel; the `partition-id` in its metrics is only a claim. `IdentityBook` binds each node to the
partition it first claims, and each partition to one node, so the rules (FoolsGold's and
FL-Defender's histories) and the records key on a partition that only its node can speak for, and
that stays stable when node ids do not (a resumed run):

- a node that claims another partition than the one it holds is refused;
- a partition a node holds is refused to every other node;
- a partition no node holds yet, claimed by several nodes in one round, is refused to all of them:
  arrival order decides nothing, so an attacker cannot take a partition by replying first;
- a binding ends when its node is no longer connected (a restarted SuperNode comes back under a
  new id and claims its partition again).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

from lab.errors import ReplyError

# A count of training examples no real partition comes near; beyond it a weight is an attack
# (1e39 examples overflows float32 and turns a weighted mean into NaN).
MAX_EXAMPLES = 2**31 - 1


def describe(value: object, limit: int = 40) -> str:
    """A short repr of a client-chosen value, safe to log and to write in metrics.jsonl."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_number(name: str, value: object) -> float:
    """`value` as a finite float; ReplyError for a missing, non-numeric or non-finite value."""
    if value is None:
        raise ReplyError(f"{name} missing")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ReplyError(f"{name} must be a number, got {describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ReplyError(f"{name} must be finite, got {describe(value)}")
    return number


def read_examples(value: object) -> float:
    """num-examples: a number in (0, MAX_EXAMPLES]."""
    n = read_number("num-examples", value)
    if not 0 < n <= MAX_EXAMPLES:
        raise ReplyError(f"num-examples must be in (0, {MAX_EXAMPLES}], got {describe(value)}")
    return n


def read_loss(value: object) -> float | None:
    """train-loss: optional, a finite number when given."""
    return None if value is None else read_number("train-loss", value)


def read_partition(value: object, num_partitions: int | None = None) -> int:
    """partition-id: an integer in [0, num_partitions) (any integer >= 0 when that is None)."""
    if value is None:
        raise ReplyError("partition-id missing")
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ReplyError(f"partition-id must be an integer, got {describe(value)}")
    if value < 0 or (num_partitions is not None and value >= num_partitions):
        upper = "" if num_partitions is None else num_partitions
        raise ReplyError(f"partition-id {describe(value)} is outside [0, {upper})")
    return int(value)


@dataclass(frozen=True)
class Refusal:
    node_id: int
    partition: int | None
    reason: str

    def as_failure(self) -> dict[str, object]:
        return {"node_id": self.node_id, "partition": self.partition, "reason": self.reason}


@dataclass(frozen=True)
class Settled:
    partition_of: dict[int, int]  # node id -> partition, for the replies accepted
    refused: list[Refusal]  # by node id


class IdentityBook:
    """Binds authenticated node ids to the partitions they claim (module docstring)."""

    def __init__(self, num_partitions: int | None = None) -> None:
        self.num_partitions = num_partitions
        self.partition_of: dict[int, int] = {}  # node id -> partition
        self.node_of: dict[int, int] = {}  # partition -> node id

    def settle(self, claims: Sequence[tuple[int, object]]) -> Settled:
        """Who each of a round's replies is, from (node id, claimed partition-id) pairs; binds the
        nodes accepted for the first time. Settling the same claims again gives the same answer,
        so the capture hook and the strategy may both ask."""
        refused: list[Refusal] = []
        replies = Counter(node for node, _ in claims)
        valid: list[tuple[int, int]] = []
        for node, claim in claims:
            if replies[node] > 1:
                refused.append(Refusal(node, None, f"node {node} sent {replies[node]} replies in one round"))
                continue
            try:
                partition = read_partition(claim, self.num_partitions)
            except ReplyError as exc:
                refused.append(Refusal(node, None, str(exc)))
                continue
            held, owner = self.partition_of.get(node), self.node_of.get(partition)
            if held is not None and held != partition:
                refused.append(Refusal(node, partition, f"node {node} holds partition {held}, not {partition}"))
            elif owner is not None and owner != node:
                refused.append(Refusal(node, partition, f"partition {partition} is held by node {owner}"))
            else:
                valid.append((node, partition))
        # Only a partition nobody holds yet can have several valid claimants.
        claimants = Counter(partition for _, partition in valid)
        accepted: dict[int, int] = {}
        for node, partition in valid:
            if claimants[partition] > 1:
                why = f"partition {partition} claimed by {claimants[partition]} nodes in one round"
                refused.append(Refusal(node, partition, why))
            else:
                accepted[node] = partition
        self.partition_of.update(accepted)
        self.node_of.update({partition: node for node, partition in accepted.items()})
        return Settled(accepted, sorted(refused, key=lambda r: r.node_id))

    def release_absent(self, connected: Iterable[int]) -> list[int]:
        """End the bindings of nodes that are no longer connected; returns those node ids."""
        present = set(connected)
        gone = [node for node in self.partition_of if node not in present]
        for node in gone:
            del self.node_of[self.partition_of.pop(node)]
        return gone
