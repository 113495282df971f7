"""The Flower pin: parsing it, and the drift check that guards the test session and `fl-lab`."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import pins
from tests.versions import claims, compose_tags, pyproject_pin


@pytest.mark.parametrize(("reqs", "pin"), [
    (["flwr[simulation]==1.42.0"], "1.42.0"),
    (["numpy>=1.26", "flwr == 1.41.0 ; python_version >= '3.10'"], "1.41.0"),
    (["flwr[simulation]>=1.41,<1.43"], None),  # a range is not a pin
    (["flwr-datasets==0.5.0"], None),  # another package with the same prefix
    ([], None),
])
def test_exact_pin(reqs: list[str], pin: str | None) -> None:
    assert pins.exact_pin(reqs) == pin


def test_drift_names_every_place_that_disagrees() -> None:
    problems = pins.drift("1.42.0", {"a": "1.42.0", "b": "1.41.0", "c": None})
    assert problems == ["b names flwr 1.41.0, the lab pins 1.42.0", "c names flwr (none), the lab pins 1.42.0"]


def test_check_flwr_refuses_an_installed_flower_that_is_not_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pins, "installed_flwr", lambda: "1.41.0")
    monkeypatch.setattr(pins, "pinned_flwr", lambda: "1.42.0")
    with pytest.raises(pins.VersionDrift, match=r"installed Flower names flwr 1\.41\.0, the lab pins 1\.42\.0"):
        pins.check_flwr()


def test_the_repository_agrees_with_its_pin() -> None:
    pin, named = claims()
    assert pin is not None and pins.drift(pin, named) == []
    assert pins.check_flwr() == pin


def test_a_stale_compose_file_is_caught(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text("services:\n  a:\n    image: flwr/superlink:1.41.0\n"
                                          "  b:\n    image: fl-security-lab-superexec:1.42.0\n")
    assert compose_tags(tmp_path / "compose.yaml") == {"1.41.0", "1.42.0"}
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["flwr[simulation]>=1.41"]\n')
    assert pyproject_pin(tmp_path / "pyproject.toml") is None


def test_fl_lab_stops_with_one_line_on_drift(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from commands import cli

    def drifted() -> str:
        raise pins.VersionDrift("the installed Flower names flwr 1.41.0, the lab pins 1.42.0: reinstall")

    monkeypatch.setattr(cli, "check_flwr", drifted)
    assert cli.main(["run", "experiments/smoke.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1.41.0" in err and "Traceback" not in err
