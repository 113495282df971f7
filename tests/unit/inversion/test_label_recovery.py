"""iDLG and bias-corrected label recovery from gradients and multi-step updates."""

from __future__ import annotations

import pytest
import torch

from inversion.labels import bias_corrected, idlg, recovered_labels
from inversion.schedule import LocalSchedule, gradient_part
from lab.capture import CapturedUpdate, probe_update
from lab.config import DatasetConfig
from lab.data import load_data
from lab.models import build_model
from lab.task import LocalHyperparams


def _entry(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> CapturedUpdate:
    hp = LocalHyperparams(epochs=1, steps=steps, batch_size=len(y), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return CapturedUpdate({k: v.clone() for k, v in model.state_dict().items()}, probe_update(model, x, y, hp),
                          len(y), 1, 0, 0, hp, None, tuple(x.shape[1:]))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    d = load_data(DatasetConfig(), 0)
    return d.train.x, d.train.y, build_model("cnn", d.image_shape, 10, d.mean, d.std, seed=0)


def test_decay_factor_matches_sgd_on_zero_gradients() -> None:
    """alpha_K is what torch.optim.SGD does to a parameter whose loss gradient is zero."""
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.05)
    for _ in range(4):
        w.grad = torch.zeros(1)
        opt.step()
    assert LocalSchedule(4, 0.1, 0.9, 0.05).decay_factor() == pytest.approx(float(w.detach()), rel=1e-6)


def test_gradient_part_is_exact_for_one_step(digits: tuple) -> None:
    x, y, model = digits
    entry = _entry(model, x[:2], y[:2], steps=1)
    torch.nn.functional.cross_entropy(model(x[:2]), y[:2]).backward()
    est = gradient_part(entry)
    for name, p in model.named_parameters():
        assert torch.allclose(est[name], p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)


def test_idlg_hand_case() -> None:
    # rows sum to 3, -1, 2: class 1 is the only negative row
    assert idlg(torch.tensor([[1.0, 2.0], [-0.5, -0.5], [1.0, 1.0]])).tolist() == [1]


def test_bias_corrected_hand_case_with_repeats() -> None:
    # B = 4 with labels {3, 3, 7, 1}: p ~ 0.1 everywhere -> db_3 = (0.4 - 2)/4, db_7 = db_1 = (0.4 - 1)/4
    db = torch.full((10,), 0.1)
    db[3], db[7], db[1] = -0.4, -0.15, -0.15
    assert bias_corrected(db, 4).tolist() == [1, 3, 3, 7]


@pytest.mark.parametrize("steps", [1, 5])
def test_idlg_recovers_single_labels(digits: tuple, steps: int) -> None:
    x, y, model = digits
    for i in range(6):
        entry = _entry(model, x[i : i + 1], y[i : i + 1], steps)
        assert recovered_labels(entry, model, 1).tolist() == [int(y[i])]


def test_bias_corrected_recovers_repeated_labels_from_a_gradient(digits: tuple) -> None:
    x, y, model = digits
    pick = torch.cat([(y == c).nonzero().flatten()[:k] for c, k in ((2, 2), (5, 1), (8, 1))])
    entry = _entry(model, x[pick], y[pick], steps=1)
    assert recovered_labels(entry, model, 4).tolist() == [2, 2, 5, 8]
