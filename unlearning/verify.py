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
from lab.capture import UPPER_BOUND_NOTE, capture_selection
from lab.config import ExperimentConfig, load_experiment
from lab.data import DataBundle, load_data
from lab.errors import LabError
from lab.metrics import Evaluation, evaluate, predict
from lab.runfolder import contained, read_manifest
from lab.task import build_for, load_state
from lab.triggers import Trigger, make_trigger

log = logging.getLogger(__name__)


# An image file may claim any size in its header; the lab's images are tiny (8x8 to 32x32), so a
# few megapixels is already generous. Checked from the header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 4096 * 4096


class RunFolderError(LabError):
    """The run folder lacks something the tool needs, or holds something that does not fit."""


class NoReconstructions(RunFolderError):
    """There is nothing to load (no folder, or no recon.safetensors in it): not a damaged file."""


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
        if not self.cfg.attack.plants_trigger:
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


def capture_of(run: Run) -> dict[str, Any]:
    """How the run's captured entries were chosen (`lab.capture.capture_selection` over the manifest).

    `upper_bound` is True when any entry was picked by ground truth (`capture.clients: malicious`):
    the whole chain's result is then an upper bound, not what a real server achieves.
    """
    try:
        rows = [e.row for e in read_manifest(run.path)]
    except LabError:
        rows = []
    picks = [capture_selection(r, run.cfg.capture.clients) for r in rows] or \
        [capture_selection({}, run.cfg.capture.clients)]
    bound = any(bool(c.get("upper_bound")) for c in picks)
    return {"modes": sorted({str(c.get("mode")) for c in picks}), "upper_bound": bound,
            "partitions": [r.get("partition_id") for r in rows],
            **({"note": UPPER_BOUND_NOTE} if bound else {})}


def load_run(path: Path, checkpoint: Path | None = None) -> Run:
    """The run's config, data and model with `checkpoint` (default: final.safetensors) loaded.

    Raises:
        RunFolderError: no config.yaml, no checkpoint, or a checkpoint that does not fit the model.
        UnsafePathError: config.yaml or final.safetensors is a link that leads outside the run folder.
        ConfigError: the stored config does not validate.
    """
    if not (path / "config.yaml").is_file():
        raise RunFolderError(f"{path}: not a run folder (no config.yaml)")
    cfg = load_experiment(contained(path, "config.yaml", "run config"))
    data = load_data(cfg.dataset, cfg.seed)
    ckpt = checkpoint or path / "final.safetensors"
    if not ckpt.is_file():
        raise RunFolderError(f"{ckpt}: no such checkpoint (did the run finish?)")
    source = ckpt if checkpoint else contained(path, "final.safetensors", "final model")  # a user's --checkpoint is theirs
    model = build_for(cfg, data)
    try:
        load_state(model, load_tensors(source))
    except Exception as exc:  # safetensors raises its own types for corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"{ckpt}: does not fit the run's {cfg.training.model} model ({first})") from None
    model.eval()
    return Run(path, cfg, data, model, ckpt)


def load_reconstructions(root: Path, shape: tuple[int, int, int], num_classes: int | None = None) -> Reconstructions:
    """Every inversion/<entry>/recon.safetensors under `root`, stacked (entries in sorted order).

    Raises:
        NoReconstructions: `root` missing or without reconstructions.
        RunFolderError: a file that is unreadable, or not images (B, *shape) in [0, 1] with labels
            (B,) in [0, num_classes).
        UnsafePathError: a recon.safetensors that is a link leading outside `root`.
    """
    files = sorted(root.rglob("recon.safetensors")) if root.is_dir() else []
    if not files:
        raise NoReconstructions(f"{root}: no reconstructions (run `fl-lab invert` on the run first)")
    images, labels, origin = [], [], []
    for f in files:
        entry = f.parent.relative_to(root).as_posix()
        source = contained(root, f.relative_to(root), "reconstruction")
        try:
            t = load_tensors(source)
        except Exception as exc:
            raise RunFolderError(f"{f}: unreadable ({type(exc).__name__})") from None
        if "images" not in t or "labels" not in t or tuple(t["images"].shape[1:]) != shape:
            got = tuple(t["images"].shape) if "images" in t else "no 'images' tensor"
            raise RunFolderError(f"{f}: expected images (B, {', '.join(map(str, shape))}) and labels, got {got}")
        y = t["labels"]
        if (y.shape != t["images"].shape[:1] or y.is_floating_point() or y.is_complex()
                or (len(y) and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)))):
            raise RunFolderError(f"{f}: labels must be {len(t['images'])} class indices"
                                 + (f" in [0, {num_classes})" if num_classes is not None else ""))
        if not bool(torch.isfinite(t["images"].float()).all()):
            raise RunFolderError(f"{f}: images hold NaN or infinite values")
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
    """(N, C, H, W) in [0, 1] from a PNG/JPEG (BMP, GIF, WebP, PPM) or a .safetensors file, resized to `shape`.

    Raises:
        RunFolderError: the file is missing, not an image, or claims more than MAX_IMAGE_PIXELS.
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
        x = _decode_image(path, gray=c == 1).permute(2, 0, 1)[None] / 255.0
    if x.dim() != 4 or x.shape[1] not in (1, c) or x.numel() == 0:
        raise RunFolderError(f"{path}: expected {c}-channel images, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise RunFolderError(f"{path}: holds NaN or infinite values")
    x = x.expand(-1, c, -1, -1)
    if tuple(x.shape[-2:]) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0, 1)


def _decode_image(path: Path, gray: bool) -> Tensor:
    """(H, W, channels) float32 in [0, 255]; the pixel count is checked from the header first."""
    import warnings

    import numpy as np
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own, milder limit
            # Plain raster formats only: no plugin that hands the file to an outside program (EPS).
            with Image.open(path, formats=("PNG", "JPEG", "BMP", "GIF", "WEBP", "PPM")) as img:  # header only
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise RunFolderError(f"{path}: {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} "
                                         "an image may have here; refused before decoding")
                img = img.convert("L" if gray else "RGB")  # decodes
                x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).view(img.height, img.width, -1)
    except RunFolderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RunFolderError(f"{path}: image too large, refused before decoding ({exc})") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for broken files
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RunFolderError(f"{path}: not a readable image ({type(exc).__name__}{': ' + text if text else ''})") from None
    return x
