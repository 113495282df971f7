"""Reproduction cards: loading, every bad-card problem at once, ids, the proxy, verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from commands.card_expect import expect_text, read_metric
from commands.cards import expectation_problem, load_card, metric_value, verdict
from commands.reproduce import planned_runs, reproduce, reproduction_markdown
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


def test_relative_verdicts() -> None:
    same = {"relative_to": "fedavg:x", "max_delta": 0.1}
    assert verdict(same, 0.85, 0.95) == "reproduced" and verdict(same, 0.95, 0.85) == "reproduced"
    assert verdict(same, 0.84, 0.95) == "off" and verdict(same, 0.5, None) == "off"
    keeps = {"relative_to": "fedavg:none", "min": -0.05}  # at most 0.05 below the other cell
    assert verdict(keeps, 0.86, 0.9) == "reproduced" and verdict(keeps, 0.84, 0.9) == "off"
    assert verdict({"relative_to": "a", "max": 0.0}, 0.3, 0.3) == "reproduced"
    assert verdict({"relative_to": "a", "max": 0.0}, 0.31, 0.3) == "off"
    assert expect_text(same) == "within 0.1 of fedavg:x" and expect_text(keeps) == ">= fedavg:none -0.05"
    assert expectation_problem({"relative_to": "a", "max_delta": -0.1}) == "expect.max_delta: must be >= 0, got -0.1"
    assert expectation_problem({"relative_to": "a", "value": 0.1, "tolerance": 0.1}) is not None
    assert expectation_problem({"relative_to": 3, "max": 0.1}) is not None


def test_a_reading_at_a_round_comes_from_metrics_jsonl(tmp_path: Path) -> None:
    rows = [{"round": 0, "accuracy": 0.1, "asr": 1.0}, {"round": 1, "accuracy": None, "asr": None},
            {"round": 2, "accuracy": 0.6, "asr": 0.25}, {"round": 2, "accuracy": 0.7, "asr": 0.5}]  # resumed
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"final_accuracy": 0.9, "final_asr": 0.0}))
    assert read_metric("asr", tmp_path, 2) == 0.5 and read_metric("error", tmp_path, 2) == pytest.approx(0.3)
    assert read_metric("accuracy", tmp_path, None) == 0.9
    with pytest.raises(ValueError, match="round 1 was not evaluated"):
        read_metric("asr", tmp_path, 1)


NEW = """\
  - {id: base, rule: fedavg, attack: none, source: lab}
  - {id: at2, rule: fedavg, attack: none, at_round: 2, source: lab}
  - {id: same, rule: median, attack: none, source: lab, expect: {relative_to: base, max_delta: 0.1}}
  - {id: "trimmed-mean:none@beta=0.25", rule: trimmed-mean, attack: none, params: {beta: 0.25}, source: lab}
  - {id: short, rule: fedavg, attack: backdoor, overrides: [training.rounds=3], source: lab}
