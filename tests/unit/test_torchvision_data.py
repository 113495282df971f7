"""lab.torchvision_data: the real datasets from small files written in their standard formats.

Every test writes a few known images into tmp_path (idx-ubyte for the MNIST family, pickled batch
dicts for CIFAR-10, written byte-for-byte the way Python 2 wrote the original files) and checks
what comes back pixel by pixel. Nothing touches the network: download failures are simulated.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import struct
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets

from lab import idx, torchvision_data
from lab.config import DatasetConfig
from lab.data import load_data
from lab.errors import DataError
from lab.idx import IdxError, read_idx

N_TRAIN, N_TEST = 5, 3


# --------------------------------------------------------------------------------------------
# Writers for the standard on-disk formats


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """idx3-ubyte: magic 0x00000803 (uint8, 3 dims), big-endian int32 sizes, then the bytes."""
    assert images.dtype == np.uint8 and images.ndim == 3
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">iiii", 0x0803, *images.shape) + images.tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """idx1-ubyte: magic 0x00000801 (uint8, 1 dim), big-endian int32 count, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">ii", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def known_images(n: int, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    """(n, h, w) uint8, asymmetric under transposition, holding both 0 and 255."""
    r = np.arange(h)[:, None]
    c = np.arange(w)[None, :]
    imgs = np.stack([(k * 31 + r * 7 + c * 3 + seed) % 256 for k in range(n)]).astype(np.uint8)
    imgs[:, 0, 0] = 0
    imgs[:, -1, -1] = 255
    return imgs


IDX = {
    # name: (torchvision folder, train prefix, test prefix)
    "mnist": ("MNIST", "train", "t10k"),
    "fashion-mnist": ("FashionMNIST", "train", "t10k"),
    "emnist-digits": ("EMNIST", "emnist-digits-train", "emnist-digits-test"),
}


def write_idx_dataset(root: Path, name: str, train: np.ndarray, test: np.ndarray,
                      y_train: np.ndarray, y_test: np.ndarray) -> Path:
    folder_name, p_train, p_test = IDX[name]
    raw = root / folder_name / "raw"
    write_idx_images(raw / f"{p_train}-images-idx3-ubyte", train)
    write_idx_labels(raw / f"{p_train}-labels-idx1-ubyte", y_train)
    write_idx_images(raw / f"{p_test}-images-idx3-ubyte", test)
    write_idx_labels(raw / f"{p_test}-labels-idx1-ubyte", y_test)
    return raw


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 `str` (STRING / BINSTRING opcodes), as cPickle did.

    Loaded with encoding="bytes" they come back as bytes, exactly like the original CIFAR files.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if self.proto == 0:
            self.write(b"S" + repr(data)[1:].encode("ascii") + b"\n")
        elif len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_dumps(obj: Any, protocol: int = 2) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=protocol).dump(obj)
    # numpy 2 names its reconstructor numpy._core...; the original files name numpy.core...
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_batch(n: int, seed: int) -> dict[bytes, Any]:
    r = np.random.default_rng(seed)
    data = r.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    data[0, 0], data[0, 1] = 0, 255
    labels = [int(v) for v in r.integers(0, 10, n)]
    return {b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": data,
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def write_cifar(
    root: Path, dumps: Any = py2_dumps, n: int = 2
) -> tuple[list[dict[bytes, Any]], Path]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = cifar_batch(n, seed=i)
        (folder / fname).write_bytes(dumps(batch))
        batches.append(batch)
    (folder / "batches.meta").write_bytes(dumps({b"label_names": [b"airplane"] * 10}))
    return batches, folder


def cfg(root: Path, **kw: Any) -> DatasetConfig:
    return DatasetConfig(name=kw.pop("name", "mnist"), data_dir=str(root),
                         download=kw.pop("download", False), **kw)


# --------------------------------------------------------------------------------------------
# MNIST family


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    train, test = known_images(N_TRAIN), known_images(N_TEST, seed=5)
    y_train, y_test = np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])
    write_idx_dataset(tmp_path, name, train, test, y_train, y_test)

    tr, te = torchvision_data.load(name, cfg(tmp_path, name=name))

    assert tr.x.shape == (N_TRAIN, 1, 28, 28) and te.x.shape == (N_TEST, 1, 28, 28)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
    assert torch.equal(tr.x[:, 0], torch.from_numpy(train).float() / 255)
    assert torch.equal(te.x[:, 0], torch.from_numpy(test).float() / 255)
    assert tr.y.tolist() == [3, 1, 4, 1, 5] and te.y.tolist() == [9, 2, 6]
    # One hand-checked pixel: image 1, row 2, col 3 -> (31 + 14 + 9) = 54.
    assert float(tr.x[1, 0, 2, 3]) == pytest.approx(54 / 255)


