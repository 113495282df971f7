"""Reading a run folder that may come from someone else: no path it names may lead outside it.

A run folder (config.yaml, final.safetensors, captures/manifest.jsonl and its entries, inversion/)
can be copied from another machine or another user, so the offline tools (`fl-lab invert`,
`verify`, `unlearn`) trust none of it: every path they take from it, or build from a name it holds,
is resolved (symlinks followed) and must stay strictly inside the folder it belongs to
(`contained`), and the capture manifest is checked row by row before anything is opened or written
(`read_manifest`). A violation is one `LabError` line naming the file and, for the manifest, the line.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import CaptureError, LabError

log = logging.getLogger(__name__)

MANIFEST = Path("captures") / "manifest.jsonl"
# Written into every folder the lab creates for a run; only such a folder is ever cleaned or reused.
RUN_MARKER = ".fl-lab-run"
# `fl-lab` writes it on Ctrl-C; the ServerApp stops at the next round boundary when it is there.
STOP_FILE = "stop-requested"
MAX_MANIFEST_BYTES = 64 << 20  # ~200k entries; a larger manifest is not one the lab wrote
# An entry id names the entry's output folder: relative segments of word characters, '.' and '-'.
_SEGMENT = re.compile(r"[\w.-]+")


class UnsafePathError(LabError):
    """A path taken from a run folder leads outside it (`..`, an absolute path or a symlink)."""


def contained(root: Path, name: str | Path, what: str, base: Path | None = None) -> Path:
    """`(base or root) / name`, resolved, provided it lies strictly inside `root` (resolved).

    `name` must be relative; nothing it names need exist yet. Symlinks that exist anywhere on the
    way are followed, so a link that points outside `root` is an escape like `..` is.

    Raises:
        UnsafePathError: `name` is absolute, or the resolved path is `root` itself or outside it.
    """
    if Path(name).is_absolute():
        raise UnsafePathError(f"{what} {str(name)!r} is an absolute path; refused (it must stay inside {root})")
    try:
        top = Path(root).resolve()
        resolved = ((Path(base) if base is not None else Path(root)) / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL byte
        raise UnsafePathError(f"{what} {str(name)!r} in {root} cannot be resolved ({exc}); refused") from None
    if resolved == top or not resolved.is_relative_to(top):
        raise UnsafePathError(f"{what} {str(name)!r} leads outside {root} (to {str(resolved)!r}); refused")
    return resolved


@dataclass(frozen=True)
class ManifestEntry:
    """One checked row of captures/manifest.jsonl; `file` and `evidence` are resolved and inside the run."""

    id: str  # relative name (round_0002/partition_003); the entry's output folder
    file: Path
    evidence: Path | None = None
    line: int = 0  # 1-based line in the manifest; 0 for an entry file named on the command line
    row: dict[str, Any] = field(default_factory=dict)  # the whole object, as written


def check_id(value: object, where: str) -> str:
    """`value` if it is a usable entry id (relative `a/b` segments, no `.` or `..`), else CaptureError."""
    parts = value.split("/") if isinstance(value, str) else []
    if not parts or any(p in (".", "..") or not _SEGMENT.fullmatch(p) for p in parts):
        raise CaptureError(f"{where}: id {value!r} is not a relative name like round_0002/partition_003 "
                           "(word characters, '.', '-' and '/', no '..')")
    return str(value)


def read_manifest(run: Path) -> list[ManifestEntry]:
    """Every row of RUN/captures/manifest.jsonl, checked; [] when the file does not exist.

    A last line without its newline that does not parse is a torn append (a crash while writing)
    and is skipped with a warning; every other bad line is an error.

    Raises:
        CaptureError: a line is not JSON or not an object, lacks `id` or `file`, has a bad id or
            a duplicate one, or the manifest is not UTF-8 text or is implausibly large.
        UnsafePathError: the manifest, an entry or an evidence file lies outside the run folder.
    """
    path = Path(run) / MANIFEST
    if not path.exists() and not path.is_symlink():
        return []
    manifest = contained(run, MANIFEST, "the capture manifest")
    if not manifest.is_file():
        raise CaptureError(f"{path}: not a regular file")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise CaptureError(f"{path}: {manifest.stat().st_size} bytes, more than a capture manifest "
                           f"can plausibly hold ({MAX_MANIFEST_BYTES}); refused")
    try:
        text = manifest.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptureError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    captures = Path(run) / "captures"
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s: skipping a torn last line (an interrupted write)", where)
                continue
            raise CaptureError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise CaptureError(f"{where}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("id", "file") if not isinstance(row.get(k), str)]
        if missing:
            raise CaptureError(f"{where}: lacks {' and '.join(repr(k) for k in missing)} (a string)")
        entry_id = check_id(row["id"], where)
        if entry_id in seen:
            raise CaptureError(f"{where}: id {entry_id!r} repeats line {seen[entry_id]}")
        seen[entry_id] = number
        evidence = row.get("evidence")
        if evidence is not None and not isinstance(evidence, str):
            raise CaptureError(f"{where}: 'evidence' must be a path or null, got {type(evidence).__name__}")
        try:
            file = contained(run, row["file"], "capture entry", base=captures)
            evidence_file = contained(run, evidence, "evidence file", base=captures) if evidence else None
        except UnsafePathError as exc:
            raise UnsafePathError(f"{where}: {exc}") from None
        entries.append(ManifestEntry(id=entry_id, file=file, evidence=evidence_file, line=number, row=row))
    return entries
