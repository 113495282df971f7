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
         overrides: [attack.attackers_ratio=0.3], source: lab}     # no expect: lab-only
      - {id: "rfout-1d:z=2", rule: rfout-1d, attack: none, params: {threshold: 2.0}, source: lab}
      - {id: "fedavg:backdoor@round=21", rule: fedavg, attack: backdoor, at_round: 21, source: lab,
         notes: "what the lab measured about it (an off cell's explanation: the run that isolates it)"}
      - {id: "iqr:stealthy", rule: iqr-filter, attack: backdoor, source: "...",
         expect: {relative_to: "fedavg:backdoor", max_delta: 0.1}}
    proxy:                              # `--quick`: the CPU proxy
      overrides: [federated.num_clients=20, training.rounds=30]
      cells: {"fedavg:none": {expect: {max: 0.3}, source: "lab, measured ...", measured: true,
                              overrides: [training.rounds=10], at_round: 5}}
    subsets:                            # `load_card(subset=NAME)`: a labelled part of the paper setting
      reduced: {label: "300 of 3,000 rounds", overrides: [training.rounds=300], cells: [fedavg:none]}

A cell's id defaults to `RULE:ATTACK`, with `:METRIC` added when its metric is not the card's
`metric`; cells that differ only in `overrides`, `params` or `at_round` need explicit ids. Metrics and
expectations: `commands.card_expect`. A cell without an expectation (or a proxy expectation with
`measured: false`) is `lab-only`. A cell's overrides come after the card's, the proxy's after the
cell's (so a proxy cell can shorten what its cell sets), a subset's last. `load_card` names every
problem of a card at once, including each cell's resolved experiment's own
(`commands.preflight.check_experiment`) and readings at rounds that are never evaluated, before
anything runs.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commands.card_expect import METRICS, expectation_problem, metric_value, verdict
from commands.preflight import check_experiment
from lab.config import ExperimentConfig, read_yaml
from lab.errors import ConfigError
from lab.schema import AttackType

__all__ = ["METRICS", "Card", "Cell", "expectation_problem", "load_card", "metric_value", "verdict"]

CARD_KEYS = {"name", "paper", "notes", "base", "setting", "overrides", "seeds", "metric", "rules", "attacks",
             "cells", "proxy", "subsets"}
CELL_KEYS = {"id", "rule", "attack", "overrides", "set", "params", "at_round", "metric", "expect", "source",
             "notes"}
PROXY_KEYS = {"overrides", "cells", "notes"}
PROXY_CELL_KEYS = {"expect", "source", "measured", "notes", "overrides", "at_round"}
SUBSET_KEYS = {"label", "overrides", "cells", "notes"}
ATTACKS = typing.get_args(AttackType)


@dataclass(frozen=True)
class Cell:
    id: str
    rule: str
    attack: str
    metric: str
    overrides: tuple[str, ...]  # what this cell adds to the card's and the proxy's common overrides
    params: Mapping[str, Any]  # the cell's own rule parameters, over the card's `rules` entry for its rule
    at_round: int | None  # the round read (None: the final evaluation)
    expect: Mapping[str, Any] | None  # what is checked (the proxy's own in --quick)
    source: str | None
    paper: Mapping[str, Any]  # the published expectation (None: lab-only) and the cell's source
    paper_rounds: int  # the rounds of the card's own setting for this cell (no proxy, no subset)
    cfgs: tuple[ExperimentConfig, ...]  # one per seed
    notes: str | None = None  # what the lab measured about this cell (an off cell's explanation)


@dataclass(frozen=True)
class Card:
    name: str
    paper: str
    path: Path
    proxy: bool
    seeds: tuple[int, ...]
    cells: tuple[Cell, ...]
    subset: str | None = None  # the subset that ran (None: the whole card)
    subset_label: str | None = None


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


def _mapping(raw: Any, key: str, what: str, problems: list[str]) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"{key}: expected a mapping of {what}")
        return {}
    return raw


