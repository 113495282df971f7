"""commands.console.guarded: a user's mistake or Ctrl-C is one line and an exit code."""

from __future__ import annotations

import pytest

from commands.console import guarded
from commands.interrupt import RunInterrupted
from lab.errors import ConfigError, RunError


def _raise(exc: BaseException) -> int:
    raise exc


@pytest.mark.parametrize(("exc", "code", "line"), [
    (KeyboardInterrupt(), 130, "fl-lab: interrupted\n"),  # a bare Ctrl-C (KeyboardInterrupt() says nothing)
    (RunInterrupted("stopped after round 3 of 15"), 130, "fl-lab: stopped after round 3 of 15\n"),
    (RunError("the run failed"), 1, "fl-lab: the run failed\n"),
    (ConfigError("training.rounds: must be >= 1"), 2, "fl-lab: invalid experiment: training.rounds: must be >= 1\n"),
])
def test_guarded_turns_errors_into_one_line(exc: BaseException, code: int, line: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert guarded("fl-lab", lambda: _raise(exc)) == code
    assert capsys.readouterr().err == line
