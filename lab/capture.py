"""Capture entries: what a curious server records about one client's update, on disk.

One entry is one safetensors file. Tensors are named `global/<key>` (the weights the server sent),
`update/<key>` (client weights minus global, same keys; integer buffers are zero) and, only when the
threat model grants them, `labels`. The scalars live in the safetensors metadata, each value a
JSON-encoded string. Writes are atomic (`lab.artifacts.save_tensors`), so a crash never leaves a
half-written entry, and private (0600 files, 0700 folders); a truncated or foreign file raises
`CaptureError` naming the file.

Semantics of an update (what the inversion's unrolled objective assumes): the client started from
`global_state`, set its model to train mode and ran `steps` steps of `torch.optim.SGD(lr, momentum,
weight_decay)` with mean cross-entropy on ONE fixed batch of `batch_size` images reused at every
step (the curious server's probe, "K steps on a batch of B", as in breaching's FedAvg case). With
`steps == 1` this is FedSGD: `update = -lr * (grad + weight_decay * W0)`.

The evidence file (simulation only) holds the exact images in [0, 1] and labels the client used.
The attack never reads it; only scoring does.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from lab.artifacts import private_dirs, save_tensors
from lab.errors import CaptureError
from lab.task import LocalHyperparams

FORMAT = "fl-lab-capture/1"
EVIDENCE_FORMAT = "fl-lab-evidence/1"
_SCALARS = ("num_examples", "server_round", "node_id", "partition_id")
# What an entry may claim. A foreign file may claim anything: 10^12 examples become the size of the
# dummy batch, 10^9 local steps the length of every unrolled objective. The lab's own are far below.
MAX_EXAMPLES = 10_000_000
MAX_LOCAL_STEPS = 10_000


@dataclass(frozen=True)
class CapturedUpdate:
    """One client's update as the curious server saw it.

    `global_state` and `update` map the model's state-dict keys to tensors of the same shapes;
    `labels` is (B,) int64 or None when the threat model does not grant labels.
    """

    global_state: dict[str, Tensor]
    update: dict[str, Tensor]
    num_examples: int
    server_round: int
    node_id: int
    partition_id: int
    hyperparams: LocalHyperparams
    labels: Tensor | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the client's inputs

    @property
    def local_steps(self) -> int:
        """SGD steps the client took: `hyperparams.steps`, else epochs x batches per epoch."""
        hp = self.hyperparams
        if hp.steps is not None:
            return int(hp.steps)
        per_epoch = -(-max(self.num_examples, 1) // max(hp.batch_size, 1))
        return int(hp.epochs * per_epoch)

    def to(self, device: torch.device) -> CapturedUpdate:
        """The same entry with its tensors on `device` (the entry itself when they already are)."""
        tensors = [*self.global_state.values(), *self.update.values(), *([] if self.labels is None else [self.labels])]
        if all(t.device == device for t in tensors):
            return self
        return replace(self, global_state={k: v.to(device) for k, v in self.global_state.items()},
                       update={k: v.to(device) for k, v in self.update.items()},
                       labels=None if self.labels is None else self.labels.to(device))


def write_entry(path: Path, entry: CapturedUpdate) -> None:
    """Write `entry` atomically to `path` (one safetensors file)."""
    if set(entry.global_state) != set(entry.update):
        raise CaptureError(f"{path}: global and update keys differ")
    tensors: dict[str, Tensor] = {f"global/{k}": v for k, v in entry.global_state.items()}
    tensors.update({f"update/{k}": v for k, v in entry.update.items()})
    if entry.labels is not None:
        tensors["labels"] = entry.labels.to(torch.int64)
    meta: dict[str, Any] = {k: getattr(entry, k) for k in _SCALARS}
    meta["hyperparams"] = asdict(entry.hyperparams)
    meta["keys"] = list(entry.global_state)  # keeps the model's key order through the round trip
    meta["image_shape"] = list(entry.image_shape) if entry.image_shape is not None else None
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["format"] = json.dumps(FORMAT)
    _save_private(Path(path), tensors, metadata)


def read_entry(path: Path) -> CapturedUpdate:
    """Read a capture entry.

    Raises:
        CaptureError: the file is missing, truncated/corrupt, or lacks tensors or metadata.
    """
    tensors, meta = _read(Path(path), "capture entry")
    if meta.get("format") != FORMAT:
        raise CaptureError(f"{path}: not a capture entry (format {meta.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in (*_SCALARS, "hyperparams", "keys") if k not in meta]
    if missing:
        raise CaptureError(f"{path}: capture entry lacks metadata {missing}")
    keys = meta["keys"]
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CaptureError(f"{path}: bad capture metadata (keys must be a list of names)")
    absent = [k for k in keys if f"global/{k}" not in tensors or f"update/{k}" not in tensors]
    if absent:
        raise CaptureError(f"{path}: capture entry lacks tensors for {absent[:3]}")
    try:
        hp = _hyperparams(meta["hyperparams"])
        scalars = {k: int(meta[k]) for k in _SCALARS}
        shape = meta.get("image_shape")
        image_shape = (int(shape[0]), int(shape[1]), int(shape[2])) if shape is not None else None
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise CaptureError(f"{path}: bad capture metadata ({exc})") from None
    if image_shape is not None and (len(shape) != 3 or min(image_shape) < 1):
        raise CaptureError(f"{path}: bad capture metadata (image_shape {shape!r} is not (C, H, W))")
    labels = tensors.get("labels")
    if labels is not None and (labels.ndim != 1 or labels.is_floating_point() or labels.is_complex()):
        raise CaptureError(f"{path}: labels must be (B,) integers, got {labels.dtype} {tuple(labels.shape)}")
    if not 0 <= scalars["num_examples"] <= MAX_EXAMPLES or hp.batch_size > MAX_EXAMPLES:
        raise CaptureError(f"{path}: bad capture metadata (num_examples {scalars['num_examples']} and batch_size "
                           f"{hp.batch_size} must lie in 0..{MAX_EXAMPLES:,})")
    entry = CapturedUpdate(
        global_state={k: tensors[f"global/{k}"] for k in keys},
        update={k: tensors[f"update/{k}"] for k in keys},
        hyperparams=hp,
        labels=labels,
        image_shape=image_shape,
        **scalars,
    )
    if entry.local_steps > MAX_LOCAL_STEPS:
        raise CaptureError(f"{path}: bad capture metadata (the client would have taken {entry.local_steps:,} local "
                           f"steps; an inversion unrolls at most {MAX_LOCAL_STEPS:,})")
    return entry


def evidence_path(captures: Path, server_round: int, partition: int) -> Path:
    """Where a simulated client leaves the exact batch it trained on in a probe round (scoring only)."""
    return captures / "evidence" / f"round_{server_round:04d}_partition_{partition:03d}.safetensors"


def write_evidence(path: Path, images: Tensor, labels: Tensor) -> None:
    """Simulation-only ground truth: `images` (B, C, H, W) in [0, 1] and `labels` (B,)."""
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise CaptureError(f"{path}: evidence wants images (B,C,H,W) and labels (B,), "
                           f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    _save_private(Path(path), {"images": images.float(), "labels": labels.to(torch.int64)},
                  {"format": json.dumps(EVIDENCE_FORMAT)})


def _save_private(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Captures and evidence are private data (an update gives the client's images away): the file
    is 0600 from its creation, and the folders this write creates are 0700."""
    private_dirs(path.parent)
    save_tensors(path, tensors, metadata, private=True)