def test_emnist_digits_come_back_upright(tmp_path: Path) -> None:
    upright = np.zeros((N_TRAIN, 28, 28), dtype=np.uint8)
    upright[:, 0, :] = 255  # a bar along the top row
    upright[:, 5:9, 2] = 128  # a short vertical stroke in column 2
    # EMNIST's files store each image transposed (the bar becomes the left column).
    stored = np.ascontiguousarray(upright.transpose(0, 2, 1))
    write_idx_dataset(tmp_path, "emnist-digits", stored, stored[:N_TEST],
                      np.arange(N_TRAIN), np.arange(N_TEST))

    tr, te = torchvision_data.load("emnist-digits", cfg(tmp_path, name="emnist-digits"))

    assert torch.equal(tr.x[:, 0], torch.from_numpy(upright).float() / 255)
    assert bool((tr.x[:, 0, 0, :] == 1).all())  # top row bright
    assert bool((tr.x[:, 0, 1:, 0] == 0).all())  # left column dark below the bar
    assert float(tr.x[0, 0, 6, 2]) == pytest.approx(128 / 255)
    assert te.x.shape == (N_TEST, 1, 28, 28) and te.y.tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", ["mnist", "emnist-digits"])
def test_reader_agrees_with_torchvisions(tmp_path: Path, name: str) -> None:
    """Oracle: torchvision's own idx reader returns the same stored arrays (EMNIST: before our
    transpose, so if torchvision ever rotated EMNIST itself we would see it here)."""
    stored = known_images(N_TRAIN)
    write_idx_dataset(tmp_path, name, stored, stored[:N_TEST], np.arange(N_TRAIN), np.arange(N_TEST))
    spec = {"mnist": torchvision_data.MNIST, "emnist-digits": torchvision_data.EMNIST_DIGITS}[name]
    ds = getattr(torchvision.datasets, spec.cls_name)(str(tmp_path), train=True, download=False,
                                                      **spec.kwargs)
    ours = read_idx(tmp_path / spec.cls_name / "raw" / spec.files[0], 3)
    assert torch.equal(ds.data, ours) and torch.equal(ds.data, torch.from_numpy(stored))


def test_resize_is_bilinear_half_pixel(tmp_path: Path) -> None:
    # Left half 0, right half 255: doubling to 56 with half-pixel-centre bilinear interpolation
    # samples source x = (j + 0.5) / 2 - 0.5, so output columns 27 and 28 (source 13.25, 13.75)
    # straddle the edge at weights 0.25 and 0.75.
    img = np.zeros((1, 28, 28), dtype=np.uint8)
    img[:, :, 14:] = 255
    write_idx_dataset(tmp_path, "mnist", img, img, np.array([7]), np.array([7]))

    tr, _ = torchvision_data.load("mnist", cfg(tmp_path, image_size=56))

    assert tr.x.shape == (1, 1, 56, 56)
    row = tr.x[0, 0, 10]
    assert row[:27].eq(0).all() and row[29:].eq(1).all()
    assert float(row[27]) == pytest.approx(0.25) and float(row[28]) == pytest.approx(0.75)
    small, _ = torchvision_data.load("mnist", cfg(tmp_path, image_size=14))
    assert small.x.shape == (1, 1, 14, 14)
    assert 0 <= float(small.x.min()) <= float(small.x.max()) <= 1
    same, _ = torchvision_data.load("mnist", cfg(tmp_path, image_size=28))
    assert torch.equal(same.x[0, 0], torch.from_numpy(img[0]).float() / 255)


