"""lab.runfolder: a path from a run folder stays inside it; the capture manifest is checked row by row."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lab.errors import CaptureError
from lab.runfolder import ManifestEntry, UnsafePathError, check_id, contained, read_manifest


def test_contained_resolves_inside_and_refuses_every_way_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "captures").mkdir(parents=True)
    (run / "captures/e.safetensors").write_bytes(b"x")
    assert contained(run, "captures/e.safetensors", "entry") == (run / "captures/e.safetensors").resolve()
    assert contained(run, "not/yet/there", "output") == (run / "not/yet/there").resolve()  # need not exist
    assert contained(run, "e.safetensors", "entry", base=run / "captures") == (run / "captures/e.safetensors").resolve()
    for name in ("../outside", "captures/../../outside", "/etc/passwd", ".", "captures/.."):
        with pytest.raises(UnsafePathError, match="refused"):
            contained(run, name, "entry")
    with pytest.raises(UnsafePathError, match="refused"):
        contained(run, "../../etc/passwd", "entry", base=run / "captures")


def test_contained_follows_symlinks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", run / "link")  # a file link that leads out
    os.symlink(tmp_path, run / "dirlink")  # a folder link that leads out: everything below it does too
    os.symlink(run / "inside.txt", run / "ok")  # a link that stays inside is fine
    for name in ("link", "dirlink/secret", "dirlink/not-yet"):
        with pytest.raises(UnsafePathError, match="leads outside"):
            contained(run, name, "entry")
    assert contained(run, "ok", "entry") == (run / "inside.txt").resolve()
    os.symlink("loop", run / "loop")
    with pytest.raises(UnsafePathError):
        contained(run, "loop", "entry")
    with pytest.raises(UnsafePathError):
        contained(run, "nul\0byte", "entry")


@pytest.mark.parametrize("good", ["round_0002/partition_003", "a", "x-1.y_2/z"])
def test_check_id_accepts_relative_names(good: str) -> None:
    assert check_id(good, "here") == good


@pytest.mark.parametrize("bad", ["../x", "a/../../b", "/abs", "", "a//b", "a/./b", "a\\..\\b", "a\nb", 3, None, ["a"]])
def test_check_id_refuses_paths_that_could_leave_the_output_folder(bad: object) -> None:
    with pytest.raises(CaptureError, match="not a relative name"):
        check_id(bad, "here")


def _run(tmp_path: Path, lines: list[str] | str) -> Path:
    run = tmp_path / "run"
    (run / "captures/round_0002").mkdir(parents=True, exist_ok=True)
    (run / "captures/round_0002/p0.safetensors").write_bytes(b"x")
    text = lines if isinstance(lines, str) else "".join(line + "\n" for line in lines)
    (run / "captures/manifest.jsonl").write_text(text)
    return run


GOOD = json.dumps({"id": "round_0002/p0", "file": "round_0002/p0.safetensors", "evidence": "ev/p0.safetensors"})


def test_read_manifest_resolves_rows_inside_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path, [GOOD, ""])
    [entry] = read_manifest(run)
    assert isinstance(entry, ManifestEntry) and entry.id == "round_0002/p0" and entry.line == 1
    assert entry.file == (run / "captures/round_0002/p0.safetensors").resolve()
    assert entry.evidence == (run / "captures/ev/p0.safetensors").resolve()
    assert read_manifest(tmp_path / "no-such-run") == []


@pytest.mark.parametrize("row, message", [
    ({"id": "x", "file": "../../../../etc/passwd"}, "leads outside"),  # finding 6
    ({"id": "x", "file": "/etc/passwd"}, "absolute path"),
    ({"id": "x", "file": "round_0002/p0.safetensors", "evidence": "../../secret"}, "leads outside"),
    ({"id": "../../../escaped", "file": "round_0002/p0.safetensors"}, "not a relative name"),  # finding 7
    ({"id": "/tmp/escaped", "file": "round_0002/p0.safetensors"}, "not a relative name"),
    ({"id": "x"}, "lacks 'file'"),  # finding 8
    ({"file": "round_0002/p0.safetensors"}, "lacks 'id'"),
    ({"id": 3, "file": 4}, "lacks 'id' and 'file'"),
    ({"id": "x", "file": "round_0002/p0.safetensors", "evidence": 5}, "'evidence' must be"),
    ([1, 2], "expected a JSON object, got list"),
    (7, "expected a JSON object, got int"),
])
def test_read_manifest_names_the_line_of_a_bad_row(tmp_path: Path, row: object, message: str) -> None:
    run = _run(tmp_path, [GOOD, json.dumps(row)])
    with pytest.raises((CaptureError, UnsafePathError), match=message) as err:
        read_manifest(run)
    assert "manifest.jsonl:2: " in str(err.value)
    assert "\n" not in str(err.value)


def test_read_manifest_refuses_a_symlinked_entry_that_leads_outside(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    run = _run(tmp_path, [json.dumps({"id": "x", "file": "round_0002/link.safetensors"})])
    os.symlink(tmp_path / "secret", run / "captures/round_0002/link.safetensors")
    with pytest.raises(UnsafePathError, match="leads outside"):
        read_manifest(run)


def test_read_manifest_broken_lines_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"manifest.jsonl:2: not JSON"):
        read_manifest(_run(tmp_path, [GOOD, "{broken", GOOD.replace("p0\"", "p1\"")]))
    with pytest.raises(CaptureError, match=r"manifest.jsonl:2: id 'round_0002/p0' repeats line 1"):
        read_manifest(_run(tmp_path, [GOOD, GOOD]))
    run = _run(tmp_path, [GOOD])
    (run / "captures/manifest.jsonl").write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(CaptureError, match="not UTF-8"):
        read_manifest(run)
    # A torn last line (an append cut short by a crash: no newline) is skipped, as every reader does.
    assert [e.id for e in read_manifest(_run(tmp_path, GOOD + "\n" + '{"id": "round_0002/p1", "fi'))] == ["round_0002/p0"]


def test_read_manifest_refuses_a_manifest_that_is_a_link_out_of_the_run(tmp_path: Path) -> None:
    run = _run(tmp_path, [GOOD])
    (tmp_path / "elsewhere.jsonl").write_text(GOOD + "\n")
    (run / "captures/manifest.jsonl").unlink()
    os.symlink(tmp_path / "elsewhere.jsonl", run / "captures/manifest.jsonl")
    with pytest.raises(UnsafePathError, match="leads outside"):
        read_manifest(run)
