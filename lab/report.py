"""`fl-lab report FOLDER`: the experiment report, as Markdown and as one self-contained HTML file.

    fl-lab report runs/default            # one run
    fl-lab report runs/demo               # a folder of runs (the demo: FedAvg, a defense, no attack)
    fl-lab report runs/sweeps/defenses    # a sweep folder (results.md + every run under runs/)

Reads only what the tools wrote (config.yaml, metrics.jsonl, summary.json, inversion/*/metrics.json
and recon.png, verification.json, unlearning/metrics.json, the demo's demo.json) and writes
FOLDER/report.md, FOLDER/report.html (images embedded as base64 data URIs, so the file opens in a
browser with no server) and FOLDER/plots/*.png. Every section is always present; one whose inputs
are missing says so, so a reader never wonders whether it was forgotten.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab import log as lablog
from lab.artifacts import atomic_write_text, read_jsonl
from lab.errors import LabError

log = logging.getLogger(__name__)

# The section headings, in order; tests check that every report has all of REQUIRED.
HEADLINE = "Headline numbers"
ROUNDS = "Accuracy and ASR per round"
NORMS = "Client update norms"
DETECTION = "Detection"
RECON = "Reconstruction"
UNLEARNING = "Unlearning"
SWEEP = "Sweep results"
CONFIG = "Resolved config"
REPRO = "Reproducibility"
REQUIRED = (HEADLINE, ROUNDS, NORMS, DETECTION, RECON, UNLEARNING, CONFIG, REPRO)

# A reconstruction shows "the trigger in place" when the true trigger box is this much brighter than
# the rest of the image (pixel scale [0, 1]; scoring only, inversion's `trigger_contrast`).
TRIGGER_CONTRAST = 0.2
NORM_PANELS = 12  # at most this many runs get an update-norm panel (sweeps have dozens)


# ------------------------------------------------------------------------------------------
# The blocks a section is made of, rendered to both Markdown and HTML.


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    path: Path  # inside the report folder
    caption: str


@dataclass(frozen=True)
class Code:
    text: str
    title: str = ""


Block = Para | Table | Image | Code


@dataclass
class Run:
    """One run folder, read back."""

    path: Path
    label: str
    config: dict[str, Any]
    config_text: str
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]  # metrics.jsonl without round 0
    role: str | None = None
    floor: float | None = None

    @property
    def rule(self) -> str:
        return str(self.summary.get("strategy") or self.config.get("federated", {}).get("aggregator", {}).get("name"))

    @property
    def attack(self) -> dict[str, Any]:
        return dict(self.config.get("attack") or {})

    @property
    def attacked(self) -> bool:
        return self.attack.get("type", "none") != "none"

    @property
    def attack_label(self) -> str:
        a = self.attack
        if not self.attacked:
            return "no attack"
        text = str(a.get("type"))
        if a.get("boost") not in (None, 1, 1.0):
            text += f", boost {a['boost']}"
        if a.get("norm_bound") is not None:
            text += f", norm bound {a['norm_bound']}"
        return text


@dataclass
class Collection:
    folder: Path
    runs: list[Run]
    kind: str  # "run" | "runs" | "sweep"
    demo: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> Run:
        """The run the offline tools worked on (inversion / unlearning), else the first."""
        for r in self.runs:
            if (r.path / "inversion").is_dir() or (r.path / "unlearning").is_dir():
                return r
        return self.runs[0]

    def role(self, name: str) -> Run | None:
        return next((r for r in self.runs if r.role == name), None)


# ------------------------------------------------------------------------------------------
# Reading


def _read_run(path: Path, label: str, role: str | None = None) -> Run:
    text = (path / "config.yaml").read_text()
    summary_path = path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    rounds = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("round", 0) > 0]
    return Run(path, label, yaml.safe_load(text) or {}, text, summary, rounds, role)


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


def collect(folder: Path) -> Collection:
    """The runs of a run folder, a demo folder or a sweep folder.

    Raises:
        LabError: no run found under `folder`.
    """
    if _is_run(folder):
        run = _read_run(folder, "")
        run.label = run.rule
        col = Collection(folder, [run], "run")
    else:
        demo = json.loads((folder / "demo.json").read_text()) if (folder / "demo.json").exists() else {}
        if demo:
            runs = [_read_run(folder / r["dir"], r["label"], r["role"]) for r in demo["runs"] if _is_run(folder / r["dir"])]
        else:
            found = sorted(p.parent for p in folder.glob("**/metrics.jsonl")
                           if not any(part.startswith(".") for part in p.relative_to(folder).parts)
                           and _is_run(p.parent))
            runs = [_read_run(p, p.relative_to(folder).as_posix()) for p in found]
        if not runs:
            raise LabError(f"{folder}: no run folder (config.yaml + metrics.jsonl) here or below")
        sweep = (folder / "results.csv").exists() or (folder / "runs").is_dir()
        col = Collection(folder, runs, "sweep" if sweep and not demo else "runs", demo)
    _fill_floors(col.runs)
    return col


def _fill_floors(runs: list[Run]) -> None:
    """ASR floor per run: summary.json's, else the no-attack run of the same rule (and seed), else FedAvg's."""
    clean: dict[tuple[str, Any], float] = {}
    for r in runs:
        if not r.attacked and r.summary.get("final_asr") is not None:
            clean.setdefault((r.rule, r.config.get("training", {}).get("seed")), r.summary["final_asr"])
    any_clean = next(iter(clean.values()), None)
    for r in runs:
        seed = r.config.get("training", {}).get("seed")
        r.floor = r.summary.get("asr_floor")
        if r.floor is None:
            r.floor = clean.get((r.rule, seed), clean.get(("fedavg", seed), any_clean))


# ------------------------------------------------------------------------------------------
# Plots (matplotlib Agg via lab.plots, which sets the backend)


def _plt() -> Any:
    from lab.plots import plt  # the Agg backend is chosen there

    return plt


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_rounds(runs: list[Run], path: Path) -> Path:
    """Clean accuracy and ASR per round, one line per run (no-attack runs dashed)."""
    plt = _plt()
    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in runs:
        xs = [m["round"] for m in r.rounds]
        style = "--" if not r.attacked else "-"
        ax_acc.plot(xs, [m["accuracy"] for m in r.rounds], style, label=r.label)
        ax_asr.plot(xs, [m["asr"] if m.get("asr") is not None else float("nan") for m in r.rounds], style, label=r.label)
    ax_acc.set(title="clean accuracy", xlabel="round", ylim=(0, 1.02))
    ax_asr.set(title="attack success rate (ASR)", xlabel="round", ylim=(-0.02, 1.02))
    ax_asr.legend(fontsize=7)
    return _save(fig, path)


def plot_norms(runs: list[Run], path: Path) -> Path:
    """Every client's update norm per round, attackers in red; hollow markers = dropped by the rule."""
    plt = _plt()
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, r in zip(axes.flat, runs):
        pts: dict[tuple[bool, bool], tuple[list[int], list[float]]] = {}
        for m in r.rounds:
            attackers = {str(p) for p in m.get("malicious") or []}
            out = {str(p) for p in m.get("dropped") or []}
            for pid, norm in (m.get("update_norms") or {}).items():
                if norm is None or norm <= 0:  # log scale
                    continue
                xs, ys = pts.setdefault((pid in attackers, pid in out), ([], []))
                xs.append(m["round"])
                ys.append(norm)
        for (bad, dropped), (xs, ys) in sorted(pts.items()):
            color = "tab:red" if bad else "tab:blue"
            ax.scatter(xs, ys, s=14, marker="^" if bad else "o", alpha=0.75,
                       facecolors="none" if dropped else color, edgecolors=color,
                       label=f"{'attacker' if bad else 'honest'}{', dropped' if dropped else ''}")
        ax.set(title=r.label, xlabel="round", yscale="log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    axes[0][0].set_ylabel("update norm ||client - global||")
    return _save(fig, path)


def plot_detection(runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for r in runs:
        xs = [m["round"] for m in r.rounds if (m.get("detection") or {}).get("f1") is not None]
        ys = [m["detection"]["f1"] for m in r.rounds if (m.get("detection") or {}).get("f1") is not None]
        ax.plot(xs, ys, marker=".", label=r.label)
    ax.set(title="detection F1 per round (the rule's drops vs the true attackers)", xlabel="round",
           ylabel="F1", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_unlearning(m: dict[str, Any], floor: float | None, path: Path) -> Path:
    """Accuracy and ASR before unlearning and after each strategy (the oracle hatched)."""
    plt = _plt()
    names = ["before", *m["after"]]
    vals = [m["before"], *m["after"].values()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "accuracy", "clean accuracy"), (axes[1], "asr", "ASR")):
        heights = [v.get(key) or 0.0 for v in vals]
        bars = ax.bar(range(len(names)), heights, color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
        for bar, v in zip(bars, vals):
            if v.get("oracle"):
                bar.set_hatch("//")
                bar.set_facecolor("white")
                bar.set_edgecolor("tab:green")
        for i, h in enumerate(heights):
            ax.text(i, h + 0.01, f"{h:.3f}", ha="center", fontsize=7)
        if key == "asr" and floor is not None:
            ax.axhline(floor, color="black", linestyle=":", label=f"floor {floor:.3f}")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(names)), [n + (" (oracle)" if v.get("oracle") and "oracle" not in n else "") for n, v in zip(names, vals)],
                      rotation=20, fontsize=7)
        ax.set(title=f"{title}: before / after unlearning", ylim=(0, 1.1))
    return _save(fig, path)


# ------------------------------------------------------------------------------------------
# Sections


def _f(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def headline(col: Collection) -> list[Block]:
    head = ("run", "rule", "attack", "rounds", "accuracy", "ASR", "ASR floor", "detection F1", "seconds")
    rows = []
    for r in col.runs:
        s = r.summary
        rows.append((r.label, r.rule, r.attack_label, str(s.get("rounds", len(r.rounds))), _f(s.get("final_accuracy"), ".4f"),
                     _f(s.get("final_asr")), _f(r.floor), _f((s.get("detection") or {}).get("f1")),
                     _f(s.get("seconds"), ".0f")))
    blocks: list[Block] = [Table(head, tuple(rows))]
    missing = [r.label for r in col.runs if not r.summary]
    if missing:
        blocks.append(Para(f"No summary.json (unfinished?) for: {', '.join(missing)}."))
    inv = _inversion(col.primary)
    if inv:
        fires = [m for m in inv if _fires_with_trigger(m, col.primary)]
        blocks.append(Para(f"Reconstruction ({col.primary.label}): {len(inv)} captured update(s) inverted; "
                           f"{sum(len(_fires_with_trigger(m, col.primary)) for m in fires)} reconstructed image(s) "
                           f"classified as the target class with the trigger box in place."))
    un = _unlearning(col.primary)
    if un:
        name = un.get("sanitized", {}).get("strategy") or next(iter(un["after"]))
        a, b = un["after"][name], un["before"]
        blocks.append(Para(f"Unlearning ({name}): accuracy {b['accuracy']:.4f} -> {a['accuracy']:.4f}, "
                           f"ASR {b['asr']:.3f} -> {a['asr']:.3f}."))
    if col.demo:
        blocks.extend(_demo_checks(col))
    return blocks


def demo_checks(col: Collection) -> list[tuple[str, bool | None, str]]:
    """The demo's acceptance criteria, measured: (what, passed or None when unknown, the numbers)."""
    out: list[tuple[str, bool | None, str]] = []
    attack, defense, clean = col.role("attack"), col.role("defense"), col.role("clean")
    floor = clean.summary.get("final_asr") if clean else None
    if attack:
        asr = attack.summary.get("final_asr")
        out.append(("FedAvg ASR >= 0.90", None if asr is None else asr >= 0.90, f"ASR {_f(asr)}"))
    if defense:
        asr = defense.summary.get("final_asr")
        ok = None if asr is None or floor is None else asr - floor <= 0.05
        out.append((f"{defense.rule} ASR within 5 points of the floor", ok, f"ASR {_f(asr)}, floor {_f(floor)}"))
    if attack:
        inv = _inversion(attack)
        hits = [f"{m['entry']}[{i}]" for m in inv for i in _fires_with_trigger(m, attack)]
        out.append(("a reconstruction classified as the target, trigger in place", bool(hits) if inv else None,
                    ", ".join(hits) or "none"))
        un = _unlearning(attack)
        if un:
            name = un.get("sanitized", {}).get("strategy") or next(iter(un["after"]))
            a, b = un["after"][name], un["before"]
            drop = b["accuracy"] - a["accuracy"]
            ok = None if floor is None else (a["asr"] - floor <= 0.02 and drop <= 0.01)
            out.append((f"unlearning ({name}): ASR within 2 points of the floor, <= 1 point accuracy lost", ok,
                        (f"ASR {b['asr']:.3f} -> {a['asr']:.3f} (floor {_f(floor)}), accuracy "
                         f"{b['accuracy']:.4f} -> {a['accuracy']:.4f} ({-100 * drop:+.2f} points)")))
        else:
            out.append(("unlearning: ASR within 2 points of the floor, <= 1 point accuracy lost", None, "not run"))
    return out


def _demo_checks(col: Collection) -> list[Block]:
    checks = demo_checks(col)
    mark = {True: "yes", False: "NO", None: "unknown"}
    blocks: list[Block] = [Table(("demo check", "met", "measured"), tuple((w, mark[ok], t) for w, ok, t in checks))]
    if col.demo.get("wall_seconds") is not None:
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in col.demo.get("step_seconds", {}).items())
        blocks.append(Para(f"Demo wall time: {col.demo['wall_seconds']:.0f} s before writing this report ({steps})."))
    if col.demo.get("note"):
        blocks.append(Para(col.demo["note"]))
    return blocks


def _inversion(run: Run) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run.path / "inversion").glob("**/metrics.json"))]