def test_missing_files_without_download_is_one_clear_line(tmp_path: Path) -> None:
    raw = write_idx_dataset(tmp_path, "fashion-mnist", known_images(2), known_images(2),
                            np.zeros(2), np.zeros(2))
    (raw / "t10k-labels-idx1-ubyte").unlink()

    with pytest.raises(DataError) as err:
        torchvision_data.load("fashion-mnist", cfg(tmp_path, name="fashion-mnist"))

    msg = str(err.value)
    assert "\n" not in msg
    assert str(raw) in msg and "missing: t10k-labels-idx1-ubyte;" in msg
    assert "train-images-idx3-ubyte" in msg and "dataset.download" in msg


def test_missing_data_dir_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="EMNIST/raw") as err:
        torchvision_data.load("emnist-digits", cfg(tmp_path / "nowhere", name="emnist-digits"))
    assert "emnist-digits-test-labels-idx1-ubyte" in str(err.value)


def test_failed_download_is_one_line_dataerror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: Any) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError) as err:
        torchvision_data.load("mnist", cfg(tmp_path, download=True))
    msg = str(err.value)
    assert "\n" not in msg and "download failed" in msg
    assert str(tmp_path.resolve() / "MNIST" / "raw") in msg and "t10k-images-idx3-ubyte" in msg
    assert err.value.__cause__ is None  # no chained traceback for the user


def test_existing_files_are_not_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_dataset(tmp_path, "mnist", known_images(2), known_images(1), np.zeros(2), np.zeros(1))

    def boom(self: Any) -> None:
        raise AssertionError("download called although every file is there")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", boom)
    tr, te = torchvision_data.load("mnist", cfg(tmp_path, download=True))
    assert len(tr) == 2 and len(te) == 1


@pytest.mark.parametrize("damage", ["truncated", "wrong-magic", "count-mismatch", "bad-label"])
def test_damaged_idx_files_raise_dataerror(tmp_path: Path, damage: str) -> None:
    raw = write_idx_dataset(tmp_path, "mnist", known_images(3), known_images(2),
                            np.array([1, 2, 3]), np.array([0, 1]))
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "wrong-magic":
        images.write_bytes(b"\x50\x4b\x03\x04" + images.read_bytes()[4:])  # a zip header
    elif damage == "count-mismatch":
        write_idx_labels(raw / "train-labels-idx1-ubyte", np.array([1, 2]))
    else:
        write_idx_labels(raw / "train-labels-idx1-ubyte", np.array([1, 2, 12]))
    with pytest.raises(DataError) as err:
        torchvision_data.load("mnist", cfg(tmp_path))
    assert "\n" not in str(err.value) and str(raw) in str(err.value)


def test_load_data_keeps_the_official_test_split(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, "mnist", known_images(20), known_images(N_TEST),
                      np.arange(20) % 10, np.array([4, 5, 6]))
    bundle = load_data(cfg(tmp_path, server_fraction=0.1), 0)
    assert len(bundle.test) == N_TEST and bundle.test.y.tolist() == [4, 5, 6]
    assert len(bundle.server) == 2 and len(bundle.train) == 18
    assert bundle.image_shape == (1, 28, 28) and len(bundle.mean) == 1


def test_unknown_name_is_dataerror(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="known"):
        torchvision_data.load("svhn", cfg(tmp_path))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST's layouts: gzipped files, Debian's folder, the system search path


def gzip_folder(folder: Path) -> None:
    """Replace every file in `folder` by its gzipped copy `<name>.gz` (as Debian ships them)."""
    for f in list(folder.iterdir()):
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()


