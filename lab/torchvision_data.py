"""The real image datasets (MNIST, Fashion-MNIST, EMNIST digits, CIFAR-10) as in-memory tensors.

`load(name, cfg)` returns `(train, test)` Splits with x float32 (N, C, H, W) in [0, 1] and y int64,
built from whole arrays at once (never image by image), from the standard on-disk formats under
`cfg.data_dir`:

- MNIST family: the four idx files, plain or gzipped (`lab.idx`), in the first folder of the
  search path that holds any of them: torchvision's `<data_dir>/<MNIST|FashionMNIST|EMNIST>/raw/`,
  then `<data_dir>/<name>/` and `<data_dir>` itself when it is named `<name>` (Debian's layout:
  `/usr/share/datasets/fashion-mnist/*.gz`), then the system folders in `SYSTEM_DIRS`
  (Fashion-MNIST: Debian's `dataset-fashion-mnist` package). A folder is taken only when its path
  names the dataset, since MNIST and Fashion-MNIST files have the same names. torchvision only
  downloads, into its own layout, when allowed.
- CIFAR-10: the pickled batches in `<data_dir>/cifar-10-batches-py/`. torchvision would md5 every
  batch and then call an unrestricted `pickle.load`; here torchvision only downloads and extracts
  the archive, and the batches are read with an allow-list unpickler that can rebuild numpy arrays
  and nothing else, so a planted file cannot run code.

Every failure a user can cause (missing files with download off, a failed download, a truncated or
foreign file) is one `DataError` line naming the folder, the files expected there and how to get
them.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lab.config import DatasetConfig
from lab.errors import DataError
from lab.idx import IdxError, read_idx
from lab.split import Split

log = logging.getLogger(__name__)

NUM_CLASSES = 10
_RESIZE_CHUNK = 4096  # images per interpolate call: bounds the float32 temporaries


def load(name: str, cfg: DatasetConfig) -> tuple[Split, Split]:
    """Train and test splits of dataset `name`, read from `cfg.data_dir`.

    Args:
        name: one of `LOADERS` ("mnist", "fashion-mnist", "emnist-digits", "cifar10").
        cfg: `data_dir` (root folder), `download` (fetch missing files through torchvision),
            `image_size` (bilinear resize to (image_size, image_size) when it differs).

    Returns:
        (train, test): x (N, C, H, W) float32 in [0, 1] (C = 1, or 3 for CIFAR-10), y (N,) int64.

    Raises:
        DataError: unknown name; files missing with download off; download failed; unreadable files.
    """
    if name not in LOADERS:
        raise DataError(f"unknown torchvision dataset {name!r}; known: {sorted(LOADERS)}")
    root = Path(cfg.data_dir).expanduser().resolve()
    train, test = LOADERS[name](root, cfg.download)
    if cfg.image_size is not None:
        train, test = _resized(train, cfg.image_size), _resized(test, cfg.image_size)
    log.info("%s: %d train + %d test images %s (data_dir %s)", name, len(train), len(test),
             tuple(train.x.shape[1:]), root)
    return train, test


# --------------------------------------------------------------------------------------------
# MNIST family: idx files (plain or gzipped) from a search path; torchvision downloads


@dataclass(frozen=True)
class IdxDataset:
    """Where one MNIST-style dataset lives and how torchvision downloads it."""

    name: str
    cls_name: str  # torchvision.datasets class; also its folder under data_dir
    # train images, train labels, test images, test labels; each also accepted as <file>.gz
    files: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # EMNIST's idx files hold every image transposed (column-major writer); (N, H, W) -> upright.
    upright: Callable[[Tensor], Tensor] = lambda x: x
    hint: str = ""  # another way to get the files, for the missing-files message


def _idx_files(prefix_train: str, prefix_test: str) -> tuple[str, ...]:
    return (f"{prefix_train}-images-idx3-ubyte", f"{prefix_train}-labels-idx1-ubyte",
            f"{prefix_test}-images-idx3-ubyte", f"{prefix_test}-labels-idx1-ubyte")


MNIST = IdxDataset("mnist", "MNIST", _idx_files("train", "t10k"))
FASHION_MNIST = IdxDataset(
    "fashion-mnist", "FashionMNIST", _idx_files("train", "t10k"),
    hint="on Debian or Ubuntu `apt-get install dataset-fashion-mnist` installs them "
         "(in /usr/share/datasets/fashion-mnist)",
)
EMNIST_DIGITS = IdxDataset(
    "emnist-digits", "EMNIST",
    _idx_files("emnist-digits-train", "emnist-digits-test"),
    kwargs={"split": "digits"},
    upright=lambda x: x.transpose(1, 2).contiguous(),
)
# Folders searched after data_dir's, per dataset: where system packages put the files. Read at
# call time (tests point it elsewhere).
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}


def idx_search_path(spec: IdxDataset, root: Path) -> list[Path]:
    """The folders that may hold `spec`'s files, in order; each names the dataset in its path."""
    folders = [root / spec.cls_name / "raw", root / spec.name]
    if root.name in (spec.name, spec.cls_name):
        folders.append(root)
    folders += [Path(d) for d in SYSTEM_DIRS.get(spec.name, ())]
    return list(dict.fromkeys(folders))  # without repeats, in order


