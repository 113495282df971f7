"""Every place in the repository that names the Flower version, read the way its user reads it.

`tests/conftest.py` stops the whole test session on the first disagreement (one clear message
before any Flower test starts, instead of a confusing failure deep in a compose or deploy test).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lab.pins import exact_pin, installed_flwr, pinned_flwr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (flwr depends on tomli)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TAG = re.compile(r"^\s*image:\s*\S+:(\S+)\s*$", re.M)


def pyproject_pin(path: Path) -> str | None:
    return exact_pin(tomllib.loads(path.read_text())["project"]["dependencies"])


def compose_tags(path: Path) -> set[str]:
    return set(IMAGE_TAG.findall(path.read_text()))


def claims(root: Path = ROOT) -> tuple[str | None, dict[str, str | None]]:
    """(the pin in pyproject.toml, {place: the version it names}) for every other place."""
    named: dict[str, str | None] = {
        "the installed lab's metadata (stale editable install?)": pinned_flwr(),
        "the installed Flower": installed_flwr(),
        "bench/plain_fedavg/pyproject.toml": pyproject_pin(root / "bench" / "plain_fedavg" / "pyproject.toml"),
    }
    tags = compose_tags(root / "compose.yaml")
    named["compose.yaml image tags"] = tags.pop() if len(tags) == 1 else ",".join(sorted(tags)) or None
    return pyproject_pin(root / "pyproject.toml"), named


MEND = ("mend: `.venv/bin/pip install -e '.[test]'` for the installed versions, "
        "`fl-lab deploy compose > compose.yaml` for compose.yaml, and edit bench/plain_fedavg/pyproject.toml")
