"""The ServerApp and ClientApp together, in-process through a fake Grid (no Ray, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from lab.artifacts import load_tensors, read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def smoke(*overrides: str) -> str:
    return dump_yaml(load_experiment(ROOT / "experiments/smoke.yaml", list(overrides)))


def test_several_rounds_write_metrics_checkpoints_and_summary(tmp_path: Path) -> None:
    run_in_process({"experiment-text": smoke("training.rounds=3", "attack.boost=5.0"), "output-dir": str(tmp_path)}, 4)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert set(r["clients"]) == {0, 1, 2, 3} and r["failures"] == []
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["asr"] <= 1
        assert r["malicious"] == [3]
        norms = {int(k): v for k, v in r["update_norms"].items()}
        honest = max(v for k, v in norms.items() if k != 3)
        assert norms[3] > 2.5 * honest  # the boosted attacker stands out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round_0001.safetensors", "round_0002.safetensors", "round_0003.safetensors"]
    final = load_tensors(tmp_path / "final.safetensors")
    last = load_tensors(tmp_path / "checkpoints" / "round_0003.safetensors")
    assert all(np.array_equal(final[k].numpy(), last[k].numpy()) for k in final)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_accuracy", "final_asr", "asr_floor", "rounds", "strategy", "attack", "seconds"):
        assert key in summary
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert load_experiment(tmp_path / "config.yaml").training.rounds == 3


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    for name in ("a", "b"):
        run_in_process({"experiment-text": smoke(), "output-dir": str(tmp_path / name)}, 4)
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k and k != "rule_peak_mb"} for r in rows]
    assert strip(read_jsonl(tmp_path / "a/metrics.jsonl")) == strip(read_jsonl(tmp_path / "b/metrics.jsonl"))


def test_bad_replies_are_dropped_with_a_reason_and_the_round_goes_on(tmp_path: Path) -> None:
    def tamper(node_id: int, reply: Message) -> Message:
        index = node_id - 1000
        if index == 0:  # a client that crashed
            return Message(Error(code=0, reason="client crashed"), reply_to=_instruction(reply))
        arrays = reply.content["arrays"].to_torch_state_dict()
        metrics = reply.content["metrics"]
        key = max(arrays, key=lambda k: arrays[k].numel())
        if index == 1:  # wrong shape
            arrays[key] = arrays[key][:1]
        elif index == 2:  # non-finite values
            arrays[key] = arrays[key] * float("nan")
        else:
            return reply
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(dict(metrics))}),
                       reply_to=_instruction(reply))

    run_in_process({"experiment-text": smoke(), "output-dir": str(tmp_path)}, 4, tamper=tamper)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    for r in rows[1:]:
        assert r["clients"] == [3]
        reasons = sorted(f["reason"] for f in r["failures"])
        assert len(reasons) == 3
        assert any("crashed" in x for x in reasons)
        assert any("shape" in x for x in reasons)
        assert any("non-finite" in x for x in reasons)
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2


def _instruction(reply: Message) -> Message:
    """A stand-in for the instruction a reply answers (reply_to needs one)."""
    msg = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")
    msg.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return msg