def _unlearning(run: Run) -> dict[str, Any] | None:
    p = run.path / "unlearning" / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else None


def _fires_with_trigger(m: dict[str, Any], run: Run) -> list[int]:
    """Indices of reconstructions the run's model classifies as the target with the trigger box bright."""
    target = run.config.get("dataset", {}).get("target_class")
    pred, contrast = m.get("predicted") or [], m.get("trigger_contrast") or []
    return [i for i, (p, c) in enumerate(zip(pred, contrast)) if p == target and c is not None and c > TRIGGER_CONTRAST]


def rounds_section(col: Collection, plots: Path) -> list[Block]:
    if col.kind == "sweep":
        from lab.plots import sweep_plots

        files = sweep_plots(col.folder, _sweep_rows(col))
        return [Image(p, f"accuracy and ASR per round per rule: {p.stem}") for p in files]
    runs = [r for r in col.runs if r.rounds]
    if not runs:
        return [Para("No rounds recorded.")]
    return [Image(plot_rounds(runs, plots / "rounds.png"),
                  "Clean accuracy and attack success rate per round, one line per run (dashed: no attack).")]


def norms_section(col: Collection, plots: Path) -> list[Block]:
    runs = [r for r in col.runs if any(m.get("update_norms") for m in r.rounds)]
    runs.sort(key=lambda r: not r.attacked)
    if not runs:
        return [Para("No update norms recorded.")]
    blocks: list[Block] = [Image(plot_norms(runs[:NORM_PANELS], plots / "update_norms.png"),
                                 "L2 norm of every client's update per round (log scale). Red triangles: the "
                                 "attackers (ground truth, never shown to the rule); hollow: dropped by the rule. "
                                 "A capture probe round (one SGD step) shows as a dip.")]
    if len(runs) > NORM_PANELS:
        blocks.append(Para(f"{len(runs) - NORM_PANELS} more run(s) not drawn."))
    return blocks


