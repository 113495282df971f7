"""bench/unlearning.py's statistics and acceptance, on hand-made metrics (no run, no fine-tuning)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("unlearning")


def metrics(asr_before: float, asr_after: float, acc_before: float, acc_after: float,
            flip: float = 0.5, oracle_asr: float = 0.0) -> dict[str, Any]:
    return {"before": {"asr": asr_before, "accuracy": acc_before},
            "after": {"transplant": {"asr": asr_after, "accuracy": acc_after, "oracle": False},
                      "oracle": {"asr": oracle_asr, "accuracy": acc_before, "oracle": True}},
            "trigger": {"found": True, "server_flip_rate": flip, "scoring": {"box_iou": 1.0},
                        "confirmation": {"min_flip_rate": 0.05, "forced": True}},
            "sanitized": {"strategy": "transplant"}}


def rows(*ms: dict[str, Any]) -> list[tuple[Path, dict[str, Any], dict[str, Any], int]]:
    capture = {"modes": ["suspects"], "hits": 3, "captured": [5, 6, 9]}
    return [(Path(f"/runs/s{i}"), m, capture, 30) for i, m in enumerate(ms)]


def test_statistics_and_acceptance_by_hand(bench: ModuleType) -> None:
    out = bench.summarise(rows(metrics(0.9, 0.0, 0.9, 0.9), metrics(0.9, 1 / 30, 0.8, 0.795)), floor=0.0)
    st = out["strategies"]["transplant"]
    assert st["asr"]["mean"] == pytest.approx(1 / 60) and st["asr"]["worst"] == pytest.approx(1 / 30)
    assert st["per_run_firing"] == [0, 1] and st["accuracy_change"]["worst"] == pytest.approx(-0.005)
    assert out["refused"] == [] and all(v for k, v in out["acceptance"].items() if k != "strategy")


def test_two_images_firing_or_a_big_accuracy_drop_fail(bench: ModuleType) -> None:
    out = bench.summarise(rows(metrics(0.9, 0.0, 0.9, 0.9), metrics(0.9, 2 / 30, 0.9, 0.88)), floor=0.0)
    verdict = {k.split(" (")[0]: v for k, v in out["acceptance"].items() if k != "strategy"}
    assert verdict == {"mean ASR <= floor + 0.02": False, "<= 1 source image firing on every run": False,
                       "accuracy >= before - 0.01 on every run": False, "every run unlearned": True}


def test_a_refused_run_counts_as_uncured(bench: ModuleType) -> None:
    # measured with --force it reached 0, but the server's check refuses it: the user keeps ASR 0.9
    refused = metrics(0.9, 0.0, 0.9, 0.9, flip=0.001)
    assert bench.refused(refused) and not bench.refused(metrics(0.9, 0.0, 0.9, 0.9))
    out = bench.summarise(rows(metrics(0.9, 0.0, 0.9, 0.9), refused), floor=0.0)
    assert out["refused"] == ["/runs/s1"]
    assert not out["acceptance"]["mean ASR <= floor + 0.02 (0.0200)"]
    assert out["strategies"]["transplant"]["asr"]["mean"] == 0.0  # the forced measurement stays reported


def test_a_run_that_could_not_be_unlearned_fails_the_acceptance(bench: ModuleType) -> None:
    out = bench.summarise(rows(metrics(0.9, 0.0, 0.9, 0.9)), floor=0.0, failed=["/runs/s7"])
    assert out["failed"] == ["/runs/s7"] and out["acceptance"]["every run unlearned"] is False
    assert "FAILED" in bench.report("default", out) and "s7" in bench.report("default", out)
