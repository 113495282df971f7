"""`fl-lab sweep SWEEP.yaml`: a grid of real Flower runs and the comparison table.

A sweep file names a base experiment and a grid of dotted keys, each with a list of values; every
combination (times every seed) is one run in its own folder. A mapping value is merged into that
section, and its optional `label` names it in the tables:

    name: defenses
    base: ../default.yaml              # relative to the sweep file
    seeds: [0]
    overrides: [training.rounds=40]    # applied to every run
    grid:
      federated.aggregator: [{name: fedavg}, {name: median}]
      attack: [{label: boosted, type: backdoor, boost: auto}, {label: none, type: none}]
      attack.poison_ratio: [0.5, 1.0]

Writes `results.csv`, `results.md` (one row per setting: clean accuracy, ASR, ASR floor, detection
F1, seconds per round, averaged over seeds with their spread) and `plots/*.png`. Finished runs are
kept: re-running the sweep skips every run folder that already has its summary.json and was run
with the same training config (`same_run`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lab.artifacts import atomic_write_text, read_jsonl
from lab.config import (
    AttackConfig,
    CaptureConfig,
    ExperimentConfig,
    InversionConfig,
    UnlearningConfig,
    dump_yaml,
    load_experiment,
    read_yaml,
    to_dict,
)
from lab.errors import ConfigError

log = logging.getLogger(__name__)

SWEEP_KEYS = {"name", "base", "seeds", "overrides", "grid"}


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its labels per grid key and the resolved experiment per seed."""

    labels: tuple[tuple[str, str], ...]  # (grid key, value label)
    seed: int
    cfg: ExperimentConfig

    @property
    def slug(self) -> str:
        parts = [f"{v}" for _, v in self.labels] + [f"seed{self.seed}"]
        return "__".join(p.replace("/", "-").replace(" ", "") for p in parts)


def load_sweep(path: Path) -> tuple[str, list[Setting]]:
    """Every run of the sweep, validated up front (all problems of all runs at once)."""
    raw = read_yaml(path)
    problems = [f"{k}: unknown sweep key; known: {', '.join(sorted(SWEEP_KEYS))}" for k in raw if k not in SWEEP_KEYS]
    if "base" not in raw or "grid" not in raw or not isinstance(raw.get("grid"), dict):
        problems.append("a sweep needs `base` (an experiment file) and `grid` (a mapping of key: [values])")
    if problems:
        raise ConfigError(problems)
    base = to_dict(load_experiment((path.parent / str(raw["base"])).resolve(), list(raw.get("overrides", []))))
    seeds = list(raw.get("seeds", [base["training"]["seed"]]))
    grid: dict[str, list[Any]] = raw["grid"]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: expected a non-empty list of values")
    if problems:
        raise ConfigError(problems)
    settings = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid.items()]):
        for seed in seeds:
            data = json.loads(json.dumps(base))  # deep copy of plain data
            labels = []
            for key, value in combo:
                label, value = _label(value)
                labels.append((key, label))
                _assign(data, key, value)
            data["training"]["seed"] = seed
            data["name"] = f"{raw.get('name', path.stem)}"
            try:
                cfg = load_experiment(data)
            except ConfigError as exc:
                problems.extend(f"[{', '.join(lab for _, lab in labels)}] {p}" for p in exc.problems)
                continue
            settings.append(Setting(tuple(labels), seed, cfg))
    if problems:
        raise ConfigError(problems)
    return str(raw.get("name", path.stem)), settings


def _label(value: Any) -> tuple[str, Any]:
    if isinstance(value, dict):
        value = dict(value)
        label = value.pop("label", None) or value.get("name") or value.get("type") or yaml.safe_dump(value).strip()
        return str(label), value
    return f"{value}", value


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        # A mapping replaces the section's named fields; aggregator params are replaced whole.
        merged = dict(node[last])
        merged.update(value)
        if "name" in value and "params" not in value and "params" in merged:
            merged["params"] = {}
        node[last] = merged
    else:
        node[last] = value