"""


def test_the_new_cell_fields_resolve(tmp_path: Path) -> None:
    card = load_card(write(tmp_path, NEW, "overrides: [training.rounds=4, training.eval_every=2]\n"))
    cells = {c.id: c for c in card.cells}
    assert cells["at2"].at_round == 2 and cells["base"].at_round is None
    assert cells["trimmed-mean:none@beta=0.25"].cfgs[0].federated.aggregator.params["beta"] == 0.25
    assert cells["short"].cfgs[0].training.rounds == 3 and cells["short"].paper_rounds == 3
    runs = planned_runs(card, tmp_path / "out")
    assert len(runs) == 4  # base and at2 read one run; params and overrides give their own folders
    assert len({d.name for d, _ in runs}) == 4
    only = load_card(write(tmp_path, NEW, "overrides: [training.rounds=4, training.eval_every=2]\n"), only=["same"])
    assert [c.id for c in only.cells] == ["base", "same"]  # what `same` is compared with comes along


def test_bad_new_fields_give_one_line_each(tmp_path: Path) -> None:
    cells = """\
  - {id: a, rule: fedavg, attack: none, at_round: 3, source: x}
  - {id: b, rule: fedavg, attack: none, at_round: 9, source: x}
  - {id: c, rule: fedavg, attack: none, at_round: -1, source: x}
  - {id: d, rule: median, attack: none, source: x, expect: {relative_to: nope, max_delta: 0.1}}
  - {id: e, rule: median, attack: none, metric: asr, source: x, expect: {relative_to: a, max_delta: 0.1}}
  - {id: f, rule: median, attack: none, source: x, expect: {relative_to: f, max: 0.1}}
  - {id: g, rule: trimmed-mean, attack: none, params: {beta: 0.25, bogus: 2}, source: x}
  - {id: h, rule: trimmed-mean, attack: none, params: [1], source: x}
  - {rule: rfout-1d, attack: none, params: {threshold: 2.0}, source: x}
  - {rule: rfout-1d, attack: none, params: {threshold: 2.5}, source: x}
  - {id: i, rule: fedavg, attack: none, set: [training.rounds=2], overrides: [training.rounds=3], source: x}
"""
    with pytest.raises(ConfigError) as err:
        load_card(write(tmp_path, cells, "overrides: [training.rounds=8, training.eval_every=2]\n"))
    p = err.value.problems
    assert "cells[0] (a) at_round: round 3 is not evaluated (training.eval_every=2: rounds 0, 2, 4, ... and the last, 8)" in p
    assert "cells[1] (b) at_round: round 9 is past the run's last round (8)" in p
    assert "cells[2] (c) at_round: must be a round number >= 0, got -1" in p
    assert "cells[3] (d) expect.relative_to: no cell has the id 'nope'" in p
    assert "cells[4] (e) expect.relative_to: 'a' reads error, this cell asr" in p
    assert "cells[5] (f) expect.relative_to: a cell cannot be compared with itself" in p
    assert any(x.startswith("cells[6] (g) federated.aggregator.params: unexpected keyword 'bogus'") for x in p)
    assert "cells[7] (h) params: expected a mapping of the rule's parameters" in p
    assert any(x.startswith("cells[9] (rfout-1d:none) id: duplicate id 'rfout-1d:none'") for x in p)
    assert "cells[10] (i) overrides: give `overrides` or its older name `set`, not both" in p
    assert len(p) == 10, p


SUBSETS = """proxy:
  overrides: [training.rounds=2]
  cells:
    "short": {overrides: [training.rounds=1], at_round: 1, expect: {max: 1.0}, source: "lab, measured"}
subsets:
  half: {label: "2 of 4 rounds", overrides: [training.rounds=2], cells: [base, same]}
  nolabel: {overrides: [training.rounds=2], cells: [nope]}
