"""One SuperLink and one Ray head for several real `flwr run` simulations (`shared_simulation`, what
`fl-lab sweep` uses): each run completes on its own, trains exactly what a run with its own
SuperLink and Ray trains, and nothing is left running afterwards; the Ray head admits no client
without its token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from commands import launch, sweep
from commands.procs import family
from lab.config import load_experiment, with_values

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_runs_share_one_superlink_and_ray_and_train_what_a_private_one_trains(tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=1"])
    other = with_values(cfg, ["training.seed=1"])
    alone = launch.run_experiment(cfg, tmp_path / "alone")
    with sweep.shared_simulation(tmp_path / "sweep") as shared:
        first = launch.run_experiment(cfg, tmp_path / "first")
        between = family([], shared.flwr_home)
        second = launch.run_experiment(other, tmp_path / "second")
        home = shared.flwr_home
    assert first["rounds"] == second["rounds"] == alone["rounds"] == 1
    assert (tmp_path / "first/final.safetensors").read_bytes() == (tmp_path / "alone/final.safetensors").read_bytes()
    assert first["flower_run_id"] != second["flower_run_id"]
    assert between, "the shared SuperLink and Ray head stay up between runs"
    log = (tmp_path / "sweep/logs/superlink.log").read_text()
    assert log.count("Started server process") == 1 and log.count("Created run") == 2
    # A run's own FLWR_HOME only points the flwr CLI at the shared SuperLink; it starts nothing.
    assert [f.name for f in (tmp_path / "first/.flwr").iterdir()] == ["config.toml"]
    assert not (tmp_path / "second/logs").exists()
    assert family([], home) == []  # SuperLink, superexec, flwr-simulation, Ray: all gone


def test_the_ray_head_is_on_loopback_and_refuses_a_client_without_its_token(tmp_path: Path) -> None:
    env = launch.simulation_env(tmp_path / ".flwr")
    join = "import ray; ray.init(); print('JOINED', ray.cluster_resources().get('CPU'))"
    try:
        with sweep.ray_head(env, tmp_path / "ray-head.log") as head:
            assert head.startswith("127.0.0.1:")
            ok = subprocess.run([sys.executable, "-c", join], env={**env, "RAY_ADDRESS": head},
                                capture_output=True, text=True, timeout=300, check=False)
            bad = subprocess.run([sys.executable, "-c", join], env={**env, "RAY_ADDRESS": head,
                                                                      "RAY_AUTH_TOKEN": "0" * 64},
                                 capture_output=True, text=True, timeout=300, check=False)
        assert "JOINED" in ok.stdout, ok.stderr[-2000:]
        assert "JOINED" not in bad.stdout and bad.returncode != 0
    finally:
        left = family([], tmp_path / ".flwr")
    assert left == []


def test_flwr_run_gets_the_lab_app_as_the_same_fab_without_the_venv() -> None:
    """The real folder (with its .venv): the staged copy builds byte for byte the FAB Flower builds."""
    import shutil

    from flwr.cli.build import build_fab_from_disk

    staged = launch.stage_app(launch.APP_DIR)
    try:
        assert build_fab_from_disk(staged) == build_fab_from_disk(launch.APP_DIR)
    finally:
        shutil.rmtree(staged)
