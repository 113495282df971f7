"""`commands.compose_stack check`: what docker/e2e.sh accepts as a completed run, on hand-made folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from commands.compose_stack import check, main
from lab.artifacts import append_jsonl
from lab.config import dump_yaml, load_experiment
from lab.errors import RunError

ROOT = Path(__file__).resolve().parents[2]


def run_folder(tmp_path: Path, rounds_logged: list[int], capture: bool = True, failures: bool = False) -> Path:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    cfg = load_experiment(ROOT / "experiments/smoke.yaml", [f"capture.enabled={str(capture).lower()}", "capture.rounds=[1]"])
    (out / "config.yaml").write_text(dump_yaml(cfg))
    for r in [0, *rounds_logged]:
        append_jsonl(out / "metrics.jsonl", {"round": r, "failures": [{"reason": "Unavailable"}] if failures and r == 2 else []})
    (out / "checkpoints" / "round_0002.safetensors").write_bytes(b"x")
    (out / "summary.json").write_text(json.dumps({"rounds": 2, "final_accuracy": 0.75, "final_asr": 0.125}))
    if capture:
        append_jsonl(out / "captures" / "manifest.jsonl", {"round": 1, "partition_id": 0})
    return out


def test_a_complete_run_passes_with_its_scores(tmp_path: Path) -> None:
    assert check(run_folder(tmp_path, [1, 2])) == "rounds=2 accuracy=0.7500 asr=0.1250"
    assert check(run_folder(tmp_path / "b", [1, 2], capture=False), rounds=2).startswith("rounds=2 ")


@pytest.mark.parametrize("logged", [[1], [1, 1, 2], [1, 2, 2], [2, 1]])
def test_a_lost_or_repeated_round_fails(tmp_path: Path, logged: list[int]) -> None:
    with pytest.raises(RunError, match="expected 1..2 once each"):
        check(run_folder(tmp_path, logged))


def test_missing_captures_checkpoints_failures_or_job_outputs_fail(tmp_path: Path) -> None:
    out = run_folder(tmp_path, [1, 2])
    with pytest.raises(RunError, match="stopped SuperNode"):
        check(out, failures=True)
    with pytest.raises(RunError, match="inversion"):
        check(out, jobs=True)
    (out / "inversion" / "round_0001" / "partition_002").mkdir(parents=True)  # the layout `fl-lab invert` writes
    (out / "inversion" / "round_0001" / "partition_002" / "metrics.json").write_text("{}")
    with pytest.raises(RunError, match="unlearning"):
        check(out, jobs=True)
    (out / "unlearning").mkdir()
    (out / "unlearning" / "metrics.json").write_text("{}")
    assert check(out, jobs=True).startswith("rounds=2")
    (out / "captures" / "manifest.jsonl").unlink()
    with pytest.raises(RunError, match="no capture"):
        check(out)
    other = run_folder(tmp_path / "f", [1, 2], failures=True)
    assert check(other, failures=True).startswith("rounds=2")
    (other / "checkpoints" / "round_0002.safetensors").unlink()
    with pytest.raises(RunError, match="no checkpoint"):
        check(other)


def test_the_command_answers_a_missing_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "no config.yaml or summary.json" in err and "Traceback" not in err
