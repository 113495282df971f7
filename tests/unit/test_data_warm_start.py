"""The data path without its heavy imports (issue 15, warm start): the same digits and the same IID
partitions as scikit-learn and flwr-datasets give, and neither library imported to get them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lab import data

ROOT = Path(__file__).resolve().parents[2]


def hf_iid(n: int, num_partitions: int, seed: int) -> tuple[tuple[int, ...], ...]:
    """The oracle: what lab/data.py did before, through `datasets` and flwr-datasets."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    table = Dataset.from_dict({"index": list(range(n)), "label": [0] * n}).shuffle(seed=seed)
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = table
    return tuple(tuple(partitioner.load_partition(i)["index"]) for i in range(num_partitions))


def test_digits_are_exactly_scikit_learns() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, target = data._digits()
    assert images.dtype == bunch.images.dtype and np.array_equal(images, bunch.images)
    assert np.array_equal(target, bunch.target)


@pytest.mark.parametrize(("n", "parts", "seed"), [(10, 3, 0), (1437, 10, 0), (1437, 7, 3), (5, 5, 1), (100, 1, 2),
                                                    (58800, 100, 0)])
def test_iid_partitions_are_exactly_flwr_datasets(n: int, parts: int, seed: int) -> None:
    assert data._iid_partitions(n, parts, seed) == hf_iid(n, parts, seed)


def test_loading_digits_and_iid_partitions_imports_neither_library() -> None:
    code = (
        "import sys\n"
        "from lab.config import load_experiment\n"
        "from lab.data import load_data, partition_indices\n"
        "cfg = load_experiment('experiments/no-attack.yaml')\n"
        "d = load_data(cfg.dataset, cfg.seed)\n"
        "partition_indices(d.train.y, 0, 10, cfg.federated, cfg.seed)\n"
        "print(sorted(m for m in ('sklearn', 'datasets', 'flwr_datasets') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]"
