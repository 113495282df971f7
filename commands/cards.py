"""Reproduction cards (`experiments/papers/<card>.yaml`): a paper's setting and the cells of its table.

    name: foundationfl-fmnist
    paper: FoundationFL (Fang et al., NDSS 2025)
    base: ../fmnist.yaml                # optional, relative to the card
    setting: {federated: {...}, ...}    # the lab's YAML sections, merged over the base
    overrides: [training.rounds=3000]   # optional, applied to every cell
    seeds: [0]
    metric: error                       # the cells' default metric
    rules: {trimmed-mean: {beta: 0.2}}  # aggregator params per rule (optional)
    attacks: {gaussian-noise: {noise_std: 1.0}}   # attack section fields per attack type (optional)
    cells:
      - {rule: fedavg, attack: scaling, metric: asr, expect: {value: 0.68, tolerance: 0.10},
         source: "Table I(b)"}
      - {id: "median:backdoor@attackers=3", rule: median, attack: backdoor,
         set: [attack.attackers_ratio=0.3], source: lab}     # no expect: lab-only
    proxy:                              # `--quick`: the CPU proxy
      overrides: [federated.num_clients=20, training.rounds=30]
      cells: {"fedavg:none": {expect: {max: 0.3}, source: "lab, measured ...", measured: true}}

A cell's id defaults to `RULE:ATTACK`, with `:METRIC` added when its metric is not the card's
`metric`. Metrics: `error` (1 - final accuracy), `asr`, `accuracy`. An expectation is
`{value, tolerance}`, `{max}` or `{min}`; a cell without one (or a proxy expectation with
`measured: false`) is `lab-only`. `load_card` names every problem of a card at once, including each
cell's resolved experiment's own (`commands.preflight.check_experiment`), before anything runs.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commands.preflight import check_experiment
from lab.config import ExperimentConfig, read_yaml
from lab.errors import ConfigError
from lab.schema import AttackType

CARD_KEYS = {"name", "paper", "notes", "base", "setting", "overrides", "seeds", "metric", "rules", "attacks",
             "cells", "proxy"}
CELL_KEYS = {"id", "rule", "attack", "set", "metric", "expect", "source", "notes"}
PROXY_KEYS = {"overrides", "cells", "notes"}
PROXY_CELL_KEYS = {"expect", "source", "measured", "notes"}
METRICS = ("error", "asr", "accuracy")
ATTACKS = typing.get_args(AttackType)


@dataclass(frozen=True)
class Cell:
    id: str
    rule: str
    attack: str
    metric: str
    overrides: tuple[str, ...]  # the cell's own `set`
    expect: Mapping[str, float] | None  # what is checked (the proxy's own in --quick)
    source: str | None
    paper: Mapping[str, Any]  # the published expectation (None: lab-only) and the cell's source
    cfgs: tuple[ExperimentConfig, ...]  # one per seed


@dataclass(frozen=True)
class Card:
    name: str
    paper: str
    path: Path
    proxy: bool
    seeds: tuple[int, ...]
    cells: tuple[Cell, ...]


def expectation_problem(expect: Any) -> str | None:
    """What is wrong with an expectation's shape, or None."""
    if not isinstance(expect, Mapping):
        return "expect: must be {value, tolerance}, {max} or {min}"
    keys = set(expect)
    if keys not in ({"value", "tolerance"}, {"max"}, {"min"}):
        return f"expect: must be {{value, tolerance}}, {{max}} or {{min}}, got keys {sorted(map(str, keys))}"
    for k, v in expect.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expect.{k}: must be a number, got {v!r}"
    if "tolerance" in expect and expect["tolerance"] < 0:
        return f"expect.tolerance: must be >= 0, got {expect['tolerance']}"
    return None