def fashion_files(folder: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Debian's layout in `folder`: the four idx files, gzipped; returns (train, test) images."""
    train, test = known_images(N_TRAIN, seed=seed), known_images(N_TEST, seed=seed + 1)
    raw = write_idx_dataset(folder, "fashion-mnist", train, test, np.array([3, 1, 4, 1, 5]),
                            np.array([9, 2, 6]))
    folder.mkdir(parents=True, exist_ok=True)
    for f in raw.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    shutil.rmtree(folder / "FashionMNIST")
    gzip_folder(folder)
    return train, test


@pytest.fixture(autouse=True)
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, ...]]:
    """Hermetic tests: no system folder is searched unless a test sets one."""
    dirs: dict[str, tuple[str, ...]] = {}
    monkeypatch.setattr(torchvision_data, "SYSTEM_DIRS", dirs)
    return dirs


@pytest.mark.parametrize("layout", ["torchvision-gz", "debian-under-data-dir", "data-dir-named"])
def test_gzipped_layouts_read_exactly(tmp_path: Path, layout: str) -> None:
    if layout == "torchvision-gz":
        train, test = known_images(N_TRAIN), known_images(N_TEST, seed=1)
        gzip_folder(write_idx_dataset(tmp_path, "fashion-mnist", train, test,
                                      np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])))
        data_dir = tmp_path
    else:
        train, test = fashion_files(tmp_path / "fashion-mnist")
        data_dir = tmp_path if layout == "debian-under-data-dir" else tmp_path / "fashion-mnist"

    tr, te = torchvision_data.load("fashion-mnist", cfg(data_dir, name="fashion-mnist"))

    assert torch.equal(tr.x[:, 0], torch.from_numpy(train).float() / 255)
    assert torch.equal(te.x[:, 0], torch.from_numpy(test).float() / 255)
    assert tr.y.tolist() == [3, 1, 4, 1, 5] and te.y.tolist() == [9, 2, 6]


def test_system_folder_is_searched_after_data_dir(
    tmp_path: Path, no_system_dirs: dict[str, tuple[str, ...]]
) -> None:
    system = tmp_path / "usr-share" / "fashion-mnist"
    sys_train, _ = fashion_files(system, seed=0)
    no_system_dirs["fashion-mnist"] = (str(system),)

    tr, _ = torchvision_data.load("fashion-mnist", cfg(tmp_path / "data", name="fashion-mnist"))
    assert torch.equal(tr.x[:, 0], torch.from_numpy(sys_train).float() / 255)

    own_train, _ = fashion_files(tmp_path / "data" / "fashion-mnist", seed=7)  # data_dir wins
    tr, _ = torchvision_data.load("fashion-mnist", cfg(tmp_path / "data", name="fashion-mnist"))
    assert torch.equal(tr.x[:, 0], torch.from_numpy(own_train).float() / 255)


def test_missing_fashion_mnist_says_how_to_get_it(
    tmp_path: Path, no_system_dirs: dict[str, tuple[str, ...]]
) -> None:
    no_system_dirs["fashion-mnist"] = (str(tmp_path / "usr-share"),)
    with pytest.raises(DataError) as err:
        torchvision_data.load("fashion-mnist", cfg(tmp_path / "data", name="fashion-mnist"))
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in msg
    assert f"also searched {tmp_path / 'data' / 'fashion-mnist'}, {tmp_path / 'usr-share'}" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "dataset.download: true" in msg


def test_offline_download_is_one_line_with_the_apt_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: Any) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(DataError) as err:
        torchvision_data.load("fashion-mnist", cfg(tmp_path, name="fashion-mnist", download=True))
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None
    assert "download failed" in msg and "name resolution" in msg
    assert str(tmp_path.resolve() / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_download_goes_to_torchvisions_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = known_images(N_TRAIN)
    calls = []

    def fake_download(self: Any) -> None:  # what torchvision leaves: the .gz files and their copies
        calls.append(self.raw_folder)
        write_idx_dataset(tmp_path, "fashion-mnist", train, train[:N_TEST], np.zeros(N_TRAIN),
                          np.zeros(N_TEST))

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fake_download)
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "_load_data", lambda self: (None, None))
    tr, _ = torchvision_data.load("fashion-mnist", cfg(tmp_path, name="fashion-mnist", download=True))
    assert calls == [str(tmp_path.resolve() / "FashionMNIST" / "raw")]
    assert torch.equal(tr.x[:, 0], torch.from_numpy(train).float() / 255)


