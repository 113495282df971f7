"""PSNR, SSIM, Hungarian matching and label accuracy on hand-checkable cases."""

from __future__ import annotations

import math

import pytest
import torch

from inversion.metrics import PSNR_MAX, label_accuracy, match, psnr, score, ssim


def test_psnr_of_identical_images_is_the_cap() -> None:
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(psnr(x, x), torch.full((3,), PSNR_MAX))
    assert math.isfinite(PSNR_MAX)


def test_psnr_known_mse() -> None:
    x = torch.full((2, 3, 4, 4), 0.5)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :2] += 0.2  # half the pixels off by 0.2: MSE 0.02 -> 16.99 dB
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 10 * math.log10(50)]), atol=1e-4)


def test_ssim_identical_is_one_and_constant_images_match_hand_value() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # Constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1).
    a, b = torch.full((1, 1, 12, 12), 0.5), torch.full((1, 1, 12, 12), 0.25)
    expected = (2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4)
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-6)


def test_ssim_drops_for_noise_and_is_symmetric() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 28, 28, generator=gen)
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    assert ssim(x, y).item() < 0.9
    assert ssim(x, y).item() == pytest.approx(ssim(y, x).item(), abs=1e-6)


def test_ssim_rejects_images_smaller_than_window() -> None:
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_hungarian_matching_undoes_a_permutation() -> None:
    truth = torch.rand(4, 1, 12, 12)
    perm = torch.tensor([2, 0, 3, 1])
    recon = truth[perm]  # recon[i] is truth[perm[i]]
    assert match(recon, truth).tolist() == perm.tolist()
    s = score(recon, truth, torch.tensor([5, 6, 7, 8])[perm], torch.tensor([5, 6, 7, 8]))
    assert s.cols.tolist() == perm.tolist()
    assert torch.allclose(s.psnr, torch.full((4,), PSNR_MAX)) and torch.allclose(s.ssim, torch.ones(4))
    assert s.label_accuracy == 1.0 and s.matched_label_accuracy == 1.0


def test_label_accuracy_is_multiset_overlap() -> None:
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 2])) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([3]), torch.tensor([4])) == 0.0
