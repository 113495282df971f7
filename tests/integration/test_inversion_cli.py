"""`fl-lab invert` / `python -m inversion` on a real (in-process) run with captures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.artifacts import load_tensors, read_jsonl
from lab.config import dump_yaml, load_experiment
from inversion.cli import main
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
FAST = ["--iterations", "30", "--restarts", "1", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [
        "capture.enabled=true", "capture.rounds=[2]", "capture.clients=all", "capture.evidence=true",
        "capture.probe={local_steps: 1, batch_size: 1, lr: 0.01}", "attack.poison_mode=append",
        "attack.poison_ratio=0.25"])
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(out)}, 4)
    return out


def test_inverts_every_entry_and_writes_outputs(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), *FAST]) == 0
    table = capsys.readouterr().out
    for row in read_jsonl(run_dir / "captures/manifest.jsonl"):
        out = run_dir / "inversion" / row["id"]
        metrics = json.loads((out / "metrics.json").read_text())
        for key in ("psnr", "ssim", "label_accuracy", "target_fraction", "iterations", "seconds"):
            assert key in metrics
        assert metrics["iterations"] == 30 and metrics["psnr"] is not None  # evidence present: scored
        recon = load_tensors(out / "recon.safetensors")["images"]
        assert recon.shape[0] == row["num_examples"] and float(recon.min()) >= 0 and float(recon.max()) <= 1
        assert (out / "recon.png").stat().st_size > 1000
        assert row["id"] in table
    # the attacker (partition 3) trained on its image plus one stamped copy of a source-class image
    attacker = json.loads((run_dir / "inversion/round_0002/partition_003/metrics.json").read_text())
    assert attacker["num_images"] == 2


def test_known_labels_and_a_single_entry_file(run_dir: Path) -> None:
    entry = run_dir / "captures/round_0002/partition_001.safetensors"
    assert main([str(entry), "--labels", "known", "--out", str(run_dir / "known"), *FAST]) == 0
    metrics = json.loads((run_dir / "known/round_0002/partition_001/metrics.json").read_text())
    assert metrics["label_accuracy"] == 1.0


def test_parallel_workers_give_the_sequential_reconstructions(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = ["--entry", "round_0002/partition_001", "--entry", "round_0002/partition_003"]
    assert main([str(run_dir), *entries, "--out", str(run_dir / "seq"), *FAST]) == 0
    assert main([str(run_dir), *entries, "--out", str(run_dir / "par"), "--jobs", "2", *FAST]) == 0
    table = capsys.readouterr().out
    for entry in ("round_0002/partition_001", "round_0002/partition_003"):
        seq = load_tensors(run_dir / "seq" / entry / "recon.safetensors")
        par = load_tensors(run_dir / "par" / entry / "recon.safetensors")
        assert torch.equal(seq["images"], par["images"]) and torch.equal(seq["labels"], par["labels"])
        assert table.count(entry) == 2  # one row per run of the command


def test_negative_jobs_exit_2(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "--jobs", "-1", *FAST]) == 2
    assert "--jobs must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"),
    ("delete", "no such"),
])
def test_bad_capture_files_exit_2_naming_the_file(run_dir: Path, tmp_path: Path, damage: str, message: str) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("inversion", "known"))
    victim = copy / "captures/round_0002/partition_000.safetensors"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:200])
    else:
        victim.unlink()
    res = subprocess.run([sys.executable, "-m", "inversion", str(copy), "--entry", "round_0002/partition_000", *FAST],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2
    assert message in res.stderr and "partition_000.safetensors" in res.stderr and "Traceback" not in res.stderr


def test_a_capture_that_does_not_fit_the_model_exits_2(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("inversion", "known"))
    (copy / "config.yaml").write_text(dump_yaml(load_experiment(copy / "config.yaml", ["training.model=mlp"])))
    assert main([str(copy), "--entry", "round_0002/partition_000", *FAST]) == 2


def test_no_captures_and_unknown_entries_exit_2(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main([str(tmp_path), *FAST]) == 2
    assert main([str(run_dir), "--entry", "round_0099/partition_000", *FAST]) == 2


def test_reconstruction_only_mode_inverts_an_existing_run(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    from commands.cli import main as fl_lab

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("inversion", "known"))
    exp = tmp_path / "exp.yaml"
    exp.write_text(dump_yaml(load_experiment(copy / "config.yaml", ["execution.reconstruction_only=true",
                                                                      "inversion.iterations=5",
                                                                      "inversion.restarts=1"])))
    assert fl_lab(["run", str(exp), "--out", str(copy)]) == 0
    assert len(list((copy / "inversion").rglob("metrics.json"))) == 4
    assert torch.equal(load_tensors(copy / "final.safetensors")["1.0.weight"],
                       load_tensors(run_dir / "final.safetensors")["1.0.weight"])  # no retraining
