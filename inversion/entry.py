"""One captured entry inverted and its outputs written: recon.safetensors, recon.png, metrics.json.

Shared by the sequential path of `fl-lab invert` (inversion.cli) and its worker processes
(inversion.parallel).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from inversion.attacks import invert_entry
from inversion.metrics import score
from inversion.types import Reconstruction
from lab.artifacts import atomic_write_bytes, load_tensors, save_tensors, write_json
from lab.capture import (
    CapturedUpdate,
    capture_selection,
    read_entry,
    read_evidence,
    stamped,
)
from lab.config import ExperimentConfig
from lab.data import DataBundle, load_data
from lab.errors import CaptureError
from lab.metrics import predict
from lab.plots import image_grid
from lab.runfolder import ManifestEntry, contained
from lab.task import build_for, load_state
from lab.triggers import make_trigger

# A dummy batch larger than this is not an inversion anyone runs (the lab's probes hold 1-64 images).
MAX_IMAGES = 4096

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


@dataclasses.dataclass(frozen=True)
class Tools:
    """What every entry of one run is inverted with, loaded once per process."""

    model: torch.nn.Module  # the architecture; each entry's global state is loaded into a copy
    judge: torch.nn.Module | None  # the run's final model, or None without final.safetensors
    image_shape: tuple[int, int, int]  # (C, H, W) of the run's dataset: an entry must agree
    num_classes: int


def load_tools(cfg: ExperimentConfig, run_dir: Path) -> Tools:
    data = load_data(cfg.dataset, cfg.seed)
    return Tools(build_for(cfg, data), judge_model(cfg, run_dir, data), data.image_shape, data.num_classes)


def judge_model(cfg: ExperimentConfig, run_dir: Path, data: DataBundle | None = None) -> torch.nn.Module | None:
    """The run's final (possibly backdoored) global model, to see what the reconstructions trigger.

    Raises:
        UnsafePathError: final.safetensors is a link that leads outside the run folder.
        CaptureError: final.safetensors is truncated or corrupt, or does not fit the run's model.
    """
    final = run_dir / "final.safetensors"
    if not final.exists() and not final.is_symlink():
        return None
    path = contained(run_dir, "final.safetensors", "final model")
    try:
        state = load_tensors(path)
    except Exception as exc:  # safetensors raises its own error types for torn or foreign files
        raise CaptureError(f"{final}: truncated or corrupt checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        return load_state(build_for(cfg, data), state)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CaptureError(f"{final}: does not fit the run's {cfg.training.model} model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def invert_one(cfg: ExperimentConfig, args: argparse.Namespace, item: ManifestEntry, tools: Tools, out: Path,
               progress: Progress | None = None) -> dict[str, Any]:
    """Invert one checked manifest entry (paths already resolved inside the run) and write its outputs.

    Raises:
        CaptureError: the entry or its evidence is unreadable or does not fit the run.
    """
    entry = read_entry(item.file)
    where = str(item.file)
    if entry.image_shape is None:
        entry = dataclasses.replace(entry, image_shape=tools.image_shape)
    elif entry.image_shape != tools.image_shape:
        raise CaptureError(f"{where}: image_shape {entry.image_shape} is not the run's {tools.image_shape}")
    _check_labels(entry.labels, tools.num_classes, where)
    evidence = None
    if item.evidence is not None:
        evidence = read_evidence(item.evidence)
        if tuple(evidence[0].shape[1:]) != tools.image_shape:
            raise CaptureError(f"{item.evidence}: images {tuple(evidence[0].shape)} are not the run's "
                               f"(B, {', '.join(map(str, tools.image_shape))})")
        _check_labels(evidence[1], tools.num_classes, str(item.evidence))
    labels = args.labels or cfg.inversion.labels
    if labels == "known":
        if evidence is None:
            raise CaptureError(f"{item.id}: --labels known needs the labels, but this entry has no evidence file")
        entry = dataclasses.replace(entry, labels=evidence[1])
    num_images = args.num_images or cfg.inversion.num_images or (entry.num_examples or None)
    if num_images is not None and num_images > MAX_IMAGES:
        raise CaptureError(f"{where}: {num_images:,} images to reconstruct at once (the entry's num_examples, "
                           f"or --num-images); at most {MAX_IMAGES:,}: pass a smaller --num-images")
    recon = invert_entry(entry, tools.model, attack=args.attack or cfg.inversion.attack,
                         preset=args.preset or cfg.inversion.preset, labels=labels, num_images=num_images,
                         progress=progress, iterations=args.iterations or cfg.inversion.iterations,
                         restarts=args.restarts or cfg.inversion.restarts, tv=args.tv or cfg.inversion.tv,
                         seed=args.seed, device=getattr(args, "device", None) or cfg.execution.device)
    return write_outputs(cfg, item.id, entry, recon, evidence, tools.judge, out,
                         capture_selection(item.row, cfg.capture.clients))


def _check_labels(labels: torch.Tensor | None, num_classes: int, where: str) -> None:
    if labels is not None and len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
        raise CaptureError(f"{where}: labels outside the run's {num_classes} classes")


def write_outputs(cfg: ExperimentConfig, entry_id: str, entry: CapturedUpdate, recon: Reconstruction,
                  evidence: tuple[torch.Tensor, torch.Tensor] | None, judge: torch.nn.Module | None,
                  out: Path, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    save_tensors(out / "recon.safetensors", {"images": recon.images, "labels": recon.labels},
                 {"entry": entry_id, "attack": recon.attack})
    metrics: dict[str, Any] = {
        "entry": entry_id, "round": entry.server_round, "partition_id": entry.partition_id,
        "attack": recon.attack, "num_images": int(recon.images.shape[0]),
        "psnr": None, "ssim": None, "label_accuracy": None, "target_fraction": None,
        "trigger_contrast": None, "loss": recon.loss, "iterations": recon.iterations,
        "seconds": recon.seconds, "restart_losses": list(recon.restart_losses), "interrupted": recon.interrupted,
        "labels": recon.labels.tolist(),
        "capture": selection,
    }
    rows = [("reconstruction", recon.images)]
    if evidence is not None:
        truth, true_labels = evidence
        s = score(recon.images, truth, recon.labels, true_labels)
        metrics.update(s.summary())
        metrics["psnr_per_image"] = s.psnr.tolist()
        if cfg.attack.plants_trigger:  # scoring only: poisoned and clean images apart
            trig = make_trigger(cfg.attack.trigger, *truth.shape[-2:])
            poisoned = stamped(truth[s.cols], trig)
            metrics["poisoned_per_image"] = poisoned.tolist()
            for name, rows_of in (("poisoned", poisoned), ("clean", ~poisoned)):
                metrics[f"psnr_{name}"] = float(s.psnr[rows_of].mean()) if bool(rows_of.any()) else None
                metrics[f"ssim_{name}"] = float(s.ssim[rows_of].mean()) if bool(rows_of.any()) else None
        rows.append(("ground truth", truth[s.cols]))
        rows[0] = ("reconstruction", recon.images[s.rows])
    if judge is not None:
        pred = predict(judge, recon.images).argmax(1)
        metrics["predicted"] = pred.tolist()
        metrics["target_fraction"] = float((pred == cfg.dataset.target_class).float().mean())
    if cfg.attack.plants_trigger:
        # Scoring only: how much brighter the true trigger box is than the rest of each image.
        trig = make_trigger(cfg.attack.trigger, *recon.images.shape[-2:])
        inside = (recon.images * trig.mask).sum((-1, -2)) / trig.mask.sum()
        outside = (recon.images * (1 - trig.mask)).sum((-1, -2)) / (1 - trig.mask).sum()
        metrics["trigger_contrast"] = (inside - outside).mean(1).tolist()
    titles = [f"label {int(y)}" for y in recon.labels]
    _save_grid(rows, out / "recon.png", titles)
    write_json(out / "metrics.json", metrics)
    return metrics


def _save_grid(rows: list[tuple[str, Any]], path: Path, titles: list[str]) -> None:
    """image_grid rendered in a private temporary folder, then written with the lab's atomic write:
    a symlink planted at `path` by whoever made the run folder is replaced, never written through."""
    with tempfile.TemporaryDirectory(prefix="fl-lab-grid-") as tmp:
        png = image_grid(rows, Path(tmp) / "grid.png", titles)
        atomic_write_bytes(path, png.read_bytes())
