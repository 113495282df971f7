"""The inversion command line (`python -m inversion`, `fl-lab invert`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inversion.attacks import ATTACKS
from inversion.entry import entry_bar, invert_one, load_tools
from inversion.optimizer import IG_PRESETS
from lab import log as lablog
from lab.config import ExperimentConfig, load_experiment
from lab.errors import CaptureError, LabError
from lab.runfolder import MANIFEST, ManifestEntry, check_id, contained, read_manifest
from lab.task import set_threads, usable_cores

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
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where to optimise (default: the run config's execution.device; auto = CUDA when present)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/inversion)")
    p.add_argument("--jobs", type=int, default=1,
                   help="entries inverted at once, one process each (default 1; 0 = one per usable core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def find_run(path: Path) -> Path:
    """The run folder of a run folder, or of one capture entry file inside its captures/."""
    if path.is_file():
        run = next((p for p in path.parents if (p / "config.yaml").exists()), None)
        if run is None:
            raise CaptureError(f"{path}: no config.yaml in any parent folder (which run is this?)")
        return run
    if not (path / "config.yaml").exists():
        raise CaptureError(f"{path}: not a run folder (no config.yaml)")
    return path


def locate(path: Path, run: Path, cfg: ExperimentConfig) -> list[ManifestEntry]:
    """The checked manifest entries to invert: all of the run's, or the one entry file `path` names.

    Raises:
        CaptureError: no manifest, an empty one, a bad row, or an entry file outside captures/.
        UnsafePathError: a path in the manifest leads outside the run folder.
    """
    captures = run / "captures"
    entries = read_manifest(run)
    if path.is_file():
        file = path.resolve()
        try:
            rel = file.relative_to(captures.resolve()).as_posix()
        except ValueError:
            raise CaptureError(f"{path}: not inside {captures} (an entry file lives in its run's captures/)") from None
        rows = [e for e in entries if e.file == file]
        return rows or [ManifestEntry(id=check_id(rel.removesuffix(".safetensors"), str(path)), file=file)]
    if entries:
        return entries
    manifest = run / MANIFEST
    if manifest.exists():
        raise CaptureError(f"{manifest}: empty, no update was captured (capture rounds {list(cfg.capture.rounds)} "
                           "not reached, or the capture budget was spent)")
    files = [p for p in captures.rglob("*.safetensors") if "evidence" not in p.relative_to(captures).parts] \
        if captures.is_dir() else []
    if files:
        raise CaptureError(f"{manifest}: missing, though {captures} holds {len(files)} entry file(s) (an incomplete "
                           f"copy?); invert one directly: fl-lab invert {files[0]}")
    if not cfg.capture.enabled:
        raise CaptureError(f"{run}: capture was disabled in this run (set capture.enabled in the experiment)")
    raise CaptureError(f"{manifest}: missing, and {captures} holds no entries although capture was enabled "
                       "(did the run reach a capture round?)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lablog.configure("WARNING")
    try:
        return run(args)
    except LabError as exc:
        sys.stderr.write(f"inversion: {exc}\n")
        return 2


def run(args: argparse.Namespace) -> int:
    path = Path(args.run_dir)
    run_dir = find_run(path)
    cfg = load_experiment(contained(run_dir, "config.yaml", "run config"))
    rows = locate(path, run_dir, cfg)
    if args.entry:
        known = {r.id for r in rows}
        missing = [e for e in args.entry if e not in known]
        if missing:
            raise CaptureError(f"no such capture entry {missing}; known: {sorted(known)}")
        rows = [r for r in rows if r.id in args.entry]
    if args.jobs < 0:
        raise LabError(f"--jobs must be >= 0, got {args.jobs}")
    # Every output folder is checked before the first write: an id may not lead out of the output
    # folder, and the default output folder may not lead out of the run (a planted symlink).
    out_root = Path(args.out) if args.out else contained(run_dir, "inversion", "output folder")
    outs = {r.id: contained(out_root, r.id, f"output folder of entry {r.id!r}") for r in rows}
    jobs = min(args.jobs or usable_cores(), len(rows))
    if jobs > 1:
        from inversion.parallel import invert_parallel

        results = invert_parallel(args, run_dir, rows, outs, jobs, cfg.execution.num_threads)
    else:
        set_threads(cfg.execution.num_threads)
        tools = load_tools(cfg, run_dir)
        results = []
        for row in rows:
            with entry_bar(row.id, args.quiet) as progress:
                results.append(invert_one(cfg, args, row, tools, outs[row.id], progress))
    sys.stdout.write(table(results) + "\n" + capture_line(results) + "\n")
    return 0


def capture_line(results: list[dict[str, Any]]) -> str:
    """How the inverted entries were chosen; the ground-truth capture is flagged as an upper bound."""
    modes = sorted({str((m.get("capture") or {}).get("mode", "unknown")) for m in results})
    bound = any((m.get("capture") or {}).get("upper_bound") for m in results)
    return (f"capture: {', '.join(modes)}"
            + (" -- UPPER BOUND: the attackers were picked by ground truth, which a real server cannot know"
               if bound else " (chosen by what the server itself saw)"))


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
