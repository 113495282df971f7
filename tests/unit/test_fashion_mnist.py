"""The real Fashion-MNIST, read from Debian's package (`/usr/share/datasets/fashion-mnist/*.gz`).

These tests need the files: the README's test command installs them (`bash tests/system-deps.sh`,
as root on Debian); elsewhere they skip, and `pytest -ra` prints why. The format itself is tested
on small files in test_torchvision_data.py, which needs nothing installed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lab import torchvision_data
from lab.config import DatasetConfig
from lab.data import load_data
from lab.models import build_model
from lab.split import Split

SYSTEM = Path(torchvision_data.SYSTEM_DIRS["fashion-mnist"][0])
INSTALLED = all((SYSTEM / f"{f}.gz").is_file() or (SYSTEM / f).is_file()
                for f in torchvision_data.FASHION_MNIST.files)
pytestmark = pytest.mark.skipif(
    not INSTALLED,
    reason=f"Fashion-MNIST is not in {SYSTEM}: `bash tests/system-deps.sh` as root on Debian, "
           "or `apt-get install dataset-fashion-mnist`",
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Split, Split]:
    # An empty data_dir: the files must come from the system folder, without a download.
    empty = tmp_path_factory.mktemp("empty-data-dir")
    return torchvision_data.load("fashion-mnist", DatasetConfig(
        name="fashion-mnist", data_dir=str(empty), download=False))


def test_full_dataset_from_the_system_package(splits: tuple[Split, Split]) -> None:
    train, test = splits
    assert train.x.shape == (60_000, 1, 28, 28) and test.x.shape == (10_000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    # Balanced classes: 6,000 train and 1,000 test images of each of the 10 labels.
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    # The published training-set statistics (mean 0.2860, std 0.3530).
    assert float(train.x.mean()) == pytest.approx(0.2860, abs=5e-4)
    assert float(train.x.std()) == pytest.approx(0.3530, abs=5e-4)
    # The first training image is an ankle boot (label 9), the first test image too.
    assert int(train.y[0]) == 9 and int(test.y[0]) == 9


def test_load_data_finds_it_from_the_default_settings(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default data_dir "data" does not exist here
    bundle = load_data(DatasetConfig(name="fashion-mnist", download=False, server_fraction=0.1), 0)
    assert len(bundle.train) == 54_000 and len(bundle.server) == 6_000 and len(bundle.test) == 10_000
    assert bundle.image_shape == (1, 28, 28) and bundle.num_classes == 10
    assert bundle.mean[0] == pytest.approx(0.286, abs=2e-3)


def test_fltrust_cnn_learns_from_real_images(splits: tuple[Split, Split]) -> None:
    train, test = splits
    torch.manual_seed(0)
    model = build_model("fltrust-cnn", (1, 28, 28), 10, (0.286,), (0.353,), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(30):  # 30 steps of 32 images: well above chance already (0.64)
        x, y = train.x[i * 32 : (i + 1) * 32], train.y[i * 32 : (i + 1) * 32]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model.eval()(test.x[:1000]).argmax(1) == test.y[:1000]).float().mean())
    assert acc > 0.5, acc

