"""Atomic file writes: a crash never leaves a half-written checkpoint, capture or summary.

Tensors go to safetensors (metadata is dict[str, str]); metadata to JSON / JSONL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save, save_file
from torch import Tensor


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path, private: bool = False) -> tuple[int, str]:
    """A temporary file next to `path`, with the permissions a plain open() would give it
    (mkstemp makes 0600 files, which breaks sharing a report or a Docker volume); a `private`
    one keeps mkstemp's 0600, set by its os.open(O_CREAT | O_EXCL, 0o600) before any byte exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    if not private:
        os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def private_dirs(folder: Path) -> None:
    """Create `folder` and its missing parents 0700 (`mkdir(parents=True)` would give the parents
    the umask's mode); folders that exist already are left as they are."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer (a parallel client) was first
            d.mkdir(mode=0o700)


def atomic_write_bytes(path: Path, data: bytes, *, private: bool = False) -> None:
    """`private`: the file is 0600 from its creation (keys, captures, evidence), never readable by others."""
    fd, tmp = _temp_beside(path, private)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any, *, allow_nan: bool = True) -> None:
    """`allow_nan=False`: strict JSON, a NaN or infinity raises ValueError (see `finite_record`)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable, allow_nan=allow_nan) + "\n")


def append_jsonl(path: Path, obj: Any, *, allow_nan: bool = True) -> None:
    """Append one line with one write call, then fsync; readers skip a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(obj, default=_jsonable, allow_nan=allow_nan) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def finite_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """`row` as strict JSON can hold it: every NaN or infinity, at any depth, becomes None, and
    `nonfinite` lists where they were as dotted paths ("loss", "update_norms.3"), after the paths
    `row` already listed there; no `nonfinite` key when all values are finite. Tensors, arrays,
    paths and sets become plain JSON values first."""
    bad: list[str] = [str(p) for p in row.get("nonfinite") or ()]  # a row written before keeps its flags
    clean = {str(k): _finite(v, str(k), bad) for k, v in row.items() if k != "nonfinite"}
    if bad:
        clean["nonfinite"] = list(dict.fromkeys(bad))
    return clean


def _finite(value: Any, path: str, bad: list[str]) -> Any:
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        bad.append(path)
        return None
    if isinstance(value, (str, int)) or value is None:  # bool is an int
        return value
    if isinstance(value, Mapping):
        return {str(k): _finite(v, f"{path}.{k}", bad) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_finite(v, f"{path}.{i}", bad) for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return _finite(value.tolist(), path, bad)
    return _finite(_jsonable(value), path, bad)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of `path` (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def save_tensors(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
                 *, private: bool = False) -> None:
    """`private`: 0600 from the file's creation (see `atomic_write_bytes`)."""
    if private:  # serialised in memory, then written through our 0600 file: save_file makes its own
        atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                      metadata=dict(metadata or {})), private=True)
        return
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=dict(metadata or {}))
        os.chmod(tmp, 0o666 & ~_umask())  # save_file recreates the file with its own mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")