def detection_section(col: Collection, plots: Path) -> list[Block]:
    runs = [r for r in col.runs if r.attacked and any((m.get("detection") or {}).get("f1") is not None for m in r.rounds)]
    if not runs:
        return [Para("No attacked run with detection scores.")]
    rows = []
    for r in runs:
        d = r.summary.get("detection") or {}
        rows.append((r.label, _f(d.get("precision")), _f(d.get("recall")), _f(d.get("f1")),
                     str(d.get("tp", "-")), str(d.get("fp", "-")), str(d.get("fn", "-"))))
    return [Image(plot_detection(runs, plots / "detection_f1.png"),
                  "Detection F1 per round: the clients each rule dropped, scored against the true attackers."),
            Table(("run", "precision", "recall", "F1", "TP", "FP", "FN"), tuple(rows)),
            Para("Totals over all rounds. A rule that keeps everyone (FedAvg) detects nobody: recall 0.")]


def recon_section(col: Collection, plots: Path) -> list[Block]:
    run = col.primary
    inv = _inversion(run)
    if not inv:
        return [Para(f"No reconstructions ({run.path / 'inversion'} is missing: run `fl-lab invert`).")]
    blocks: list[Block] = []
    target = run.config.get("dataset", {}).get("target_class")
    rows = []
    for m in inv:
        src = run.path / "inversion" / m["entry"] / "recon.png"
        if src.exists():
            dst = plots / f"recon_{m['entry'].replace('/', '_')}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            blocks.append(Image(dst, f"{m['entry']} (partition {m.get('partition_id')}): reconstruction (top) beside "
                                     f"the ground truth (bottom, scoring only), after Hungarian matching."))
        rows.append((m["entry"], str(m.get("num_images")), _f(m.get("psnr"), ".2f"), _f(m.get("ssim"), ".2f"),
                     _f(m.get("label_accuracy"), ".2f"), str(m.get("labels")), str(m.get("predicted", "-")),
                     ", ".join(_f(c, ".2f") for c in m.get("trigger_contrast") or []) or "-",
                     _f(m.get("target_fraction"), ".2f"), f"{m.get('iterations')} it / {_f(m.get('seconds'), '.0f')} s"))
    blocks.append(Table(("entry", "images", "PSNR", "SSIM", "label acc.", "recovered labels",
                         "model predicts", "trigger contrast", "target share", "cost"), tuple(rows)))
    blocks.append(Para(f"Target class {target}. Trigger contrast: mean brightness inside the true trigger box minus "
                       f"outside (scoring only; > {TRIGGER_CONTRAST} counts as the trigger in place). The model "
                       f"is the run's final (backdoored) global model."))
    ver = run.path / "verification.json"
    if ver.exists():
        v = json.loads(ver.read_text())
        blocks.append(Para(f"Verification (`fl-lab verify`): {v.get('fires_target')}/{v.get('num_reconstructions')} "
                           f"reconstructions fire the backdoor; model accuracy {_f(v.get('accuracy'), '.4f')}, "
                           f"ASR {_f(v.get('asr'))} (true trigger, evaluation only)."))
    return blocks


