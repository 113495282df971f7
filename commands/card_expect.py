"""What a reproduction card's cell expects, and the lab's reading it is judged on.

An expectation is absolute, `{value, tolerance}`, `{max}` or `{min}` on the cell's own reading, or
relative to another cell of the card, `{relative_to: ID, max_delta: X}` (|ours - theirs| <= X: "the
same as FedAvg") or `{relative_to: ID, min: X}` / `{relative_to: ID, max: X}` (ours - theirs >= X or
<= X: "keeps accuracy within 0.05 of the clean run" is `min: -0.05`). A reading is the run's final
evaluation (`summary.json`), or with `at_round: N` the central evaluation of round N
(`metrics.jsonl`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRICS = ("error", "asr", "accuracy")
ABSOLUTE_SHAPES = ({"value", "tolerance"}, {"max"}, {"min"})
RELATIVE_SHAPES = ({"relative_to", "max_delta"}, {"relative_to", "min"}, {"relative_to", "max"})
SHAPES_TEXT = "{value, tolerance}, {max}, {min}, or {relative_to: CELL_ID, max_delta | min | max}"


def expectation_problem(expect: Any) -> str | None:
    """What is wrong with an expectation's shape, or None (the relative target is checked by the card)."""
    if not isinstance(expect, Mapping):
        return f"expect: must be {SHAPES_TEXT}"
    keys = set(expect)
    if keys not in ABSOLUTE_SHAPES and keys not in RELATIVE_SHAPES:
        return f"expect: must be {SHAPES_TEXT}, got keys {sorted(map(str, keys))}"
    for k, v in expect.items():
        if k == "relative_to":
            if not isinstance(v, str) or not v.strip():
                return f"expect.relative_to: must be another cell's id, got {v!r}"
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"expect.{k}: must be a number, got {v!r}"
    for k in ("tolerance", "max_delta"):
        if k in expect and expect[k] < 0:
            return f"expect.{k}: must be >= 0, got {expect[k]}"
    return None


def verdict(expect: Mapping[str, Any] | None, mean: float | None, other: float | None = None) -> str:
    """`reproduced` when the lab's mean meets the expectation, `off` when not, `lab-only` without one.

    `other` is the mean of the cell a relative expectation names."""
    if expect is None:
        return "lab-only"
    if mean is None or ("relative_to" in expect and other is None):
        return "off"
    eps = 1e-12  # 0.25 - 0.2 is 0.05000000000000002 in floats
    if "relative_to" in expect:
        assert other is not None
        delta = mean - other
        if "max_delta" in expect:
            return "reproduced" if abs(delta) <= expect["max_delta"] + eps else "off"
        mean = delta
    if "value" in expect:
        return "reproduced" if abs(mean - expect["value"]) <= expect["tolerance"] + eps else "off"
    if "max" in expect:
        return "reproduced" if mean <= expect["max"] + eps else "off"
    return "reproduced" if mean >= expect["min"] - eps else "off"


def expect_text(expect: Mapping[str, Any] | None) -> str:
    if not expect:
        return "-"
    if "relative_to" in expect:
        other = expect["relative_to"]
        if "max_delta" in expect:
            return f"within {expect['max_delta']:g} of {other}"
        return (f"<= {other} + {expect['max']:g}" if "max" in expect else f">= {other} {expect['min']:+g}")
    if "value" in expect:
        return f"{expect['value']:g} ± {expect['tolerance']:g}"
    return f"<= {expect['max']:g}" if "max" in expect else f">= {expect['min']:g}"


def metric_value(metric: str, summary: Mapping[str, Any]) -> float | None:
    """The metric of a run's final evaluation (a summary.json)."""
    return _reading(metric, summary.get("final_accuracy"), summary.get("final_asr"))


def read_metric(metric: str, run_dir: Path, at_round: int | None) -> float | None:
    """The metric of the run in `run_dir`: its final evaluation, or round `at_round`'s.

    Raises:
        ValueError: round `at_round` was not evaluated in that run (the card's check prevents it).
    """
    if at_round is None:
        return metric_value(metric, json.loads((run_dir / "summary.json").read_text()))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    row = next((r for r in reversed(rows) if r.get("round") == at_round), None)  # a resume may repeat a round
    if row is None or row.get("accuracy") is None:
        raise ValueError(f"{run_dir}: round {at_round} was not evaluated")
    return read_reading(metric, row)


def read_reading(metric: str, row: Mapping[str, Any]) -> float | None:
    """The metric of one evaluated round of metrics.jsonl."""
    return _reading(metric, row["accuracy"], row.get("asr"))


def _reading(metric: str, accuracy: Any, asr: Any) -> float | None:
    if metric == "error":
        return 1.0 - float(accuracy)
    if metric == "accuracy":
        return float(accuracy)
    return None if asr is None else float(asr)
