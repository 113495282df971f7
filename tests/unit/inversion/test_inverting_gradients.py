"""Inverting Gradients on the untrained digits CNN: objective oracles, quality, interrupt, errors."""

from __future__ import annotations

import pytest
import torch

from inversion import invert_entry
from inversion.metrics import psnr, score
from inversion.objective import UpdateMatcher, model_at
from inversion.optimizer import milestones
from lab.capture import CapturedUpdate, probe_update
from lab.config import DatasetConfig
from lab.data import load_data
from lab.errors import CaptureError, ConfigError
from lab.models import build_model
from lab.task import LocalHyperparams


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    torch.set_num_threads(1)
    d = load_data(DatasetConfig(), 0)
    return d.train.x, d.train.y, build_model("cnn", d.image_shape, 10, d.mean, d.std, seed=0)


def _entry(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1,
           labels: bool = True) -> CapturedUpdate:
    hp = LocalHyperparams(epochs=1, steps=steps, batch_size=len(y), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return CapturedUpdate({k: v.clone() for k, v in model.state_dict().items()}, probe_update(model, x, y, hp),
                          len(y), 1, 0, 0, hp, y if labels else None, tuple(x.shape[1:]))


@pytest.mark.parametrize("steps", [1, 3])
def test_true_images_have_zero_loss_and_backends_agree(digits: tuple, steps: int) -> None:
    """Oracle: the unrolled candidate update at the true images is the client's update (cos = 1),
    and the vmap backend computes the same objective and gradient as the autograd one."""
    x, y, model = digits
    entry = _entry(model, x[:2], y[:2], steps)
    net = model_at(entry, model)
    matcher = UpdateMatcher(entry, net, y[:2], tv=1e-3)
    z_true = ((x[:2] - matcher.mean) / matcher.std)[None]  # (1, B, C, H, W)
    _, rec, _ = matcher.autograd_fn()(z_true)
    assert rec.item() < 1e-5
    z = torch.randn(2, 2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ga, ra, ta = matcher.autograd_fn()(z)
    gv, rv, tv = matcher.vmap_fn()(z)
    assert torch.allclose(ra, rv, atol=1e-5) and torch.allclose(ta, tv, atol=1e-5)
    assert torch.allclose(ga, gv, atol=1e-5, rtol=1e-3)


def test_milestones_at_three_five_seven_eighths() -> None:
    assert milestones(24_000) == [9_000, 15_000, 21_000]


def test_beats_grey_baseline_by_10_db(digits: tuple) -> None:
    x, y, model = digits
    truth = x[5:6]
    entry = _entry(model, truth, y[5:6])
    rec = invert_entry(entry, model, preset="fast-cpu", labels="recovered", iterations=300, restarts=1,
                       tv=1e-2, seed=0)
    grey = psnr(torch.full_like(truth, 0.5), truth).item()
    got = score(rec.images, truth, rec.labels, y[5:6])
    assert rec.images.shape == (1, 1, 28, 28) and 0 <= rec.images.min() and rec.images.max() <= 1
    assert got.label_accuracy == 1.0
    assert got.psnr.item() > grey + 10.0, (got.psnr.item(), grey)
    assert rec.iterations == 300 and not rec.interrupted and rec.loss == min(rec.restart_losses)


def test_dry_run_and_vectorized_restarts(digits: tuple) -> None:
    x, y, model = digits
    calls: list[tuple[int, float]] = []
    rec = invert_entry(_entry(model, x[:1], y[:1]), model, preset="dry-run", restarts=8,
                       progress=lambda i, loss: calls.append((i, loss)))
    assert rec.iterations == 1 and len(rec.restart_losses) == 8 and rec.stats["vectorized"] == 1.0
    assert calls == [(1, rec.loss)]
    assert model.training  # the caller's model is left alone


def test_vmap_and_loop_take_the_same_path(digits: tuple) -> None:
    x, y, model = digits
    entry = _entry(model, x[:1], y[:1])
    runs = [invert_entry(entry, model, iterations=4, restarts=2, vectorize=v) for v in ("on", "off")]
    assert [r.stats["vectorized"] for r in runs] == [1.0, 0.0]
    assert runs[0].restart_losses == pytest.approx(runs[1].restart_losses, rel=1e-3)
    assert torch.allclose(runs[0].images, runs[1].images, atol=1e-4)


def test_ctrl_c_returns_best_so_far(digits: tuple) -> None:
    x, y, model = digits
    seen: list[float] = []

    def stop_at_five(i: int, loss: float) -> None:
        seen.append(loss)
        if i == 5:
            raise KeyboardInterrupt

    rec = invert_entry(_entry(model, x[:2], y[:2], labels=False), model, labels="recovered",
                       iterations=100, restarts=1, progress=stop_at_five)
    assert rec.interrupted and rec.iterations == 5
    assert rec.loss == pytest.approx(min(seen)) and rec.images.shape == (2, 1, 28, 28)


def test_clear_errors(digits: tuple) -> None:
    x, y, model = digits
    entry = _entry(model, x[:1], y[:1], labels=False)
    with pytest.raises(CaptureError, match="no labels"):
        invert_entry(entry, model, labels="known", preset="dry-run")
    with pytest.raises(ConfigError, match="unknown inverting-gradients parameter"):
        invert_entry(entry, model, preset="dry-run", iterationz=5)
    with pytest.raises(ConfigError, match="unknown inversion attack"):
        invert_entry(entry, model, attack="dlg")
    with pytest.raises(CaptureError, match="does not fit"):
        invert_entry(entry, build_model("cnn", (1, 16, 16), 10, (0.3,), (0.3,)), preset="dry-run")
