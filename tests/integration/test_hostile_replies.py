"""One malicious client must not break the server: hostile replies in a real in-process round.

Each bad reply is refused with its reason under `failures` in metrics.jsonl, the round goes on with
the others, the global model stays finite, and metrics.jsonl is strict JSON. A non-finite aggregate
is not applied (the round is `skipped`), and a run whose final model is not finite fails.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

import server.app
from lab.artifacts import load_tensors
from lab.config import dump_yaml, load_experiment
from lab.data import load_data
from lab.errors import RunError
from lab.task import build_for, state_of
from tests.integration.harness import forge, run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
NODES = 13  # node 1000 + i is the node that holds partition i


def smoke(*overrides: str) -> str:
    return dump_yaml(load_experiment(ROOT / "experiments/smoke.yaml", list(overrides)))


def strict_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a strict JSON reader sees it (NaN / Infinity are errors there)."""
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token} in {path.name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def smuggle(record: MetricRecord, key: str, value: object) -> MetricRecord:
    """A value MetricRecord's own type check would refuse (a sender that does not use Flower's API)."""
    record.__dict__["_data"][key] = value
    return record


def hostile(node: int, server_round: int, reply: Message) -> Message:
    """What node `node` sends in round `server_round` instead of its honest reply."""
    index = node - 1000
    arrays = reply.content["arrays"].to_torch_state_dict()
    metrics = MetricRecord(dict(reply.content["metrics"]))
    big = max(arrays, key=lambda k: arrays[k].numel())
    if index in (0, 9) and server_round == 1:  # two nodes claim partition 0 in one round
        metrics["partition-id"] = 0
    elif index == 2:
        arrays[big] = arrays[big] * float("nan")
    elif index == 3:
        metrics["num-examples"] = float("inf")
    elif index == 4:
        metrics["num-examples"] = 1e39
    elif index == 5 and server_round == 1:  # a string identity ...
        smuggle(metrics, "partition-id", "1")
    elif index == 5:  # ... then a spoof of node 1001's partition
        metrics["partition-id"] = 1
    elif index == 6:
        smuggle(metrics, "train-loss", "low")
    elif index == 7:
        arrays[big] = arrays[big][:1]
    elif index == 8 and server_round == 2:  # bound to partition 8 in round 1, now claims node 1000's
        metrics["partition-id"] = 0
    elif index == 10:
        metrics["partition-id"] = [10]
    elif index == 11:
        metrics["partition-id"] = 99
    elif index == 12:  # finite weights whose update norm overflows float32
        arrays[big] = arrays[big] * 1e30
    else:
        return reply
    return forge(reply, RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}))


# The second case probes round 2 with round 1's model: the hostile replies then pass the capture's
# rebasing onto the current model before the aggregation refuses them.
@pytest.mark.parametrize("probe", [[], ["capture.probe={local_steps: 1, batch_size: 1, lr: 0.01, model_round: 1}"]])
def test_hostile_replies_are_refused_with_a_reason_and_the_model_stays_finite(tmp_path: Path,
                                                                             probe: list[str]) -> None:
    rounds: Counter[int] = Counter()

    def tamper(node: int, reply: Message) -> Message:
        rounds[node] += 1
        return hostile(node, rounds[node], reply)

    cfg = smoke(f"federated.num_clients={NODES}", "attack.attackers_ratio=0.1", "capture.enabled=true",
                "capture.rounds=[1, 2]", "capture.clients=all", *probe)
    run_in_process({"experiment-text": cfg, "output-dir": str(tmp_path)}, NODES, tamper=tamper)

    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    expected = {
        1: {1000: "claimed by 2 nodes", 1009: "claimed by 2 nodes", 1005: "partition-id must be an integer"},
        2: {1005: "partition 1 is held by node 1001", 1008: "node 1008 holds partition 8, not 0"},
    }
    same_each_round = {1002: "non-finite", 1003: "num-examples", 1004: "num-examples", 1006: "train-loss",
                       1007: "shape", 1010: "partition-id must be an integer", 1011: "partition-id 99 is outside",
                       1012: "update too large"}
    for row, clients in zip(rows[1:], ([1, 8], [0, 1, 9])):
        assert row["clients"] == clients and row["skipped"] is None
        reasons = {f["node_id"]: f["reason"] for f in row["failures"]}
        want = {**same_each_round, **expected[row["round"]]}
        assert set(reasons) == set(want), reasons
        for node, why in want.items():
            assert why in reasons[node], (node, reasons[node])
        assert all(math.isfinite(v) for v in row["update_norms"].values())
        assert math.isfinite(row["accuracy"]) and math.isfinite(row["train_loss"])
    for path in [tmp_path / "final.safetensors", *(tmp_path / "checkpoints").glob("round_*.safetensors")]:
        assert all(bool(torch.isfinite(t).all()) for t in load_tensors(path).values()), path

    # The capture keys on the same identities: no spoofer's update is filed under another's partition.
    manifest = strict_rows(tmp_path / "captures/manifest.jsonl")
    assert manifest and all(e["node_id"] == 1000 + e["partition_id"] for e in manifest)
    assert (1, 0) not in {(e["round"], e["partition_id"]) for e in manifest}
    assert all(math.isfinite(e["num_examples"]) and e["num_examples"] < 1e9 for e in manifest)