def unlearning_section(col: Collection, plots: Path) -> list[Block]:
    run = col.primary
    m = _unlearning(run)
    if not m:
        return [Para(f"No unlearning results ({run.path / 'unlearning' / 'metrics.json'} is missing: run `fl-lab unlearn`).")]
    rows = [("before", _f(m["before"]["accuracy"], ".4f"), _f(m["before"]["asr"]), _f(m["before"].get("source_accuracy")), "-")]
    for name, a in m["after"].items():
        label = name + (" (ORACLE upper bound)" if a.get("oracle") else "")
        if name == m.get("sanitized", {}).get("strategy"):
            label += " = sanitized"
        rows.append((label, _f(a["accuracy"], ".4f"), _f(a["asr"]), _f(a.get("source_accuracy")),
                     f"{a.get('steps_run', a.get('steps'))}"))
    blocks: list[Block] = [
        Image(plot_unlearning(m, run.floor, plots / "unlearning.png"),
              "Clean accuracy and ASR of the final model before unlearning and after each strategy."),
        Table(("model", "accuracy", "ASR", "source-class accuracy", "steps"), tuple(rows)),
    ]
    t = m.get("trigger") or {}
    if t.get("found"):
        box = t["box"]
        iou = (t.get("scoring") or {}).get("box_iou")
        blocks.append(Para(f"Trigger recovered from the reconstructions only: {box['height']}x{box['width']} box at "
                           f"row {box['top']}, column {box['left']}, pattern mean {t.get('pattern_mean')}, from "
                           f"{', '.join(t.get('sources') or [])}" + (f"; IoU with the true box {iou:.2f} (scoring only)."
                                                                     if iou is not None else ".")))
    else:
        blocks.append(Para(f"No trigger recovered: {t.get('reason', 'unknown')}."))
    return blocks


