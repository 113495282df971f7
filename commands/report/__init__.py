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
import sys
from collections.abc import Sequence
from pathlib import Path

from commands.report.blocks import to_html, to_markdown
from commands.report.collection import collect, environment
from commands.report.sections import REQUIRED, SWEEP, build, demo_checks, title_of
from lab import log as lablog
from lab.artifacts import atomic_write_text
from lab.errors import LabError

__all__ = ["REQUIRED", "SWEEP", "collect", "demo_checks", "environment", "main", "write_report"]


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
