"""Experiment config: one YAML file = one experiment, loaded into frozen dataclasses.

`load_experiment(path, overrides)` reads the YAML, applies `section.key=value` overrides, converts
every section into its dataclass and validates the result. It collects *all* problems (unknown keys,
wrong types, impossible values) with their key paths and raises one `ConfigError`, so a bad file
never starts a run. YAML keys are snake_case because they map onto dataclass fields.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    PreAggregatorConfig,
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
    "PreAggregatorConfig",
    "ProbeConfig",
    "Review",
    "TrainingConfig",
    "TriggerConfig",
    "TriggerShape",
    "UnlearningConfig",
    "apply_overrides",
    "dump_yaml",
    "from_run_config",
    "load_experiment",
    "parse_yaml",
    "read_yaml",
    "review_experiment",
    "to_dict",
    "with_values",
]

# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> dataclasses -> validation


@dataclass(frozen=True)
class Review:
    """Everything wrong with an experiment, without raising (what `load_experiment` raises).

    `cfg` is None when there was nothing to convert (no file, not YAML, not a mapping); otherwise
    fields that could not be converted hold their defaults, so a later check (the rule's, in
    `commands.preflight`) asks `touches` whether what it reads is what the user wrote.
    """

    cfg: ExperimentConfig | None
    problems: tuple[str, ...]  # 'key.path: reason'

    def touches(self, keys: Sequence[str]) -> bool:
        """Is any problem about one of `keys`, a key below one, or a section above one?"""
        paths = [p.split(":", 1)[0] for p in self.problems]
        return any(p == k or p.startswith((k + ".", k + "[")) or k.startswith(p + ".") or p == "<top>"
                   for p in paths for k in keys)


def review_experiment(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Review:
    """Every problem of an experiment and its overrides, with their key paths; never raises."""
    problems: list[str] = []
    try:
        raw: Any = dict(source) if isinstance(source, Mapping) else read_yaml(Path(source))
    except ConfigError as exc:
        apply_overrides({}, overrides, problems)  # their syntax, at least
        return Review(None, (*exc.problems, *problems))
    raw = apply_overrides(raw, overrides, problems)
    # Fields that failed conversion fall back to their defaults, so value checks still run and
    # the user sees every problem of the file at once.
    cfg = convert(ExperimentConfig, raw, "", problems)
    if not isinstance(cfg, ExperimentConfig):
        return Review(None, tuple(problems))
    problems.extend(validate(cfg))
    return Review(cfg, tuple(problems))


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
    review = review_experiment(source, overrides)
    if review.problems or review.cfg is None:
        raise ConfigError(list(review.problems))
    return review.cfg


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is a mistake; `{}` means the defaults).

    Raises:
        ConfigError: no such file, unreadable, not UTF-8, not YAML, empty, or not a mapping.
    """
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise ConfigError(f"{path}: no such experiment file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the file is empty (write `{{}}` to run every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """YAML as a person writes it: `1e30`, `1E-3` and `-2e5` are floats (PyYAML's YAML 1.1 rules
    read only `1.0e+30` as one, and every other exponent form as a string).

    Raises:
        ConfigError: not valid YAML (or nested too deep to read).
    """
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader with one more float form
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of more than 4300 digits
        raise ConfigError(f"{where}: not valid YAML ({exc})".replace("\n", " ")) from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None
    _check_expanded_size(data, where)
    return data


MAX_VALUES = 100_000  # an experiment, sweep or card has hundreds


def _check_expanded_size(data: Any, where: str) -> None:
    """Refuse YAML whose anchors and aliases expand past MAX_VALUES values, or refer to themselves.

    PyYAML shares an aliased node instead of copying it, so a 1 kB "billion laughs" file loads
    at once; every later copy or walk of it (overrides, merges, the dump of config.yaml) would
    then try to build all 10^9 values. The size is counted on the shared graph, never expanded.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{where}: an alias refers to a node that contains it (a YAML structure without end)")
        open_nodes.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        sizes[key] = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        return sizes[key]

    try:
        total = size(data)
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None
    if total > MAX_VALUES:
        raise ConfigError(f"{where}: its anchors and aliases expand to {total:,} values (at most "
                          f"{MAX_VALUES:,}): an alias bomb, or a file that is not an experiment")


class _Loader(yaml.SafeLoader):
    """SafeLoader plus YAML 1.2's exponent floats (`1e30`, `1E-3`, `-2e5`, `.5e3`)."""


# The resolver lists are copied, not shared, so PyYAML's own SafeLoader is left as it was.
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], problems: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with every `a.b.c=value` applied (values parsed as YAML)."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected section.key=value")
            continue
        try:
            value = parse_yaml(text, "--set") if text.strip() else None
        except ConfigError:
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
    data = parse_yaml(text, "run config 'experiment-text'")
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
