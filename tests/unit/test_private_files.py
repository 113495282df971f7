"""Secrets, captures and evidence are private from their first byte; secrets stay out of git."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from commands.secrets import make_certificates, make_node_key
from lab.capture import CapturedUpdate, evidence_path, write_entry, write_evidence
from lab.task import LocalHyperparams

ROOT = Path(__file__).resolve().parents[2]


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def on_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[int]]]:
    """{final file name: modes its bytes had on disk}: at each fsync of the file being written (the
    temporary one) and when it is renamed into place."""
    seen: dict[str, list[int]] = {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # .<final name>.<random>.tmp
        seen.setdefault(name[1:].rsplit(".", 2)[0] if name.endswith(".tmp") else name, []).append(
            stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        seen.setdefault(Path(dst).name, []).append(mode(src))
        real_replace(src, dst)

    old_umask = os.umask(0o022)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    yield seen
    os.umask(old_umask)


def test_keys_are_0600_before_any_byte_is_written(tmp_path: Path, on_disk: dict[str, list[int]]) -> None:
    certs = make_certificates(tmp_path / "certs")
    public = make_node_key(tmp_path / "keys" / "node-0")
    for name in ("ca.key", "server.key", "node-0"):
        assert on_disk[name] and set(on_disk[name]) == {0o600}, (name, [oct(m) for m in on_disk[name]])
    assert mode(certs.server_key) == mode(tmp_path / "certs" / "ca.key") == mode(tmp_path / "keys" / "node-0") == 0o600
    assert mode(certs.ca_cert) == mode(public) == 0o644  # public halves stay readable (SuperNodes, Docker)


def test_captures_and_evidence_are_private_files_in_private_folders(tmp_path: Path,
                                                                    on_disk: dict[str, list[int]]) -> None:
    captures = tmp_path / "run" / "captures"
    state = {"w": torch.ones(2, 3)}
    entry = captures / "round_0002" / "partition_001.safetensors"
    write_entry(entry, CapturedUpdate(state, {"w": torch.zeros(2, 3)}, 4, 2, 7, 1,
                                      LocalHyperparams(1, 1, 4, 0.1, 0.0, 0.0)))
    evidence = evidence_path(captures, 2, 1)
    write_evidence(evidence, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    for path in (entry, evidence):
        assert set(on_disk[path.name]) == {0o600}, (path.name, [oct(m) for m in on_disk[path.name]])
        assert mode(path) == 0o600
    for folder in (captures, entry.parent, evidence.parent):
        assert mode(folder) == 0o700, folder
    assert mode(tmp_path / "run") == 0o700  # created by this write, so private too


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_docker_secrets_and_flower_home_are_ignored_by_git() -> None:
    for path in ("docker/secrets/keys/node-0", "docker/secrets/certs/ca.key", "docker/flwr-home/config.toml"):
        res = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert res.returncode == 0, f"{path} is not ignored by .gitignore"
    assert subprocess.run(["git", "check-ignore", "-q", "docker/secrets.sh"], cwd=ROOT, check=False).returncode == 1
