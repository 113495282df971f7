"""The update-matrix attacks through the real ServerApp and ClientApp, in-process (fake Grid).

Full knowledge: the server-side colluder replaces the attacker's row after the matrix is built and
before the rule runs; the rule and the recorded norms see the replaced row. Partial knowledge: the
ClientApp sends -epsilon * its own honest update, and no colluder exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from byzantine import collusion
from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def smoke(*overrides: str) -> str:
    return dump_yaml(load_experiment(ROOT / "experiments/smoke.yaml", list(overrides)))


def test_full_knowledge_ipm_replaces_the_malicious_row_before_the_rule(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = []
    original = collusion.Colluder.__call__

    def spy(self, updates, client_ids, server_round):  # type: ignore[no-untyped-def]
        before = updates.clone()
        after = original(self, updates, client_ids, server_round)
        calls.append((before, tuple(client_ids), after.clone()))
        return after

    monkeypatch.setattr(collusion.Colluder, "__call__", spy)
    run_in_process({"experiment-text": smoke("attack.type=ipm", "attack.ipm_epsilon=2.0"),
                    "output-dir": str(tmp_path)}, 4)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(calls) == 2  # one per round
    for (before, ids, after), row in zip(calls, rows[1:]):
        assert ids == (0, 1, 2, 3) and row["malicious"] == [3]
        assert torch.allclose(after[3], -2.0 * before[:3].mean(0))
        assert torch.equal(after[:3], before[:3])
        assert row["update_norms"]["3"] == pytest.approx(float(after[3].norm()), rel=1e-5)  # what the rule saw
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attack"] == "ipm" and summary["attack_knowledge"] == "full"


def test_partial_knowledge_ipm_runs_in_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> None:
        raise AssertionError("no colluder with partial knowledge")

    monkeypatch.setattr(collusion.Colluder, "__call__", never)
    run_in_process({"experiment-text": smoke("attack.type=ipm", "attack.knowledge=partial"),
                    "output-dir": str(tmp_path)}, 4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attack_knowledge"] == "partial"
    honest = read_jsonl(tmp_path / "metrics.jsonl")[1]["update_norms"]
    # The same first round without the attack: the attacker's honest norm, halved by epsilon = 0.5.
    run_in_process({"experiment-text": smoke("training.rounds=1", "attack.type=none"),
                    "output-dir": str(tmp_path / "clean")}, 4)
    clean = read_jsonl(tmp_path / "clean" / "metrics.jsonl")[1]["update_norms"]
    assert honest["3"] == pytest.approx(0.5 * clean["3"], rel=1e-4)
    assert honest["0"] == pytest.approx(clean["0"], rel=1e-4)
