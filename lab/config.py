"""Experiment config: one YAML file = one experiment, loaded into frozen dataclasses.

`load_experiment(path, overrides)` reads the YAML, applies `section.key=value` overrides, converts
every section into its dataclass and validates the result. It collects *all* problems (unknown keys,
wrong types, impossible values) with their key paths and raises one `ConfigError`, so a bad file
never starts a run. YAML keys are snake_case because they map onto dataclass fields.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lab.errors import ConfigError

DatasetName = Literal["digits", "mnist", "fashion-mnist", "emnist-digits", "cifar10"]
AttackType = Literal["none", "backdoor", "label-flip", "sign-flip", "gaussian-noise"]
PoisonMode = Literal["mix", "append"]
TriggerShape = Literal["square", "checkerboard", "cross"]
Position = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"]


@dataclass(frozen=True)
class DatasetConfig:
    name: DatasetName = "digits"
    data_dir: str = "data"
    download: bool = True
    # Digits are 8x8; upsampled so the same CNN (and trigger sizes) fit MNIST-sized inputs.
    image_size: int | None = None
    test_fraction: float = 0.2
    # Share of the training split held out as the server's clean set (FLTrust root set, unlearning).
    server_fraction: float = 0.1
    source_class: int | None = 1  # None = all-to-one
    target_class: int = 0


@dataclass(frozen=True)
class AggregatorConfig:
    name: str = "fedavg"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FederatedConfig:
    num_clients: int = 10
    clients_per_round: int | None = None  # None = all clients (see fraction)
    fraction: float = 1.0
    partitioning: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = 0.5
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    server_lr: float = 1.0

    @property
    def round_size(self) -> int:
        if self.clients_per_round is not None:
            return self.clients_per_round
        return max(1, round(self.fraction * self.num_clients))


@dataclass(frozen=True)
class TrainingConfig:
    model: Literal["cnn", "mlp", "resnet18"] = "cnn"
    rounds: int = 20
    local_epochs: int = 1
    local_steps: int | None = None  # when set, overrides local_epochs
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


@dataclass(frozen=True)
class TriggerConfig:
    shape: TriggerShape = "square"
    size: int = 3
    position: Position = "bottom-right"
    margin: int = 1
    value: float = 1.0  # pixel intensity in [0, 1], all channels


@dataclass(frozen=True)
class AttackConfig:
    type: AttackType = "none"
    # A list runs one experiment per value (`fl-lab run` makes a subfolder for each).
    attackers_ratio: float | tuple[float, ...] = 0.0
    malicious_behavior_rate: float = 1.0
    start_round: int = 1
    end_round: int | None = None
    poison_mode: PoisonMode = "mix"
    poison_ratio: float = 0.5
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    # Model replacement: scale the update by this factor; "auto" = clients in the round / server lr.
    boost: float | Literal["auto"] = 1.0
    # Norm-constrained evasion: project the (boosted) update onto this L2 ball.
    norm_bound: float | None = None
    noise_std: float = 1.0  # gaussian-noise attack
    sign_flip_scale: float = 1.0  # sign-flip attack: send -scale * honest update

    @property
    def ratios(self) -> tuple[float, ...]:
        r = self.attackers_ratio
        return r if isinstance(r, tuple) else (r,)


@dataclass(frozen=True)
class ProbeConfig:
    """Local hyperparameters a curious server imposes on the clients it captures."""

    local_steps: int = 1
    batch_size: int = 1
    lr: float = 0.01


@dataclass(frozen=True)
class CaptureConfig:
    enabled: bool = False
    rounds: tuple[int, ...] = ()
    clients: Literal["all", "malicious"] | tuple[int, ...] = "malicious"
    probe: ProbeConfig | None = None
    max_bytes: int = 200_000_000
    evidence: bool = False  # simulation only: store the exact images used, for scoring


@dataclass(frozen=True)
class InversionConfig:
    attack: str = "inverting-gradients"
    preset: str = "fast-cpu"
    labels: Literal["known", "recovered"] = "recovered"
    num_images: int | None = None
    iterations: int | None = None
    restarts: int | None = None
    tv: float | None = None


@dataclass(frozen=True)
class UnlearningConfig:
    strategies: tuple[str, ...] = ("transplant", "relabel", "clean-finetune")
    clean_samples: int | None = None  # None = the whole server clean set
    steps: int = 100
    lr: float = 0.005  # 0.01 cost 1.0 +- 1.5 accuracy points on the digits runs; 0.005 cost 0.4
    momentum: float = 0.9
    batch_size: int = 32
    mix_ratio: float = 0.2
    freeze_bn: bool = True
    max_accuracy_drop: float = 0.02


@dataclass(frozen=True)
class ExecutionConfig:
    output_dir: str = "runs"
    num_threads: int = 1  # OpenMP spin-waits badly on a shared 2-core box
    client_cpus: float = 2.0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    checkpoint_every: int = 1
    reconstruction_only: bool = False
    resume: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    unlearning: UnlearningConfig = field(default_factory=UnlearningConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    @property
    def seed(self) -> int:
        return self.training.seed


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
    cfg = _convert(ExperimentConfig, raw, "", problems)
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


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data for a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


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


_MISSING = object()


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert parsed YAML `value` into type `tp`; append problems instead of raising."""
    where = path or "<top>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {_kind(value)}")
            return _MISSING
        fields = {f.name: f for f in dataclasses.fields(tp)}
        hints = typing.get_type_hints(tp)
        for key in value:
            if key not in fields:
                near = [k for k in fields if k.startswith(str(key)[:3])]
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                problems.append(f"{_join(path, str(key))}: unknown key{hint}; "
                                f"known: {', '.join(sorted(fields))}")
        kwargs = {}
        for name in fields:
            if name in value:
                converted = _convert(hints[name], value[name], _join(path, name), problems)
                if converted is not _MISSING:
                    kwargs[name] = converted
        try:
            return tp(**kwargs)
        except TypeError as exc:  # only reachable when a nested conversion failed
            problems.append(f"{where}: {exc}")
            return _MISSING
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        problems.append(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return _MISSING
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            out = _convert(option, value, path, trial)
            if not trial:
                return out
        names = " or ".join(_type_name(o) for o in options)
        problems.append(f"{where}: expected {names}, got {_kind(value)} {value!r}")
        return _MISSING
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {_kind(value)}")
            return _MISSING
        items = [_convert(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return _MISSING if _MISSING in items else tuple(items)
    if origin in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            problems.append(f"{where}: expected a mapping, got {_kind(value)}")
            return _MISSING
        return dict(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is Any:
        return value
    else:  # pragma: no cover - a schema bug, not a user mistake
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    problems.append(f"{where}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")
    return _MISSING


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "/".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------
# Validation of values (types are already right here)


NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "emnist-digits": 10, "cifar10": 10}


def validate(cfg: ExperimentConfig) -> list[str]:
    """Every impossible value in `cfg`, as 'key.path: reason' strings."""
    p: list[str] = []
    d, f, t, a, c = cfg.dataset, cfg.federated, cfg.training, cfg.attack, cfg.capture

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            p.append(f"{key}: {why}")

    classes = NUM_CLASSES[d.name]
    need(0 < d.test_fraction < 1, "dataset.test_fraction", "must be in (0, 1)")
    need(0 <= d.server_fraction < 1, "dataset.server_fraction", "must be in [0, 1)")
    need(0 <= d.target_class < classes, "dataset.target_class", f"must be in [0, {classes})")
    if d.source_class is not None:
        need(0 <= d.source_class < classes, "dataset.source_class", f"must be in [0, {classes}) or null")
        need(d.source_class != d.target_class, "dataset.source_class", "must differ from target_class")
    if d.image_size is not None:
        need(8 <= d.image_size <= 256, "dataset.image_size", "must be in [8, 256]")

    need(f.num_clients >= 1, "federated.num_clients", "must be >= 1")
    need(0 < f.fraction <= 1, "federated.fraction", "must be in (0, 1]")
    if f.clients_per_round is not None:
        need(1 <= f.clients_per_round <= f.num_clients, "federated.clients_per_round",
             f"must be in [1, num_clients={f.num_clients}]")
    # Below ~0.01 flwr-datasets' self-balancing divides by zero and dumps whole classes on one client.
    need(f.dirichlet_alpha >= 0.01, "federated.dirichlet_alpha", "must be >= 0.01")
    need(f.server_lr > 0, "federated.server_lr", "must be > 0")

    need(t.rounds >= 1, "training.rounds", "must be >= 1")
    need(t.local_epochs >= 1, "training.local_epochs", "must be >= 1")
    if t.local_steps is not None:
        need(t.local_steps >= 1, "training.local_steps", "must be >= 1")
    need(t.batch_size >= 1, "training.batch_size", "must be >= 1")
    need(t.lr > 0, "training.lr", "must be > 0")
    need(0 <= t.momentum < 1, "training.momentum", "must be in [0, 1)")
    need(t.weight_decay >= 0, "training.weight_decay", "must be >= 0")
    need(t.model != "resnet18" or d.name == "cifar10" or (d.image_size or 0) >= 32,
         "training.model", "resnet18 expects 32x32 inputs (cifar10, or set dataset.image_size: 32)")

    for i, r in enumerate(a.ratios):
        key = "attack.attackers_ratio" + (f"[{i}]" if isinstance(a.attackers_ratio, tuple) else "")
        need(0 <= r <= 1, key, "must be in [0, 1] (a share of num_clients, not a count)")
        if 0 < r <= 1:
            need(round(r * f.num_clients) >= 1, key,
                 f"{r} of {f.num_clients} clients rounds to zero attackers")
    if a.type != "none":
        need(any(r > 0 for r in a.ratios), "attack.attackers_ratio",
             f"attack.type={a.type!r} needs attackers_ratio > 0 (or set type: none)")
    need(0 <= a.malicious_behavior_rate <= 1, "attack.malicious_behavior_rate", "must be in [0, 1]")
    need(a.start_round >= 1, "attack.start_round", "must be >= 1")
    if a.end_round is not None:
        need(a.end_round >= a.start_round, "attack.end_round", "must be >= start_round")
    need(0 < a.poison_ratio <= 1, "attack.poison_ratio", "must be in (0, 1]")
    if a.poison_mode == "append" and a.type == "backdoor":
        need(d.source_class is not None, "attack.poison_mode",
             "'append' copies source-class samples: set dataset.source_class")
    need(a.boost == "auto" or (isinstance(a.boost, float) and a.boost > 0), "attack.boost",
         "must be > 0 or 'auto'")
    if a.norm_bound is not None:
        need(a.norm_bound > 0, "attack.norm_bound", "must be > 0")
    need(a.noise_std > 0, "attack.noise_std", "must be > 0")
    need(a.trigger.size >= 1, "attack.trigger.size", "must be >= 1")
    need(0 <= a.trigger.value <= 1, "attack.trigger.value", "must be in [0, 1]")

    for i, r in enumerate(c.rounds):
        need(1 <= r <= t.rounds, f"capture.rounds[{i}]", f"round {r} is outside 1..{t.rounds}")
    if isinstance(c.clients, tuple):
        for i, pid in enumerate(c.clients):
            need(0 <= pid < f.num_clients, f"capture.clients[{i}]", f"no partition {pid}")
    need(c.max_bytes > 0, "capture.max_bytes", "must be > 0")
    if c.enabled:
        need(bool(c.rounds), "capture.rounds", "capture is enabled but no rounds are listed")
    if c.probe is not None:
        need(c.probe.local_steps >= 1, "capture.probe.local_steps", "must be >= 1")
        need(c.probe.batch_size >= 1, "capture.probe.batch_size", "must be >= 1")
        need(c.probe.lr > 0, "capture.probe.lr", "must be > 0")

    u = cfg.unlearning
    need(u.steps >= 1, "unlearning.steps", "must be >= 1")
    need(0 <= u.mix_ratio <= 1, "unlearning.mix_ratio", "must be in [0, 1]")
    need(cfg.execution.num_threads >= 1, "execution.num_threads", "must be >= 1")
    need(cfg.execution.client_cpus > 0, "execution.client_cpus", "must be > 0")
    return p


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
