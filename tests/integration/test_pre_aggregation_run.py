"""Pre-aggregators in a real (in-process) federation: the rule sees the mixed rows and its
per-client decisions still come back per client."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("aggregator", "rows"), [
    ("{name: median, pre: [nnm]}", 6.0),
    ("{name: multi-krum, params: {num_byzantine: 0}, pre: [{name: bucketing, params: {s: 2}}]}", 3.0),
])
def test_pre_aggregated_rule_runs_a_federation(aggregator: str, rows: float, tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [
        "federated.num_clients=6", "attack.attackers_ratio=0.34", f"federated.aggregator={aggregator}"])
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 6)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert math.isfinite(r["accuracy"]) and r["skipped"] is None
        assert r["agg.pre-rows"] == rows  # the pre-aggregators ran (the server passed `pre` on)
        assert set(r["detection"]["scores"]) == {str(c) for c in r["clients"]}  # one score per client
        if r["kept"] is not None:
            assert set(r["kept"]) | set(r["dropped"]) == set(r["clients"])
