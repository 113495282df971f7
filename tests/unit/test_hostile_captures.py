"""A hostile run folder: `fl-lab invert`, `verify` and `unlearn` trust nothing in it.

Every path read or written stays inside the run (or the --out folder the user named); a bad file is
one line on stderr and exit 2, never a traceback. The run folder is built in-process, no Flower run:
the tiny digits config, an untrained final model, one capture entry with its evidence, one
reconstruction; inversion runs one iteration.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inversion.cli import main as invert
from lab.artifacts import save_tensors
from lab.capture import CapturedUpdate, probe_update, write_entry, write_evidence
from lab.config import dump_yaml, load_experiment
from lab.task import LocalHyperparams, build_for, state_of
from tests.tiny_backdoor import TINY
from unlearning.cli import unlearn_main, verify_main

FAST = ["--iterations", "1", "--restarts", "1", "--quiet"]
ENTRY = "round_0002/partition_000"
ROW = {"id": ENTRY, "file": f"{ENTRY}.safetensors", "evidence": "evidence/round_0002_partition_000.safetensors",
       "num_examples": 1}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    run.mkdir()
    cfg = load_experiment({**TINY, "capture": {"enabled": True, "rounds": [2]}})
    (run / "config.yaml").write_text(dump_yaml(cfg))
    model = build_for(cfg, seed=0)
    save_tensors(run / "final.safetensors", state_of(model))
    hp = LocalHyperparams(epochs=1, steps=1, batch_size=1, lr=0.01, momentum=0.0, weight_decay=0.0)
    x, y = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3])
    write_entry(run / "captures" / ROW["file"], CapturedUpdate(
        state_of(model), probe_update(model, x, y, hp), 1, 2, 7, 0, hp, image_shape=(1, 16, 16)))
    write_evidence(run / "captures" / ROW["evidence"], x, y)
    (run / "captures/manifest.jsonl").write_text(json.dumps(ROW) + "\n")
    save_tensors(run / "inversion" / ENTRY / "recon.safetensors", {"images": x, "labels": y})
    return run


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "box" / "run"  # tmp_path/box/ is "outside the run": nothing may land there
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def refused(code: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Exit 2 with exactly one line on stderr holding every needle (and so no traceback)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def write_manifest(run: Path, *rows: object) -> None:
    (run / "captures/manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def outside_files(run: Path) -> list[Path]:
    return sorted(p for p in run.parent.rglob("*") if not p.is_relative_to(run))


# ---------------------------------------------------------------------------- fl-lab invert


def test_a_good_run_folder_inverts(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert invert([str(run), *FAST]) == 0
    assert ENTRY in capsys.readouterr().out and (run / "inversion" / ENTRY / "metrics.json").is_file()


@pytest.mark.parametrize("file", ["../../../../../../etc/passwd", "/etc/passwd", "../final.safetensors/../../x"])
def test_finding6_manifest_file_outside_the_run_is_refused(run: Path, capsys: pytest.CaptureFixture[str],
                                                           file: str) -> None:
    write_manifest(run, {**ROW, "id": "x", "file": file, "evidence": None})
    refused(invert([str(run), *FAST]), capsys, "refused", "manifest.jsonl:1")


def test_finding6_symlinked_entry_and_evidence_outside_the_run_are_refused(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outside = run.parent / "elsewhere.safetensors"
    shutil.copy(run / "captures" / ROW["file"], outside)  # a valid entry: only where it lies is wrong
    os.symlink(outside, run / "captures/round_0002/link.safetensors")
    write_manifest(run, {**ROW, "file": "round_0002/link.safetensors"})
    refused(invert([str(run), *FAST]), capsys, "leads outside")
    write_manifest(run, {**ROW, "evidence": "../../elsewhere.safetensors"})
    refused(invert([str(run), *FAST]), capsys, "leads outside")


@pytest.mark.parametrize("entry_id", ["../../escaped", "ABSOLUTE", "a/../../../escaped"])
def test_finding7_manifest_id_cannot_write_outside_the_output_folder(
        run: Path, capsys: pytest.CaptureFixture[str], entry_id: str) -> None:
    write_manifest(run, {**ROW, "id": str(run.parent / "escaped") if entry_id == "ABSOLUTE" else entry_id})
    refused(invert([str(run), *FAST]), capsys, "manifest.jsonl:1")
    out = run.parent / "out"
    refused(invert([str(run), "--out", str(out), *FAST]), capsys, "manifest.jsonl:1")
    assert outside_files(run) == []


def test_finding7_planted_links_do_not_carry_the_outputs_out(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(run / "inversion")
    os.symlink(run.parent, run / "inversion")  # the default output folder leads out of the run
    refused(invert([str(run), *FAST]), capsys, "leads outside")
    assert outside_files(run) == []
    (run / "inversion").unlink()
    (run / "inversion/round_0002").mkdir(parents=True)
    os.symlink(run.parent, run / "inversion" / ENTRY)  # an entry's output folder leads out
    refused(invert([str(run), *FAST]), capsys, "leads outside")
    assert outside_files(run) == []
    # A planted file link is replaced by the new output, never written through.
    (run / "inversion" / ENTRY).unlink()
    (run / "inversion" / ENTRY).mkdir()
    victim = run.parent / "victim.txt"
    victim.write_text("keep me")
    for name in ("recon.png", "recon.safetensors", "metrics.json"):
        os.symlink(victim, run / "inversion" / ENTRY / name)
    assert invert([str(run), *FAST]) == 0
    assert victim.read_text() == "keep me"
    assert not any((run / "inversion" / ENTRY / n).is_symlink() for n in ("recon.png", "recon.safetensors", "metrics.json"))


@pytest.mark.parametrize("line, needle", [
    ('{"id": "x"}', "lacks 'file'"),
    ('{"file": "round_0002/partition_000.safetensors"}', "lacks 'id'"),
    ("[1, 2]", "expected a JSON object"),
    ("42", "expected a JSON object"),
    ('"a string"', "expected a JSON object"),
    ("{broken", "not JSON"),
])
def test_finding8_a_bad_manifest_row_names_its_line(run: Path, capsys: pytest.CaptureFixture[str],
                                                    line: str, needle: str) -> None:
    (run / "captures/manifest.jsonl").write_text(json.dumps(ROW) + "\n" + line + "\n")
    refused(invert([str(run), *FAST]), capsys, "manifest.jsonl:2", needle)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_finding9_corrupt_final_model_exits_2(run: Path, capsys: pytest.CaptureFixture[str], jobs: str) -> None:
    if jobs == "2":  # two entries, so two worker processes start and load the final model
        shutil.copy(run / "captures" / ROW["file"], run / "captures/round_0002/partition_001.safetensors")
        write_manifest(run, {**ROW, "evidence": None},
                       {**ROW, "id": "round_0002/partition_001", "file": "round_0002/partition_001.safetensors",
                        "evidence": None})
    final = run / "final.safetensors"
    final.write_bytes(final.read_bytes()[:100])
    refused(invert([str(run), "--jobs", jobs, *FAST]), capsys, "final.safetensors", "corrupt")


def test_finding9_final_model_that_does_not_fit_is_one_line(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_tensors(run / "final.safetensors", {"w": torch.zeros(3)})
    refused(invert([str(run), *FAST]), capsys, "final.safetensors", "does not fit")


def test_corrupt_entry_metadata_exits_2(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    path = run / "captures" / ROW["file"]
    save_file({"global/w": torch.zeros(1), "update/w": torch.zeros(1)}, str(path),
              metadata={"format": '"fl-lab-capture/1"', "keys": "5", "num_examples": "1", "server_round": "2",
                        "node_id": "1", "partition_id": "0", "hyperparams": "{}"})
    refused(invert([str(run), *FAST]), capsys, "bad capture metadata")


def entry_claiming(run: Path, num_examples: int, hp: LocalHyperparams) -> None:
    """Rewrite the run's entry with the same tensors and these claims."""
    from lab.capture import read_entry

    path = run / "captures" / ROW["file"]
    entry = read_entry(path)
    write_entry(path, CapturedUpdate(entry.global_state, entry.update, num_examples, 2, 7, 0, hp,
                                     image_shape=(1, 16, 16)))