def sweep_section(col: Collection) -> list[Block]:
    md = col.folder / "results.md"
    if md.exists():
        table = _md_table(md.read_text())
        if table is not None:
            return [table, Para(f"From {md.name} (`fl-lab sweep`); mean ± standard deviation over seeds.")]
    return [Para(f"{len(col.runs)} run(s) found; results.md not written yet (the sweep is unfinished).")]


def _sweep_rows(col: Collection) -> list[dict[str, Any]]:
    """results.csv's rows, or rows built from the run folders when the sweep is unfinished."""
    path = col.folder / "results.csv"
    if path.exists():
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        return [r for r in rows if Path(r["run"]).is_dir()]
    return [{"attack": r.attack_label, "attack_type": r.attack.get("type", "none"), "rule": r.rule,
             "federated.aggregator": r.rule, "seed": r.config.get("training", {}).get("seed"), "run": str(r.path),
             "asr": r.summary.get("final_asr")} for r in col.runs]


def _md_table(text: str) -> Table | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return None
    cells = [tuple(c.strip() for c in ln.strip("|").split("|")) for ln in lines]
    return Table(cells[0], tuple(cells[2:]))


def config_section(col: Collection) -> list[Block]:
    p = col.primary
    blocks: list[Block] = [Code(p.config_text, f"{p.label}: {p.path.name}/config.yaml")]
    base = _flat(p.config)
    for r in col.runs:
        if r is p:
            continue
        diff = {k: v for k, v in _flat(r.config).items() if base.get(k) != v}
        diff.update({k: None for k in base if k not in _flat(r.config)})
        text = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(diff.items())) or "identical"
        blocks.append(Para(f"{r.label}: differs in {text}"))
    return blocks


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def environment() -> dict[str, Any]:
    """Versions and hardware of this machine (the one that ran the demo, or that wrote this report)."""
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    mem = None
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"python": platform.python_version(), "torch": version("torch"), "flwr": version("flwr"),
            "numpy": version("numpy"), "matplotlib": version("matplotlib"), "platform": platform.platform(),
            "cpu": cpu, "cpu_cores": os.cpu_count(), "usable_cores": usable, "memory_gib": mem}


