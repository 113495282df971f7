"""Datasets as in-memory tensors, the server's held-out clean set, and client partitions.

Images are float32 in [0, 1], shaped (N, C, H, W); normalisation lives inside the models, so
triggers are stamped and reconstructions are scored in pixel space. Everything here is a pure
function of the config and the seed: a client in simulation and a SuperNode in deployment that
share `partition-id`, `num-partitions` and the seed hold exactly the same samples.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lab.config import DatasetConfig, FederatedConfig
from lab.errors import DataError
from lab.split import Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataBundle:
    train: Split  # what the clients partition among themselves
    test: Split  # central evaluation
    server: Split  # the server's held-out clean set (FLTrust root set, unlearning)
    num_classes: int
    mean: tuple[float, ...]  # per channel, of the training images (used by the models)
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


RawLoader = Callable[[DatasetConfig], tuple[Split, Split | None]]


def _load_digits(cfg: DatasetConfig) -> tuple[Split, Split | None]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images; ships in the wheel)."""
    images, target = _digits()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    size = cfg.image_size or 28
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return Split(x, torch.tensor(target, dtype=torch.int64)), None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64, labels (1797,)) exactly as `sklearn.datasets.load_digits` gives
    them, read from its `digits.csv.gz` the way it reads it, but without importing scikit-learn:
    that import costs 1-2.5 s in each process that loads the data (the ServerApp and every Ray
    actor of every run; bench/warm_start.py). Falls back to `load_digits` if the file moved."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(roots[0]) / "datasets" / "data" / "digits.csv.gz" if roots else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")  # (1797, 65): 64 pixels, then the label
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def _torchvision(name: str) -> RawLoader:
    def load(cfg: DatasetConfig) -> tuple[Split, Split | None]:
        from lab import torchvision_data

        return torchvision_data.load(name, cfg)

    return load


LOADERS: dict[str, RawLoader] = {
    "digits": _load_digits,
    "mnist": _torchvision("mnist"),
    "fashion-mnist": _torchvision("fashion-mnist"),
    "emnist-digits": _torchvision("emnist-digits"),
    "cifar10": _torchvision("cifar10"),
}


@functools.lru_cache(maxsize=2)
def load_data(cfg: DatasetConfig, seed: int) -> DataBundle:
    """Train / test / server splits for `cfg`, deterministic for `seed`.

    Datasets with an official test split keep it; digits (one pool) is split with
    `cfg.test_fraction`. The server set is `cfg.server_fraction` of the training pool. The
    result is cached per process (two entries) because a Ray actor or a long-lived
    SuperNode calls this once per round with the same arguments.

    Raises:
        DataError: when the dataset cannot be found or read.
    """
    if cfg.name not in LOADERS:
        raise DataError(f"unknown dataset {cfg.name!r}; known: {sorted(LOADERS)}")
    pool, test = LOADERS[cfg.name](cfg)
    gen = torch.Generator().manual_seed(seed)
    if test is None:
        order = torch.randperm(len(pool), generator=gen)
        n_test = int(round(cfg.test_fraction * len(pool)))
        test, pool = pool.subset(order[:n_test]), pool.subset(order[n_test:])
    order = torch.randperm(len(pool), generator=gen)
    n_server = int(round(cfg.server_fraction * len(pool)))
    server, train = pool.subset(order[:n_server]), pool.subset(order[n_server:])
    dims = [0, 2, 3]
    mean = tuple(float(v) for v in train.x.mean(dim=dims))
    std = tuple(max(float(v), 1e-3) for v in train.x.std(dim=dims))
    return DataBundle(train, test, server, num_classes=10, mean=mean, std=std)


