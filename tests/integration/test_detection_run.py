"""Detection as a ranking in real runs: a `fl-lab run` Flower simulation writes the rule's suspicion
and AUC per round and the pooled metrics in summary.json, and a resumed run ends with the same ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment
from tests.integration.harness import run_in_process

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
KRUM_6 = ["federated.num_clients=6", "attack.attackers_ratio=0.34", "federated.aggregator.name=krum"]


def check_detection(out: Path) -> tuple[list[dict], dict]:
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["round"] > 0]
    summary = json.loads((out / "summary.json").read_text())
    malicious = summary["malicious_partitions"]
    assert len(malicious) == 2  # round(0.34 * 6)
    for r in rows:
        det = r["detection"]
        assert sorted(det["scores"]) == sorted(str(c) for c in r["clients"])  # {partition: score}
        assert all(isinstance(v, float) for v in det["scores"].values())
        assert 0.0 <= det["auc"] <= 1.0  # both classes in every round: all 6 clients train
        assert {"precision", "recall", "f1", "tp", "fp", "fn"} <= set(det)  # the drop-based fields stay
        assert r["rule_seconds"] > 0
    pooled = summary["detection"]
    assert 0.0 <= pooled["auc"] <= 1.0
    assert sorted(pooled["rounds_to_detect"]) == sorted(str(p) for p in malicious)
    assert all(v is None or 1 <= v <= len(rows) for v in pooled["rounds_to_detect"].values())
    assert pooled["false_alarm_rate"] is None  # no round without an attacker
    assert summary["rule_cost"]["rounds"] == len(rows)
    return rows, summary


def test_fl_lab_run_krum_writes_suspicion_scores_and_auc(tmp_path: Path) -> None:
    out = tmp_path / "krum"
    res = subprocess.run([sys.executable, "-m", "commands.cli", "run", "experiments/smoke.yaml", "--set", *KRUM_6,
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    check_detection(out)


class Killed(Exception):
    """Stands for SIGKILL of the ServerApp in the middle of a round."""


def test_resume_ends_with_the_same_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = dump_yaml(load_experiment(ROOT / "experiments/smoke.yaml", ["training.rounds=3", *KRUM_6]))
    full = tmp_path / "full"
    run_in_process({"experiment-text": text, "output-dir": str(full)}, 6)

    import strategies.flower as sf

    original = sf.RobustFedAvg.configure_train

    def configure(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        if server_round == 3:
            raise Killed  # after rounds 1 and 2 were written
        return original(self, server_round, arrays, config, grid)

    out = tmp_path / "resumed"
    monkeypatch.setattr(sf.RobustFedAvg, "configure_train", configure)
    with pytest.raises(Killed):
        run_in_process({"experiment-text": text, "output-dir": str(out)}, 6)
    monkeypatch.setattr(sf.RobustFedAvg, "configure_train", original)
    resumed = text.replace("resume: false", "resume: true")
    assert resumed != text
    run_in_process({"experiment-text": resumed, "output-dir": str(out)}, 6)

    (rows_a, sum_a), (rows_b, sum_b) = check_detection(full), check_detection(out)
    assert [r["detection"] for r in rows_b] == [r["detection"] for r in rows_a]
    assert sum_b["detection"] == sum_a["detection"]  # pooled over rounds 1-2 read back and round 3 run
    assert sum_b["rule_cost"]["rounds"] == 3
