"""Every registered rule drives a small real federation (ServerApp + ClientApps in-process)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from strategies.registry import AGGREGATORS
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# Hyperparameters that fit 5 clients with 1 boosted attacker (rules not listed use their defaults).
PARAMS: dict[str, dict[str, object]] = {
    "fedavg": {}, "median": {}, "fltrust": {}, "foolsgold": {}, "fl-defender": {}, "flame": {},
    "rfout-1d": {"method": "mad"}, "iqr-filter": {}, "trimmed-mean": {"beta": 0.2},
    "krum": {"num_byzantine": 1}, "multi-krum": {"num_byzantine": 1}, "bulyan": {"num_byzantine": 0},
    "norm-clip": {"max_norm": 1.0, "noise_std": 0.001}, "clip-avg": {"clip_gamma": 1.0, "clip_decay": 0.5},
    "clip-avg-iqr": {"clip_gamma": 1.0, "clip_decay": 0.5},
    "geomed": {}, "centered-clipping": {}, "rlr": {}, "dnc": {"num_byzantine": 1}, "signguard": {},
    "freqfed": {}, "fldetector": {}, "deepsight": {"num_samples": 200}, "multi-metrics": {},
}
# Rules that decide per client (kept / dropped / clipped); coordinate-wise rules do not.
PER_CLIENT = {"fedavg", "krum", "multi-krum", "foolsgold", "fl-defender", "fltrust", "norm-clip", "iqr-filter",
              "clip-avg", "clip-avg-iqr", "flame", "bulyan", "centered-clipping", "dnc", "signguard",
              "freqfed", "fldetector", "deepsight", "multi-metrics"}


def test_every_registered_rule_has_a_case() -> None:
    assert set(PARAMS) == set(AGGREGATORS)


@pytest.mark.parametrize("rule", sorted(AGGREGATORS))
def test_rule_runs_a_federation(rule: str, tmp_path: Path) -> None:
    params = json.dumps(PARAMS[rule])
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [
        "federated.num_clients=5", "attack.attackers_ratio=0.2", "attack.boost=10.0",
        f"federated.aggregator={{name: {rule}, params: {params}}}"])
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 5)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert math.isfinite(r["accuracy"]) and r["skipped"] is None
        assert len(r["clients"]) == 5
        # the rule's own statistics, under the names it gave them
        assert not any(k.startswith("agg.agg.") for k in r)
        if rule == "clip-avg":
            assert r["agg.bound"] > 0
        if rule in PER_CLIENT:
            decided = (r["kept"] is not None) or (r["clipped"] is not None)
            assert decided, r
            assert r["detection"] is not None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == rule