@pytest.mark.parametrize(("num_examples", "hp", "needle"), [
    (10**12, LocalHyperparams(1, 1, 1, 0.01, 0.0, 0.0), "num_examples 1000000000000"),
    (1, LocalHyperparams(1, 1, 10**9, 0.01, 0.0, 0.0), "batch_size 1000000000"),
    (1, LocalHyperparams(1, 10**9, 1, 0.01, 0.0, 0.0), "1,000,000,000 local steps"),
    (600_000, LocalHyperparams(100, None, 1, 0.01, 0.0, 0.0), "60,000,000 local steps"),
])
def test_an_entry_claiming_an_impossible_client_exits_2_before_anything_is_allocated(
        run: Path, capsys: pytest.CaptureFixture[str], num_examples: int, hp: LocalHyperparams, needle: str) -> None:
    entry_claiming(run, num_examples, hp)
    refused(invert([str(run), *FAST]), capsys, "bad capture metadata", needle)


def test_a_plausible_client_too_big_to_invert_at_once_asks_for_num_images(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry_claiming(run, 60_000, LocalHyperparams(1, 1, 32, 0.01, 0.0, 0.0))  # a whole Fashion-MNIST client
    refused(invert([str(run), *FAST]), capsys, "60,000 images to reconstruct at once", "--num-images")
    assert invert([str(run), *FAST, "--num-images", "1"]) == 0


def test_evidence_that_does_not_fit_the_run_exits_2(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_evidence(run / "captures" / ROW["evidence"], torch.rand(1, 3, 5, 5), torch.tensor([99]))
    refused(invert([str(run), *FAST]), capsys, "evidence")


def test_finding11_no_manifest_says_what_is_really_wrong(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = run / "captures/manifest.jsonl"
    manifest.unlink()  # entries exist: the manifest is what is missing
    err = refused(invert([str(run), *FAST]), capsys, "manifest.jsonl: missing", "1 entry file")
    assert "enable" not in err
    manifest.write_text("")
    refused(invert([str(run), *FAST]), capsys, "manifest.jsonl: empty")
    manifest.unlink()
    shutil.rmtree(run / "captures")
    refused(invert([str(run), *FAST]), capsys, "although capture was enabled")
    cfg = load_experiment(run / "config.yaml", ["capture.enabled=false"])
    (run / "config.yaml").write_text(dump_yaml(cfg))
    refused(invert([str(run), *FAST]), capsys, "capture was disabled")


def test_an_entry_file_outside_captures_is_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stray = run / "stray.safetensors"
    shutil.copy(run / "captures" / ROW["file"], stray)
    refused(invert([str(stray), *FAST]), capsys, "not inside")


# ---------------------------------------------------------------------------- fl-lab verify / unlearn


@pytest.mark.parametrize("tool", [verify_main, unlearn_main])
def test_finding9_corrupt_final_model_verify_and_unlearn(run: Path, capsys: pytest.CaptureFixture[str],
                                                        tool: Callable[[list[str]], int]) -> None:
    final = run / "final.safetensors"
    final.write_bytes(final.read_bytes()[:100])
    refused(tool([str(run), "--quiet"] if tool is unlearn_main else [str(run)]), capsys, "final.safetensors")


@pytest.mark.parametrize("tool", [verify_main, unlearn_main])
def test_corrupt_or_hostile_reconstruction_exits_2(run: Path, capsys: pytest.CaptureFixture[str],
                                                   tool: Callable[[list[str]], int]) -> None:
    argv = [str(run), "--quiet", "--steps", "1"] if tool is unlearn_main else [str(run)]
    recon = run / "inversion" / ENTRY / "recon.safetensors"
    recon.write_bytes(recon.read_bytes()[:60])
    refused(tool(argv), capsys, "recon.safetensors", "unreadable")
    save_tensors(recon, {"images": torch.rand(1, 1, 16, 16), "labels": torch.tensor([10**9])})
    refused(tool(argv), capsys, "labels")
    recon.unlink()
    (run.parent / "r.safetensors").write_bytes(b"")
    os.symlink(run.parent / "r.safetensors", recon)
    refused(tool(argv), capsys, "leads outside")
    assert not (run / "verification.json").exists() and not (run / "unlearning").exists()


def test_symlinked_final_model_and_output_folder_outside_the_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    final = run / "final.safetensors"
    shutil.move(final, run.parent / "final.safetensors")
    os.symlink(run.parent / "final.safetensors", final)
    refused(verify_main([str(run)]), capsys, "leads outside")
    final.unlink()
    shutil.move(run.parent / "final.safetensors", final)
    os.symlink(run.parent, run / "unlearning")
    refused(unlearn_main([str(run), "--quiet", "--steps", "1"]), capsys, "leads outside")
    assert outside_files(run) == []


def png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims width x height grey pixels (one row of data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [20_000, 5_000])  # past PIL's own limit, and past only ours
def test_finding10_verify_refuses_an_oversized_image_before_decoding(
        run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], side: int) -> None:
    bomb = png_header(tmp_path / "bomb.png", side, side)
    assert bomb.stat().st_size < 1000
    refused(verify_main([str(run), "--image", str(bomb)]), capsys, "bomb.png", "refused before decoding")


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b""])
def test_finding10_verify_refuses_unreadable_images(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     content: bytes) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    refused(verify_main([str(run), "--image", str(bad)]), capsys, "bad.png")
    from PIL import Image

    Image.frombytes("L", (64, 64), bytes(range(256)) * 16).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # the header is right, the pixels are cut off
    refused(verify_main([str(run), "--image", str(tmp_path / "cut.png")]), capsys, "cut.png")


def test_verify_image_still_classifies_a_real_png(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    Image.new("L", (32, 32), 128).save(tmp_path / "ok.png")
    assert verify_main([str(run), "--image", str(tmp_path / "ok.png")]) == 0
    assert "ok.png: predicted class" in capsys.readouterr().out
