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
    data.clear_partition_caches()  # recompute from scratch, as another process would
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


# --- the "bias" split of FLTrust / Fang et al. (federated.partitioning: bias, federated.bias_h) ---


def bias(h: float = 0.5) -> FederatedConfig:
    return FederatedConfig(num_clients=N, partitioning="bias", bias_h=h)


def test_bias_hand_checkable_with_h_one() -> None:
    # h = 1: every example stays in its label's group; 10 clients = 10 groups of one client each.
    labels = torch.tensor([3, 1, 3, 0, 9, 1])
    parts = data.bias_partitions(labels, 10, 1.0, seed=0)
    assert [p.tolist() for p in parts] == [[3], [1, 5], [], [0, 2], [], [], [], [], [], [4]]


def test_bias_h_one_gives_each_group_only_its_label() -> None:
    labels = torch.arange(1000) % 10
    parts = data.bias_partitions(labels, 20, 1.0, seed=3)  # groups {0,1}, {2,3}, ... {18,19}
    for client, p in enumerate(parts):
        assert len(p) > 0 and set(labels[p].tolist()) == {client // 2}


def test_bias_h_zero_keeps_no_example_in_its_own_group() -> None:
    labels = torch.arange(1000) % 10
    parts = data.bias_partitions(labels, 10, 0.0, seed=3)
    for group, p in enumerate(parts):
        assert group not in set(labels[p].tolist())


def test_client_groups_split_evenly_and_say_where_the_remainder_goes() -> None:
    assert data.client_groups(100, 10) == [range(10 * g, 10 * g + 10) for g in range(10)]
    # 15 clients, 10 groups: the first 5 groups get 2 clients, the others 1.
    assert [len(g) for g in data.client_groups(15, 10)] == [2] * 5 + [1] * 5
    assert [c for g in data.client_groups(15, 10) for c in g] == list(range(15))
    with pytest.raises(DataError, match="one client per group"):
        data.client_groups(9, 10)


@pytest.mark.parametrize(("num", "h"), [(10, 0.5), (15, 0.5), (20, 0.0), (30, 1.0)])
def test_bias_partitions_are_disjoint_cover_and_are_seeded(labels: Tensor, num: int, h: float) -> None:
    parts = data.bias_partitions(labels, num, h, seed=1)
    every = torch.cat(parts)
    assert len(every) == len(labels) and torch.equal(every.sort().values, torch.arange(len(labels)))
    again = data.bias_partitions(labels, num, h, seed=1)
    other = data.bias_partitions(labels, num, h, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert h == 1.0 or not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_bias_through_partition_indices_matches_and_is_deterministic(labels: Tensor) -> None:
    first = all_parts(labels, bias(0.5), seed=7)
    data.clear_partition_caches()  # recompute, as another process would
    assert all(torch.equal(a, b) for a, b in zip(first, all_parts(labels, bias(0.5), seed=7)))
    assert all(torch.equal(a, b) for a, b in zip(first, data.bias_partitions(labels, N, 0.5, 7)))
    assert data.partition_sizes(labels, N, bias(0.5), 7) == tuple(len(p) for p in first)


@pytest.mark.parametrize("h", [0.1, 0.5, 0.8])
def test_bias_group_label_share_is_close_to_h_on_large_data(h: float) -> None:
    labels = torch.randint(0, 10, (60_000,), generator=torch.Generator().manual_seed(0))
    parts = data.bias_partitions(labels, 100, h, seed=0)
    groups = data.client_groups(100, 10)
    own = sum(int((labels[parts[c]] == g).sum()) for g, members in enumerate(groups) for c in members)
    share = own / len(labels)  # binomial: std sqrt(h(1-h)/60000) <= 0.002
    assert abs(share - h) < 0.01
    # The other labels spread evenly over the other groups: each (1 - h) / 9 of a label.
    counts = torch.zeros(10, 10)  # (group, label)
    for g, members in enumerate(groups):
        for c in members:
            counts[g] += torch.bincount(labels[parts[c]], minlength=10)
    frac = counts / counts.sum(dim=0, keepdim=True)  # share of each label per group
    off = frac[~torch.eye(10, dtype=torch.bool)]
    assert (off - (1 - h) / 9).abs().max() < 0.02


def test_a_partition_is_computed_once_per_labels_tensor_and_handed_out_as_a_copy(labels: Tensor) -> None:
    data.clear_partition_caches()
    first = partition_indices(labels, 3, N, bias(0.5), 7)
    first[:] = -1  # a caller's own copy: the cache is untouched
    again = partition_indices(labels, 3, N, bias(0.5), 7)
    assert bool((again >= 0).all()) and torch.equal(again, data.bias_partitions(labels, N, 0.5, 7)[3])
    twin = labels.clone()  # equal labels, another tensor: its own entry, the same split
    assert torch.equal(partition_indices(twin, 3, N, bias(0.5), 7), again)
    assert len(data._SPLITS) == 2


def test_a_partitions_images_are_copied_once_per_split_and_within_the_byte_cap(
        monkeypatch: pytest.MonkeyPatch) -> None:
    train = load_data(DatasetConfig(), 0).train
    data.clear_partition_caches()
    first = data.partition_split(train, 3, N, bias(0.5), 7)
    want = train.subset(partition_indices(train.y, 3, N, bias(0.5), 7))
    assert torch.equal(first.x, want.x) and torch.equal(first.y, want.y)
    assert data.partition_split(train, 3, N, bias(0.5), 7) is first  # kept: the next round copies nothing
    assert data.partition_split(train, 3, N, bias(0.9), 7) is not first  # another split setting
    monkeypatch.setattr(data, "MAX_KEPT_PARTITION_BYTES", first.x.nbytes // 2)
    data.clear_partition_caches()
    one, two = (data.partition_split(train, 4, N, bias(0.5), 7) for _ in range(2))
    assert one is not two and torch.equal(one.x, two.x)  # over the cap: a fresh copy each time
