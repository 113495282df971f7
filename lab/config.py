"""Experiment config: one YAML file = one experiment, loaded into frozen dataclasses.

`load_experiment(path, overrides)` reads the YAML, applies `section.key=value` overrides, converts
every section into its dataclass and validates the result. It collects *all* problems (unknown keys,
wrong types, impossible values) with their key paths and raises one `ConfigError`, so a bad file
never starts a run. YAML keys are snake_case because they map onto dataclass fields.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lab.coerce import convert, to_dict
from lab.errors import ConfigError
from lab.schema import (
    AggregatorConfig,
    AttackConfig,
    AttackType,
    CaptureConfig,
    DatasetConfig,
    DatasetName,
    ExecutionConfig,
    ExperimentConfig,
    FederatedConfig,
    InversionConfig,
    PoisonMode,
    Position,
    ProbeConfig,
    TrainingConfig,
    TriggerConfig,
    TriggerShape,
    UnlearningConfig,
)
from lab.validation import validate

# The schema's names are re-exported: `lab.config` is where the rest of the lab imports them from.
__all__ = [
    "AggregatorConfig",
    "AttackConfig",
    "AttackType",
    "CaptureConfig",
    "DatasetConfig",
    "DatasetName",
    "ExecutionConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "InversionConfig",
    "PoisonMode",
    "Position",
    "ProbeConfig",
    "TrainingConfig",
    "TriggerConfig",
    "TriggerShape",
    "UnlearningConfig",
    "apply_overrides",
    "dump_yaml",
    "from_run_config",
    "load_experiment",
    "read_yaml",
    "to_dict",
    "with_values",
]

# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> dataclasses -> validation


def load_experiment(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Load, override and validate an experiment.

    Args:
        source: a YAML file path, or an already-parsed mapping.
        overrides: `section.key=value` strings; values are parsed as YAML scalars/lists.

    Raises:
        ConfigError: listing every problem found, each with its key path.
    """
    if isinstance(source, Mapping):
        raw: Any = dict(source)
    else:
        raw = read_yaml(Path(source))
    problems: list[str] = []
    raw = apply_overrides(raw, overrides, problems)
    # Fields that failed conversion fall back to their defaults, so value checks still run and
    # the user sees every problem of the file at once.
    cfg = convert(ExperimentConfig, raw, "", problems)
    if isinstance(cfg, ExperimentConfig):
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such experiment file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], problems: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with every `a.b.c=value` applied (values parsed as YAML)."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected section.key=value")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {key}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return out


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_values(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """A validated copy of `cfg` with `section.key=value` overrides applied."""
    return load_experiment(to_dict(cfg), overrides)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# From Flower's run config (both apps call this; the YAML text travels in the run config so the
# ServerApp and every ClientApp read the same resolved experiment, in simulation and deployment)


@functools.lru_cache(maxsize=8)
def _from_text(text: str) -> ExperimentConfig:
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError("run config 'experiment-text' is not a YAML mapping")
    return load_experiment(data)


def from_run_config(run_config: Mapping[str, Any], app_dir: Path) -> ExperimentConfig:
    """The experiment of a Flower run: `experiment-text` (resolved YAML) if set, else the
    `experiment` file relative to the app directory."""
    text = str(run_config.get("experiment-text", "") or "")
    if text.strip():
        return _from_text(text)
    path = Path(str(run_config.get("experiment", "experiments/default.yaml")))
    return load_experiment(path if path.is_absolute() else app_dir / path)
