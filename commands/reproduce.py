"""`fl-lab reproduce CARD`: run a reproduction card's cells as real Flower runs and judge them.

Each distinct resolved experiment (the error and the ASR of one rule x attack share one) runs once
per seed in `DIR/runs/<slug>`; a finished run with the same training config is reused
(`commands.sweep.same_run`), so an interrupted card resumes where it stopped. Writes
`DIR/reproduction.json` and `DIR/reproduction.md` (paper vs lab, the source of each value, and
whether it ran as the CPU proxy).
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commands.cards import Card, Cell, metric_value, verdict
from commands.sweep import run_identity, same_run
from lab.artifacts import atomic_write_text
from lab.config import ExperimentConfig

Runner = Callable[[ExperimentConfig, Path], dict[str, Any]]


def run_slug(cell: Cell, seed: int) -> str:
    extra = ""
    if cell.overrides:
        extra = "__" + hashlib.sha256("\n".join(cell.overrides).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{cell.rule}__{cell.attack}{extra}__seed{seed}")


def planned_runs(card: Card, out: Path) -> list[tuple[Path, ExperimentConfig]]:
    """The distinct runs of the card, in cell order: (run folder, experiment)."""
    runs: dict[str, tuple[Path, ExperimentConfig]] = {}
    for cell in card.cells:
        for seed, cfg in zip(card.seeds, cell.cfgs):
            runs.setdefault(run_identity(cfg), (out / "runs" / run_slug(cell, seed), cfg))
    return list(runs.values())


def reproduce(card: Card, out: Path, runner: Runner,
              on_start: Callable[[int, int, Path, bool], None] | None = None) -> dict[str, Any]:
    """Run (or reuse) every run of the card, then write and return reproduction.json's content."""
    runs = planned_runs(card, out)
    folder = {run_identity(cfg): run_dir for run_dir, cfg in runs}
    for i, (run_dir, cfg) in enumerate(runs):
        reuse = (run_dir / "summary.json").exists() and same_run(run_dir, cfg)
        if on_start is not None:
            on_start(i, len(runs), run_dir, reuse)
        if not reuse:
            runner(cfg, run_dir)
    cells = []
    for cell in card.cells:
        values, rounds = [], None
        for cfg in cell.cfgs:
            summary = json.loads((folder[run_identity(cfg)] / "summary.json").read_text())
            rounds = summary.get("rounds", cfg.training.rounds)
            v = metric_value(cell.metric, summary)
            if v is not None:
                values.append(round(v, 6))
        mean = statistics.mean(values) if values else None
        cells.append({
            "id": cell.id, "rule": cell.rule, "attack": cell.attack, "metric": cell.metric,
            "paper": cell.paper, "expect": None if cell.expect is None else dict(cell.expect),
            "source": cell.source, "proxy": card.proxy,
            "ours": {"mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else None, "values": values},
            "rounds": rounds, "runs": [str(folder[run_identity(cfg)]) for cfg in cell.cfgs],
            "verdict": verdict(cell.expect, mean),
        })
    result = {"card": card.name, "paper": card.paper, "path": str(card.path), "proxy": card.proxy,
              "seeds": list(card.seeds), "cells": cells}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "reproduction.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "reproduction.md", reproduction_markdown(result))
    return result


def _expect_text(expect: Any) -> str:
    if not expect:
        return "-"
    if "value" in expect:
        return f"{expect['value']:g} ± {expect['tolerance']:g}"
    return f"<= {expect['max']:g}" if "max" in expect else f">= {expect['min']:g}"


def reproduction_markdown(result: dict[str, Any]) -> str:
    proxy = result["proxy"]
    title = f"# Reproduction: {result['card']}" + (" (CPU PROXY, --quick)" if proxy else "")
    lines = [title, "", f"Paper: {result['paper'] or '-'}. Seeds: {result['seeds']}."]
    if proxy:
        lines.append("Ran as the card's CPU proxy: the expectations checked are the proxy's own (measured by "
                     "the lab), not the paper's; the paper's values are shown for reference only.")
    counts = {v: sum(c["verdict"] == v for c in result["cells"]) for v in ("reproduced", "off", "lab-only")}
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items()), "",
              "| cell | metric | paper | paper source | expected" + (" (proxy)" if proxy else "")
              + " | source | lab (mean ± sd) | rounds | verdict |", "|" + "---|" * 9]
    for c in result["cells"]:
        ours = c["ours"]
        lab = "-" if ours["mean"] is None else f"{ours['mean']:.3f}" + (
            f" ± {ours['sd']:.3f}" if ours["sd"] is not None else "")
        paper = c["paper"] or {}
        lines.append(f"| {c['id']} | {c['metric']} | {_expect_text(paper.get('expect'))} | "
                     f"{paper.get('source') or '-'} | {_expect_text(c['expect'])} | {c['source'] or '-'} | {lab} | "
                     f"{c['rounds']} | {c['verdict']}{' (proxy)' if proxy else ''} |")
    return "\n".join(lines) + "\n"
