"""Reconstruction quality: PSNR, SSIM, optimal matching to the ground truth, label accuracy.

Pure batched torch functions on images (B, C, H, W) in [0, 1].
- PSNR = 10 log10(1 / MSE) per image. The MSE is floored at 1e-12, so identical images give
  PSNR_MAX = 120 dB instead of infinity (JSON-safe, and what the prototype reported as the cap).
- SSIM (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004): Gaussian window 11, sigma 1.5,
  K1 = 0.01, K2 = 0.03, data range 1, "valid" windows only, averaged over pixels and channels.
- A reconstruction of a batch comes back in an arbitrary order, so scores are taken after the
  optimal one-to-one matching of reconstructions to ground-truth images (Hungarian algorithm,
  scipy.optimize.linear_sum_assignment, maximising the total PSNR).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MSE_FLOOR = 1e-12
PSNR_MAX = 120.0  # = 10 log10(1 / MSE_FLOOR)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """(B,) PSNR in dB between x and y, both (B, C, H, W) in [0, 1]; capped at PSNR_MAX."""
    mse = ((x.double() - y.double()) ** 2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))).float()


def pairwise_psnr(x: Tensor, y: Tensor) -> Tensor:
    """(Bx, By) PSNR of every reconstruction x[i] against every ground truth y[j]."""
    mse = ((x.double().flatten(1)[:, None] - y.double().flatten(1)[None]) ** 2).mean(dim=2)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """(B,) mean SSIM between x and y, both (B, C, H, W) in [0, 1].

    Raises:
        ValueError: the images are smaller than the window.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim wants two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    b, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"ssim: images {h}x{w} are smaller than the {window}x{window} window")
    g = _gaussian_window(window, sigma)
    kh = g.view(1, 1, window, 1).expand(c, 1, window, 1)
    kw = g.view(1, 1, 1, window).expand(c, 1, 1, window)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian filter per channel, valid windows
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(dim=1).float()


def label_accuracy(predicted: Tensor, true: Tensor) -> float:
    """Order-free share of labels recovered: sum_c min(#pred_c, #true_c) / B (multiset overlap)."""
    if len(true) == 0:
        return float("nan")
    classes = int(torch.cat([predicted, true]).max()) + 1
    hit = torch.minimum(torch.bincount(predicted, minlength=classes), torch.bincount(true, minlength=classes))
    return float(hit.sum()) / len(true)


def match(reconstructed: Tensor, truth: Tensor) -> Tensor:
    """(B,) permutation `order` maximising total PSNR: reconstructed[i] pairs with truth[order[i]].

    Both are (B, C, H, W); for unequal counts use `score`, which returns the matched pairs.
    """
    if reconstructed.shape[0] != truth.shape[0]:
        raise ValueError(f"match wants equal counts, got {reconstructed.shape[0]} and {truth.shape[0]}")
    rows, cols = linear_sum_assignment((-pairwise_psnr(reconstructed, truth)).numpy())
    order = torch.empty(len(rows), dtype=torch.int64)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    return order


@dataclass(frozen=True)
class Scores:
    """Per matched pair: reconstruction `rows[i]` pairs with ground truth `cols[i]`."""

    rows: Tensor  # (M,) indices into the reconstructions
    cols: Tensor  # (M,) indices into the ground truth
    psnr: Tensor  # (M,) dB
    ssim: Tensor  # (M,)
    label_accuracy: float | None  # order-free, None without labels
    matched_label_accuracy: float | None  # share of matched pairs whose labels agree

    def summary(self) -> dict[str, float | None]:
        return {"psnr": float(self.psnr.mean()), "ssim": float(self.ssim.mean()),
                "label_accuracy": self.label_accuracy, "matched_label_accuracy": self.matched_label_accuracy}


def score(reconstructed: Tensor, truth: Tensor, reconstructed_labels: Tensor | None = None,
          true_labels: Tensor | None = None) -> Scores:
    """Match reconstructions (Br, C, H, W) to ground truth (Bt, C, H, W), then score each pair.

    SSIM falls back to NaN for images smaller than its 11x11 window.
    """
    rows, cols = linear_sum_assignment((-pairwise_psnr(reconstructed, truth)).numpy())
    rows_t, cols_t = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
    x, y = reconstructed[rows_t], truth[cols_t]
    p = psnr(x, y)
    try:
        s = ssim(x, y)
    except ValueError:
        s = torch.full_like(p, float("nan"))
    acc = matched = None
    if reconstructed_labels is not None and true_labels is not None:
        acc = label_accuracy(reconstructed_labels, true_labels)
        matched = float((reconstructed_labels[rows_t] == true_labels[cols_t]).float().mean())
    return Scores(rows_t, cols_t, p, s, acc, matched)
