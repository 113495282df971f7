"""Capture entries: round trip, clear errors for missing / truncated / foreign files, model fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lab.capture import (CapturedUpdate, check_fits, probe_update, read_entry, read_evidence, write_entry,
                         write_evidence)
from lab.errors import CaptureError
from lab.models import build_model
from lab.task import LocalHyperparams

HP = LocalHyperparams(epochs=1, steps=3, batch_size=2, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _entry(labels: bool = True) -> CapturedUpdate:
    model = build_model("cnn", (1, 8, 8), 10, (0.3,), (0.3,), seed=0)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([3, 7])
    return CapturedUpdate(
        global_state={k: v.clone() for k, v in model.state_dict().items()},
        update=probe_update(model, x, y, HP), num_examples=2, server_round=5, node_id=123456789012,
        partition_id=4, hyperparams=HP, labels=y if labels else None, image_shape=(1, 8, 8))


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    entry = _entry()
    write_entry(tmp_path / "node.safetensors", entry)
    back = read_entry(tmp_path / "node.safetensors")
    assert list(back.global_state) == list(entry.global_state)
    for k in entry.global_state:
        assert torch.equal(back.global_state[k], entry.global_state[k])
        assert torch.equal(back.update[k], entry.update[k])
    assert back.labels is not None and back.labels.tolist() == [3, 7]
    assert (back.num_examples, back.server_round, back.node_id, back.partition_id) == (2, 5, 123456789012, 4)
    assert back.hyperparams == HP and back.image_shape == (1, 8, 8) and back.local_steps == 3


def test_round_trip_without_labels(tmp_path: Path) -> None:
    write_entry(tmp_path / "e.safetensors", _entry(labels=False))
    assert read_entry(tmp_path / "e.safetensors").labels is None


def test_update_is_what_sgd_did() -> None:
    """One plain SGD step: update = -lr * (grad + wd * W0)."""
    model = build_model("mlp", (1, 4, 4), 3, (0.0,), (1.0,), seed=1)
    x, y = torch.rand(1, 1, 4, 4), torch.tensor([2])
    hp = LocalHyperparams(epochs=1, steps=1, batch_size=1, lr=0.1, momentum=0.9, weight_decay=0.01)
    upd = probe_update(model, x, y, hp)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(upd[name], -0.1 * (p.grad + 0.01 * p.detach()), atol=1e-6)


def test_missing_file_raises_capture_error(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="no such capture entry"):
        read_entry(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file_raises_capture_error(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "torn.safetensors"
    write_entry(path, _entry())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CaptureError, match="torn.safetensors"):
        read_entry(path)


def test_foreign_safetensors_is_rejected(tmp_path: Path) -> None:
    from lab.artifacts import save_tensors

    save_tensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    with pytest.raises(CaptureError, match="not a capture entry"):
        read_entry(tmp_path / "w.safetensors")
    with pytest.raises(CaptureError, match="not an evidence file"):
        read_evidence(tmp_path / "w.safetensors")


def test_check_fits_names_the_mismatch() -> None:
    entry = _entry()
    check_fits(entry, build_model("cnn", (1, 8, 8), 10, (0.3,), (0.3,)))
    with pytest.raises(CaptureError, match="shape"):
        check_fits(entry, build_model("cnn", (1, 12, 12), 10, (0.3,), (0.3,)))
    with pytest.raises(CaptureError, match="keys differ"):
        check_fits(entry, build_model("mlp", (1, 8, 8), 10, (0.3,), (0.3,)))


def test_evidence_round_trip(tmp_path: Path) -> None:
    images, labels = torch.rand(3, 1, 5, 5), torch.tensor([0, 9, 9])
    write_evidence(tmp_path / "ev.safetensors", images, labels)
    back_images, back_labels = read_evidence(tmp_path / "ev.safetensors")
    assert torch.equal(back_images, images) and torch.equal(back_labels, labels)
