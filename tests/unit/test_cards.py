"""Reproduction cards: loading, every bad-card problem at once, ids, the proxy, verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands.cards import expectation_problem, load_card, metric_value, verdict
from commands.reproduce import planned_runs, reproduction_markdown
from lab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments/smoke.yaml"


def write(tmp_path: Path, cells: str, extra: str = "") -> Path:
    card = tmp_path / "card.yaml"
    card.write_text(f"name: t\nbase: {SMOKE}\nmetric: error\nsetting: {{training: {{rounds: 1}}}}\n{extra}"
                    f"cells:\n{cells}")
    return card


GOOD = """\
  - {rule: fedavg, attack: backdoor, expect: {value: 0.2, tolerance: 0.05}, source: "T1"}
  - {rule: fedavg, attack: backdoor, metric: asr, expect: {max: 0.5}, source: "T1"}
  - {rule: median, attack: none, source: lab}
  - {id: "median:backdoor@attackers=2", rule: median, attack: backdoor, set: [attack.attackers_ratio=0.5], source: lab}
"""


def test_a_good_card_resolves_every_cell_and_shares_runs(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, GOOD))
    assert [c.id for c in card.cells] == ["fedavg:backdoor", "fedavg:backdoor:asr", "median:none",
                                          "median:backdoor@attackers=2"]
    assert card.cells[0].cfgs[0].training.rounds == 1
    assert card.cells[3].cfgs[0].attack.ratios == (0.5,)
    assert card.cells[2].expect is None and card.cells[0].paper["source"] == "T1"
    assert len(planned_runs(card, tmp_path / "out")) == 3  # error and ASR of fedavg x backdoor share a run
    only = load_card(write(tmp_path, GOOD), seeds=[1, 2], only=["median:none"])
    assert [c.id for c in only.cells] == ["median:none"] and [c.cfgs[1].seed for c in only.cells] == [2]


def test_a_bad_card_names_every_problem_before_anything_runs(tmp_path: Path) -> None:
    cells = """\
  - {rule: nosuchrule, attack: backdoor, source: x}
  - {rule: fedavg, attack: nosuchattack, source: x}
  - {rule: fedavg, attack: backdoor}
  - {rule: median, attack: backdoor, expect: {value: 0.2, tolerance: "5%"}, source: x}
  - {rule: median, attack: backdoor, expect: {value: 0.2, tolerance: 0.1}, source: x}
  - {rule: fedavg, attack: none, expect: {value: 0.2}, source: x}
  - {rule: median, attack: none, expect: {max: 0.2, min: 0.1}, source: x}
  - {rule: krum, attack: backdoor, set: [training.rounds=0], source: x}
  - {rule: fedavg, attack: alie, metric: loss, source: x}
"""
    with pytest.raises(ConfigError) as err:
        load_card(write(tmp_path, cells, "bogus: 1\nrules: [median]\n"))
    text = "\n".join(err.value.problems)
    assert "bogus: unknown card key" in text and "rules: expected a mapping" in text
    assert "cells[0] (nosuchrule:backdoor) rule: unknown rule 'nosuchrule'" in text
    assert "cells[1] (fedavg:nosuchattack) attack: unknown attack 'nosuchattack'" in text
    assert "cells[2] (fedavg:backdoor) source:" in text
    assert "cells[3] (median:backdoor) expect.tolerance: must be a number" in text
    assert "cells[4] (median:backdoor) id: duplicate id 'median:backdoor'" in text
    assert "cells[5] (fedavg:none) expect: must be {value, tolerance}" in text
    assert "cells[6] (median:none) expect: must be" in text
    assert any(p.startswith("cells[7] (krum:backdoor) training.rounds") for p in err.value.problems)
    assert "cells[8] (fedavg:alie:loss) metric: must be one of" in text
    assert len(err.value.problems) == 11


def test_the_rules_own_checks_run_for_every_cell(tmp_path: Path) -> None:
    cells = "  - {rule: krum, attack: backdoor, source: x}\n"
    with pytest.raises(ConfigError, match=r"cells\[0\] \(krum:backdoor\) .*krum: needs clients_per_round"):
        load_card(write(tmp_path, cells, "rules: {krum: {num_byzantine: 3}}\n"))


def test_the_proxy_has_its_own_expectations_and_labels(tmp_path: Path) -> None:
    proxy = """proxy:
  overrides: [training.rounds=2]
  cells:
    "fedavg:backdoor": {expect: {max: 0.9}, source: "lab, measured"}
    "fedavg:backdoor:asr": {expect: {min: 0.1}, source: "lab", measured: false}
