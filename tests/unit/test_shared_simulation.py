"""`shared_simulation` (issue 15, warm start) starts nothing until a run asks for it: a sweep whose
runs are all reused, or whose runner is not a Flower run, leaves no process and no folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from commands import launch, sweep
from commands.procs import family
from commands.sweep import run_sweep
from lab.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]


def test_a_sweep_with_a_runner_of_its_own_starts_no_superlink_and_no_ray(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {ROOT / 'experiments/smoke.yaml'}\ngrid: {{training.lr: [0.05, 0.1]}}\n")
    seen: list[bool] = []

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        seen.append(launch.SHARED_SUPERLINK.get(None) is not None)  # run_experiment here would use the shared one
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text('{"final_accuracy": 1.0, "final_asr": 0.0}')
        (run_dir / "metrics.jsonl").write_text("")
        return {}

    run_sweep(sweep, tmp_path / "out", runner)
    assert seen == [True, True]
    assert launch.SHARED_SUPERLINK.get(None) is None  # the session ends with the sweep
    assert not (tmp_path / "out" / ".flwr").exists() and not (tmp_path / "out" / "logs").exists()
    assert family([], (tmp_path / "out" / ".flwr").resolve()) == []


def test_using_none_inside_a_shared_block_means_a_superlink_per_run(tmp_path: Path) -> None:
    with sweep.shared_simulation(tmp_path) as shared:
        assert launch.SHARED_SUPERLINK.get(None) == shared.open
        with sweep.using(None):
            assert launch.SHARED_SUPERLINK.get(None) is None
        assert launch.SHARED_SUPERLINK.get(None) == shared.open
    assert launch.SHARED_SUPERLINK.get(None) is None
    assert not (tmp_path / ".flwr").exists()  # never opened: nothing started


def test_the_staged_app_packs_into_the_same_fab_as_the_app_folder(tmp_path: Path) -> None:
    """`flwr run` gets a copy without .venv (commands.launch.stage_app); Flower must build the same bytes."""
    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "app"
    files = {
        "pyproject.toml": (ROOT / "pyproject.toml").read_text(), ".gitignore": (ROOT / ".gitignore").read_text(),
        "LICENSE": "x", "README.md": "# r", "pkg/__init__.py": "", "pkg/mod.py": "A = 1\n", "pkg/test_mod.py": "",
        "experiments/e.yaml": "name: e\n", "experiments/sub/n.json": "{}", "pkg/data.bin": "\0\1",
        ".venv/lib/site.py": "x = 1\n", "runs/r/metrics.jsonl": "{}\n", "pkg/__pycache__/m.py": "",
        "data/x.json": "{}", "docker/secrets/k.yaml": "k: 1\n", "tests/t.py": "",
    }
    for rel, text in files.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    (app / "pkg" / "link.py").symlink_to(app / "pkg" / "mod.py")
    staged = launch.stage_app(app)
    try:
        assert not (staged / ".venv").exists() and not (staged / "runs").exists()
        assert build_fab_from_disk(staged) == build_fab_from_disk(app)
    finally:
        shutil.rmtree(staged)
