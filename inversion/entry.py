"""One captured entry inverted and its outputs written: recon.safetensors, recon.png, metrics.json.

Shared by the sequential path of `fl-lab invert` (inversion.cli) and its worker processes
(inversion.parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from inversion.attacks import invert_entry
from inversion.metrics import score
from inversion.types import Reconstruction
from lab.artifacts import load_tensors, save_tensors, write_json
from lab.capture import CapturedUpdate, read_entry, read_evidence
from lab.config import ExperimentConfig
from lab.errors import CaptureError
from lab.metrics import predict
from lab.plots import image_grid
from lab.task import build_for, load_state
from lab.triggers import make_trigger

Progress = Callable[[int, float], None]  # (iterations done, best loss so far)


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