"""
    card = load_card(write(tmp_path, GOOD, proxy), quick=True)
    assert card.proxy and card.cells[0].cfgs[0].training.rounds == 2
    assert card.cells[0].expect == {"max": 0.9} and card.cells[0].paper["expect"]["value"] == 0.2
    assert card.cells[1].expect is None  # not measured: lab-only
    assert card.cells[2].expect is None
    with pytest.raises(ConfigError, match="--quick needs"):
        load_card(write(tmp_path, GOOD), quick=True)
    bad = proxy.replace('"fedavg:backdoor":', '"nope":').replace('source: "lab", measured', 'measured')
    with pytest.raises(ConfigError) as err:
        load_card(write(tmp_path, GOOD, bad), quick=True)
    assert any("proxy.cells.nope: no cell has this id" in p for p in err.value.problems)
    assert any("names its source" in p for p in err.value.problems)


def test_verdicts_and_metrics() -> None:
    assert verdict({"value": 0.2, "tolerance": 0.05}, 0.25) == "reproduced"
    assert verdict({"value": 0.2, "tolerance": 0.05}, 0.26) == "off"
    assert verdict({"max": 0.3}, 0.3) == "reproduced" and verdict({"max": 0.3}, 0.31) == "off"
    assert verdict({"min": 0.3}, 0.3) == "reproduced" and verdict({"min": 0.3}, 0.29) == "off"
    assert verdict(None, 0.5) == "lab-only" and verdict({"min": 0.3}, None) == "off"
    assert expectation_problem({"value": True, "tolerance": 0.1}) is not None
    assert expectation_problem({"min": 0}) is None
    summary = {"final_accuracy": 0.8, "final_asr": None}
    assert metric_value("error", summary) == pytest.approx(0.2) and metric_value("asr", summary) is None
    md = reproduction_markdown({"card": "c", "paper": "p", "proxy": True, "seeds": [0], "cells": [
        {"id": "a:b", "metric": "error", "paper": {"expect": {"value": 0.2, "tolerance": 0.05}, "source": "T1"},
         "expect": None, "source": None, "ours": {"mean": 0.3, "sd": None, "values": [0.3]}, "rounds": 2,
         "verdict": "lab-only"}]})
    assert "CPU PROXY" in md and "| a:b | error | 0.2 ± 0.05 | T1 | - | - | 0.300 | 2 | lab-only (proxy) |" in md


PAPERS = sorted((ROOT / "experiments/papers").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPERS, ids=lambda p: p.stem)
def test_every_published_card_loads_in_both_modes_and_names_its_sources(path: Path) -> None:
    full, quick = load_card(path), load_card(path, quick=True)
    assert [c.id for c in full.cells] == [c.id for c in quick.cells]
    for cell in full.cells:
        assert cell.source and cell.source.strip()
    for cell in quick.cells:  # a proxy expectation is always the lab's own measurement
        assert cell.expect is None or (cell.source or "").startswith("lab")


def test_the_rfout_card_tests_the_rule_on_both_sides_of_samuelsons_limit() -> None:
    card = load_card(ROOT / "experiments/papers/rfout-1d.yaml", quick=True)
    for cell in card.cells:
        cfg = cell.cfgs[0]
        n, k = cfg.federated.round_size, round(cfg.attack.ratios[0] * cfg.federated.num_clients)
        if cell.id.endswith("@n=10"):
            assert n - 1 <= 9  # max |z| = sqrt(n - 1) <= 3: nothing can be replaced
        elif cell.rule == "rfout-1d":
            assert n >= 20 and k < n / 10


def test_the_model_replacement_card_reads_the_attack_round_and_later() -> None:
    card = load_card(ROOT / "experiments/papers/model-replacement.yaml")
    attack = {c.id: c.cfgs[0] for c in card.cells}["fedavg:replacement@round=20"].attack
    assert attack.start_round == attack.end_round == 20 and attack.boost == "auto"
    rounds = {c.cfgs[0].training.rounds for c in card.cells}
    assert {19, 20, 21, 40} <= rounds
    assert all(c.cfgs[0].federated.attackers_per_round == 1 for c in card.cells)