def test_mnist_files_are_never_taken_for_fashion_mnist(tmp_path: Path) -> None:
    # Both datasets name their files alike: only a folder named after the dataset counts.
    write_idx_dataset(tmp_path, "mnist", known_images(2), known_images(1), np.zeros(2), np.zeros(1))
    for f in (tmp_path / "MNIST" / "raw").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())  # and flat in data_dir
    assert len(torchvision_data.load("mnist", cfg(tmp_path))[0]) == 2
    with pytest.raises(DataError, match="not found"):
        torchvision_data.load("fashion-mnist", cfg(tmp_path, name="fashion-mnist"))


@pytest.mark.parametrize("damage", ["cut-gzip", "not-gzip-inside", "plain-named-gz"])
def test_damaged_gzip_is_dataerror_and_names_drive_nothing(tmp_path: Path, damage: str) -> None:
    fashion_files(tmp_path / "fashion-mnist")
    target = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    if damage == "cut-gzip":
        target.write_bytes(target.read_bytes()[:-40])
    elif damage == "not-gzip-inside":
        target.write_bytes(b"\x1f\x8b" + b"\x00" * 64)
    else:  # a plain idx file under a .gz name reads fine: the magic bytes decide, not the name
        target.write_bytes(gzip.decompress(target.read_bytes()))
        tr, _ = torchvision_data.load("fashion-mnist", cfg(tmp_path, name="fashion-mnist"))
        assert tr.x.shape == (N_TRAIN, 1, 28, 28)
        return
    with pytest.raises(DataError) as err:
        torchvision_data.load("fashion-mnist", cfg(tmp_path, name="fashion-mnist"))
    msg = str(err.value)
    assert "\n" not in msg and str(target) in msg and "corrupt gzip" in msg


def test_read_idx_checks_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = tmp_path / "i", tmp_path / "l"
    write_idx_images(images, known_images(2, 3, 4))
    write_idx_labels(labels, np.array([7, 8]))
    assert read_idx(images, 3).shape == (2, 3, 4) and read_idx(labels, 1).tolist() == [7, 8]
    with pytest.raises(IdxError, match="not an unsigned-byte idx3"):
        read_idx(labels, 3)  # a labels file where images belong
    images.write_bytes(images.read_bytes() + b"\x00")
    with pytest.raises(IdxError, match="2x3x4 = 24 values but 25 bytes"):
        read_idx(images, 3)
    monkeypatch.setattr(idx, "MAX_BYTES", 16)  # the bound that stops a gzip bomb
    (tmp_path / "big.gz").write_bytes(gzip.compress(b"\x00" * 1000))
    with pytest.raises(IdxError, match="over 16 bytes once decompressed"):
        read_idx(tmp_path / "big.gz", 1)


# --------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("protocol", [0, 2])
def test_cifar_python2_batches_round_trip(tmp_path: Path, protocol: int) -> None:
    batches, _ = write_cifar(tmp_path, dumps=lambda o: py2_dumps(o, protocol))

    tr, te = torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10"))

    assert tr.x.shape == (10, 3, 32, 32) and te.x.shape == (2, 3, 32, 32)
    assert tr.x.dtype == torch.float32 and tr.y.dtype == torch.int64
    assert float(tr.x.min()) == 0.0 and float(tr.x.max()) == 1.0
    data = np.concatenate([b[b"data"] for b in batches[:5]])  # batches 1..5 in order
    assert torch.equal(tr.x, torch.from_numpy(data).float().view(-1, 3, 32, 32) / 255)
    assert tr.y.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    assert te.y.tolist() == batches[5][b"labels"]
    # Row layout by hand: 1024 red, then 1024 green, then 1024 blue, each 32x32 row-major.
    row = batches[5][b"data"][1]
    assert float(te.x[1, 0, 0, 1]) == pytest.approx(row[1] / 255)  # red (0, 1)
    assert float(te.x[1, 1, 0, 0]) == pytest.approx(row[1024] / 255)  # green (0, 0)
    assert float(te.x[1, 2, 1, 0]) == pytest.approx(row[2048 + 32] / 255)  # blue (1, 0)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python3_rewrites_load(tmp_path: Path, protocol: int) -> None:
    def dumps(obj: dict[bytes, Any]) -> bytes:  # str keys, as torchvision's latin1 load gives
        return pickle.dumps({k.decode(): v for k, v in obj.items()}, protocol=protocol)

    batches, _ = write_cifar(tmp_path, dumps=dumps)
    _, te = torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10"))
    expected = torch.from_numpy(batches[5][b"data"]).float().view(-1, 3, 32, 32) / 255
    assert torch.equal(te.x, expected)


