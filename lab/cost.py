"""What one call costs: wall seconds and the peak memory it needed beyond what was resident before.

torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the peak is the
kernel's: the process's high-water mark (VmHWM in /proc/self/status) is reset just before the call
(writing 5 to /proc/self/clear_refs, Linux >= 4.0) and read after it; the cost is VmHWM - VmRSS
before. Memory the allocator already holds (pages a freed object left resident) costs nothing and
reads 0: the number is what the call added to the process, not what it touched. Where the reset is
not allowed (not Linux, a locked-down /proc) the peak is None, never a guess. The reset touches
only that counter. The aggregation rules run on CPU tensors, so CUDA memory is not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Cost:
    seconds: float
    peak_mb: float | None  # resident memory beyond the start, at the call's peak (None: not measurable)


def _status_kb(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def measured(fn: Callable[[], T]) -> tuple[T, Cost]:
    """Run `fn()` and return its result with its `Cost`."""
    base = _status_kb("VmRSS")
    exact = base is not None and _reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") if exact else None
    peak_mb = None if peak is None or base is None else max(peak - base, 0) / 1024
    return result, Cost(seconds, peak_mb)
