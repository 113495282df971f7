"""The inversion command line (`python -m inversion`, `fl-lab invert`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inversion.attacks import ATTACKS
from inversion.entry import entry_bar, invert_one, judge_model
from inversion.optimizer import IG_PRESETS
from lab import log as lablog
from lab.artifacts import read_jsonl
from lab.config import load_experiment
from lab.errors import CaptureError, LabError
from lab.task import build_for, set_threads, usable_cores

log = logging.getLogger(__name__)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-lab invert", description="Reconstruct client images from captured updates.")
    p.add_argument("run_dir", help="a run folder (with captures/), or one capture entry file")
    p.add_argument("--entry", action="append", help="entry id from captures/manifest.jsonl (default: all)")
    p.add_argument("--attack", choices=sorted(ATTACKS), help="default: the run config's inversion.attack")
    p.add_argument("--preset", help=f"one of {', '.join(sorted(IG_PRESETS))} (default: the run config's)")
    p.add_argument("--labels", choices=["known", "recovered"], help="threat model: are labels granted?")
    p.add_argument("--num-images", type=int, help="images in the batch (default: the reply's num-examples)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--restarts", type=int)
    p.add_argument("--tv", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: RUN_DIR/inversion)")
    p.add_argument("--jobs", type=int, default=1,
                   help="entries inverted at once, one process each (default 1; 0 = one per usable core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def locate(path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """(run folder, manifest rows to invert) for a run folder or a single entry file."""
    if path.is_file():
        run = next((p for p in path.parents if (p / "config.yaml").exists()), None)
        if run is None:
            raise CaptureError(f"{path}: no config.yaml in any parent folder (which run is this?)")
        captures = run / "captures"
        rel = path.resolve().relative_to(captures.resolve()).as_posix()
        rows = [r for r in read_jsonl(captures / "manifest.jsonl") if r["file"] == rel]
        return run, rows or [{"id": rel.removesuffix(".safetensors"), "file": rel, "evidence": None}]
    if not (path / "config.yaml").exists():
        raise CaptureError(f"{path}: not a run folder (no config.yaml)")
    manifest = path / "captures" / "manifest.jsonl"
    rows = read_jsonl(manifest)
    if not rows:
        raise CaptureError(f"{manifest}: no captured updates (enable `capture` in the experiment)")
    return path, rows


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lablog.configure("WARNING")
    try:
        return run(args)
    except LabError as exc:
        sys.stderr.write(f"inversion: {exc}\n")
        return 2


def run(args: argparse.Namespace) -> int:
    run_dir, rows = locate(Path(args.run_dir))
    if args.entry:
        known = {r["id"] for r in rows}
        missing = [e for e in args.entry if e not in known]
        if missing:
            raise CaptureError(f"no such capture entry {missing}; known: {sorted(known)}")
        rows = [r for r in rows if r["id"] in args.entry]
    if args.jobs < 0:
        raise LabError(f"--jobs must be >= 0, got {args.jobs}")
    cfg = load_experiment(run_dir / "config.yaml")
    out_root = Path(args.out) if args.out else run_dir / "inversion"
    jobs = min(args.jobs or usable_cores(), len(rows))
    if jobs > 1:
        from inversion.parallel import invert_parallel

        results = invert_parallel(args, run_dir, rows, out_root, jobs, cfg.execution.num_threads)
    else:
        set_threads(cfg.execution.num_threads)
        model = build_for(cfg)
        judge = judge_model(cfg, run_dir)
        results = []
        for row in rows:
            with entry_bar(row["id"], args.quiet) as progress:
                results.append(invert_one(cfg, args, run_dir, row, model, judge, out_root / row["id"], progress))
    sys.stdout.write(table(results) + "\n")
    return 0


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'entry':<28} {'imgs':>4} {'psnr':>6} {'ssim':>5} {'labels':>6} {'target':>6} {'loss':>7} {'secs':>6}"
    lines = [head, "-" * len(head)]

    def cell(m: dict[str, Any], key: str, fmt: str) -> str:
        return "-" if m.get(key) is None else format(m[key], fmt)

    for m in results:
        lines.append(f"{m['entry']:<28} {m['num_images']:>4} {cell(m, 'psnr', '6.2f')} {cell(m, 'ssim', '5.2f')} "
                     f"{cell(m, 'label_accuracy', '6.2f')} {cell(m, 'target_fraction', '6.2f')} {m['loss']:7.4f} "
                     f"{m['seconds']:6.1f}")
    return "\n".join(lines)