def _find_idx(spec: IdxDataset, folders: list[Path]) -> tuple[Path, list[Path | None]]:
    """The first folder holding any of `spec.files` (plain preferred over .gz), with each file's
    path there or None; the first folder and all None when no folder holds any."""
    for folder in folders:
        found = [next((p for p in (folder / f, folder / f"{f}.gz") if p.is_file()), None)
                 for f in spec.files]
        if any(found):
            return folder, found
    return folders[0], [None] * len(spec.files)


def load_idx(spec: IdxDataset, root: Path, download: bool) -> tuple[Split, Split]:
    """Train and test splits of an MNIST-style dataset from its idx files (see the module doc)."""
    folders = idx_search_path(spec, root)
    folder, found = _find_idx(spec, folders)
    if None in found and not download:
        raise DataError(_missing_message(spec.name, folder, spec.files, _absent(spec, found),
                                         _also(folders, folder), spec.hint))
    if None in found:
        import torchvision.datasets

        folder = folders[0]  # torchvision's own layout
        log.info("%s: downloading into %s", spec.name, folder)
        try:
            getattr(torchvision.datasets, spec.cls_name)(str(root), train=True, download=True,
                                                         **spec.kwargs)
        except Exception as exc:  # urllib, http, tar/zip and md5 errors all mean the same here
            log.debug("%s: download failed", spec.name, exc_info=True)
            raise DataError(_download_message(spec.name, folder, spec.files, exc, spec.hint)) from None
        folder, found = _find_idx(spec, [folder])
        if None in found:
            raise DataError(_missing_message(spec.name, folder, spec.files, _absent(spec, found)))
    paths = [p for p in found if p is not None]
    splits = []
    for images, labels in (paths[:2], paths[2:]):
        x = spec.upright(_read(spec, images, 3))  # (N, H, W) uint8
        y = _read(spec, labels, 1)  # (N,) uint8
        splits.append(_checked(spec.name, folder, x.unsqueeze(1), y))
    log.info("%s: idx files from %s", spec.name, folder)
    return splits[0], splits[1]


def _read(spec: IdxDataset, path: Path, ndim: int) -> Tensor:
    try:
        return read_idx(path, ndim)
    except IdxError as exc:  # a file a user put there is a user mistake, not a bug: one line
        raise DataError(f"{spec.name}: cannot read {path} ({_one_line(exc)}); expected "
                        f"{', '.join(spec.files)} (each may be gzipped)") from None


def _absent(spec: IdxDataset, found: list[Path | None]) -> list[str]:
    return [f for f, p in zip(spec.files, found, strict=True) if p is None]


def _also(folders: list[Path], used: Path) -> list[Path]:
    return [f for f in folders if f != used]


# --------------------------------------------------------------------------------------------
# CIFAR-10: torchvision downloads, an allow-list unpickler reads


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)


def load_cifar10(root: Path, download: bool) -> tuple[Split, Split]:
    """Train (data_batch_1..5) and test (test_batch) splits of CIFAR-10 from the pickled batches.

    Each batch is a dict with b"data" (N, 3072) uint8, rows = 1024 red then 1024 green then 1024
    blue values of a 32x32 image in row-major order, and b"labels" (N ints in 0..9).
    """
    folder = root / CIFAR_FOLDER
    files = CIFAR_TRAIN + CIFAR_TEST
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not download:
        raise DataError(_missing_message("cifar10", folder, files, missing))
    if missing:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        # Only the archive step of torchvision: the archive's md5 is checked, and the batches
        # it holds are then read below without torchvision's unrestricted pickle.load.
        log.info("cifar10: downloading into %s", root)
        try:
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                         md5=CIFAR10.tgz_md5)
        except Exception as exc:  # urllib, http, tar and md5 errors all mean the same here
            log.debug("cifar10: download failed", exc_info=True)
            raise DataError(_download_message("cifar10", folder, files, exc)) from None
        still = [f for f in files if not (folder / f).is_file()]
        if still:
            raise DataError(_missing_message("cifar10", folder, files, still))
    train = _cat([_read_cifar_batch(folder / f) for f in CIFAR_TRAIN])
    test = _cat([_read_cifar_batch(folder / f) for f in CIFAR_TEST])
    return (_checked("cifar10", folder, *train), _checked("cifar10", folder, *test))


