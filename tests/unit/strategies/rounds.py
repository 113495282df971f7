"""Small builders the tests of the issue-18 rules share: a context and a round's info."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lab.records import ParamLayout
from strategies.types import Aggregate, Aggregator, AggregatorContext, RoundInfo


def ctx(n: int, seed: int = 0, d: int = 4) -> AggregatorContext:
    return AggregatorContext(layout=ParamLayout.of({"w": torch.zeros(d)}), clients_per_round=n, seed=seed)


def info(n: int, rnd: int = 1, examples: Sequence[float] | None = None,
         ids: Sequence[int] | None = None) -> RoundInfo:
    ex = torch.tensor(list(examples) if examples is not None else [1.0] * n)
    return RoundInfo(server_round=rnd, client_ids=tuple(ids) if ids is not None else tuple(range(n)),
                     num_examples=ex)


def rows(seed: int, n: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def check_permutation(make: Callable[[], Aggregator], u: torch.Tensor, seed: int,
                      atol: float = 1e-5) -> tuple[Aggregate, Aggregate, torch.Tensor]:
    """A fresh rule from `make` on `u` and on its rows permuted: the same update, and the suspicion
    permuted with the rows. Returns both aggregates and the permutation for further checks."""
    n = u.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = make()(u, info(n)), make()(u[perm], info(n))
    assert torch.allclose(a.update, b.update, atol=atol)
    if a.suspicion is not None:
        assert torch.allclose(a.suspicion[perm].double(), b.suspicion.double(), atol=10 * atol)
    return a, b, perm
