"""The curious-server capture: entries, probe rounds, evidence, budget, and any inner strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from lab.artifacts import load_tensors, read_jsonl, save_tensors
from lab.capture import probe_update, read_entry, read_evidence
from lab.config import CaptureConfig, ProbeConfig, dump_yaml, load_experiment
from lab.data import load_data
from lab.task import LocalHyperparams, build_for, load_state, state_of
from server.capture import CapturePlan, CaptureUpdates
from strategies.flower import to_tensors
from tests.integration.harness import FakeGrid, run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
PROBE = ["capture.enabled=true", "capture.rounds=[2]", "capture.clients=all",
         "capture.probe={local_steps: 3, batch_size: 4, lr: 0.01}", "capture.evidence=true"]


def test_probe_round_entries_replay_exactly_from_the_evidence(tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", PROBE)
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 4)
    manifest = read_jsonl(tmp_path / "captures/manifest.jsonl")
    assert sorted(r["partition_id"] for r in manifest) == [0, 1, 2, 3]
    assert all(r["round"] == 2 and r["probe"] and r["hyperparams"]["local-steps"] == 3 for r in manifest)
    data = load_data(cfg.dataset, cfg.seed)
    for row in manifest:
        entry = read_entry(tmp_path / "captures" / row["file"])
        assert entry.hyperparams == LocalHyperparams(1, 3, 4, 0.01, 0.9, 0.0005)
        assert entry.partition_id == row["partition_id"] and entry.image_shape == data.image_shape
        images, labels = read_evidence(tmp_path / "captures" / row["evidence"])
        model = load_state(build_for(cfg, data), entry.global_state)
        replay = probe_update(model, images, labels, entry.hyperparams)
        for key, value in entry.update.items():
            assert torch.allclose(replay[key], value, atol=1e-6), key
    malicious = [r for r in manifest if r["partition_id"] == 3][0]
    _, labels = read_evidence(tmp_path / "captures" / malicious["evidence"])
    assert labels.numel() >= 4  # the attacker's batch may carry appended or relabelled samples


def test_a_probe_with_an_earlier_model_captures_its_gradients_and_training_goes_on(tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml",
                          ["training.rounds=3", "capture.enabled=true", "capture.rounds=[3]", "capture.clients=all",
                           "capture.probe={local_steps: 1, batch_size: 2, lr: 0.01, model_round: 2}",
                           "capture.evidence=true"])
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 4)
    manifest = read_jsonl(tmp_path / "captures/manifest.jsonl")
    assert sorted(r["partition_id"] for r in manifest) == [0, 1, 2, 3]
    assert all(r["round"] == 3 and r["model_round"] == 2 for r in manifest)
    sent_in_round_2 = load_tensors(tmp_path / "checkpoints/round_0001.safetensors")
    before = load_tensors(tmp_path / "checkpoints/round_0002.safetensors")
    after = load_tensors(tmp_path / "checkpoints/round_0003.safetensors")
    data = load_data(cfg.dataset, cfg.seed)
    weighted = {k: torch.zeros_like(v) for k, v in before.items() if v.is_floating_point()}
    for row in manifest:
        entry = read_entry(tmp_path / "captures" / row["file"])
        assert all(torch.equal(entry.global_state[k], v) for k, v in sent_in_round_2.items())
        images, labels = read_evidence(tmp_path / "captures" / row["evidence"])
        replay = probe_update(load_state(build_for(cfg, data), entry.global_state), images, labels, entry.hyperparams)
        for key in weighted:
            assert torch.allclose(replay[key], entry.update[key], atol=1e-6), key
            weighted[key] += entry.update[key] * row["num_examples"]
    # FedAvg of the rebased replies: the probe's changes land on round 2's model, not on round 1's.
    total = sum(r["num_examples"] for r in manifest)
    for key, summed in weighted.items():
        assert torch.allclose(after[key], before[key] + summed / total, atol=1e-5), key


def test_a_resumed_run_probes_with_the_earlier_model_read_back_from_its_checkpoint(tmp_path: Path) -> None:
    plan = CapturePlan.of(CaptureConfig(enabled=True, rounds=(5,), clients="all", probe=ProbeConfig(model_round=3)),
                          LocalHyperparams(1, 1, 1, 0.01, 0.9, 0.0), frozenset(), (1, 8, 8))
    hook = CaptureUpdates(FedAvg(), tmp_path / "captures", plan)
    current = ArrayRecord({"w": torch.ones(3)})
    assert hook._probe_model(5, current) == (current, 5)  # nothing kept, no checkpoint: a warning
    save_tensors(tmp_path / "checkpoints/round_0002.safetensors", {"w": torch.tensor([1.0, 2.0, 3.0])})
    sent, model_round = hook._probe_model(5, current)
    assert model_round == 3 and torch.equal(to_tensors(sent)["w"], torch.tensor([1.0, 2.0, 3.0]))


def test_capture_budget_stops_capturing_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [*PROBE, "capture.max_bytes=700000"])
    with caplog.at_level("WARNING"):
        run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 4)
    manifest = read_jsonl(tmp_path / "captures/manifest.jsonl")
    assert 0 < len(manifest) < 4
    assert sum(r["bytes"] for r in manifest) <= 700000
    assert "capture budget" in caplog.text
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2  # the run went on


def test_capture_wraps_flowers_builtin_fedavg(tmp_path: Path) -> None:
    from client.app import app as client_app

    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["capture.enabled=true", "capture.rounds=[1]",
                                                            "capture.clients=[1]"])
    run_config = {"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}
    grid = FakeGrid(client_app, [{"partition-id": i, "num-partitions": 4} for i in range(4)], run_config)
    data = load_data(cfg.dataset, cfg.seed)
    initial = state_of(build_for(cfg, data, seed=0))
    plan = CapturePlan.of(CaptureConfig(enabled=True, rounds=(1,), clients=(1,), probe=ProbeConfig()),
                          LocalHyperparams.of(cfg), frozenset(), data.image_shape)
    strategy = CaptureUpdates(FedAvg(fraction_evaluate=0.0, min_available_nodes=4), tmp_path / "captures", plan)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=2,
                            train_config=ConfigRecord(LocalHyperparams.of(cfg).to_config()))
    assert result.arrays is not None
    manifest = read_jsonl(tmp_path / "captures/manifest.jsonl")
    assert [(r["round"], r["partition_id"]) for r in manifest] == [(1, 1)]
    entry = read_entry(tmp_path / "captures" / manifest[0]["file"])
    assert entry.hyperparams.steps == 1 and entry.hyperparams.batch_size == 1
    assert all(torch.equal(entry.global_state[k], v) for k, v in initial.items())


def test_honest_capture_keeps_the_servers_top_k_suspects_and_says_how(tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["capture.enabled=true", "capture.rounds=[2]",
                                                            "capture.clients=suspects", "capture.top_k=2",
                                                            "capture.probe={local_steps: 1, batch_size: 1, lr: 0.01}"])
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 4)
    manifest = read_jsonl(tmp_path / "captures/manifest.jsonl")
    suspects = json.loads((tmp_path / "captures/suspects_round_0002.json").read_text())
    assert [r["partition_id"] for r in manifest] == suspects["ranking"][:2]  # in rank order, only the top 2
    assert sorted(suspects["ranking"]) == [0, 1, 2, 3] and set(suspects["scores"]) == {"0", "1", "2", "3"}
    for rank, row in enumerate(manifest, start=1):
        sel = row["selection"]
        assert sel["mode"] == "suspects" and sel["upper_bound"] is False and sel["suspect_rank"] == rank
        assert {"dropped_rounds", "rule_suspicion", "history_similarity"} <= set(sel)
    # round 1 (not a probe) fed the histories: every client has a similarity to the others
    assert all(v["history_similarity"] != 0.0 for v in suspects["scores"].values())


def test_ground_truth_capture_is_flagged_as_an_upper_bound_in_the_manifest(tmp_path: Path) -> None:
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", ["capture.enabled=true", "capture.rounds=[1]",
                                                            "capture.clients=malicious"])
    run_in_process({"experiment-text": dump_yaml(cfg), "output-dir": str(tmp_path)}, 4)
    manifest = read_jsonl(tmp_path / "captures/manifest.jsonl")
    assert [r["partition_id"] for r in manifest] == [3]
    assert manifest[0]["selection"]["upper_bound"] is True and "UPPER BOUND" in manifest[0]["selection"]["note"]
