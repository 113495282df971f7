"""Cohort execution (lab.cohort) changes how clients travel, never what they compute: the same
seed gives the same metrics, decisions and final model as one message per client, in-process (the
fake Grid runs the real ServerApp and ClientApp), across attacks, rules, sampling and captures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lab.artifacts import read_jsonl
from lab.cohort import RUN_CONFIG_KEY
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# What must agree row by row (seconds and node ids may not).
SAME = ("round", "accuracy", "asr", "loss", "clients", "kept", "dropped", "clipped", "malicious", "update_norms",
        "weights", "scores", "failures", "train_loss", "skipped")


def run(out: Path, overrides: list[str], cohort_nodes: int | None) -> tuple[list[dict], dict]:
    """One in-process run; with `cohort_nodes`, the round's clients travel in that many messages."""
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", overrides)
    run_config: dict[str, object] = {"experiment-text": dump_yaml(cfg), "output-dir": str(out)}
    nodes = cfg.federated.num_clients
    if cohort_nodes is not None:
        per_message = -(-cfg.federated.round_size // cohort_nodes)
        run_config[RUN_CONFIG_KEY] = per_message
        nodes = cohort_nodes
    grid = run_in_process(run_config, nodes)
    if cohort_nodes is not None:  # every round's training went out as cohorts, one message per node
        assert grid.sent and all(n <= cohort_nodes for n in grid.sent)
    return read_jsonl(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text())


def assert_same_run(a: Path, b: Path, rows_a: list[dict], rows_b: list[dict]) -> None:
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for key in SAME:
            va, vb = ra.get(key), rb.get(key)
            if isinstance(va, float) and isinstance(vb, float):
                assert va == pytest.approx(vb, rel=1e-5, abs=1e-6), (ra["round"], key)
            elif isinstance(va, dict) and isinstance(vb, dict):
                assert va.keys() == vb.keys(), (ra["round"], key)
                for k in va:
                    assert va[k] == pytest.approx(vb[k], rel=1e-5, abs=1e-6), (ra["round"], key, k)
            else:
                assert va == vb, (ra["round"], key)
    fa, fb = load_file(str(a / "final.safetensors")), load_file(str(b / "final.safetensors"))
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-6)


CASES = {
    "backdoor-fedavg": ["training.rounds=2"],
    "sampled-multikrum-boost": ["federated.num_clients=10", "federated.clients_per_round=5",
                                "federated.attackers_per_round=2", "attack.attackers_ratio=0.3",
                                "attack.boost=5.0", "federated.aggregator.name=multi-krum",
                                "training.rounds=3"],
    "colluding-alie-median-lenet": ["federated.num_clients=6", "attack.type=alie", "attack.attackers_ratio=0.34",
                                    "federated.aggregator.name=median", "training.model=lenet",
                                    "training.local_steps=3", "training.rounds=2"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_cohorts_give_the_same_run_as_one_message_per_client(tmp_path: Path, case: str) -> None:
    overrides = CASES[case]
    rows_a, summary_a = run(tmp_path / "plain", overrides, None)
    rows_b, summary_b = run(tmp_path / "cohort", overrides, 2)
    assert_same_run(tmp_path / "plain", tmp_path / "cohort", rows_a, rows_b)
    assert summary_a["final_accuracy"] == pytest.approx(summary_b["final_accuracy"], abs=1e-6)
    assert summary_a["settings"]["execution.clients_per_message"] == 1
    assert summary_b["settings"]["execution.clients_per_message"] > 1


@pytest.mark.parametrize("model_round", [2, 1])  # 1: the probe sends round 1's model, replies rebased
def test_cohort_captures_file_the_same_entries_under_the_same_partitions(tmp_path: Path, model_round: int) -> None:
    overrides = ["training.rounds=2", "capture.enabled=true", "capture.rounds=[2]", "capture.clients=all",
                 "capture.evidence=true",
                 f"capture.probe={{local_steps: 2, batch_size: 4, lr: 0.01, model_round: {model_round}}}"]
    run(tmp_path / "plain", overrides, None)
    run(tmp_path / "cohort", overrides, 3)  # 4 clients over 3 nodes: cohorts of 2, 1 and 1
    plain = read_jsonl(tmp_path / "plain" / "captures" / "manifest.jsonl")
    cohort = read_jsonl(tmp_path / "cohort" / "captures" / "manifest.jsonl")
    assert [r["id"] for r in plain] == [r["id"] for r in cohort] and len(plain) == 4
    for ra, rb in zip(plain, cohort):
        assert ra["partition_id"] == rb["partition_id"] and ra["probe"] and rb["probe"]
        ea = load_file(str(tmp_path / "plain" / "captures" / ra["file"]))
        eb = load_file(str(tmp_path / "cohort" / "captures" / rb["file"]))
        for k in ea:
            torch.testing.assert_close(ea[k], eb[k], rtol=1e-5, atol=1e-6)
        assert ra["evidence"] == rb["evidence"] and ra["evidence"] is not None
        assert ra["model_round"] == rb["model_round"] == model_round
    final_a = load_file(str(tmp_path / "plain" / "checkpoints" / "round_0002.safetensors"))
    final_b = load_file(str(tmp_path / "cohort" / "checkpoints" / "round_0002.safetensors"))
    for k in final_a:  # the rebased cohort replies aggregate to the same model
        torch.testing.assert_close(final_a[k], final_b[k], rtol=1e-5, atol=1e-6)


def test_a_deployed_node_refuses_a_cohort_order(tmp_path: Path) -> None:
    """A SuperNode whose config is its operator's (not a simulated node's) trains only its own
    partition: a cohort order fails the whole message, and the round goes on without it."""
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=1"])
    run_config = {"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path), RUN_CONFIG_KEY: 2}
    from flwr.app import Context, Error, Message, RecordDict

    from client.app import app as client_app
    from server.app import app as server_app
    from tests.integration.harness import FakeGrid

    def runtime(msg: Message, context: Context) -> Message:  # Flower's ClientApp runtime turns a raise into an error reply
        try:
            return client_app(msg, context)
        except ValueError as exc:
            return Message(Error(code=0, reason=str(exc)), reply_to=msg)

    grid = FakeGrid(runtime, [{"partition-id": 0, "num-partitions": 4, "malicious": False},
                                 {"partition-id": 1, "num-partitions": 4}], run_config)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[1]["clients"] == [2, 3]  # the simulated node's cohort
    reasons = {f["partition"]: f["reason"] for f in rows[1]["failures"]}
    assert set(reasons) == {0, 1} and all("simulation nodes only" in r for r in reasons.values())