def _round_problem(at_round: Any) -> str | None:
    if at_round is None or (isinstance(at_round, int) and not isinstance(at_round, bool) and at_round >= 0):
        return None
    return f"at_round: must be a round number >= 0, got {at_round!r}"


def _unevaluated(at_round: int | None, cfg: ExperimentConfig) -> str | None:
    """Why round `at_round` has no central evaluation in `cfg`'s run, or None."""
    if at_round is None:
        return None
    from server.recorder import evaluates  # the recorder's own schedule; brings torch

    t = cfg.training
    if at_round > t.rounds:
        return f"at_round: round {at_round} is past the run's last round ({t.rounds})"
    if not evaluates(cfg, at_round):
        return (f"at_round: round {at_round} is not evaluated (training.eval_every={t.eval_every}: "
                f"rounds 0, {t.eval_every}, {2 * t.eval_every}, ... and the last, {t.rounds})")
    return None


@dataclass(frozen=True)
class _Mode:
    """What the card's mode adds to every cell: the proxy's section (`--quick`) or a subset."""

    quick: bool
    proxy_overrides: tuple[str, ...]
    proxy_cells: Mapping[str, Any]
    subset_overrides: tuple[str, ...]


def _notes(raw: Any, where: str, problems: list[str]) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    problems.append(f"{where}notes: expected text, got {type(raw).__name__}")
    return None


def _proxy_cell(pc: Any, problems: list[str]) -> tuple[Any, Any, list[str], Any, str | None]:
    """A proxy cell's (expect, source, overrides, at_round, notes); expect None when not measured."""
    if pc is None:
        return None, None, [], None, None
    if not isinstance(pc, Mapping):
        problems.append("proxy.cells: expected a mapping {expect, source, measured, overrides, at_round}")
        return None, None, [], None, None
    problems += [f"proxy.cells.{k}: unknown key; known: {', '.join(sorted(PROXY_CELL_KEYS))}" for k in pc
                 if k not in PROXY_CELL_KEYS]
    expect, source = None, None
    if pc.get("expect") is not None:
        if bad := expectation_problem(pc["expect"]):
            problems.append(f"proxy.cells: {bad}")
        if not isinstance(pc.get("source"), str) or not pc["source"].strip():
            problems.append("proxy.cells: source: a proxy expectation names its source (lab, measured ...)")
        if pc.get("measured", True) is True:
            expect, source = pc["expect"], pc.get("source")
    if bad := _round_problem(pc.get("at_round")):
        problems.append(f"proxy.cells: {bad}")
    return (expect, source, _str_list(pc.get("overrides"), "proxy.cells overrides", problems), pc.get("at_round"),
            _notes(pc.get("notes"), "proxy.cells ", problems))


def _resolve(data: dict[str, Any], overrides: Sequence[str], seeds: Sequence[int], at_round: int | None,
             checked: dict[str, list[str]]) -> tuple[list[ExperimentConfig], list[str]]:
    """One checked experiment per seed, or the problems (each distinct experiment is checked once)."""
    cfgs: list[ExperimentConfig] = []
    for seed in seeds:
        key = json.dumps([data, list(overrides)], sort_keys=True, default=str)
        if checked.get(key):
            return cfgs, checked[key]
        try:
            cfg = check_experiment(data, [*overrides, f"training.seed={seed}"])
        except ConfigError as exc:
            checked[key] = list(exc.problems)
            return cfgs, checked[key]
        checked[key] = []
        if bad := _unevaluated(at_round, cfg):
            return cfgs, [bad]
        cfgs.append(cfg)
    return cfgs, []


