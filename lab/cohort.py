"""Cohort execution: several simulated clients trained by one Flower message.

Flower's simulation pays a fixed cost per message (about 12 ms on the CI's 2 cores: routing, the
global model serialised into every message, an actor call), which at paper scale (100 clients per
round, one minibatch each) costs as much as the training itself. In a cohort round the server sends
one message per worker node, carrying the partition ids it is to train; the ClientApp trains them
one after the other with exactly the code and seeds of a single client, and replies with one update
per partition. Nothing else changes: a malicious partition is still one client, every update is
still one row of the server's matrix, and the results equal one message per client (tested).

Simulation only: a deployed SuperNode holds one partition and refuses a cohort order. The server
assigns the partitions, so a cohort reply's rows are keyed by what the server asked, not by claims.

The message format (both sides import these names):
- request: the usual `arrays` and `config` records, with `config[COHORT_KEY]` the list of partition
  ids;
- reply: for each partition p, an ArrayRecord `arrays_key(p)` and a MetricRecord `metrics_key(p)`.
"""

from __future__ import annotations

import math
import os
from typing import Literal

COHORT_KEY = "cohort"
RUN_CONFIG_KEY = "cohort-size"  # clients per message, chosen at launch; absent or 1: one per client
# The replies of one message travel and are decoded together; above this a cohort is split into more
# messages (a ResNet-18 update is 45 MB, so 50 of them in one reply would hold 2.2 GB at once).
MAX_COHORT_BYTES = 256 * 2**20


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def arrays_key(partition: int) -> str:
    return f"arrays.{partition}"


def metrics_key(partition: int) -> str:
    return f"metrics.{partition}"


def clients_per_message(mode: Literal["auto", "per-client", "cohort"], round_size: int, workers: int,
                        model_bytes: int) -> int:
    """How many clients one simulation message carries (1: one message per client, Flower's way).

    `cohort` and `auto` spread the round's clients evenly over the workers, at most MAX_COHORT_BYTES of
    weights per message. `auto` keeps one message per client when that sends no more messages than
    there are workers (nothing to save) or when a single client's weights exceed the budget. The
    rule is measured, not guessed: bench/RESULTS.md (issue 15) shows a cohort never slower than one
    message per client at the sizes it allows, and 12 ms per message saved.
    """
    if mode == "per-client" or round_size <= 1:
        return 1
    even = math.ceil(round_size / max(1, workers))
    fit = max(1, MAX_COHORT_BYTES // max(1, model_bytes))
    size = min(even, fit)
    if mode == "auto" and size <= 1:
        return 1
    return max(1, size)


def split_evenly(partitions: list[int], parts: int) -> list[list[int]]:
    """`partitions` in `parts` consecutive chunks whose sizes differ by at most one (no empty chunk)."""
    parts = max(1, min(parts, len(partitions)))
    base, extra = divmod(len(partitions), parts)
    chunks, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        chunks.append(partitions[start : start + size])
        start += size
    return chunks