def repro_section(col: Collection) -> list[Block]:
    env = col.demo.get("environment") or environment()
    where = "the machine that ran the demo" if col.demo.get("environment") else "the machine that wrote this report"
    seeds = sorted({str(r.config.get("training", {}).get("seed")) for r in col.runs})
    run_torch = sorted({str(r.summary["torch"]) for r in col.runs if r.summary.get("torch")})
    threads = sorted({str(r.config.get("execution", {}).get("num_threads")) for r in col.runs})
    devices = sorted({str(r.config.get("execution", {}).get("device")) for r in col.runs})
    rows = [("seed (training.seed)", ", ".join(seeds)),
            ("python", env["python"]), ("torch", env["torch"] + (f" (runs recorded {', '.join(run_torch)})" if run_torch else "")),
            ("flwr", env["flwr"]), ("numpy / matplotlib", f"{env['numpy']} / {env['matplotlib']}"),
            ("platform", env["platform"]), ("CPU", f"{env['cpu']}; {env['cpu_cores']} cores, {env['usable_cores']} usable"),
            ("memory", f"{env['memory_gib']} GiB" if env.get("memory_gib") else "unknown"),
            ("device / torch threads", f"{', '.join(devices)} / {', '.join(threads)}")]
    return [Table(("", "value"), tuple(rows)),
            Para(f"Versions and hardware of {where}. The same config and seed give the same metrics on the same "
                 f"machine (data split, client sampling, attackers and training are seeded from training.seed); "
                 f"report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")]