def _mode(raw: Mapping[str, Any], quick: bool, subset: str | None, problems: list[str]) -> tuple[_Mode, str | None,
                                                                                                 list[str] | None]:
    """The mode's common overrides and proxy cells; the subset's label and cell ids."""
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
            proxy_cells = _mapping(proxy.get("cells"), "proxy.cells", "cell id: {expect, source, measured}", problems)
    elif quick:
        problems.append("proxy: --quick needs the card's `proxy` section (the CPU proxy's overrides)")
    subsets = _mapping(raw.get("subsets"), "subsets", "subset name: {label, overrides, cells}", problems)
    label, ids, subset_overrides = None, None, []
    for name, s in subsets.items():
        if not isinstance(s, Mapping):
            problems.append(f"subsets.{name}: expected a mapping {{label, overrides, cells}}")
            continue
        problems += [f"subsets.{name}.{k}: unknown key; known: {', '.join(sorted(SUBSET_KEYS))}" for k in s
                     if k not in SUBSET_KEYS]
        if not isinstance(s.get("label"), str) or not s["label"].strip():
            problems.append(f"subsets.{name}.label: a subset says what it leaves out (e.g. '300 of 3,000 rounds')")
        own = _str_list(s.get("overrides"), f"subsets.{name}.overrides", problems)
        cells = s.get("cells")
        if cells is not None and (not isinstance(cells, list) or not all(isinstance(c, str) for c in cells)):
            problems.append(f"subsets.{name}.cells: expected a list of cell ids")
            cells = None
        if name == subset:
            label, ids, subset_overrides = s.get("label"), cells, own
    if subset is not None:
        if subset not in subsets:
            problems.append(f"--subset: the card has no subset {subset!r}; known: {', '.join(subsets) or 'none'}")
        if quick:
            problems.append("--subset: a subset is a part of the paper setting; it does not combine with --quick")
    return _Mode(quick, tuple(proxy_overrides) if quick else (), proxy_cells if quick else {},
                 tuple(subset_overrides)), label, ids