def _nan_in_round(*bad_rounds: int):  # type: ignore[no-untyped-def]
    """`build_aggregator` whose rule returns a NaN update in `bad_rounds` (e.g. FLAME, noise_lambda NaN)."""
    real = server.app.build_aggregator

    def build(name, params, ctx, pre=()):  # type: ignore[no-untyped-def]
        rule = real(name, params, ctx, pre=pre)

        def aggregate(updates, info):  # type: ignore[no-untyped-def]
            out = rule(updates, info)
            return replace(out, update=out.update * float("nan")) if info.server_round in bad_rounds else out
        return aggregate
    return build


def test_a_non_finite_aggregate_is_skipped_and_the_model_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(server.app, "build_aggregator", _nan_in_round(2))
    with caplog.at_level("WARNING"):
        run_in_process({"experiment-text": smoke("training.rounds=3"), "output-dir": str(tmp_path)}, 4)
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert rows[1]["skipped"] is None and rows[3]["skipped"] is None
    assert "not finite" in rows[2]["skipped"] and "not finite" in caplog.text
    assert rows[2]["accuracy"] == rows[1]["accuracy"] and rows[2]["loss"] == rows[1]["loss"]
    one, two = (load_tensors(tmp_path / f"checkpoints/round_000{r}.safetensors") for r in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)  # round 2 left the model as it was
    final = load_tensors(tmp_path / "final.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())


def test_a_run_whose_every_round_is_skipped_keeps_the_initial_model(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.app, "build_aggregator", _nan_in_round(1, 2))
    run_in_process({"experiment-text": smoke(), "output-dir": str(tmp_path)}, 4)
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert all("not finite" in r["skipped"] for r in rows[1:])
    cfg = load_experiment(tmp_path / "config.yaml")
    initial = state_of(build_for(cfg, load_data(cfg.dataset, cfg.seed), seed=cfg.seed))
    final = load_tensors(tmp_path / "final.safetensors")  # was empty: Flower's Result has no arrays then
    assert set(final) == set(initial) and all(torch.equal(final[k], initial[k]) for k in initial)


def test_a_run_whose_final_model_is_not_finite_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = server.app.state_of
    calls = Counter[str]()

    def nan_initial(model):  # type: ignore[no-untyped-def]
        state = real(model)
        calls["state_of"] += 1
        if calls["state_of"] == 1:  # the initial global model
            state = {k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}
        return state

    monkeypatch.setattr(server.app, "state_of", nan_initial)
    with pytest.raises(RunError, match="not finite"):
        run_in_process({"experiment-text": smoke(), "output-dir": str(tmp_path)}, 4)
    assert not (tmp_path / "final.safetensors").exists() and not (tmp_path / "summary.json").exists()
    rows = strict_rows(tmp_path / "metrics.jsonl")  # NaN losses are null, and flagged
    assert rows[0]["loss"] is None and "loss" in rows[0]["nonfinite"]
    assert all(r["skipped"] == "no valid client reply" for r in rows[1:])
