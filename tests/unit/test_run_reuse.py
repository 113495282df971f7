"""Which earlier attempt a card or sweep takes over: a finished run of the same config is read, an
interrupted one (checkpoints, no summary) continues after its last checkpoint, anything else
starts again at round 1."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from commands.cards import load_card
from commands.reproduce import planned_runs, reproduce
from commands.run_reuse import continuing, finished_run, interrupted_run, training_identity
from lab.config import ExperimentConfig, dump_yaml, with_values
from tests.unit.test_card_score import card_path, leave_run

ROW = {"asr": 0.0, "loss": 1.0}


def interrupt(run_dir: Path, cfg: ExperimentConfig, checkpoint: bool = True) -> None:
    """What a run killed after round 2 leaves: config, two metrics lines, the round-2 checkpoint."""
    leave_run(run_dir, cfg, [{"round": 0, "accuracy": 0.1, **ROW}, {"round": 2, "accuracy": 0.5, **ROW}], False)
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "round_0002.safetensors").write_bytes(b"")


def test_training_identity_ignores_resume_and_name_but_not_what_trains(tmp_path: Path) -> None:
    (_, cfg), *_ = planned_runs(load_card(card_path(tmp_path)), tmp_path / "out")
    resumed = dataclasses.replace(cfg, name="other", execution=dataclasses.replace(cfg.execution, resume=True))
    assert training_identity(resumed) == training_identity(cfg)
    assert training_identity(with_values(cfg, ["training.lr=0.5"])) != training_identity(cfg)


def test_only_an_interrupted_run_of_the_same_config_continues(tmp_path: Path) -> None:
    (run_dir, cfg), *_ = planned_runs(load_card(card_path(tmp_path)), tmp_path / "out")
    assert not interrupted_run(run_dir, cfg) and continuing(run_dir, cfg) is cfg  # nothing there yet
    interrupt(run_dir, cfg)
    assert interrupted_run(run_dir, cfg) and not finished_run(run_dir, cfg)
    resumed = continuing(run_dir, cfg)
    assert resumed.execution.resume and dataclasses.replace(resumed, execution=cfg.execution) == cfg
    # a config written by the resumed run (resume: true) is still the same run, finished or not
    (run_dir / "config.yaml").write_text(dump_yaml(resumed))
    assert interrupted_run(run_dir, cfg)
    assert not interrupted_run(run_dir, with_values(cfg, ["training.lr=0.5"]))  # another run's checkpoints
    (run_dir / "summary.json").write_text("{}")
    assert not interrupted_run(run_dir, cfg) and finished_run(run_dir, cfg)


def test_a_run_without_a_checkpoint_starts_again(tmp_path: Path) -> None:
    (run_dir, cfg), *_ = planned_runs(load_card(card_path(tmp_path)), tmp_path / "out")
    interrupt(run_dir, cfg, checkpoint=False)
    assert not interrupted_run(run_dir, cfg) and continuing(run_dir, cfg) is cfg


def test_the_card_continues_its_interrupted_run_and_says_so(tmp_path: Path) -> None:
    path, out = card_path(tmp_path), tmp_path / "out"
    card = load_card(path, only=["done", "half"])
    (fedavg_dir, fedavg), (median_dir, median) = planned_runs(card, out)
    interrupt(fedavg_dir, fedavg)
    interrupt(median_dir, with_values(median, ["training.lr=0.5"]))  # stale: another config
    given: dict[str, bool] = {}
    said: dict[str, str] = {}

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        given[run_dir.name] = cfg.execution.resume
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))  # as a run does, resumed or new
        (run_dir / "metrics.jsonl").write_text('{"round": 4, "accuracy": 0.8, "asr": 0.0}\n')
        (run_dir / "summary.json").write_text('{"final_accuracy": 0.8, "final_asr": 0.0}')
        return {}

    reproduce(card, out, runner, on_start=lambda i, n, run_dir, state: said.update({run_dir.name: state}))
    assert given == {fedavg_dir.name: True, median_dir.name: False}
    assert said == {fedavg_dir.name: "interrupted: continues after its last checkpoint", median_dir.name: ""}
    reproduce(card, out, runner, on_start=lambda i, n, run_dir, state: said.update({run_dir.name: state}))
    assert set(said.values()) == {"finished: reused"}
