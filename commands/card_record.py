"""A card's measured runs, kept in the repository beside the card.

A card at paper scale takes tens of hours on 2 cores, so it is run in parts, over sessions and
machines, and run folders (`runs/`, not versioned) do not travel with the repository.
`fl-lab reproduce CARD --record` copies what each finished run of the card proves (its config.yaml,
its summary.json and the evaluated rounds of its metrics.jsonl) to
`<card's folder>/measured/<card folder name>/<run slug>/`, with a record.json saying when and on
what machine it was recorded, the run's seconds and torch, and the lab's commit at recording.
`reproduce` reads a recorded run like a finished run of its own, and only when it trained exactly
what the cell asks (`commands.run_reuse.same_run`): a card edited since runs that cell again instead of
mixing in a stale number.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from commands.cards import Card
from commands.run_reuse import finished_run
from lab.artifacts import atomic_write_text, read_jsonl, write_json
from lab.config import ExperimentConfig

RECORD = "record.json"


def card_folder(card: Card) -> str:
    """The folder a card's runs go to under runs/reproduce/ and measured/: `NAME`, `NAME-quick`
    for the CPU proxy, `NAME-SUBSET` for a labelled subset."""
    return f"{card.name}-quick" if card.proxy else f"{card.name}-{card.subset}" if card.subset else card.name


def measured_dir(card: Card) -> Path:
    """Where the card's recorded runs live: `measured/<card folder>` beside the card file."""
    return card.path.parent / "measured" / card_folder(card)


def is_recorded(record_dir: Path, cfg: ExperimentConfig) -> bool:
    """Does `record_dir` hold a recorded run that trained exactly `cfg`?"""
    return (record_dir / RECORD).exists() and finished_run(record_dir, cfg)


def read_record(record_dir: Path) -> dict[str, Any]:
    return json.loads((record_dir / RECORD).read_text())


def record_run(run_dir: Path, record_dir: Path) -> None:
    """Copy the finished run in `run_dir` to `record_dir`, its metrics.jsonl cut to what a card
    reads: the evaluated rounds, their scalar readings. The rest (per-round client lists, weights,
    norms: 29 MB for 3,000 rounds of 100 clients) would swell the repository for nothing judged."""
    evaluated = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                 for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("accuracy") is not None]
    summary = json.loads((run_dir / "summary.json").read_text())
    record_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.yaml", record_dir / "config.yaml")
    shutil.copyfile(run_dir / "summary.json", record_dir / "summary.json")
    atomic_write_text(record_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in evaluated))
    write_json(record_dir / RECORD, {
        "run": run_dir.name,
        "recorded": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "commit_when_recorded": _lab_commit(),
        "seconds": summary.get("seconds"),
        "torch": summary.get("torch"),
    })


def _lab_commit() -> str | None:
    """The lab's git commit, when the lab runs from a checkout (None from an installed wheel)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def record_finished(runs: list[tuple[Path, ExperimentConfig]], measured: Path) -> list[str]:
    """Record every run of `runs` that finished in its own folder (a rerun replaces its record);
    returns their folder names."""
    done = [run_dir for run_dir, cfg in runs if finished_run(run_dir, cfg)]
    for run_dir in done:
        record_run(run_dir, measured / run_dir.name)
    return [run_dir.name for run_dir in done]
