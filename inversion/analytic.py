"""Closed-form reconstruction through a fully-connected first layer.

Geiping et al., NeurIPS 2020, Prop. (any input to a fully-connected layer can be reconstructed);
also Phong et al. 2018 and Fowl et al., ICLR 2022 (breaching's `analytic` attacker). For
y = W x + b with mean loss over a batch, dL/dW[i] = sum_n delta_ni x_n^T and dL/db[i] = sum_n delta_ni,
so a row i that only one image n activates gives x_n = dW[i] / db[i] exactly.

Through K local SGD steps on one fixed batch (momentum, weight decay) the input x never changes, so
once the weight-decay part (alpha_K - 1) W0 is removed (see `inversion.schedule`) every row of the
weight update is still a multiple of x_n with the bias update as its coefficient: exact for one
image however many steps. For a small batch, rows whose recovered x nearly coincide ("repeated
rows") are units active for one image only; each group of repeats is one exact image. Pure rows
become rare as 2^-B, so expect this to work for B <= ~4.

The recovered x lives in the model's normalised input space (the first module is Normalize); it
is mapped back to pixels with the Normalize mean and std.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from inversion.labels import LABEL_SOURCES, count_images
from inversion.objective import input_stats
from inversion.schedule import LocalSchedule
from inversion.types import Reconstruction
from lab.capture import CapturedUpdate, check_fits
from lab.errors import CaptureError, ConfigError

log = logging.getLogger(__name__)

_PASSIVE = (nn.Flatten, nn.Identity)  # modules allowed between Normalize and the first Linear


def first_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(state-dict prefix, layer) of a Linear that sees the (flattened, normalised) input directly.

    Raises:
        ValueError: the first layer with parameters is not a Linear with bias, or something other
            than Normalize / Flatten comes before it.
    """
    for name, module in model.named_modules():
        if list(module.children()):
            continue  # containers
        if isinstance(module, nn.Linear) and module.bias is not None:
            return name, module
        if isinstance(module, _PASSIVE) or (hasattr(module, "mean") and hasattr(module, "std")
                                            and not list(module.parameters())):
            continue
        raise ValueError(f"the analytic attack needs a model whose first layer is Flatten + Linear "
                         f"(lab model 'mlp'); this one starts with {type(module).__name__} ({name})")
    raise ValueError("the analytic attack needs a Linear layer on the input; the model has none")


def invert_rows(dw: Tensor, db: Tensor, num_images: int, rel_tol: float = 1e-3,
                min_bias: float = 1e-6) -> tuple[Tensor, int]:
    """Inputs (num_images, D) from a first-layer weight update dw (units, D) and bias update db (units,).

    One image: the least-squares x minimising |dw - db x^T| (every active row is a multiple of x).
    Several: greedy groups of rows whose x_i = dw[i]/db[i] agree within `rel_tol` (relative L2);
    the largest groups of >= 2 rows are exact images; missing ones are filled with the remaining
    rows of largest |db| (mixtures, not exact). Returns (images, number found as repeats).
    """
    valid = db.abs() > min_bias * db.abs().max().clamp_min(1e-30)
    dw, db = dw[valid].double(), db[valid].double()
    if len(db) == 0:
        raise ValueError("the first layer's bias update is zero: no input can be recovered")
    if num_images == 1:
        x = (db[:, None] * dw).sum(dim=0) / (db * db).sum()  # (D,)
        return x[None].float(), 1
    cand = dw / db[:, None]  # (rows, D) one candidate input per active unit
    norms = cand.norm(dim=1)
    dist = torch.cdist(cand, cand) / (norms[:, None] + norms[None, :]).clamp_min(1e-30)  # (rows, rows)
    free = torch.ones(len(db), dtype=torch.bool)
    groups: list[Tensor] = []
    for i in torch.argsort(db.abs(), descending=True).tolist():
        if not free[i]:
            continue
        members = (free & (dist[i] < rel_tol)).nonzero().flatten()
        free[members] = False
        groups.append(members)
    groups.sort(key=lambda g: (-len(g), -float(db[g].abs().sum())))
    repeats = [g for g in groups if len(g) >= 2][:num_images]
    fill = [g for g in groups if len(g) < 2][: num_images - len(repeats)]
    images = [(db[g, None] * dw[g]).sum(0) / (db[g] ** 2).sum() for g in repeats + fill]
    return torch.stack(images).float(), len(repeats)


class AnalyticAttack:
    """`reconstruct(entry, model)`: x = dW[i] / db[i] of the first fully-connected layer."""

    name = "analytic"

    def __init__(self, *, labels: str = "recovered", num_images: int | None = None, rel_tol: float = 1e-3,
                 **_: object) -> None:
        if labels not in LABEL_SOURCES:
            raise ConfigError(f"unknown labels source {labels!r}; known: {sorted(LABEL_SOURCES)}")
        self.labels = labels
        self.num_images = num_images
        self.rel_tol = rel_tol

    def reconstruct(self, target: CapturedUpdate, model: nn.Module) -> Reconstruction:
        """Closed-form images from the first layer's update; milliseconds, no optimisation.

        Raises:
            CaptureError: the entry does not fit the model, or it has no image shape.
            ValueError: the model has no fully-connected first layer.
        """
        start = time.perf_counter()
        check_fits(target, model)
        prefix, layer = first_linear(model)
        shape = target.image_shape
        if shape is None:
            raise CaptureError("the capture entry has no image_shape; the analytic attack needs it")
        n = count_images(target, self.num_images)
        shrink = LocalSchedule.of(target).decay_factor() - 1.0  # remove the weight-decay part
        w_key, b_key = f"{prefix}.weight", f"{prefix}.bias"
        dw = target.update[w_key].float() - shrink * target.global_state[w_key].float()
        db = target.update[b_key].float() - shrink * target.global_state[b_key].float()
        z, found = invert_rows(dw, db, n, self.rel_tol)  # (n, C*H*W) normalised inputs
        mean, std = input_stats(model)
        images = (z.view(-1, *shape) * std + mean).clamp(0.0, 1.0)
        labels = LABEL_SOURCES[self.labels](target, model, n)  # reads the update and layer names only
        seconds = time.perf_counter() - start
        log.info("analytic: %d of %d images from repeated rows, %.3f s", found, n, seconds)
        return Reconstruction(images=images, labels=labels, loss=0.0, iterations=0, seconds=seconds,
                              attack=self.name, stats={"exact_images": float(found)})
