"""Does the backdoor fire, and do the reconstructions fire it? (replaces the original predict.py)

Loads a run folder (resolved config, final global model, reconstructions under inversion/) and
measures on the test set: clean accuracy, ASR with the TRUE trigger (evaluation only; the
trigger never reaches unlearning from here) and source-class accuracy; then what the model
predicts for each reconstructed image. Everything that can be wrong with a run folder is checked
here and raised as one `LabError` with a one-line message, before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lab.artifacts import load_tensors
from lab.config import ExperimentConfig, load_experiment
from lab.data import DataBundle, load_data
from lab.errors import LabError
from lab.metrics import Evaluation, evaluate, predict
from lab.task import build_for, load_state
from lab.triggers import Trigger, make_trigger

log = logging.getLogger(__name__)


class RunFolderError(LabError):
    """The run folder lacks something the tool needs, or holds something that does not fit."""


@dataclass(frozen=True)
class Run:
    path: Path
    cfg: ExperimentConfig
    data: DataBundle
    model: nn.Module
    checkpoint: Path

    @property
    def target(self) -> int:
        return self.cfg.dataset.target_class

    @property
    def source(self) -> int | None:
        return self.cfg.dataset.source_class

    def true_trigger(self) -> Trigger | None:
        """EVALUATION ONLY: the attack's real trigger (None when the run has no backdoor)."""
        if self.cfg.attack.type != "backdoor":
            return None
        _, h, w = self.data.image_shape
        return make_trigger(self.cfg.attack.trigger, h, w)

    def evaluate(self, model: nn.Module | None = None) -> Evaluation:
        """Test-set accuracy, loss, ASR (true trigger, evaluation only), source-class accuracy."""
        return evaluate(model or self.model, self.data.test, self.true_trigger(), self.target, self.source)


@dataclass(frozen=True)
class Reconstructions:
    images: Tensor  # (N, C, H, W) in [0, 1]
    labels: Tensor  # (N,) the labels the attack used or recovered
    origin: tuple[tuple[str, int], ...]  # (entry id, row in that entry) per image

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_run(path: Path, checkpoint: Path | None = None) -> Run:
    """The run's config, data and model with `checkpoint` (default: final.safetensors) loaded.

    Raises:
        RunFolderError: no config.yaml, no checkpoint, or a checkpoint that does not fit the model.
        ConfigError: the stored config does not validate.
    """
    if not (path / "config.yaml").is_file():
        raise RunFolderError(f"{path}: not a run folder (no config.yaml)")
    cfg = load_experiment(path / "config.yaml")
    data = load_data(cfg.dataset, cfg.seed)
    ckpt = checkpoint or path / "final.safetensors"
    if not ckpt.is_file():
        raise RunFolderError(f"{ckpt}: no such checkpoint (did the run finish?)")
    model = build_for(cfg, data)
    try:
        load_state(model, load_tensors(ckpt))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"{ckpt}: does not fit the run's {cfg.training.model} model ({first})") from None
    model.eval()
    return Run(path, cfg, data, model, ckpt)


def load_reconstructions(root: Path, shape: tuple[int, int, int]) -> Reconstructions:
    """Every inversion/<entry>/recon.safetensors under `root`, stacked (entries in sorted order).

    Raises:
        RunFolderError: `root` missing or without reconstructions, or images of the wrong shape.
    """
    files = sorted(root.rglob("recon.safetensors")) if root.is_dir() else []
    if not files:
        raise RunFolderError(f"{root}: no reconstructions (run `fl-lab invert` on the run first)")
    images, labels, origin = [], [], []
    for f in files:
        entry = f.parent.relative_to(root).as_posix()
        try:
            t = load_tensors(f)
        except Exception as exc:
            raise RunFolderError(f"{f}: unreadable ({type(exc).__name__})") from None
        if "images" not in t or "labels" not in t or tuple(t["images"].shape[1:]) != shape:
            got = tuple(t["images"].shape) if "images" in t else "no 'images' tensor"
            raise RunFolderError(f"{f}: expected images (B, {', '.join(map(str, shape))}) and labels, got {got}")
        images.append(t["images"].float().clamp(0, 1))
        labels.append(t["labels"].long())
        origin += [(entry, i) for i in range(len(t["labels"]))]
    return Reconstructions(torch.cat(images), torch.cat(labels), tuple(origin))


def verify(run: Run, recon: Reconstructions | None) -> dict[str, Any]:
    """The verification.json content (see module docstring)."""
    ev = run.evaluate()
    out: dict[str, Any] = {
        "run": str(run.path),
        "checkpoint": run.checkpoint.name,
        "target_class": run.target,
        "source_class": run.source,
        **ev.as_dict(),
        "asr_trigger": "true trigger from the run config (evaluation only)" if ev.asr is not None else None,
        "test_images": len(run.data.test),
        "reconstructions": [],
        "num_reconstructions": 0,
        "fires_target": 0,
        "fires_target_fraction": None,
    }
    if recon is None or len(recon) == 0:
        return out
    probs = predict(run.model, recon.images).softmax(1)  # (N, classes)
    pred = probs.argmax(1)
    rows = []
    for i, (entry, row) in enumerate(recon.origin):
        rows.append({
            "entry": entry, "index": row, "label": int(recon.labels[i]), "predicted": int(pred[i]),
            "confidence": round(float(probs[i, pred[i]]), 4),
            "target_probability": round(float(probs[i, run.target]), 4),
            "fires_target": bool(pred[i] == run.target),
        })
    fired = int((pred == run.target).sum())
    out.update(reconstructions=rows, num_reconstructions=len(rows), fires_target=fired,
               fires_target_fraction=fired / len(rows))
    return out


def read_image(path: Path, shape: tuple[int, int, int]) -> Tensor:
    """(N, C, H, W) in [0, 1] from a PNG/JPEG or a .safetensors file, resized to `shape`.

    Raises:
        RunFolderError: the file is missing or not an image.
    """
    if not path.is_file():
        raise RunFolderError(f"{path}: no such image file")
    c, h, w = shape
    if path.suffix == ".safetensors":
        try:
            tensors = load_tensors(path)
        except Exception as exc:
            raise RunFolderError(f"{path}: unreadable safetensors ({type(exc).__name__})") from None
        x = tensors.get("images", next(iter(tensors.values()), None))
        if x is None:
            raise RunFolderError(f"{path}: holds no tensor")
        x = x.float()
        x = x.view(1, 1, *x.shape) if x.dim() == 2 else x[None] if x.dim() == 3 else x
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if c == 1 else "RGB")
                import numpy as np

                x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).view(img.height, img.width, -1)
        except (UnidentifiedImageError, OSError) as exc:
            raise RunFolderError(f"{path}: not an image ({exc})") from None
        x = x.permute(2, 0, 1)[None] / 255.0
    if x.dim() != 4 or x.shape[1] not in (1, c):
        raise RunFolderError(f"{path}: expected {c}-channel images, got shape {tuple(x.shape)}")
    x = x.expand(-1, c, -1, -1)
    if tuple(x.shape[-2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)
