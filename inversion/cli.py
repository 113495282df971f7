"""The inversion command line (`python -m inversion`, `fl-lab invert`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lab import log as lablog
from lab.artifacts import load_tensors, read_jsonl, save_tensors, write_json
from lab.capture import CapturedUpdate, read_entry, read_evidence
from lab.config import ExperimentConfig, load_experiment
from lab.errors import CaptureError, LabError
from lab.metrics import predict
from lab.plots import image_grid
from lab.task import build_for, load_state, set_threads, usable_cores
from lab.triggers import make_trigger
from inversion.attacks import ATTACKS, invert_entry
from inversion.metrics import score
from inversion.optimizer import IG_PRESETS
from inversion.types import Reconstruction

log = logging.getLogger(__name__)

Progress = Callable[[int, float], None]  # (iterations done, best loss so far)


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


@contextlib.contextmanager
def entry_bar(entry_id: str, quiet: bool, position: int | None = None) -> Iterator[Progress]:
    """A progress bar for one entry's iterations and the callback that feeds it."""
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    bar = None if quiet else tqdm(desc=f"invert {entry_id}", unit="it", leave=False, disable=None, position=position)

    def progress(iteration: int, loss: float) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(iteration - bar.n)  # tqdm throttles the redraws itself

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def judge_model(cfg: ExperimentConfig, run_dir: Path) -> torch.nn.Module | None:
    """The run's final (possibly backdoored) global model, to see what the reconstructions trigger."""
    final = run_dir / "final.safetensors"
    if not final.exists():
        return None
    try:
        return load_state(build_for(cfg), load_tensors(final))
    except (RuntimeError, OSError) as exc:
        raise CaptureError(f"{final}: does not fit the run's model ({exc})") from None


def invert_one(cfg: ExperimentConfig, args: argparse.Namespace, run_dir: Path, row: dict[str, Any],
               model: torch.nn.Module, judge: torch.nn.Module | None, out: Path,
               progress: Progress | None = None) -> dict[str, Any]:
    entry = read_entry(run_dir / "captures" / row["file"])
    evidence = None
    if row.get("evidence"):
        evidence = read_evidence(run_dir / "captures" / row["evidence"])
    labels = args.labels or cfg.inversion.labels
    if labels == "known":
        if evidence is None:
            raise CaptureError(f"{row['file']}: --labels known needs the labels, but this entry has no evidence file")
        entry = dataclasses.replace(entry, labels=evidence[1])
    num_images = args.num_images or cfg.inversion.num_images or (entry.num_examples or None)
    recon = invert_entry(entry, model, attack=args.attack or cfg.inversion.attack,
                         preset=args.preset or cfg.inversion.preset, labels=labels, num_images=num_images,
                         progress=progress, iterations=args.iterations or cfg.inversion.iterations,
                         restarts=args.restarts or cfg.inversion.restarts, tv=args.tv or cfg.inversion.tv,
                         seed=args.seed)
    return write_outputs(cfg, row, entry, recon, evidence, judge, out)


def write_outputs(cfg: ExperimentConfig, row: dict[str, Any], entry: CapturedUpdate, recon: Reconstruction,
                  evidence: tuple[torch.Tensor, torch.Tensor] | None, judge: torch.nn.Module | None,
                  out: Path) -> dict[str, Any]:
    save_tensors(out / "recon.safetensors", {"images": recon.images, "labels": recon.labels},
                 {"entry": row["id"], "attack": recon.attack})
    metrics: dict[str, Any] = {
        "entry": row["id"], "round": entry.server_round, "partition_id": entry.partition_id,
        "attack": recon.attack, "num_images": int(recon.images.shape[0]),
        "psnr": None, "ssim": None, "label_accuracy": None, "target_fraction": None,
        "trigger_contrast": None, "loss": recon.loss, "iterations": recon.iterations,
        "seconds": recon.seconds, "restart_losses": list(recon.restart_losses), "interrupted": recon.interrupted,
        "labels": recon.labels.tolist(),
    }
    rows = [("reconstruction", recon.images)]
    if evidence is not None:
        truth, true_labels = evidence
        s = score(recon.images, truth, recon.labels, true_labels)
        metrics.update(s.summary())
        metrics["psnr_per_image"] = s.psnr.tolist()
        rows.append(("ground truth", truth[s.cols]))
        rows[0] = ("reconstruction", recon.images[s.rows])
    if judge is not None:
        pred = predict(judge, recon.images).argmax(1)
        metrics["predicted"] = pred.tolist()
        metrics["target_fraction"] = float((pred == cfg.dataset.target_class).float().mean())
    if cfg.attack.type == "backdoor":
        # Scoring only: how much brighter the true trigger box is than the rest of each image.
        trig = make_trigger(cfg.attack.trigger, *recon.images.shape[-2:])
        inside = (recon.images * trig.mask).sum((-1, -2)) / trig.mask.sum()
        outside = (recon.images * (1 - trig.mask)).sum((-1, -2)) / (1 - trig.mask).sum()
        metrics["trigger_contrast"] = (inside - outside).mean(1).tolist()
    titles = [f"label {int(y)}" for y in recon.labels]
    image_grid(rows, out / "recon.png", titles)
    write_json(out / "metrics.json", metrics)
    return metrics


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
