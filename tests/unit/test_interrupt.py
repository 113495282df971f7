"""commands.interrupt: what a stopped run's folder keeps, and how it continues: a single run with
the resume flag, a card or a sweep by running the same command again (they continue by themselves)."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands.cli import _continues_by_itself
from commands.interrupt import RunInterrupted, interrupted_where
from lab.artifacts import append_jsonl


def stopped_run(tmp_path: Path, rounds: int, checkpoints: list[int]) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for r in range(rounds + 1):
        append_jsonl(run_dir / "metrics.jsonl", {"round": r})
    for r in checkpoints:
        (run_dir / "checkpoints" / f"round_{r}.safetensors").write_bytes(b"")
    return run_dir


def test_a_stopped_run_says_what_it_keeps_and_where_it_continues(tmp_path: Path) -> None:
    run_dir = stopped_run(tmp_path, 517, [100, 500])
    exc = interrupted_where(run_dir, 3000)
    assert exc.resume_after == 500
    assert str(exc) == (f"interrupted after round 517 of 3000: {run_dir} keeps rounds 1-517 "
                        "(metrics, checkpoints up to round 500); `--set execution.resume=true` continues after round 500")
    assert str(exc.continued_by("the same command")).endswith(
        "(metrics, checkpoints up to round 500); the same command continues after round 500")


def test_a_run_without_a_checkpoint_offers_no_way_to_continue(tmp_path: Path) -> None:
    exc = interrupted_where(stopped_run(tmp_path, 3, []), 10)
    assert exc.resume_after is None
    assert str(exc).endswith("keeps rounds 1-3 (metrics, no checkpoint)")
    assert str(exc.continued_by("the same command")) == str(exc)
    assert str(interrupted_where(stopped_run(tmp_path / "b", 0, []), 10)).startswith(
        "interrupted before round 1 of 10 finished")


@pytest.mark.parametrize(("raised", "said"), [
    (RunInterrupted("interrupted after round 7 of 9: D keeps rounds 1-7 (checkpoints, metrics)", 7),
     "interrupted after round 7 of 9: D keeps rounds 1-7 (checkpoints, metrics); the same command continues after round 7"),
    (KeyboardInterrupt(), "interrupted: the same command continues each unfinished run after its last checkpoint"),
])
def test_a_card_or_sweep_says_the_same_command_continues(raised: BaseException, said: str) -> None:
    with pytest.raises(RunInterrupted) as caught, _continues_by_itself():
        raise raised
    assert str(caught.value) == said and "--set" not in str(caught.value)
