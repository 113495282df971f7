"""A run folder reused for a new run: the earlier run's results go, the user's own files stay."""

from __future__ import annotations

from pathlib import Path

from lab.config import load_experiment
from commands.launch import prepare_run_dir

ROOT = Path(__file__).resolve().parents[2]


def old_run(folder: Path) -> None:
    for name in ("metrics.jsonl", "summary.json", "final.safetensors", "verification.json", "notes.txt",
                 "checkpoints/round_0001.safetensors", "captures/manifest.jsonl", "inversion/x/recon.png",
                 "unlearning/metrics.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old")


def test_a_new_run_clears_the_earlier_runs_artifacts_only(tmp_path: Path) -> None:
    old_run(tmp_path)
    prepare_run_dir(load_experiment(ROOT / "experiments/smoke.yaml"), tmp_path)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["config.yaml", "notes.txt"]


def test_a_resumed_run_keeps_what_it_continues_from(tmp_path: Path) -> None:
    old_run(tmp_path)
    prepare_run_dir(load_experiment(ROOT / "experiments/smoke.yaml", ["execution.resume=true"]), tmp_path)
    assert not (tmp_path / "summary.json").exists()
    for kept in ("metrics.jsonl", "checkpoints/round_0001.safetensors", "captures/manifest.jsonl"):
        assert (tmp_path / kept).read_text() == "old"
