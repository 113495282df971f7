"""lab.data partitions on the embedded digits data: pure functions of (labels, config, seed).

A client in simulation and a SuperNode in deployment must hold the same samples for the same
partition-id and seed, so determinism is checked with the caches cleared (a cache hit would make
the check vacuous); disjointness and coverage are checked as exact set properties.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lab import data
from lab.config import DatasetConfig, FederatedConfig
from lab.data import load_data, malicious_partitions, partition_indices
from lab.errors import DataError

N = 10


@pytest.fixture(scope="module")
def labels() -> Tensor:
    return load_data(DatasetConfig(), 0).train.y  # (1294,) digits labels 0..9


def fed(scheme: str = "iid", alpha: float = 0.5) -> FederatedConfig:
    return FederatedConfig(num_clients=N, partitioning=scheme, dirichlet_alpha=alpha)


def all_parts(labels: Tensor, cfg: FederatedConfig, seed: int) -> list[Tensor]:
    return [partition_indices(labels, i, N, cfg, seed) for i in range(N)]


def dominant_share(labels: Tensor, parts: list[Tensor]) -> float:
    """Mean over non-empty partitions of the largest class's share of the partition."""
    counts = [torch.bincount(labels[p], minlength=10) for p in parts if len(p)]
    shares = [float(c.max() / c.sum()) for c in counts]
    return sum(shares) / len(shares)


def test_load_data_splits_are_seeded() -> None:
    load_data.cache_clear()
    a = load_data(DatasetConfig(), 3)
    load_data.cache_clear()
    b = load_data(DatasetConfig(), 3)
    c = load_data(DatasetConfig(), 4)
    assert a is not b and torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.y, c.train.y)
    # 1,797 images: round(0.2 * 1797) = 359 test, round(0.1 * 1438) = 144 server, 1294 train.
    assert (len(a.train), len(a.test), len(a.server)) == (1294, 359, 144)
    assert a.train.x.shape[1:] == (1, 28, 28) and a.train.x.dtype == torch.float32


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_train(labels: Tensor, scheme: str) -> None:
    parts = all_parts(labels, fed(scheme), seed=1)
    every = torch.cat(parts)
    assert all(p.dtype == torch.int64 for p in parts)
    assert len(every) == len(labels)  # no index twice ...
    assert torch.equal(every.sort().values, torch.arange(len(labels)))  # ... and none left out


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_deterministic_per_seed(labels: Tensor, scheme: str) -> None:
    first = all_parts(labels, fed(scheme), seed=7)
    data._partitions.cache_clear()  # recompute from scratch, as another process would
    again = all_parts(labels, fed(scheme), seed=7)
    other = all_parts(labels, fed(scheme), seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_iid_partitions_are_balanced_and_mixed(labels: Tensor) -> None:
    parts = all_parts(labels, fed("iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # 1294 = 4 * 130 + 6 * 129
    for p in parts:
        assert (torch.bincount(labels[p], minlength=10) > 0).all()
    assert dominant_share(labels, parts) < 0.2  # ~0.1 for uniform classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_dirichlet_alpha_skews_label_histograms(labels: Tensor, seed: int) -> None:
    skewed = all_parts(labels, fed("dirichlet", alpha=0.05), seed)
    near_iid = all_parts(labels, fed("dirichlet", alpha=100.0), seed)
    classes = [int((torch.bincount(labels[p], minlength=10) > 0).sum()) for p in skewed if len(p)]
    assert dominant_share(labels, skewed) > 0.4  # measured 0.64 for seed 1
    assert sum(classes) / len(classes) < 7
    assert dominant_share(labels, near_iid) < 0.2  # measured 0.12 for seed 1


@pytest.mark.parametrize("pid", [-1, N, N + 5])
def test_bad_partition_id_is_dataerror(labels: Tensor, pid: int) -> None:
    with pytest.raises(DataError, match=rf"partition-id {pid} is outside 0\.\.{N - 1}"):
        partition_indices(labels, pid, N, fed(), 0)


def test_malicious_partitions() -> None:
    chosen = malicious_partitions(10, 0.3, seed=0)
    assert chosen == malicious_partitions(10, 0.3, seed=0)
    assert len(chosen) == 3 and len(set(chosen)) == 3
    assert list(chosen) == sorted(chosen) and all(0 <= c < 10 for c in chosen)
    assert len({malicious_partitions(10, 0.3, seed=s) for s in range(5)}) > 1
    assert malicious_partitions(10, 0.0, seed=0) == ()
    assert malicious_partitions(10, 1.0, seed=0) == tuple(range(10))
    assert len(malicious_partitions(20, 0.25, seed=1)) == 5  # round(0.25 * 20)
