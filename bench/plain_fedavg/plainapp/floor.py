"""The compute floor of a FedAvg round: the clients' own work in plain processes, no Flower.

Each client does what the lab's ClientApp does for one round (load the global weights,
`lab.task.train_local` on its partition, the flat update client - global); a pool of one-thread
worker processes shares the clients, each returning the sum of its clients' updates (so the floor
pays no per-client transfer), and the server takes the plain mean. bench/round_time.py sizes the
pool like the lab's simulation (`floor_workers`).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from torch import Tensor

from lab.config import ExperimentConfig
from lab.data import load_data, partition_indices
from lab.records import ParamLayout
from lab.split import Split
from lab.task import (
    LocalHyperparams,
    build_for,
    generator,
    load_state,
    set_threads,
    state_of,
    train_local,
    usable_cores,
)


class FloorWorker:
    """One pool process: the data, the model and each client's partition, built once."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        set_threads(1)
        self.cfg = cfg
        self.data = load_data(cfg.dataset, cfg.seed)
        self.model = build_for(cfg, self.data)
        self.hp = LocalHyperparams.of(cfg)
        self.parts: dict[int, Split] = {}

    def local(self, pid: int) -> Split:
        # Built on first use: round 1 pays it, and round 1 is not in the statistic.
        if pid not in self.parts:
            n = self.cfg.federated.num_clients
            self.parts[pid] = self.data.train.subset(
                partition_indices(self.data.train.y, pid, n, self.cfg.federated, self.cfg.seed))
        return self.parts[pid]

    def update_sum(self, global_state: dict[str, Tensor], server_round: int, pids: list[int]) -> Tensor:
        """(n_params,) sum of the updates (client - global) of clients `pids`."""
        layout = ParamLayout.of(global_state)
        base = layout.flatten(global_state)
        total = torch.zeros_like(base)
        for pid in pids:
            load_state(self.model, global_state)
            train_local(self.model, self.local(pid), self.hp, generator(self.cfg.seed, server_round, pid, "train"))
            total += layout.flatten(state_of(self.model)) - base
        return total


# A pool's initializer can only hand state to later tasks through the worker process's globals.
_WORKER: FloorWorker | None = None


def _init_worker(cfg: ExperimentConfig) -> None:
    global _WORKER
    _WORKER = FloorWorker(cfg)


def _work(global_state: dict[str, Tensor], server_round: int, pids: list[int]) -> tuple[Tensor, float]:
    """The update sum of `pids`, and the CPU seconds this worker spent on it."""
    assert _WORKER is not None
    started = time.process_time()
    total = _WORKER.update_sum(global_state, server_round, pids)
    return total, time.process_time() - started


def measure_floor(cfg: ExperimentConfig, workers: int) -> dict[str, Any]:
    """`cfg.training.rounds` floor rounds on `workers` processes; `round_s` is the median wall time of
    rounds 2..R (round 1 builds the partitions). `cpu_s` is the median of the workers' CPU seconds
    per round, summed: the clients' work itself, which the load of other programs on a shared
    machine stretches in wall time but not in CPU time; `cpu_s / workers` is what the round would
    take on otherwise idle cores."""
    n, rounds = cfg.federated.num_clients, cfg.training.rounds
    data = load_data(cfg.dataset, cfg.seed)
    state = state_of(build_for(cfg, data, seed=cfg.seed))
    layout = ParamLayout.of(state)
    chunks = [list(range(i, n, workers)) for i in range(workers)]
    times, cpu = [], []
    # spawn, not fork: a forked child inherits torch's thread pools half set up. An executor, not a
    # multiprocessing.Pool: a worker that fails to start breaks it, where a Pool respawns forever.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg,)) as pool:
        list(pool.map(_work, [state] * workers, [0] * workers, [[]] * workers))  # all started
        for rnd in range(1, rounds + 1):
            started = time.perf_counter()
            done = list(pool.map(_work, [state] * workers, [rnd] * workers, chunks))
            mean = torch.stack([d[0] for d in done]).sum(0) / n  # (n_params,) plain mean of the n updates
            state = layout.unflatten(layout.flatten(state) + mean, state)
            times.append(time.perf_counter() - started)
            cpu.append(sum(d[1] for d in done))
    cpu_s = statistics.median(cpu[1:])
    return {"round_s": statistics.median(times[1:]), "workers": workers, "cpu_s": cpu_s,
            "idle_cores_round_s": cpu_s / workers, "cpu_ms_per_client": 1000 * cpu_s / n,
            "round_seconds": [round(t, 3) for t in times], "cpu_seconds": [round(c, 3) for c in cpu]}


def floor_workers(cfg: ExperimentConfig, clients_per_message: int) -> int:
    """How many clients the lab's Ray simulation trains at once, as `commands.launch` sizes it.

    One message per client: Ray runs usable cores // `execution.client_cpus` actors. Cohort
    messages (`clients_per_message` > 1, `lab.cohort`): `execution.workers` nodes (None: the usable
    cores), one actor each.
    """
    if clients_per_message > 1:
        return cfg.execution.workers or usable_cores()
    return max(1, int(usable_cores() // cfg.execution.client_cpus))
