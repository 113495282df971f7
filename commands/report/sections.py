"""The report's sections: each reads the collected runs and returns its blocks; one whose inputs
are missing says so."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from commands.report.blocks import Block, Code, Image, Para, Table
from commands.report.collection import Collection, Run, environment, flat_config
from commands.report.detection import detection_section
from commands.report.figures import (
    plot_norms,
    plot_rounds,
    plot_unlearning,
)
from commands.report.paper import plot_paper_vs_lab
from commands.report.settings import settings_section

log = logging.getLogger(__name__)

# The section headings, in order; tests check that every report has all of REQUIRED.
HEADLINE = "Headline numbers"
SETTINGS = "Federation settings"
ROUNDS = "Accuracy and ASR per round"
NORMS = "Client update norms"
DETECTION = "Detection"
RECON = "Reconstruction"
UNLEARNING = "Unlearning"
SWEEP = "Sweep results"
CONFIG = "Resolved config"
REPRO = "Reproducibility"
PAPER = "Paper vs lab"
REQUIRED = (HEADLINE, SETTINGS, ROUNDS, NORMS, DETECTION, RECON, UNLEARNING, CONFIG, REPRO)

# A reconstruction shows "the trigger in place" when the true trigger box is this much brighter than
# the rest of the image (pixel scale [0, 1]; scoring only, inversion's `trigger_contrast`).
TRIGGER_CONTRAST = 0.2
NORM_PANELS = 12  # at most this many runs get an update-norm panel (sweeps have dozens)



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
    base = flat_config(p.config)
    for r in col.runs:
        if r is p:
            continue
        diff = {k: v for k, v in flat_config(r.config).items() if base.get(k) != v}
        diff.update({k: None for k in base if k not in flat_config(r.config)})
        text = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(diff.items())) or "identical"
        blocks.append(Para(f"{r.label}: differs in {text}"))
    return blocks


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


def paper_section(col: Collection, plots: Path) -> list[Block]:
    """A `fl-lab reproduce` folder: the paper-against-lab figure and reproduction.md's table."""
    md = col.folder / "reproduction.md"
    table = _md_table(md.read_text()) if md.exists() else None
    if table is None:
        return [Para("reproduction.md not written yet (the card is unfinished).")]
    reproduction = json.loads((col.folder / "reproduction.json").read_text())
    note = (" Ran as the card's CPU proxy: the expectations checked are the proxy's own measured ones, "
            "not the paper's." if reproduction.get("proxy") else "")
    figure = Image(plot_paper_vs_lab(reproduction, plots / "paper_vs_lab.png"),
                   "per cell: the range the paper's value allows (blue bar: value +- tolerance, or a bound; a "
                   "relative cell around the other cell's value) and the lab's mean +- sd over seeds (dot, "
                   "coloured by the verdict)")
    notes = [Para(f"{c['id']} ({c['verdict']}): {' '.join(c['notes'].split())}")
             for c in reproduction["cells"] if c.get("notes")]
    return [figure, table, Para(f"From {md.name} (`fl-lab reproduce`).{note}"), *notes]


def build(col: Collection, plots: Path) -> list[tuple[str, list[Block]]]:
    sections = [
        (HEADLINE, headline(col)),
        (SETTINGS, settings_section(col)),
        (ROUNDS, _guarded(rounds_section, col, plots)),
        (NORMS, _guarded(norms_section, col, plots)),
        (DETECTION, _guarded(detection_section, col, plots)),
        (RECON, _guarded(recon_section, col, plots)),
        (UNLEARNING, _guarded(unlearning_section, col, plots)),
    ]
    if (col.folder / "reproduction.json").exists():
        sections.append((PAPER, _guarded(paper_section, col, plots)))
    elif col.kind == "sweep":
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




def title_of(col: Collection) -> str:
    kinds = {"run": f"Run report: {col.folder.name}", "runs": f"Report: {col.folder.name}",
             "sweep": f"Sweep report: {col.folder.name}"}
    if (col.folder / "reproduction.json").exists():
        return f"Reproduction report: {col.folder.name}"
    return "FL Security Lab demo" if col.demo else kinds[col.kind]