def read_evidence(path: Path) -> tuple[Tensor, Tensor]:
    """(images (B, C, H, W) float32 in [0, 1], labels (B,) int64) from an evidence file.

    Raises:
        CaptureError: the file is missing, corrupt or not an evidence file.
    """
    tensors, meta = _read(Path(path), "evidence file")
    if meta.get("format") != EVIDENCE_FORMAT or "images" not in tensors or "labels" not in tensors:
        raise CaptureError(f"{path}: not an evidence file")
    images, labels = tensors["images"], tensors["labels"]
    if (images.ndim != 4 or not images.is_floating_point() or labels.shape != (images.shape[0],)
            or labels.is_floating_point() or labels.is_complex() or bool((labels < 0).any())):
        raise CaptureError(f"{path}: evidence wants float images (B,C,H,W) and labels (B,) >= 0, "
                           f"got {images.dtype} {tuple(images.shape)} and {labels.dtype} {tuple(labels.shape)}")
    return images.float(), labels.long()


def check_fits(entry: CapturedUpdate, model: nn.Module) -> None:
    """Raise CaptureError unless the entry's keys and shapes are exactly the model's state dict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for name, state in (("global", entry.global_state), ("update", entry.update)):
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            problems.append(f"{name} keys differ from the model (missing {missing[:3]}, extra {extra[:3]})")
            continue
        problems += [f"{name}/{k}: shape {tuple(state[k].shape)} != model {shape}"
                     for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if problems:
        raise CaptureError("capture entry does not fit the model: " + "; ".join(problems[:4]))


def _hyperparams(raw: Any) -> LocalHyperparams:
    """LocalHyperparams from an entry's metadata, with the types checked (a foreign file may hold anything)."""
    hp = LocalHyperparams(**raw)
    ints = [hp.epochs, hp.batch_size] + ([] if hp.steps is None else [hp.steps])
    floats = [hp.lr, hp.momentum, hp.weight_decay]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise ValueError(f"hyperparams {raw!r}: epochs, steps and batch_size must be integers >= 0")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in floats):
        raise ValueError(f"hyperparams {raw!r}: lr, momentum and weight_decay must be finite numbers")
    return hp