def test_cifar_resize(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    tr, te = torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10", image_size=16))
    assert tr.x.shape == (10, 3, 16, 16) and te.x.shape == (2, 3, 16, 16)
    assert 0 <= float(tr.x.min()) and float(tr.x.max()) <= 1


class _Evil:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


@pytest.mark.parametrize("where", ["whole-file", "inside-data"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "numpy.load"])
def test_cifar_malicious_pickle_is_refused(tmp_path: Path, where: str, payload: str) -> None:
    import builtins
    import os

    marker = tmp_path / "pwned"
    func = {"os.system": os.system, "builtins.eval": builtins.eval, "numpy.load": np.load}[payload]
    arg = {"os.system": f"touch {marker}", "builtins.eval": f"open({str(marker)!r}, 'w')",
           "numpy.load": str(marker)}[payload]
    _, folder = write_cifar(tmp_path)
    evil = _Evil(func, arg)
    obj: Any = evil if where == "whole-file" else {b"data": evil, b"labels": [0]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(obj, protocol=2))

    with pytest.raises(DataError) as err:
        torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10"))

    msg = str(err.value)
    assert "refusing" in msg and "data_batch_3" in msg and "\n" not in msg
    assert payload.split(".")[-1] in msg
    assert not marker.exists()


def test_cifar_object_arrays_are_refused(tmp_path: Path) -> None:
    _, folder = write_cifar(tmp_path)
    objs = np.array([b"x", 1], dtype=object)
    batch = {b"data": objs, b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="object dtype"):
        torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10"))


@pytest.mark.parametrize("bad", ["shape", "dtype", "labels", "not-a-dict", "garbage"])
def test_cifar_malformed_batch_is_dataerror(tmp_path: Path, bad: str) -> None:
    _, folder = write_cifar(tmp_path)
    batch: Any = cifar_batch(2, seed=9)
    if bad == "shape":
        batch[b"data"] = batch[b"data"][:, :100]
    elif bad == "dtype":
        batch[b"data"] = batch[b"data"].astype(np.float32)
    elif bad == "labels":
        batch[b"labels"] = [1]
    elif bad == "not-a-dict":
        batch = [1, 2, 3]
    data = b"\x80\x02not a pickle at all" if bad == "garbage" else py2_dumps(batch)
    (folder / "test_batch").write_bytes(data)
    with pytest.raises(DataError, match="test_batch"):
        torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10"))


def test_cifar_missing_and_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = write_cifar(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError) as err:
        torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10"))
    assert str(folder) in str(err.value) and "missing: data_batch_5;" in str(err.value)

    calls = []

    def offline(url: str, download_root: str, **kw: Any) -> None:
        calls.append((url, download_root, kw))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        torchvision_data.load("cifar10", cfg(tmp_path, name="cifar10", download=True))
    msg = str(err.value)
    assert "download failed" in msg and "name resolution" in msg and str(folder) in msg
    assert "\n" not in msg
    # torchvision's archive (with its md5) into the data folder, nothing else.
    assert calls == [(torchvision.datasets.CIFAR10.url, str(tmp_path.resolve()),
                      {"filename": "cifar-10-python.tar.gz",
                       "md5": torchvision.datasets.CIFAR10.tgz_md5})]
