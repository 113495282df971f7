"""Where inversion computes: `lab.task.pick_device`, and the device path of Inverting Gradients
(run here with device "cpu" and the GPU's throttled progress; on CUDA when a GPU is present)."""

from __future__ import annotations

import pytest
import torch

import inversion.optimizer as optimizer
from inversion import invert_entry
from lab.capture import CapturedUpdate, probe_update
from lab.config import DatasetConfig
from lab.data import load_data
from lab.errors import ConfigError, LabError
from lab.models import build_model
from lab.task import LocalHyperparams, pick_device

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def entry_and_model() -> tuple[CapturedUpdate, torch.nn.Module]:
    torch.set_num_threads(1)
    d = load_data(DatasetConfig(), 0)
    model = build_model("cnn", d.image_shape, 10, d.mean, d.std, seed=0)
    x, y = d.train.x[:2], d.train.y[:2]
    hp = LocalHyperparams(epochs=1, steps=1, batch_size=2, lr=0.01, momentum=0.9, weight_decay=5e-4)
    entry = CapturedUpdate({k: v.clone() for k, v in model.state_dict().items()}, probe_update(model, x, y, hp),
                           2, 1, 0, 0, hp, None, tuple(x.shape[1:]))
    return entry, model


def test_auto_takes_cuda_only_when_present() -> None:
    assert pick_device("auto").type == ("cuda" if CUDA else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_clear_line() -> None:
    with pytest.raises(LabError, match="sees no CUDA GPU") as err:
        pick_device("cuda")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:x", ""])
def test_unknown_device_names_fail(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        pick_device(name)


def _run(entry: CapturedUpdate, model: torch.nn.Module, **kw: object) -> object:
    return invert_entry(entry, model, labels="recovered", iterations=20, restarts=2, seed=3, **kw)


def test_explicit_cpu_equals_the_default_path(entry_and_model: tuple) -> None:
    entry, model = entry_and_model
    default, cpu = _run(entry, model), _run(entry, model, device="cpu")
    assert cpu.images.device.type == "cpu" and cpu.labels.device.type == "cpu"
    assert torch.allclose(default.images, cpu.images, atol=1e-6)
    assert default.restart_losses == pytest.approx(cpu.restart_losses, rel=1e-6)


def test_throttled_progress_changes_nothing_but_the_reports(entry_and_model: tuple,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's rate (a report every N iterations) on the CPU: same images, fewer reports."""
    entry, model = entry_and_model
    every: list[tuple[int, float]] = []
    base = _run(entry, model, device="cpu", progress=lambda i, loss: every.append((i, loss)))
    monkeypatch.setattr(optimizer, "progress_every", lambda device: 7)
    calls: list[tuple[int, float]] = []
    rec = _run(entry, model, device="cpu", progress=lambda i, loss: calls.append((i, loss)))
    assert [i for i, _ in every] == list(range(1, 21))
    assert [i for i, _ in calls] == [7, 14, 20]
    assert calls == [every[6], every[13], every[19]]
    assert torch.equal(rec.images, base.images) and rec.iterations == 20


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu(entry_and_model: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions, as on the CPU
    entry, model = entry_and_model
    cpu, gpu = _run(entry, model, device="cpu"), _run(entry, model, device="cuda")
    assert gpu.images.device.type == "cpu" and gpu.labels.device.type == "cpu"
    assert torch.equal(gpu.labels, cpu.labels) and gpu.iterations == cpu.iterations == 20
    # the sign in signed Adam can flip on near-zero gradients: close, not bit-equal
    assert (gpu.images - cpu.images).abs().mean() < 1e-2
    assert gpu.restart_losses == pytest.approx(cpu.restart_losses, rel=5e-2)