def _cat(batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """(x (N, 3, 32, 32) uint8, y (N,) int64) of one pickled CIFAR-10 batch, or DataError."""
    try:
        entry = SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except RefusedGlobal as exc:
        raise DataError(f"cifar10: refusing {path}: {exc}") from None
    except Exception as exc:  # truncated stream, wrong opcodes, bad reduce arguments
        raise DataError(f"cifar10: {path} is not a CIFAR-10 batch ({_one_line(exc)})") from None
    if not isinstance(entry, dict):
        raise DataError(f"cifar10: {path} holds a {type(entry).__name__}, not a batch dict")
    # The original files were written by Python 2: encoding="bytes" gives bytes keys, but a
    # batch re-saved by Python 3 has str keys.
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"cifar10: {path}: b'data' must be a uint8 (N, 3072) array, got {what}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        y = np.empty(0)
    if labels is None or y.ndim != 1 or y.shape[0] != data.shape[0]:
        raise DataError(f"cifar10: {path}: b'labels' must hold {data.shape[0]} integer labels")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)  # (N, 3, 32, 32)
    return x, torch.from_numpy(y)


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allow-list."""


def _numpy_global(module: str, name: str) -> Any:
    """numpy 2 moved `core` to `_core` (the old path warns); the CIFAR files name the old path."""
    for candidate in (module.replace("numpy.core", "numpy._core", 1), module):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise RefusedGlobal(f"{module}.{name} is not available in this numpy")


def _plain_dtype(*args: Any) -> np.dtype[Any]:
    """`numpy.dtype` for the unpickler, refusing object dtypes (arrays of arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise RefusedGlobal(f"object dtype {dtype} is not allowed in a CIFAR-10 batch")
    return dtype


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles (protocol <= 2) use it for bytes; latin1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


# Every global a CIFAR-10 batch pickle needs: the original Python 2 files rebuild their arrays
# with numpy.core.multiarray._reconstruct(numpy.ndarray, ...) and numpy.dtype; Python 3 rewrites
# use numpy._core paths, _frombuffer (protocol 5) or _codecs.encode for bytes (protocol 2).
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"):
        lambda: _numpy_global("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"):
        lambda: _numpy_global("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"):
        lambda: _numpy_global("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"):
        lambda: _numpy_global("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `_ALLOWED` and refuses everything else.

    Persistent ids stay refused by the base class; the copyreg extension opcodes go through
    `find_class` too, so the allow-list covers every way a pickle can name a callable.
    """

    def find_class(self, module: str, name: str) -> Any:
        make = _ALLOWED.get((module, name))
        if make is None:
            raise RefusedGlobal(
                f"it references {module}.{name}, which a CIFAR-10 batch never needs")
        return make()


# --------------------------------------------------------------------------------------------
# Shared helpers


def _checked(name: str, folder: Path, x: Tensor, y: Tensor) -> Split:
    """Split from uint8 images (N, C, H, W) and labels (N,), after checking they agree."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{name}: {folder} holds {x.shape[0]} images but {y.shape[0]} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DataError(f"{name}: labels in {folder} must be in 0..{NUM_CLASSES - 1}, "
                        f"found {int(y.min())}..{int(y.max())}")
    return Split(x.to(torch.float32).div_(255.0), y.to(torch.int64))


def _resized(split: Split, size: int) -> Split:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size), in chunks to bound memory."""
    if tuple(split.x.shape[2:]) == (size, size):
        return split
    n, c = split.x.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.float32)
    for i in range(0, n, _RESIZE_CHUNK):
        chunk = split.x[i : i + _RESIZE_CHUNK]
        out[i : i + _RESIZE_CHUNK] = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return Split(out, split.y)


def _missing_message(name: str, folder: Path, files: tuple[str, ...], missing: list[str],
                     also: list[Path] | None = None, hint: str = "") -> str:
    which = "" if len(missing) == len(files) else f"missing: {', '.join(missing)}; "
    searched = f"; also searched {', '.join(map(str, also))}" if also else ""
    how = f"{hint}; or " if hint else ""
    return (f"{name}: dataset files not found in {folder} "
            f"({which}expected: {', '.join(files)}{searched}); "
            f"{how}set dataset.download: true or put the files there")


def _download_message(name: str, folder: Path, files: tuple[str, ...], exc: BaseException,
                      hint: str = "") -> str:
    how = f"; or {hint}" if hint else ""
    return (f"{name}: download failed ({_one_line(exc)}); put the files "
            f"{', '.join(files)} in {folder}{how}")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


LOADERS: dict[str, Callable[[Path, bool], tuple[Split, Split]]] = {
    "mnist": functools.partial(load_idx, MNIST),
    "fashion-mnist": functools.partial(load_idx, FASHION_MNIST),
    "emnist-digits": functools.partial(load_idx, EMNIST_DIGITS),
    "cifar10": load_cifar10,
}