"""


def test_the_proxy_shortens_a_cell_and_a_subset_is_labelled(tmp_path: Path) -> None:
    path = write(tmp_path, NEW, "overrides: [training.rounds=4, training.eval_every=2]\n" + SUBSETS.replace(
        "  nolabel: {overrides: [training.rounds=2], cells: [nope]}\n", ""))
    quick = {c.id: c for c in load_card(path, quick=True).cells}
    assert quick["short"].cfgs[0].training.rounds == 1 and quick["short"].paper_rounds == 3  # the cell said 3
    assert quick["short"].at_round == 1 and quick["base"].cfgs[0].training.rounds == 2
    half = load_card(path, subset="half")
    assert half.subset == "half" and half.subset_label == "2 of 4 rounds"
    assert [(c.id, c.cfgs[0].training.rounds, c.paper_rounds) for c in half.cells] == [("base", 2, 4), ("same", 2, 4)]
    with pytest.raises(ConfigError) as err:
        load_card(write(tmp_path, NEW, SUBSETS), subset="other", quick=True)
    p = err.value.problems
    assert "subsets.nolabel.label: a subset says what it leaves out (e.g. '300 of 3,000 rounds')" in p
    assert "--subset: the card has no subset 'other'; known: half, nolabel" in p
    assert "--subset: a subset is a part of the paper setting; it does not combine with --quick" in p
    with pytest.raises(ConfigError, match="subsets.nolabel.cells: no cell has the id 'nope'"):
        load_card(write(tmp_path, NEW, SUBSETS), subset="nolabel")


def test_reproduction_json_reads_rounds_and_relative_cells(tmp_path: Path) -> None:
    path = write(tmp_path, NEW, "overrides: [training.rounds=4, training.eval_every=2]\n" + SUBSETS.replace(
        "  nolabel: {overrides: [training.rounds=2], cells: [nope]}\n", ""))
    card = load_card(path, subset="half")

    def fake_run(cfg: Any, run_dir: Path) -> dict[str, Any]:  # what a run leaves: metrics.jsonl and summary.json
        run_dir.mkdir(parents=True)
        acc = 0.8 if cfg.federated.aggregator.name == "median" else 0.75
        rows = [{"round": r, "accuracy": acc - 0.1 * (2 - r), "asr": 0.0} for r in (0, 2)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "summary.json").write_text(json.dumps({"final_accuracy": acc, "final_asr": 0.0}))
        return {}

    result = reproduce(card, tmp_path / "out", fake_run)
    cells = {c["id"]: c for c in result["cells"]}
    assert cells["base"]["rounds"] == 2 and cells["base"]["paper_rounds"] == 4 and cells["base"]["reduced"]
    assert cells["same"]["ours"]["mean"] == pytest.approx(0.2) and cells["same"]["against"]["mean"] == pytest.approx(0.25)
    assert cells["same"]["verdict"] == "reproduced" and result["subset"] == "half"
    md = (tmp_path / "out" / "reproduction.md").read_text()
    assert "reduced: 2 of 4 rounds" in md and "Subset `half` of the card: 2 of 4 rounds." in md
    assert "within 0.1 of base" in md and "0.200 (base: 0.250)" in md


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
        if "@n=10" in cell.id:
            assert n - 1 <= 9  # max |z| = sqrt(n - 1) <= 3: nothing can be replaced (with the std z-score)
            assert (cell.params.get("method") == "mad") == cell.id.endswith("method=mad")
        elif cell.rule == "rfout-1d":
            assert n >= 20 and k < n / 10


def test_the_model_replacement_card_reads_the_attack_round_and_later() -> None:
    card = load_card(ROOT / "experiments/papers/model-replacement.yaml")
    attack = {c.id: c.cfgs[0] for c in card.cells}["fedavg:replacement@round=20"].attack
    assert attack.start_round == attack.end_round == 20 and attack.boost == "auto"
    assert {c.at_round for c in card.cells} == {19, 20, 21, 25, 40}  # the decay curve, read from one run
    assert len(planned_runs(card, Path("out"))) == 2  # the boosted run and the no-boost one
    assert all(c.cfgs[0].federated.attackers_per_round == 1 for c in card.cells)


def test_a_proxy_reading_that_the_card_itself_cannot_make_is_named(tmp_path: Path) -> None:
    cells = "  - {id: a, rule: fedavg, attack: none, at_round: 3, source: x}\n"
    proxy = 'proxy:\n  overrides: [training.eval_every=1]\n  cells: {"a": {at_round: 3}}\n'
    path = write(tmp_path, cells, "overrides: [training.rounds=4, training.eval_every=2]\n" + proxy)
    with pytest.raises(ConfigError) as err:
        load_card(path, quick=True)
    want = ("cells[0] (a) (the card's own setting) at_round: round 3 is not evaluated "
            "(training.eval_every=2: rounds 0, 2, 4, ... and the last, 4)")
    assert err.value.problems == [want]