def run_sweep(
    path: Path,
    out: Path,
    runner: Callable[[ExperimentConfig, Path], dict[str, Any]],
    on_start: Callable[[int, int, Setting], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or reuse) every setting; returns one result row per run."""
    name, settings = load_sweep(path)
    rows = []
    done: dict[str, Path] = {}  # identical resolved configs (e.g. no-attack x poison ratio) run once
    for i, setting in enumerate(settings):
        run_dir = done.setdefault(run_identity(setting.cfg), out / "runs" / setting.slug)
        summary_path = run_dir / "summary.json"
        if on_start is not None:
            on_start(i, len(settings), setting)
        if not summary_path.exists() or not same_run(run_dir, setting.cfg):
            runner(setting.cfg, run_dir)
        summary = json.loads(summary_path.read_text())
        rows.append(result_row(setting, summary, read_jsonl(run_dir / "metrics.jsonl"), run_dir))
    fill_floors(rows)
    write_results(out, name, rows)
    return rows


def same_run(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """Did the finished run in `run_dir` train exactly what `cfg` asks for?

    A base experiment edited since (say, a capture probe added to default.yaml) makes an old
    result stale: it is run again rather than silently mixed into the table. The offline tools'
    sections (inversion, unlearning) do not change the Flower run, and neither does the rest of
    `capture` while capture is off.
    """
    try:
        done = load_experiment(run_dir / "config.yaml")
    except (ConfigError, OSError):
        return False
    if _training_identity(done) == _training_identity(cfg):
        return True
    log.warning("%s: finished with a different config; running it again", run_dir.name)
    return False


def _training_identity(cfg: ExperimentConfig) -> str:
    cfg = dataclasses.replace(cfg, inversion=InversionConfig(), unlearning=UnlearningConfig())
    if not cfg.capture.enabled:
        cfg = dataclasses.replace(cfg, capture=CaptureConfig())
    return run_identity(cfg)


def run_identity(cfg: ExperimentConfig) -> str:
    """What makes two runs the same: without attackers, the attack's knobs (but the trigger) do nothing."""
    if cfg.attack.type == "none":
        cfg = dataclasses.replace(cfg, attack=AttackConfig(trigger=cfg.attack.trigger))
    return dump_yaml(cfg)


def result_row(setting: Setting, summary: Mapping[str, Any], metrics: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    rounds = [r for r in metrics if r["round"] > 0]
    det = summary.get("detection") or {}
    return {
        **{key: label for key, label in setting.labels},
        "seed": setting.seed,
        "accuracy": summary["final_accuracy"],
        "asr": summary["final_asr"],
        "asr_floor": summary.get("asr_floor"),
        "detection_f1": det.get("f1"),
        "seconds_per_round": statistics.mean(r["round_seconds"] for r in rounds[1:]) if len(rounds) > 1 else None,
        "attack_type": setting.cfg.attack.type,
        "rule": setting.cfg.federated.aggregator.name,
        "run": str(run_dir),
    }


def fill_floors(rows: list[dict[str, Any]]) -> None:
    """ASR floor of each row: the no-attack run of the same rule and seed, else FedAvg's."""
    clean = {(r["rule"], r["seed"]): r["asr"] for r in rows if r["attack_type"] == "none"}
    for r in rows:
        r["asr_floor"] = clean.get((r["rule"], r["seed"]), clean.get(("fedavg", r["seed"])))


def _group_key(row: Mapping[str, Any], keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple(row[k] for k in keys)


def write_results(out: Path, name: str, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = list(rows[0]) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", results_markdown(name, rows))
    try:
        from lab.plots import sweep_plots

        sweep_plots(out, rows)
    except Exception as exc:  # a broken plot must not lose the table
        log.warning("plots failed: %s", exc)


def results_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"# {name}\n\n(no runs)\n"
    label_keys = [k for k in rows[0] if k not in {"seed", "accuracy", "asr", "asr_floor", "detection_f1",
                                                   "seconds_per_round", "attack_type", "rule", "run"}]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r, label_keys), []).append(r)
    head = [*label_keys, "seeds", "accuracy", "ASR", "ASR floor", "detection F1", "s/round"]
    lines = [f"# {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        lines.append("| " + " | ".join([*map(str, key), str(len(rs)), _stat(rs, "accuracy"), _stat(rs, "asr"),
                                         _stat(rs, "asr_floor"), _stat(rs, "detection_f1"),
                                         _stat(rs, "seconds_per_round", "{:.2f}")]) + " |")
    return "\n".join(lines) + "\n"


def _stat(rows: list[dict[str, Any]], key: str, fmt: str = "{:.3f}") -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values))}"
