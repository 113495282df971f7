"""What the commands print: one line per round, and a lab error as one line with an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lab.config import ExperimentConfig
from lab.errors import ConfigError, LabError


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress_printer(cfg: ExperimentConfig, label: str = "") -> Callable[[dict[str, Any]], None]:
    """A per-round terminal line: round, accuracy, ASR, elapsed seconds."""
    total = cfg.training.rounds
    prefix = f"[{label}] " if label else ""

    def show(row: dict[str, Any]) -> None:
        acc, asr = row.get("accuracy"), row.get("asr")
        dropped = row.get("dropped")
        extra = f"  dropped {dropped}" if dropped else ""
        if acc is None:  # a round without central evaluation (training.eval_every)
            scores = "not evaluated"
        else:
            scores = f"accuracy {acc:.4f}  asr {'-' if asr is None else f'{asr:.3f}'}"
        say(f"{prefix}round {row['round']:>3}/{total}  {scores}  ({row.get('seconds', 0.0):.1f} s){extra}")

    return show


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command body; lab errors become one line on stderr and an exit code, not a traceback:
    2 for an invalid experiment, 1 for a failed run, 130 for Ctrl-C."""
    try:
        return body()
    except ConfigError as exc:
        sys.stderr.write(f"{prog}: invalid experiment:{'' if len(exc.problems) > 1 else ' '}{exc}\n")
        return 2
    except LabError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    except KeyboardInterrupt as exc:  # a run's RunInterrupted says where it stopped
        sys.stderr.write(f"{prog}: {str(exc) or 'interrupted'}\n")
        return 130