def partition_indices(
    labels: Tensor, partition_id: int, num_partitions: int, fed: FederatedConfig, seed: int,
    num_classes: int = 10,
) -> Tensor:
    """Indices of the training samples held by `partition_id`.

    IID or Dirichlet(alpha)-by-label through flwr-datasets partitioners, over a small
    `datasets.Dataset` of (index, label) so only indices travel, never images; or the "bias" split
    of FLTrust and Fang et al. (`bias_partitions`, `num_classes` client groups).
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if num_partitions > len(labels):
        raise DataError(f"{num_partitions} partitions but only {len(labels)} training samples")
    return _split_of(labels, num_partitions, fed, seed, num_classes)[partition_id].clone()


# The split of one labels tensor, per split setting, kept while that tensor lives (the split's only
# cache): a cohort worker asks for a partition per client, and keying a cache on 60,000 labels cost
# about 1 ms a time (bench/RESULTS.md, issue 15). Keyed by the tensor's identity, checked through a
# weak reference, so a new tensor that reuses a dead one's id starts afresh.
_SPLITS: dict[int, tuple[weakref.ref[Tensor], dict[tuple[object, ...], tuple[Tensor, ...]]]] = {}


def clear_partition_caches() -> None:
    """Forget every split computed in this process (tests: recompute as another process would)."""
    _SPLITS.clear()
    _KEPT.clear()


def _split_of(labels: Tensor, num_partitions: int, fed: FederatedConfig, seed: int,
              num_classes: int) -> tuple[Tensor, ...]:
    entry = _SPLITS.get(id(labels))
    if entry is None or entry[0]() is not labels:
        entry = (weakref.ref(labels), {})
        _SPLITS[id(labels)] = entry
    setting = (num_partitions, fed.partitioning, fed.bias_h, fed.dirichlet_alpha, fed.dirichlet_balance, seed,
               num_classes)
    if setting not in entry[1]:
        if fed.partitioning == "bias":
            parts = bias_partitions(labels, num_partitions, fed.bias_h, seed, num_classes)
        else:
            rows = _partitions(tuple(labels.tolist()), num_partitions, fed.partitioning, fed.dirichlet_alpha, seed,
                               fed.dirichlet_balance)
            parts = [torch.tensor(p, dtype=torch.int64) for p in rows]
        entry[1][setting] = tuple(parts)
    return entry[1][setting]


# A worker trains the same clients round after round: their images are copied out of the training
# set once and kept (as the compute floor keeps them, bench/plain_fedavg/plainapp/floor.py), not
# once per client per round (~1 ms each at 600 Fashion-MNIST images, bench/RESULTS.md, issue 15),
# up to this many bytes per process; past it a partition is copied afresh each time.
MAX_KEPT_PARTITION_BYTES = 512 << 20
_KEPT: dict[int, tuple[weakref.ref[Tensor], dict[tuple[object, ...], Split]]] = {}


def partition_split(split: Split, partition_id: int, num_partitions: int, fed: FederatedConfig, seed: int,
                    num_classes: int = 10) -> Split:
    """`split.subset(partition_indices(split.y, ...))`, kept for the life of `split` (within
    `MAX_KEPT_PARTITION_BYTES` per process). Callers must not write into it: it is shared by
    every round of that client in this process."""
    entry = _KEPT.get(id(split.x))
    if entry is None or entry[0]() is not split.x:
        for dead in [k for k, (ref, _) in _KEPT.items() if ref() is None]:
            del _KEPT[dead]
        entry = (weakref.ref(split.x), {})
        _KEPT[id(split.x)] = entry
    key = (id(split.y), partition_id, num_partitions, fed.partitioning, fed.bias_h, fed.dirichlet_alpha,
           fed.dirichlet_balance, seed, num_classes)
    if key in entry[1]:
        return entry[1][key]
    part = split.subset(partition_indices(split.y, partition_id, num_partitions, fed, seed, num_classes))
    kept = sum(p.x.nbytes + p.y.nbytes for e in _KEPT.values() for p in e[1].values())
    if kept + part.x.nbytes + part.y.nbytes <= MAX_KEPT_PARTITION_BYTES:
        entry[1][key] = part
    return part


def partition_sizes(labels: Tensor, num_partitions: int, fed: FederatedConfig, seed: int,
                    num_classes: int = 10) -> tuple[int, ...]:
    """How many training samples each partition holds (the same split as `partition_indices`)."""
    return tuple(len(partition_indices(labels, i, num_partitions, fed, seed, num_classes))
                 for i in range(num_partitions))


def client_groups(num_partitions: int, num_groups: int) -> list[range]:
    """The bias split's client groups: contiguous ranges of partition ids, as even as possible.

    When `num_groups` does not divide `num_partitions`, the first `num_partitions % num_groups`
    groups get one client more (10 groups of 10 for FLTrust's 100 clients).
    """
    if num_partitions < num_groups:
        raise DataError(f"the bias split needs one client per group: {num_partitions} clients, "
                        f"{num_groups} groups")
    base, extra = divmod(num_partitions, num_groups)
    starts = [g * base + min(g, extra) for g in range(num_groups + 1)]
    return [range(starts[g], starts[g + 1]) for g in range(num_groups)]


def bias_partitions(labels: Tensor, num_partitions: int, h: float, seed: int,
                    num_classes: int = 10) -> list[Tensor]:
    """FLTrust's non-IID "bias" split (Cao et al., NDSS 2021; Fang et al., USENIX Security 2020).

    The clients form `num_classes` groups (`client_groups`). A training example of label l goes
    to group l with probability `h`, otherwise to one of the other groups uniformly, then
    uniformly to one client of that group. h = 1 gives each group only its own label; h = 1 /
    num_classes is IID in distribution. Every example goes to exactly one client; the draw is a
    pure function of (labels, num_partitions, h, seed). Returns each partition's indices, ascending.
    """
    y = labels.numpy().astype(np.int64)  # (N,)
    if len(y) and not (0 <= y.min() and y.max() < num_classes):
        raise DataError(f"labels outside [0, {num_classes}) for the bias split")
    groups = client_groups(num_partitions, num_classes)
    rng = np.random.default_rng([seed, 0xB1A5])
    stay = rng.random(len(y)) < h  # (N,) keeps its own group
    other = (y + rng.integers(1, num_classes, size=len(y))) % num_classes  # uniform over the other groups
    group = np.where(stay, y, other)  # (N,)
    start = np.array([g.start for g in groups])
    size = np.array([len(g) for g in groups])
    client = start[group] + np.floor(rng.random(len(y)) * size[group]).astype(np.int64)  # (N,)
    order = np.argsort(client, kind="stable")  # indices grouped by client, ascending within each
    bounds = np.searchsorted(client[order], np.arange(num_partitions + 1))
    return [torch.from_numpy(order[bounds[i]:bounds[i + 1]].copy()) for i in range(num_partitions)]


def _partitions(
    labels: tuple[int, ...], num_partitions: int, scheme: str, alpha: float, seed: int, balance: bool = True
) -> tuple[tuple[int, ...], ...]:
    if scheme == "iid":
        return _iid_partitions(len(labels), num_partitions, seed)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    table = Dataset.from_dict({"index": list(range(len(labels))), "label": list(labels)})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=alpha,
        min_partition_size=0, self_balancing=balance, shuffle=True, seed=seed,
    )
    partitioner.dataset = table
    return tuple(tuple(partitioner.load_partition(i)["index"]) for i in range(num_partitions))


def _iid_partitions(n: int, num_partitions: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """flwr-datasets' IidPartitioner over the rows shuffled once with `datasets.Dataset.shuffle(seed=seed)`
    (so partitions mix classes), the same indices without importing either library (2-3 s in each Ray
    actor, and 4 s of table work for Fashion-MNIST; bench/warm_start.py): the shuffle is
    `np.random.default_rng(seed).permutation`, the partitioner takes contiguous shards
    (`Dataset.shard(contiguous=True)`: the first n % num_partitions shards get one row more).
    tests/unit/test_data_warm_start.py checks both against the libraries."""
    order = np.random.default_rng(seed).permutation(n)  # (n,)
    div, mod = divmod(n, num_partitions)
    starts = [div * i + min(i, mod) for i in range(num_partitions + 1)]
    return tuple(tuple(order[starts[i]:starts[i + 1]].tolist()) for i in range(num_partitions))


def malicious_partitions(num_clients: int, ratio: float, seed: int) -> tuple[int, ...]:
    """Which partitions attack in simulation: round(ratio * num_clients) of them, chosen by seed."""
    k = int(round(ratio * num_clients))
    rng = np.random.default_rng(seed)
    return tuple(sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False)))