def load_card(path: Path, *, quick: bool = False, seeds: Sequence[int] | None = None,
              only: Sequence[str] | None = None, subset: str | None = None) -> Card:
    """The card with every cell's experiment resolved and checked (one per seed).

    `only` picks cells by id, `subset` a named subset of the card (`subsets:`); cells a picked
    cell's relative expectation names come along.

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
    setting = _mapping(raw.get("setting"), "setting", "the lab's experiment sections", problems)
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
    rules = _mapping(raw.get("rules"), "rules", "rule name: {aggregator params}", problems)
    attacks = _mapping(raw.get("attacks"), "attacks", "attack type: {attack section fields}", problems)
    if not all(isinstance(v, Mapping) for v in rules.values()):
        problems.append("rules: expected a mapping of rule name: {aggregator params}")
        rules = {}
    if not all(isinstance(v, Mapping) for v in attacks.values()):
        problems.append("attacks: expected a mapping of attack type: {attack section fields}")
        attacks = {}
    mode, subset_label, subset_ids = _mode(raw, quick, subset, problems)
    # brings torch: only when a card is loaded
    from strategies.registry import AGGREGATORS

    cells_raw = raw.get("cells")
    if not isinstance(cells_raw, list) or not cells_raw:
        problems.append("cells: expected a non-empty list of cells")
        cells_raw = []
    cells: list[Cell] = []
    metric_of: dict[str, str] = {}
    relative: list[tuple[str, str, str, str]] = []  # (where, cell id, metric, the id it compares with)
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
        if cid in metric_of:
            own.append(f"id: duplicate id {cid!r} (cells that differ in overrides, params or at_round need an "
                       f"explicit `id`)")
        metric_of.setdefault(cid, str(metric))
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
        if "set" in c and "overrides" in c:
            own.append("overrides: give `overrides` or its older name `set`, not both")
        cell_overrides = _str_list(c.get("overrides", c.get("set")), "overrides", own)
        params = _mapping(c.get("params"), "params", "the rule's parameters", own)
        at_round = c.get("at_round")
        if bad := _round_problem(at_round):
            own.append(bad)
        paper = {"expect": None if expect is None else dict(expect), "source": source}
        checked_expect, checked_source, mode_at_round = expect, source, at_round
        notes = _notes(c.get("notes"), "", own)
        proxy_overrides: list[str] = []
        if mode.quick:  # the paper setting's notes say nothing about the proxy's runs
            checked_expect, checked_source, proxy_overrides, proxy_round, notes = _proxy_cell(
                mode.proxy_cells.get(cid), own)
            mode_at_round = at_round if proxy_round is None else proxy_round
        for e in [expect] if checked_expect is expect else [expect, checked_expect]:
            if isinstance(e, Mapping) and isinstance(e.get("relative_to"), str):
                relative.append((where, cid, str(metric), e["relative_to"]))
        if own:
            problems += [f"{where} {p}" for p in own]
            continue
        cell_data = json.loads(json.dumps(data))
        rule_params = {**rules.get(rule, {}), **params}
        cell_data.setdefault("federated", {})["aggregator"] = {"name": rule, "params": rule_params}
        cell_data["attack"] = _merge(cell_data.get("attack") or {}, {**attacks.get(attack, {}), "type": attack})
        extra = [*cell_overrides, *proxy_overrides, *mode.subset_overrides]
        ov = [*overrides, *cell_overrides, *mode.proxy_overrides, *proxy_overrides, *mode.subset_overrides]
        cfgs, bad_cfg = _resolve(cell_data, ov, card_seeds, mode_at_round, checked)
        paper_cfgs = cfgs[:1]
        if not bad_cfg and (mode.quick or mode.subset_overrides):  # the card's own setting for this cell
            paper_cfgs, bad_cfg = _resolve(cell_data, [*overrides, *cell_overrides], card_seeds[:1], at_round, checked)
            bad_cfg = [f"(the card's own setting) {p}" for p in bad_cfg]
        if bad_cfg:
            problems += [f"{where} {p}" for p in bad_cfg]
            continue
        cells.append(Cell(cid, str(rule), str(attack), str(metric), tuple(extra), dict(params), mode_at_round,
                          checked_expect, checked_source, paper, paper_cfgs[0].training.rounds, tuple(cfgs), notes))
    for where, cid, metric, other in relative:
        if other == cid:
            problems.append(f"{where} expect.relative_to: a cell cannot be compared with itself")
        elif other not in metric_of:
            problems.append(f"{where} expect.relative_to: no cell has the id {other!r}")
        elif metric_of[other] != metric:
            problems.append(f"{where} expect.relative_to: {other!r} reads {metric_of[other]}, this cell {metric}")
    if mode.quick:
        problems += [f"proxy.cells.{k}: no cell has this id" for k in mode.proxy_cells if k not in metric_of]
    if subset_ids is not None:
        problems += [f"subsets.{subset}.cells: no cell has the id {k!r}" for k in subset_ids if k not in metric_of]
    if only:
        problems += [f"--cells: no cell has the id {k!r}" for k in only if k not in metric_of]
        if subset_ids is not None:
            problems += [f"--cells: {k!r} is not in subset {subset!r}" for k in only if k not in subset_ids]
    if problems:
        raise ConfigError(problems)
    picked = only or subset_ids
    if picked:
        cells = _with_compared(cells, set(picked))
    return Card(name, str(raw.get("paper", "")), path, quick, tuple(card_seeds), tuple(cells), subset,
                subset_label)


def _with_compared(cells: list[Cell], picked: set[str]) -> list[Cell]:
    """The picked cells and, transitively, the cells their relative expectations compare with."""
    by_id = {c.id: c for c in cells}
    todo = list(picked)
    while todo:
        cell = by_id[todo.pop()]
        other = (cell.expect or {}).get("relative_to")
        if other is not None and other not in picked:
            picked.add(other)
            todo.append(other)
    return [c for c in cells if c.id in picked]
