"""lab.task.seed_torch: the same draws as torch.manual_seed on the CPU, without its lazy device
seedings (a captured stack trace each, paid per client per round)."""

from __future__ import annotations

import traceback

import pytest
import torch

from lab.task import seed_torch


def dropout_mask(seed_with: object, seed: int) -> torch.Tensor:
    seed_with(seed)  # type: ignore[operator]
    return torch.nn.functional.dropout(torch.ones(1000), p=0.5, training=True)


def test_seed_torch_draws_what_manual_seed_draws() -> None:
    for seed in (0, 7, 2**31 - 1):
        assert torch.equal(dropout_mask(seed_torch, seed), dropout_mask(torch.manual_seed, seed))
    assert not torch.equal(dropout_mask(seed_torch, 1), dropout_mask(seed_torch, 2))


def test_seed_torch_captures_no_stack_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.cuda.is_initialized():  # a GPU run: no lazy seeding is queued, either way
        return
    stacks: list[int] = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: stacks.append(1) or real(*a, **k))
    seed_torch(3)
    assert stacks == []
    torch.manual_seed(3)  # what the client used to call, per client per round
    assert len(stacks) >= 1
