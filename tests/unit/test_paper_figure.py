"""The paper-against-lab figure of `fl-lab report` on a reproduce folder (commands/report/paper.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from commands.report.paper import allowed_range, plot_paper_vs_lab


@pytest.mark.parametrize(("expect", "expected"), [
    ({"value": 0.18, "tolerance": 0.05}, (0.13, 0.23)),
    ({"max": 0.05}, (0.0, 0.05)),
    ({"min": 0.9}, (0.9, 1.0)),
    ({"relative_to": "fedavg:none", "max_delta": 0.1}, (0.7, 0.9)),
    ({"relative_to": "fedavg:none", "min": -0.05}, (0.75, 1.8)),
    ({"relative_to": "missing", "max_delta": 0.1}, None),
    (None, None),
])
def test_allowed_range(expect: dict | None, expected: tuple[float, float] | None) -> None:
    got = allowed_range(expect, {"fedavg:none": 0.8})
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_figure_has_a_row_per_cell(tmp_path: Path) -> None:
    cells = [
        {"id": "fedavg:none", "metric": "error", "verdict": "reproduced", "paper": {"expect": {"value": 0.18, "tolerance": 0.05}},
         "ours": {"mean": 0.16, "sd": 0.01}},
        {"id": "median:scaling", "metric": "asr", "verdict": "off", "paper": {"expect": {"max": 0.1}},
         "ours": {"mean": 0.4, "sd": None}},
        {"id": "krum:none", "metric": "error", "verdict": "lab-only", "paper": {"expect": None}, "ours": {"mean": None}},
    ]
    path = plot_paper_vs_lab({"card": "c", "proxy": False, "cells": cells}, tmp_path / "f.png")
    assert path.exists() and path.stat().st_size > 5000
