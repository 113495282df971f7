"""Which runs a sweep or a card may take over from an earlier attempt in the same folder.

A run folder is reused only for the run it was made for: `same_run` compares what trained (the
resolved config in its config.yaml) with what is asked. A finished run is then read as it is; an
interrupted one (no summary.json, at least one model checkpoint) continues after its last
checkpointed round (`execution.resume`) instead of starting again at round 1: at paper scale a
run is an hour or more, and a stopped session would otherwise lose all of it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from lab.config import (
    AttackConfig,
    CaptureConfig,
    ExperimentConfig,
    InversionConfig,
    UnlearningConfig,
    dump_yaml,
    load_experiment,
)
from lab.errors import ConfigError

log = logging.getLogger(__name__)


def run_identity(cfg: ExperimentConfig) -> str:
    """What makes two runs the same: without attackers, the attack's knobs (but the trigger) do nothing."""
    if cfg.attack.type == "none":
        cfg = dataclasses.replace(cfg, attack=AttackConfig(trigger=cfg.attack.trigger))
    return dump_yaml(cfg)


def training_identity(cfg: ExperimentConfig) -> str:
    """`run_identity` of what the Flower run trains: the offline tools' sections (inversion,
    unlearning), the rest of `capture` while capture is off, the experiment's name (a subset sweep
    reuses the runs of the sweep it is part of) and whether the run was resumed do not change it."""
    cfg = dataclasses.replace(cfg, name="", inversion=InversionConfig(), unlearning=UnlearningConfig(),
                              execution=dataclasses.replace(cfg.execution, resume=False))
    if not cfg.capture.enabled:
        cfg = dataclasses.replace(cfg, capture=CaptureConfig())
    return run_identity(cfg)


def _trained_as_asked(run_dir: Path, cfg: ExperimentConfig) -> bool | None:
    """Did the run in `run_dir` train exactly `cfg`? None when it holds no readable config."""
    try:
        done = load_experiment(run_dir / "config.yaml")
    except (ConfigError, OSError):
        return None
    return training_identity(done) == training_identity(cfg)


def same_run(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Did the finished run in `run_dir` train exactly what `cfg` asks for?

    A base experiment edited since (say, a capture probe added to default.yaml) makes an old
    result stale: it is run again rather than silently mixed into the table.
    """
    same = _trained_as_asked(run_dir, cfg)
    if same is False:
        log.warning("%s: finished with a different config: not reused (a run starts it again, --score reads it "
                    "as not run)", run_dir.name)
    return bool(same)


def finished_run(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Did a run finish in `run_dir`, training exactly `cfg`?"""
    return (run_dir / "summary.json").exists() and same_run(run_dir, cfg)


def interrupted_run(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Did a run of exactly `cfg` stop in `run_dir` after saving at least one model checkpoint?"""
    if (run_dir / "summary.json").exists() or not any((run_dir / "checkpoints").glob("round_*.safetensors")):
        return False
    if _trained_as_asked(run_dir, cfg):
        return True
    log.info("%s: its checkpoints are of another config: the run starts again at round 1", run_dir.name)
    return False


def continuing(run_dir: Path, cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` as it should run in `run_dir`: resumed after the last checkpoint an interrupted run of
    the same config left there, else as it is (a new run replaces whatever else is in the folder)."""
    if cfg.execution.resume or not interrupted_run(run_dir, cfg):
        return cfg
    return dataclasses.replace(cfg, execution=dataclasses.replace(cfg.execution, resume=True))