def build(col: Collection, plots: Path) -> list[tuple[str, list[Block]]]:
    sections = [
        (HEADLINE, headline(col)),
        (ROUNDS, _guarded(rounds_section, col, plots)),
        (NORMS, _guarded(norms_section, col, plots)),
        (DETECTION, _guarded(detection_section, col, plots)),
        (RECON, _guarded(recon_section, col, plots)),
        (UNLEARNING, _guarded(unlearning_section, col, plots)),
    ]
    if col.kind == "sweep":
        sections.append((SWEEP, sweep_section(col)))
    sections += [(CONFIG, config_section(col)), (REPRO, repro_section(col))]
    return sections


def _guarded(fn: Any, col: Collection, plots: Path) -> list[Block]:
    # One odd input file must not cost the whole report: the section says what went wrong.
    try:
        return list(fn(col, plots))
    except (KeyError, TypeError, ValueError, OSError) as exc:
        log.warning("report section %s failed: %r", fn.__name__, exc)
        return [Para(f"(this section could not be drawn: {exc!r})")]


# ------------------------------------------------------------------------------------------
# Rendering


def title_of(col: Collection) -> str:
    kinds = {"run": f"Run report: {col.folder.name}", "runs": f"Report: {col.folder.name}",
             "sweep": f"Sweep report: {col.folder.name}"}
    return "FL Security Lab demo" if col.demo else kinds[col.kind]


def to_markdown(title: str, sections: list[tuple[str, list[Block]]], root: Path) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for b in blocks:
            if isinstance(b, Para):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(_cell(h) for h in b.head) + " |")
                out.append("|" + "---|" * len(b.head))
                out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Image):
                out += [f"![{b.caption}]({b.path.relative_to(root).as_posix()})", "", f"*{b.caption}*", ""]
            elif isinstance(b, Code):
                out += ([f"`{b.title}`", ""] if b.title else []) + ["```yaml", b.text.rstrip(), "```", ""]
    return "\n".join(out)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222}h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #bbb;padding:.3em .6em;
text-align:left}th{background:#eee}figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}
nav a{margin-right:1em}.no{color:#b00;font-weight:bold}.yes{color:#070;font-weight:bold}"""


def to_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    """One self-contained page: inline CSS, every image a base64 data URI, no script, no links out."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>",
           "<nav>" + "".join(f'<a href="#s{i}">{e(h)}</a>' for i, (h, _) in enumerate(sections)) + "</nav>"]
    for i, (heading, blocks) in enumerate(sections):
        out.append(f'<section id="s{i}"><h2>{e(heading)}</h2>')
        for b in blocks:
            if isinstance(b, Para):
                out.append(f"<p>{e(b.text)}</p>")
            elif isinstance(b, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.head) + "</tr></thead><tbody>")
                for row in b.rows:
                    out.append("<tr>" + "".join(_td(c) for c in row) + "</tr>")
                out.append("</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.caption)}">'
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
            elif isinstance(b, Code):
                out.append((f"<p><code>{e(b.title)}</code></p>" if b.title else "") + f"<pre>{e(b.text)}</pre>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _td(text: str) -> str:
    cls = {"yes": ' class="yes"', "NO": ' class="no"'}.get(text, "")
    return f"<td{cls}>{html.escape(str(text))}</td>"


def write_report(folder: Path) -> tuple[Path, Path]:
    """Write FOLDER/report.md, report.html and plots/*.png; returns the two report paths.

    Raises:
        LabError: no run under `folder`.
    """
    folder = folder.resolve()
    col = collect(folder)
    plots = folder / "plots"
    sections = build(col, plots)
    title = title_of(col)
    md, page = folder / "report.md", folder / "report.html"
    atomic_write_text(md, to_markdown(title, sections, folder))
    atomic_write_text(page, to_html(title, sections))
    return md, page


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fl-lab report", description="Markdown + self-contained HTML report of a run, "
                                "a folder of runs (the demo) or a sweep folder.")
    p.add_argument("folder", help="a run folder, a demo folder or a sweep folder")
    args = p.parse_args(argv)
    lablog.configure("WARNING")
    try:
        md, page = write_report(Path(args.folder))
    except LabError as exc:
        sys.stderr.write(f"report: {exc}\n")
        return 2
    sys.stdout.write(f"wrote {md}\nwrote {page}\nplots in {md.parent / 'plots'}\n")
    return 0
