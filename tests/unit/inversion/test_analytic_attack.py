"""The analytic attack is exact through a fully-connected first layer, also through momentum steps."""

from __future__ import annotations

import pytest
import torch

from inversion import invert_entry
from inversion.analytic import first_linear
from inversion.metrics import score
from lab.capture import CapturedUpdate, probe_update
from lab.config import DatasetConfig
from lab.data import load_data
from lab.models import build_model
from lab.task import LocalHyperparams


@pytest.fixture(scope="module")
def setup() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    d = load_data(DatasetConfig(), 0)
    return d.train.x, d.train.y, build_model("mlp", d.image_shape, 10, d.mean, d.std, seed=0)


def _entry(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, hp: LocalHyperparams) -> CapturedUpdate:
    return CapturedUpdate({k: v.clone() for k, v in model.state_dict().items()}, probe_update(model, x, y, hp),
                          len(y), 1, 0, 0, hp, y, tuple(x.shape[1:]))


@pytest.mark.parametrize("steps,momentum,wd", [(1, 0.0, 0.0), (1, 0.9, 5e-4), (5, 0.9, 0.0), (5, 0.9, 5e-4)])
def test_one_image_is_exact(setup: tuple, steps: int, momentum: float, wd: float) -> None:
    x, y, model = setup
    hp = LocalHyperparams(epochs=1, steps=steps, batch_size=1, lr=0.05, momentum=momentum, weight_decay=wd)
    rec = invert_entry(_entry(model, x[3:4], y[3:4], hp), model, attack="analytic", labels="recovered")
    s = score(rec.images, x[3:4], rec.labels, y[3:4])
    assert s.psnr.item() > 60.0
    assert s.label_accuracy == 1.0


def test_small_batch_from_repeated_rows(setup: tuple) -> None:
    x, y, model = setup
    hp = LocalHyperparams(epochs=1, steps=1, batch_size=4, lr=0.05, momentum=0.0, weight_decay=0.0)
    rec = invert_entry(_entry(model, x[:4], y[:4], hp), model, attack="analytic", labels="known")
    s = score(rec.images, x[:4])
    assert rec.stats["exact_images"] >= 3
    assert int((s.psnr > 60).sum()) >= 3


def test_rejects_a_model_without_fc_first_layer(setup: tuple) -> None:
    x, y, _ = setup
    cnn = build_model("cnn", (1, 28, 28), 10, (0.3,), (0.3,), seed=0)
    hp = LocalHyperparams(epochs=1, steps=1, batch_size=1, lr=0.05, momentum=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="Flatten \\+ Linear"):
        invert_entry(_entry(cnn, x[:1], y[:1], hp), cnn, attack="analytic")
    assert first_linear(build_model("mlp", (1, 4, 4), 10, (0.0,), (1.0,)))[0] == "1.1"