def _read(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """All tensors and the JSON-decoded metadata of a safetensors file, or one CaptureError line."""
    if not path.is_file():
        raise CaptureError(f"{path}: no such {what}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw: Mapping[str, str] = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
        meta = {k: json.loads(v) for k, v in raw.items()}
    except Exception as exc:  # safetensors raises its own error types for torn headers and bodies
        raise CaptureError(f"{path}: truncated or corrupt {what} ({type(exc).__name__}: {exc})") from None
    return tensors, meta


def probe_update(model: nn.Module, images: Tensor, labels: Tensor, hp: LocalHyperparams) -> dict[str, Tensor]:
    """What a client answering the probe sends, as client - global: `hp.steps` (default 1) steps of
    torch.optim.SGD on the one batch (`images` (B, C, H, W) in [0, 1], `labels` (B,)), train mode.

    `model` is not modified. This is the semantics the inversion assumes; the client under a probe
    and the tests use it to produce updates.
    """
    net = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    for _ in range(hp.steps or 1):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
        opt.step()
    after = net.state_dict()
    return {k: (after[k] - v) if v.is_floating_point() else torch.zeros_like(v) for k, v in before.items()}


UPPER_BOUND_NOTE = "UPPER BOUND: attackers picked by ground truth, which a real server cannot know"


def capture_selection(row: Mapping[str, Any], clients: object) -> dict[str, Any]:
    """How a manifest row's entry was chosen (its `selection`, else the run's `capture.clients`).

    Every inversion and unlearning output carries this, so a result that rests on the ground-truth
    capture (`malicious`) says it is an upper bound wherever it is read.
    """
    chosen = row.get("selection")
    if isinstance(chosen, Mapping):
        return dict(chosen)
    mode = clients if isinstance(clients, str) else "listed"
    out: dict[str, Any] = {"mode": mode, "upper_bound": mode == "malicious"}
    if mode == "malicious":
        out["note"] = UPPER_BOUND_NOTE
    return out


def stamped(images: Tensor, trigger: Any, tolerance: float = 0.1) -> Tensor:
    """SCORING ONLY: (B,) bool, which of `images` (B, C, H, W) carry `trigger` (a `lab.triggers.Trigger`):
    the mean |image - pattern| over the mask is below `tolerance`."""
    m = trigger.mask.to(images.dtype)
    diff = ((images - trigger.pattern.to(images.dtype)).abs() * m).sum((-1, -2)).mean(-1)  # (B,)
    return diff / m.sum().clamp_min(1) < tolerance
