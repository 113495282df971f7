"""Label recovery from the last fully-connected layer's gradient.

- iDLG (Zhao, Mopuri, Bilen 2020, arXiv:2001.02610), one image: with mean cross-entropy and
  non-negative features h, dL/dW_last[c] = (p_c - y_c) h, so only the true class has a negative
  row sum: y = argmin_c sum_j dW_last[c, j].
- Bias-corrected counting (Geiping et al.'s breaching, after Wainakh et al. 2022), a batch of B:
  db_c = (1/B) sum_n (p_nc - y_nc) is negative for every class present. Take those classes first,
  estimate one sample's impact as m = (sum of the negative entries) / B, lift the taken classes by
  |m|, then repeatedly take the argmin class and lift it by |m| until B labels are chosen. This
  handles repeated labels.

A captured update is about `-lr * sum of gradients`, so rules read `schedule.gradient_part`, which
negates and rescales it (and removes the weight-decay part) first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from inversion.schedule import gradient_part
from lab.capture import CapturedUpdate
from lab.errors import CaptureError

log = logging.getLogger(__name__)


def last_linear_keys(model: nn.Module) -> tuple[str, str]:
    """State-dict keys (weight, bias) of the model's last nn.Linear.

    Raises:
        ValueError: the model has no Linear layer with a bias.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if not names:
        raise ValueError("label recovery needs a final nn.Linear layer with a bias")
    return f"{names[-1]}.weight", f"{names[-1]}.bias"


def idlg(weight_grad: Tensor) -> Tensor:
    """(1,) int64: the class whose row of the last weight gradient (classes, features) sums lowest."""
    return weight_grad.sum(dim=1).argmin().reshape(1)


def bias_corrected(bias_grad: Tensor, num_images: int) -> Tensor:
    """(num_images,) int64 labels from the last bias gradient (classes,), repeats allowed."""
    bias = bias_grad.double().clone()
    present = (bias < 0).nonzero().flatten()
    if len(present) == 0:  # no negative entry: fall back to plain argmin counting
        present = bias.argmin().reshape(1)
    chosen = present[torch.argsort(bias[present])][:num_images].tolist()
    impact = float(bias[present].sum()) / num_images  # one sample's (negative) contribution
    bias[present] -= impact
    while len(chosen) < num_images:
        c = int(bias.argmin())
        chosen.append(c)
        bias[c] -= impact
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def recovered_labels(entry: CapturedUpdate, model: nn.Module, num_images: int) -> Tensor:
    """(num_images,) labels from the update alone: iDLG for one image, bias-corrected otherwise."""
    weight_key, bias_key = last_linear_keys(model)
    grads = gradient_part(entry)
    labels = idlg(grads[weight_key]) if num_images == 1 else bias_corrected(grads[bias_key], num_images)
    log.debug("recovered labels %s", labels.tolist())
    return labels


def known_labels(entry: CapturedUpdate, model: nn.Module, num_images: int) -> Tensor:
    """The labels the threat model granted (stored in the entry).

    Raises:
        CaptureError: the entry holds no labels, or not `num_images` of them.
    """
    if entry.labels is None:
        raise CaptureError("labels='known' but the capture entry holds no labels "
                           "(the threat model does not grant them); use labels='recovered'")
    if len(entry.labels) != num_images:
        raise CaptureError(f"the entry holds {len(entry.labels)} labels but {num_images} images were asked for")
    return entry.labels.to(torch.int64)


LABEL_SOURCES: dict[str, Callable[[CapturedUpdate, nn.Module, int], Tensor]] = {
    "known": known_labels,
    "recovered": recovered_labels,
}


def count_images(entry: CapturedUpdate, num_images: int | None) -> int:
    """How many images to reconstruct: as asked, else the granted labels, else the probe's batch."""
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        return num_images
    if entry.labels is not None:
        return len(entry.labels)
    return max(1, min(entry.hyperparams.batch_size, entry.num_examples))
