"""`fl-lab reproduce CARD`: run a reproduction card's cells as real Flower runs and judge them.

Each distinct resolved experiment (the error and the ASR of one rule x attack share one) runs once
per seed in `DIR/runs/<slug>`; a finished run with the same training config is reused
(`commands.run_reuse`), and an interrupted run continues after its last checkpoint, so an
interrupted card resumes where it stopped. Writes
`DIR/reproduction.json` and `DIR/reproduction.md` (paper vs lab, the source of each value, and
whether it ran as the CPU proxy, and each cell's `notes`: what the lab measured about it). With
`score_only` (`--score`) nothing starts: the card is judged as it stands, cells without a finished
run reading `not-run`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from commands.card_expect import expect_text, read_metric, read_reading, verdict
from commands.card_record import is_recorded, read_record
from commands.cards import Card, Cell
from commands.local_run import run_all
from commands.run_reuse import continuing, finished_run, run_identity
from lab.artifacts import atomic_write_text, read_jsonl
from lab.config import ExperimentConfig

Runner = Callable[[ExperimentConfig, Path], dict[str, Any]]


def run_slug(cell: Cell, seed: int) -> str:
    """`RULE__ATTACK[__HASH]__seedS`: the hash names what the cell adds (its overrides, its rule parameters)."""
    extra = ""
    if cell.overrides or cell.params:
        own = "\n".join(cell.overrides) + (f"\n{json.dumps(cell.params, sort_keys=True)}" if cell.params else "")
        extra = "__" + hashlib.sha256(own.encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{cell.rule}__{cell.attack}{extra}__seed{seed}")


def planned_runs(card: Card, out: Path) -> list[tuple[Path, ExperimentConfig]]:
    """The distinct runs of the card, in cell order: (run folder, experiment)."""
    runs: dict[str, tuple[Path, ExperimentConfig]] = {}
    for cell in card.cells:
        for seed, cfg in zip(card.seeds, cell.cfgs):
            runs.setdefault(run_identity(cfg), (out / "runs" / run_slug(cell, seed), cfg))
    return list(runs.values())


def reproduce(card: Card, out: Path, runner: Runner,
              on_start: Callable[[int, int, Path, str], None] | None = None, jobs: int = 1,
              score_only: bool = False, measured: Path | None = None) -> dict[str, Any]:
    """Run (or reuse) every run of the card (`jobs` at a time: see `commands.sweep.run_all`), then
    write and return reproduction.json's content.

    `score_only` starts nothing: a card too long for one sitting is run in parts (`--cells`, on
    several machines or days) and scored as it stands; a cell without a finished run reads `not-run`,
    with how far its run got. A run the card's record (`measured`, see `commands.card_record`)
    holds is read from there, unless `out` has its own finished run."""
    runs = planned_runs(card, out)
    folder: dict[str, Path] = {}
    finished: dict[str, bool] = {}
    records: dict[str, dict[str, Any]] = {}
    for run_dir, cfg in runs:
        key = run_identity(cfg)
        folder[key], finished[key] = run_dir, finished_run(run_dir, cfg)
        if measured is not None and not finished[key] and is_recorded(measured / run_dir.name, cfg):
            folder[key], finished[key] = measured / run_dir.name, True
            records[key] = read_record(measured / run_dir.name)

    def one(i: int, run_dir: Path, cfg: ExperimentConfig, reuse: bool) -> None:
        run_cfg = cfg if reuse else continuing(run_dir, cfg)
        if on_start is not None:
            on_start(i, len(runs), run_dir, "finished: reused" if reuse else
                     "interrupted: continues after its last checkpoint" if run_cfg.execution.resume else "")
        if not reuse:
            runner(run_cfg, run_dir)

    if not score_only:
        run_all([functools.partial(one, i, run_dir, cfg, finished[run_identity(cfg)])
                 for i, (run_dir, cfg) in enumerate(runs)], jobs)
        finished = dict.fromkeys(finished, True)
    means: dict[str, float | None] = {}
    cells = []
    for cell in card.cells:
        done = [cfg for cfg in cell.cfgs if finished[run_identity(cfg)]]
        values = [round(v, 6) for cfg in done
                  if (v := read_metric(cell.metric, folder[run_identity(cfg)], cell.at_round)) is not None]
        rounds = cell.cfgs[0].training.rounds
        means[cell.id] = statistics.mean(values) if values else None
        cells.append({
            "id": cell.id, "rule": cell.rule, "attack": cell.attack, "metric": cell.metric,
            "params": dict(cell.params), "at_round": cell.at_round,
            "paper": cell.paper, "expect": None if cell.expect is None else dict(cell.expect),
            "source": cell.source, "proxy": card.proxy,
            "ours": {"mean": means[cell.id], "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "values": values},
            "rounds": rounds, "paper_rounds": cell.paper_rounds, "reduced": rounds < cell.paper_rounds,
            "runs": [str(folder[run_identity(cfg)]) for cfg in cell.cfgs],
            "recorded": [records[run_identity(cfg)] for cfg in cell.cfgs if run_identity(cfg) in records],
            "ran": len(done) == len(cell.cfgs),
            "progress": [run_progress(folder[run_identity(cfg)], cell.metric) for cfg in cell.cfgs
                         if not finished[run_identity(cfg)]],
            "notes": cell.notes,
        })
    ran = {c["id"]: c["ran"] for c in cells}
    for c in cells:  # relative expectations need the other cell's mean
        other = (c["expect"] or {}).get("relative_to")
        if other is not None:
            c["against"] = {"id": other, "mean": means.get(other)}
        c["verdict"] = (verdict(c["expect"], c["ours"]["mean"], means.get(other) if other else None)
                        if c["ran"] and ran.get(other, True) else "not-run")
    result = {"card": card.name, "paper": card.paper, "path": str(card.path), "proxy": card.proxy,
              "subset": card.subset, "subset_label": card.subset_label, "seeds": list(card.seeds),
              "scored_only": score_only, "cells": cells}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "reproduction.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "reproduction.md", reproduction_markdown(result))
    return result


def run_progress(run_dir: Path, metric: str) -> dict[str, Any]:
    """How far an unfinished run got: its last round and its last central evaluation's reading
    (None: never started, or nothing evaluated yet). Only shown, never judged."""
    rows = read_jsonl(run_dir / "metrics.jsonl")  # a killed run's torn last line is skipped
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else None
    return {"run": str(run_dir), "round": max((r.get("round", 0) for r in rows), default=None),
            "evaluated_round": None if last is None else last["round"],
            "reading": None if last is None else read_reading(metric, last)}


def _rounds_text(cell: dict[str, Any]) -> str:
    """`40`, `round 19 of 40`, `reduced: 300 of 3000 rounds`, both, or how far an unfinished run got."""
    if not cell.get("ran", True):
        return "; ".join(_progress_text(p, cell["rounds"], cell["metric"]) for p in cell["progress"])
    ran = str(cell["rounds"]) if cell.get("at_round") is None else f"round {cell['at_round']} of {cell['rounds']}"
    if not cell.get("reduced"):
        return ran
    reduced = f"reduced: {cell['rounds']} of {cell['paper_rounds']} rounds"
    return reduced if cell.get("at_round") is None else f"{ran} ({reduced})"


def _progress_text(progress: dict[str, Any], rounds: int, metric: str) -> str:
    if not progress["round"]:
        return "not started"
    text = f"stopped at round {progress['round']} of {rounds}"
    if progress["reading"] is not None:
        text += f" ({metric} {progress['reading']:.3f} at round {progress['evaluated_round']}, not judged)"
    return text


def reproduction_markdown(result: dict[str, Any]) -> str:
    proxy = result["proxy"]
    title = f"# Reproduction: {result['card']}" + (" (CPU PROXY, --quick)" if proxy else "")
    lines = [title, "", f"Paper: {result['paper'] or '-'}. Seeds: {result['seeds']}."]
    if proxy:
        lines.append("Ran as the card's CPU proxy: the expectations checked are the proxy's own (measured by "
                     "the lab), not the paper's; the paper's values are shown for reference only.")
    if result.get("subset"):
        lines.append(f"Subset `{result['subset']}` of the card: {result.get('subset_label') or '-'}.")
    if any(c.get("reduced") for c in result["cells"]):
        lines.append("Cells marked `reduced` ran fewer rounds than the paper's setting: their verdicts hold the "
                     "lab's value at that length against the paper's at the paper's length.")
    verdicts = ["reproduced", "off", "lab-only"]
    if result.get("scored_only"):
        ran = sum(c.get("ran", True) for c in result["cells"])
        lines.append(f"Scored without running anything (`--score`): {ran} of {len(result['cells'])} cells have "
                     "every run finished; the others read `not-run`, with how far their runs got.")
        verdicts.append("not-run")
    counts = {v: sum(c["verdict"] == v for c in result["cells"]) for v in verdicts}
    lines += ["", ", ".join(f"{n} {v}" for v, n in counts.items()), "",
              "| cell | metric | paper | paper source | expected" + (" (proxy)" if proxy else "")
              + " | source | lab (mean ± sd) | rounds | verdict |", "|" + "---|" * 9]
    for c in result["cells"]:
        ours = c["ours"]
        lab = "-" if ours["mean"] is None else f"{ours['mean']:.3f}" + (
            f" ± {ours['sd']:.3f}" if ours["sd"] is not None else "")
        if c.get("against") and c["against"]["mean"] is not None:
            lab += f" ({c['against']['id']}: {c['against']['mean']:.3f})"
        paper = c["paper"] or {}
        lines.append(f"| {c['id']} | {c['metric']} | {expect_text(paper.get('expect'))} | "
                     f"{paper.get('source') or '-'} | {expect_text(c['expect'])} | {c['source'] or '-'} | {lab} | "
                     f"{_rounds_text(c)} | {c['verdict']}{' (proxy)' if proxy else ''} |")
    recorded = {r["run"]: r for c in result["cells"] for r in c.get("recorded", [])}
    if recorded:
        lines += ["", "## Runs read from the card's record (`fl-lab reproduce --record`)", ""]
        lines += [f"- `{r['run']}`: recorded {r['recorded']} on {r['machine']} (lab commit "
                  f"{r['commit_when_recorded'] or '-'})" + ("" if r.get("seconds") is None else
                                                          f", the run took {r['seconds'] / 60:.0f} min")
                  for r in recorded.values()]
    noted = [c for c in result["cells"] if c.get("notes")]
    if noted:
        lines += ["", "## What the lab measured about these cells", ""]
        lines += [f"- `{c['id']}` ({c['verdict']}): {' '.join(c['notes'].split())}" for c in noted]
    return "\n".join(lines) + "\n"
