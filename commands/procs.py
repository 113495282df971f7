"""Finding and stopping the processes a Flower run leaves around, by PID, never by name.

Flower starts some of its processes detached (flower-superexec spawns `flwr-simulation` and
`flwr-clientapp` in sessions of their own), so stopping a SuperLink's process group is not enough:
the family of a run is its root processes, their descendants and process groups, and any process
whose environment carries the run's private FLWR_HOME.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, starttime) of a live process, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return rest[0], int(rest[1]), int(rest[2]), int(rest[19])


def running(pid: int, start: int) -> bool:
    """Is `pid` still the live process that started at `start` (not a zombie, not a recycled PID)?"""
    st = stat(pid)
    return st is not None and st[0] != "Z" and st[3] == start


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def uses_home(pid: int, flwr_home: Path) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"FLWR_HOME={flwr_home}".encode() in env.split(b"\0")


def family(roots: Iterable[int], flwr_home: Path) -> list[int]:
    """Live PIDs of a run: `roots`, their descendants, anything in their process groups, and any
    process (an orphan too, e.g. a `flwr-clientapp` whose SuperNode died) whose environment carries
    our private FLWR_HOME. Never anything selected by name."""
    roots = set(roots)
    stats = {pid: s for pid in all_pids() if (s := stat(pid)) is not None and s[0] != "Z"}
    members = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (_, ppid, pgid, _) in stats.items():
            if pid not in members and (ppid in members or pgid in roots):
                members.add(pid)
                changed = True
    me = os.getpid()
    members |= {pid for pid in stats if pid != me and uses_home(pid, flwr_home)}
    members.discard(me)
    return sorted(members)


def terminate(pids: Iterable[int], grace: float = 10.0) -> list[int]:
    """SIGTERM, wait up to `grace` s, SIGKILL the rest; returns PIDs still alive (should be [])."""
    starts = {pid: st[3] for pid in pids if (st := stat(pid)) is not None}

    def same(pid: int) -> bool:
        return running(pid, starts[pid])

    for pid in starts:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(same(p) for p in starts):
        time.sleep(0.2)
    for pid in starts:
        if same(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    return [p for p in starts if same(p)]
