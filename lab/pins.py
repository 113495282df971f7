"""The one Flower version the lab runs on: the exact `flwr[simulation]==X` pin in pyproject.toml.

Why an exact pin: the lab's numbers, the Docker image tags (compose.yaml) and the docs must name the
Flower that produced them, and a range (`>=1.41,<1.43`) let a fresh install move to a new release
under them (1.41 -> 1.42 broke a fresh clone's CI). The pin is read from the installed package's
metadata, so it is the same value pip resolved against; `drift` compares every copy of it.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable

from lab.errors import LabError

DIST = "fl-security-lab"
_EXACT = re.compile(r"^flwr(\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.+-]*)\s*(;.*)?$")


class VersionDrift(LabError):
    """The installed Flower, the pin and the generated files name different versions."""


def exact_pin(requirements: Iterable[str]) -> str | None:
    """The X of an exact `flwr[...]==X` requirement among `requirements` (None if there is none)."""
    for req in requirements:
        match = _EXACT.match(req.strip())
        if match:
            return match.group(2)
    return None


def pinned_flwr() -> str:
    """The flwr version this installation of the lab was built for.

    Raises:
        VersionDrift: the lab is not installed, or its metadata has no exact flwr pin.
    """
    try:
        requires = importlib.metadata.requires(DIST) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise VersionDrift(f"{DIST} is not installed: run `pip install -e .` in the repository") from exc
    pin = exact_pin(requires)
    if pin is None:
        raise VersionDrift(f"{DIST}'s metadata has no exact flwr pin (`flwr[simulation]==X`): reinstall it "
                           "with `pip install -e .`")
    return pin


def installed_flwr() -> str | None:
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return None


def drift(pin: str, named: dict[str, str | None]) -> list[str]:
    """One line per place (`named`: where -> version it names) that disagrees with `pin`."""
    return [f"{where} names flwr {found or '(none)'}, the lab pins {pin}"
            for where, found in named.items() if found != pin]


def check_flwr() -> str:
    """The pinned version, after checking that it is the one installed; fails before any Flower work.

    Raises:
        VersionDrift: with the one command that mends it.
    """
    pin = pinned_flwr()
    problems = drift(pin, {"the installed Flower": installed_flwr()})
    if problems:
        raise VersionDrift(f"{problems[0]}: reinstall with `pip install -e .` (pyproject.toml pins it)")
    return pin