def verdict(expect: Mapping[str, float] | None, mean: float | None) -> str:
    """`reproduced` when the lab's mean meets the expectation, `off` when not, `lab-only` without one."""
    if expect is None:
        return "lab-only"
    if mean is None:
        return "off"
    if "value" in expect:
        return "reproduced" if abs(mean - expect["value"]) <= expect["tolerance"] + 1e-12 else "off"
    if "max" in expect:
        return "reproduced" if mean <= expect["max"] else "off"
    return "reproduced" if mean >= expect["min"] else "off"


def metric_value(metric: str, summary: Mapping[str, Any]) -> float | None:
    if metric == "error":
        return 1.0 - float(summary["final_accuracy"])
    if metric == "accuracy":
        return float(summary["final_accuracy"])
    asr = summary.get("final_asr")
    return None if asr is None else float(asr)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _str_list(raw: Any, key: str, problems: list[str]) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        problems.append(f"{key}: expected a list of KEY=VALUE strings")
        return []
    return list(raw)


def load_card(path: Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
              only: Sequence[str] | None = None) -> Card:
    """The card with every cell's experiment resolved and checked (one per seed).

    Raises:
        ConfigError: every problem of the card, one line each (nothing has run).
    """
    raw = read_yaml(path)
    problems = [f"{k}: unknown card key; known: {', '.join(sorted(CARD_KEYS))}" for k in raw if k not in CARD_KEYS]
    name = str(raw.get("name", path.stem))
    base: dict[str, Any] = {}
    if "base" in raw:
        try:
            base = read_yaml((path.parent / str(raw["base"])).resolve())
        except (ConfigError, OSError) as exc:
            problems.append(f"base: {getattr(exc, 'problems', None) or exc}")
    setting = raw.get("setting") or {}
    if not isinstance(setting, Mapping):
        problems.append("setting: expected a mapping of the lab's experiment sections")
        setting = {}
    data = _merge(base, setting)
    data["name"] = name
    overrides = _str_list(raw.get("overrides"), "overrides", problems)
    default_metric = raw.get("metric", "error")
    if default_metric not in METRICS:
        problems.append(f"metric: must be one of {', '.join(METRICS)}, got {default_metric!r}")
    card_seeds = list(seeds) if seeds else raw.get("seeds", [0])
    if not isinstance(card_seeds, list) or not card_seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in card_seeds):
        problems.append(f"seeds: expected a non-empty list of integers, got {card_seeds!r}")
        card_seeds = [0]
    rules = raw.get("rules") or {}
    attacks = raw.get("attacks") or {}
    if not isinstance(rules, Mapping) or not all(isinstance(v, Mapping) for v in rules.values()):
        problems.append("rules: expected a mapping of rule name: {aggregator params}")
        rules = {}
    if not isinstance(attacks, Mapping) or not all(isinstance(v, Mapping) for v in attacks.values()):
        problems.append("attacks: expected a mapping of attack type: {attack section fields}")
        attacks = {}
    proxy = raw.get("proxy")
    proxy_cells: Mapping[str, Any] = {}
    proxy_overrides: list[str] = []
    if proxy is not None:
        if not isinstance(proxy, Mapping):
            problems.append("proxy: expected a mapping with `overrides` and `cells`")
        else:
            problems += [f"proxy.{k}: unknown key; known: {', '.join(sorted(PROXY_KEYS))}" for k in proxy
                         if k not in PROXY_KEYS]
            proxy_overrides = _str_list(proxy.get("overrides"), "proxy.overrides", problems)
            proxy_cells = proxy.get("cells") or {}
            if not isinstance(proxy_cells, Mapping):
                problems.append("proxy.cells: expected a mapping of cell id: {expect, source, measured}")
                proxy_cells = {}
    elif quick:
        problems.append("proxy: --quick needs the card's `proxy` section (the CPU proxy's overrides)")
    from strategies.registry import AGGREGATORS  # brings torch: only when a card is loaded

    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        problems.append("cells: expected a non-empty list of cells")
        cells_raw = []
    cells: list[Cell] = []
    seen: set[str] = set()
    checked: dict[str, list[str]] = {}
    for i, c in enumerate(cells_raw):
        where = f"cells[{i}]"
        if not isinstance(c, Mapping):
            problems.append(f"{where}: expected a mapping")
            continue
        rule, attack, metric = c.get("rule"), c.get("attack"), c.get("metric", default_metric)
        cid = str(c.get("id") or f"{rule}:{attack}" + (f":{metric}" if metric != default_metric else ""))
        where = f"cells[{i}] ({cid})"
        own = [f"{k}: unknown cell key; known: {', '.join(sorted(CELL_KEYS))}" for k in c if k not in CELL_KEYS]
        if cid in seen:
            own.append(f"id: duplicate id {cid!r} (give the cell an explicit `id`)")
        seen.add(cid)
        if rule not in AGGREGATORS:
            own.append(f"rule: unknown rule {rule!r}; known: {', '.join(sorted(AGGREGATORS))}")
        if attack not in ATTACKS:
            own.append(f"attack: unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        if metric not in METRICS:
            own.append(f"metric: must be one of {', '.join(METRICS)}, got {metric!r}")
        source = c.get("source")
        if not isinstance(source, str) or not source.strip():
            own.append("source: every cell names its source (paper, table or figure; or `lab`)")
        expect = c.get("expect")
        if expect is not None and (bad := expectation_problem(expect)):
            own.append(bad)
        cell_set = _str_list(c.get("set"), f"{where} set", own)
        paper = {"expect": None if expect is None else dict(expect), "source": source}
        checked_expect, checked_source = expect, source
        if quick:
            pc = proxy_cells.get(cid)
            checked_expect, checked_source = None, None
            if isinstance(pc, Mapping):
                own += [f"proxy.cells.{k}: unknown key; known: {', '.join(sorted(PROXY_CELL_KEYS))}" for k in pc
                        if k not in PROXY_CELL_KEYS]
                if pc.get("expect") is not None:
                    if bad := expectation_problem(pc["expect"]):
                        own.append(f"proxy.cells: {bad}")
                    if not isinstance(pc.get("source"), str) or not pc["source"].strip():
                        own.append("proxy.cells: source: a proxy expectation names its source (lab, measured ...)")
                    if pc.get("measured", True) is True:
                        checked_expect, checked_source = pc["expect"], pc.get("source")
            elif pc is not None:
                own.append("proxy.cells: expected a mapping {expect, source, measured}")
        if own:
            problems += [f"{where} {p}" for p in own]
            continue
        cell_data = json.loads(json.dumps(data))
        cell_data.setdefault("federated", {})["aggregator"] = {"name": rule, "params": dict(rules.get(rule, {}))}
        cell_data["attack"] = _merge(cell_data.get("attack") or {}, {**attacks.get(attack, {}), "type": attack})
        cfgs = []
        for seed in card_seeds:
            ov = [*overrides, *cell_set, *(proxy_overrides if quick else []), f"training.seed={seed}"]
            key = json.dumps([cell_data, ov[:-1]], sort_keys=True, default=str)
            if key in checked and checked[key]:
                break
            try:
                cfgs.append(check_experiment(cell_data, ov))
                checked[key] = []
            except ConfigError as exc:
                checked[key] = list(exc.problems)
                problems += [f"{where} {p}" for p in exc.problems]
                break
        if len(cfgs) == len(card_seeds):
            cells.append(Cell(cid, str(rule), str(attack), str(metric), tuple(cell_set), checked_expect,
                              checked_source, paper, tuple(cfgs)))
    if quick:
        problems += [f"proxy.cells.{k}: no cell has this id" for k in proxy_cells if k not in seen]
    if only:
        problems += [f"--cells: no cell has the id {k!r}" for k in only if k not in seen]
    if problems:
        raise ConfigError(problems)
    if only:
        cells = [c for c in cells if c.id in set(only)]
    return Card(name, str(raw.get("paper", "")), path, quick, tuple(card_seeds), tuple(cells))
