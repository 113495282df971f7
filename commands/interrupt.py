"""Ctrl-C during a run: stop at the next round boundary, and say what the run folder keeps.

The ServerApp runs in another process (flwr-simulation, or a SuperExec in deployment), and `flwr
stop` takes seconds to arrive: enough for a fast experiment to run every remaining round and write
a summary.json that claims a complete run. So the launcher first writes STOP_FILE into the run
folder; the ServerApp looks for it after each round's metrics line and checkpoint (server/app.py,
same name) and returns there, writing no final model and no summary. `flwr stop` follows only when
no boundary comes within STOP_GRACE seconds or a second Ctrl-C asks for it.
"""

from __future__ import annotations

import re
from pathlib import Path

from lab.artifacts import atomic_write_text, read_jsonl
from lab.runfolder import STOP_FILE

STOP_GRACE = 60.0  # seconds: a deployment round of the default experiment takes about one minute


RESUME_FLAG = "`--set execution.resume=true`"


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or SIGTERM); the message says after which round, what is kept, and
    (`resume_after`: its last checkpoint) how it continues."""

    def __init__(self, where: str, resume_after: int | None = None, how: str = RESUME_FLAG) -> None:
        self.where, self.resume_after = where, resume_after
        super().__init__(where if resume_after is None else f"{where}; {how} continues after round {resume_after}")

    def continued_by(self, how: str) -> RunInterrupted:
        """The same stop, continued another way (a card or a sweep continues its unfinished runs
        by itself: the same command, no flag)."""
        return RunInterrupted(self.where, self.resume_after, how)


def request_stop(run_dir: Path) -> None:
    atomic_write_text(run_dir / STOP_FILE, "fl-lab was interrupted: stop after the current round\n")


def clear_stop(run_dir: Path) -> None:
    """Before a run starts (a stale request would stop it after round 0) and after it ends."""
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def interrupted_where(run_dir: Path, total: int) -> RunInterrupted:
    """'interrupted after round 4 of 10: DIR keeps rounds 1-4 (checkpoints, metrics); ...'."""
    if (run_dir / "summary.json").exists():
        return RunInterrupted(f"interrupted after the run had finished: {run_dir} holds all {total} rounds and summary.json")
    rounds = sorted({int(r["round"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "round" in r} - {0})
    if not rounds:
        return RunInterrupted(f"interrupted before round 1 of {total} finished: {run_dir} keeps no round")
    last = rounds[-1]
    saved = sorted(int(m.group(1)) for f in (run_dir / "checkpoints").glob("round_*.safetensors")
                   if (m := re.fullmatch(r"round_(\d+)\.safetensors", f.name)))
    if saved and saved[-1] == last:
        kept = "checkpoints, metrics"
    else:
        kept = f"metrics, checkpoints up to round {saved[-1]}" if saved else "metrics, no checkpoint"
    return RunInterrupted(f"interrupted after round {last} of {total}: {run_dir} keeps rounds {rounds[0]}-{last} ({kept})",
                          saved[-1] if saved else None)
