"""Federation settings end to end, in-process (fake Grid, no Ray): seeded per-round client sampling
with a fixed attacker count, the evaluation cadence, FedAvg's divisor, and what summary.json, the
report and the progress line make of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commands.console import progress_printer
from commands.report import write_report
from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# 10 digits clients, 3 attackers (ratio 0.3, seed 0), 4 clients per round.
SAMPLED = ("federated.num_clients=10", "federated.clients_per_round=4", "attack.attackers_ratio=0.3",
           "training.rounds=3")


def run(out: Path, *overrides: str) -> tuple[list[dict], dict]:
    text = dump_yaml(load_experiment(ROOT / "experiments/smoke.yaml", list(overrides)))
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", list(overrides))
    run_in_process({"experiment-text": text, "output-dir": str(out)}, cfg.federated.num_clients)
    return read_jsonl(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text())


def test_fixed_attackers_per_round_is_exact_and_sampling_is_reproducible(tmp_path: Path) -> None:
    rows, summary = run(tmp_path / "a", *SAMPLED, "federated.attackers_per_round=1")
    again, _ = run(tmp_path / "b", *SAMPLED, "federated.attackers_per_round=1")
    malicious = set(summary["malicious_partitions"])
    assert len(malicious) == 3
    for r in rows[1:]:
        assert len(r["clients"]) == 4 and r["failures"] == []
        assert len(r["malicious"]) == 1 and set(r["malicious"]) == malicious & set(r["clients"])
    assert [r.get("clients") for r in rows] == [r.get("clients") for r in again]  # node ids differ, partitions not
    assert len({tuple(r["clients"]) for r in rows[1:]}) > 1  # a new draw each round
    assert summary["settings"]["federated.attackers_per_round"] == 1
    assert summary["settings"]["federated.clients_per_round"] == 4


def test_unset_attacker_count_samples_everyone_alike_and_seeded(tmp_path: Path) -> None:
    rows, summary = run(tmp_path / "a", *SAMPLED, "training.rounds=4")
    again, _ = run(tmp_path / "b", *SAMPLED, "training.rounds=4")
    other, _ = run(tmp_path / "c", *SAMPLED, "training.rounds=4", "training.seed=1")
    assert [r.get("clients") for r in rows] == [r.get("clients") for r in again]
    assert [r.get("clients") for r in rows] != [r.get("clients") for r in other]
    assert all(len(r["clients"]) == 4 for r in rows[1:])
    assert summary["settings"]["federated.attackers_per_round"] is None


def test_eval_every_writes_every_round_and_evaluates_some(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, summary = run(tmp_path, "training.rounds=5", "training.eval_every=2", "attack.boost=5.0")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    evaluated = [r["round"] for r in rows if r["accuracy"] is not None]
    assert evaluated == [0, 2, 4, 5]  # round 0, every 2nd, and the last
    for r in rows:
        if r["round"] in (1, 3):
            assert r["asr"] is None and r["loss"] is None and r["source_accuracy"] is None
            assert r["clients"] == [0, 1, 2, 3] and r["update_norms"]  # the round itself is recorded
        else:
            assert 0 <= r["accuracy"] <= 1 and 0 <= r["asr"] <= 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        f"round_000{i}.safetensors" for i in range(1, 6)]
    assert summary["final_accuracy"] == rows[-1]["accuracy"] and summary["final_round_evaluated"] == 5
    assert summary["settings"]["training.eval_every"] == 2
    show = progress_printer(load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=5"]))
    for r in rows:
        show(r)
    lines = capsys.readouterr().out.splitlines()
    assert "round   1/5  not evaluated" in lines[1] and "accuracy" in lines[2]
    md = write_report(tmp_path)[0].read_text()
    assert "## Federation settings" in md and "| training.eval_every | 2 |" in md
    assert "could not be drawn" not in md


def test_total_divisor_uses_every_clients_weight(tmp_path: Path) -> None:
    # Everyone sampled: the honest num-examples add up to the total weight the server computed, so
    # `total` is FedAvg itself (weights sum to one).
    rows, summary = run(tmp_path / "all", "federated.fedavg_divisor=total")
    base, _ = run(tmp_path / "sampled")
    # One local epoch: each client reports its partition's size, and the partitions cover the 1,294
    # digits training images.
    assert summary["settings"]["federated.fedavg_total_weight"] == 1294
    for r, b in zip(rows[1:], base[1:]):
        assert r["agg.weight-share"] == pytest.approx(1.0, abs=1e-6)
        assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # Four of ten clients sampled: their weights add up to their share of all examples.
    rows, summary = run(tmp_path / "some", *SAMPLED, "federated.fedavg_divisor=total")
    total = summary["settings"]["federated.fedavg_total_weight"]
    for r in rows[1:]:
        share = sum(r["weights"].values())
        assert 0.25 < share < 0.55 and share == pytest.approx(r["agg.weight-share"], abs=1e-6)
    assert summary["settings"]["federated.fedavg_divisor"] == "total" and total > 0


def test_a_sampled_round_does_not_wait_forever_for_nodes_that_never_come() -> None:
    import torch

    from lab.records import ParamLayout
    from strategies.flower import RobustFedAvg
    from strategies.registry import build_aggregator
    from strategies.types import AggregatorContext

    class TwoNodes:  # a Grid that only ever has two nodes connected, none of them known yet
        def get_node_ids(self) -> list[int]:
            return [11, 12]

        def send_and_receive(self, messages: object, *, timeout: float | None = None) -> list[object]:
            return []  # nobody answers the roll call

    layout = ParamLayout.of({"w": torch.zeros(3)})
    ctx = AggregatorContext(layout=layout, clients_per_round=3, seed=0)
    strategy = RobustFedAvg(build_aggregator("fedavg", {}, ctx), layout, clients_per_round=3, num_clients=5,
                            train_config={}, roll_call_timeout=0.5)
    assert strategy._nodes_holding([0, 1, 2], TwoNodes(), 1) == []  # returns: the round goes on without them
