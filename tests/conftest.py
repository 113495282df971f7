"""Session guard: the Flower the tests run on must be the one the lab pins, everywhere."""

from __future__ import annotations

import pytest

from lab.errors import LabError
from lab.pins import drift
from tests.versions import MEND, claims


def pytest_sessionstart(session: pytest.Session) -> None:
    try:
        pin, named = claims()
    except LabError as exc:
        pytest.exit(f"flwr version check: {exc}", returncode=3)
    if pin is None:
        pytest.exit("flwr version check: pyproject.toml has no exact `flwr[simulation]==X` pin", returncode=3)
    problems = drift(pin, named)
    if problems:
        pytest.exit("flwr version drift (pyproject.toml pins " + pin + "):\n  - " + "\n  - ".join(problems)
                    + "\n" + MEND, returncode=3)
