"""Our Krum, Multi-Krum, median, trimmed mean and Bulyan against the pinned Flower's built-ins.

Flower aggregates full weights, so each client i replies global + U_i and we compare
(Flower's result - global) with our update on U. Conventions read from flwr/serverapp/strategy/:
- Krum / MultiKrum: n - f - 2 neighbours (floored at 1); the selected replies are averaged
  weighted by num-examples. We match with `weighted=True`; our default is unweighted
  (num-examples is client-reported), tested with equal counts.
- FedMedian: np.median (mean of the two middle values for even n), as ours.
- FedTrimmedAvg: int(beta * n) per tail, unweighted mean, as ours.
- Bulyan: one-shot Multi-Krum selection of theta = n - 2f, then the beta = theta - 2f values
  closest to the median: our default `selection="multi-krum"`. Our `selection="recursive"` is the
  paper's recursive Krum and can select differently (intended difference, checked below).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402  (internal; see notes/flower.md 6)

from strategies.robust import bulyan, coordinate_median, krum, multi_krum, trimmed_mean  # noqa: E402
from strategies.types import RoundInfo  # noqa: E402

SHAPES = {"conv.weight": (2, 3), "conv.bias": (3,), "fc.weight": (4, 2)}  # d = 17


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    logging.getLogger("flwr").setLevel(logging.WARNING)


def replies(global_flat: np.ndarray, updates: np.ndarray, examples: list[int]) -> list[Message]:
    instr = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    out = []
    for row, ex in zip(updates, examples):
        w = global_flat + row
        arrays, off = {}, 0
        for key, shape in SHAPES.items():
            size = int(np.prod(shape))
            arrays[key] = Array(w[off : off + size].reshape(shape).astype(np.float32))
            off += size
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": ex})})
        out.append(Message(content=content, reply_to=instr))
    return out


def flower_delta(strategy, global_flat: np.ndarray, updates: np.ndarray, examples: list[int]) -> torch.Tensor:
    arrays, _ = strategy.aggregate_train(1, replies(global_flat, updates, examples))
    assert arrays is not None
    flat = np.concatenate([arrays[k].numpy().reshape(-1) for k in SHAPES])
    return torch.from_numpy(flat.astype(np.float64) - global_flat.astype(np.float64))


def case(n: int, seed: int, outliers: int = 0) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(17).astype(np.float32)
    u = (0.1 * rng.standard_normal((n, 17))).astype(np.float32)
    u[:outliers] += 3.0  # well separated, so the float32 round trip through weights cannot flip a choice
    return g, u, torch.from_numpy(u)


def rinfo(n: int, examples: list[int]) -> RoundInfo:
    return RoundInfo(server_round=1, client_ids=tuple(range(n)), num_examples=torch.tensor(examples, dtype=torch.float32))


TOL = 1e-6


@pytest.mark.parametrize("n,f,seed", [(5, 1, 0), (8, 2, 1), (12, 3, 2)])
def test_krum_matches_flower(n: int, f: int, seed: int) -> None:
    g, u, ut = case(n, seed, outliers=f)
    ex = [10] * n
    ours = krum(ut, rinfo(n, ex), num_byzantine=f).update.double()
    assert torch.allclose(ours, flower_delta(Krum(num_malicious_nodes=f), g, u, ex), atol=TOL)


@pytest.mark.parametrize("n,f,m,seed", [(6, 1, 3, 0), (10, 2, 6, 1), (12, 3, 9, 2)])
def test_multi_krum_matches_flower_weighted(n: int, f: int, m: int, seed: int) -> None:
    g, u, ut = case(n, seed, outliers=f)
    ex = list(range(3, 3 + n))
    ours = multi_krum(ut, rinfo(n, ex), num_byzantine=f, num_selected=m, weighted=True).update.double()
    theirs = flower_delta(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), g, u, ex)
    assert torch.allclose(ours, theirs, atol=TOL)
    # our default (unweighted, m = n - f) equals Flower's with equal num-examples and m = n - f
    eq = [5] * n
    ours = multi_krum(ut, rinfo(n, eq), num_byzantine=f).update.double()
    theirs = flower_delta(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=n - f), g, u, eq)
    assert torch.allclose(ours, theirs, atol=TOL)


@pytest.mark.parametrize("n,seed", [(3, 0), (4, 1), (7, 2), (10, 3)])
def test_median_matches_flower(n: int, seed: int) -> None:
    g, u, ut = case(n, seed, outliers=1)
    ex = [1] * n
    ours = coordinate_median(ut, rinfo(n, ex)).update.double()
    assert torch.allclose(ours, flower_delta(FedMedian(), g, u, ex), atol=TOL)


@pytest.mark.parametrize("n,beta,seed", [(5, 0.2, 0), (10, 0.2, 1), (10, 0.1, 2), (9, 0.34, 3), (4, 0.0, 4)])
def test_trimmed_mean_matches_flower(n: int, beta: float, seed: int) -> None:
    g, u, ut = case(n, seed, outliers=1)
    ex = [1] * n
    ours = trimmed_mean(ut, rinfo(n, ex), beta=beta).update.double()
    assert torch.allclose(ours, flower_delta(FedTrimmedAvg(beta=beta), g, u, ex), atol=TOL)


@pytest.mark.parametrize("n,f,seed", [(7, 1, 0), (11, 2, 1), (16, 3, 2)])
def test_bulyan_matches_flower(n: int, f: int, seed: int) -> None:
    g, u, ut = case(n, seed, outliers=f)
    ex = [1] * n
    ours = bulyan(ut, rinfo(n, ex), num_byzantine=f).update.double()
    assert torch.allclose(ours, flower_delta(Bulyan(num_malicious_nodes=f), g, u, ex), atol=TOL)


def test_bulyan_recursive_is_an_intended_difference() -> None:
    # Recursive Krum (the paper's option) rescores on the shrinking set with |R| - f - 2 neighbours:
    # near the end (|R| = 2f + 1 .. 2f + 2) that is a single neighbour, so two colluders that are
    # each other's nearest neighbour can get picked. One-shot Multi-Krum (Flower, our default)
    # scores once with n - f - 2 neighbours and drops them. Here the two differ on purpose.
    n, f = 11, 2
    g, u, ut = case(n, 5, outliers=f)
    rec = bulyan(ut, rinfo(n, [1] * n), num_byzantine=f, selection="recursive")
    one = bulyan(ut, rinfo(n, [1] * n), num_byzantine=f)
    assert rec.kept is not None and one.kept is not None
    assert not one.kept[:f].any()
    assert rec.kept[:f].any()
    assert torch.allclose(one.update.double(), flower_delta(Bulyan(num_malicious_nodes=f), g, u, [1] * n), atol=TOL)
