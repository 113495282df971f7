"""Which clients train in a round: a seeded draw over partition ids, reproducible across runs.

Flower's own sampling (`FedAvg.configure_train`) draws node ids with Python's unseeded `random`,
and node ids are random per run, so two runs of one experiment would train different clients.
`RoundSampler` draws partitions instead, from (seed, round) alone; the Flower wrapper
(`strategies.flower.RobustFedAvg`) then sends to the nodes holding them.

`attackers_per_round` fixes how many of the sampled clients are malicious (papers differ: random
sampling vs a fixed attacker count per round changes results). That uses the ground truth of who
is malicious, which only the simulation's server code knows: it is part of the experiment's
design, like the attackers' ratio, and no defense ever sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.errors import ConfigError
from lab.task import generator


@dataclass(frozen=True)
class RoundSampler:
    """Draws `size` of the partitions 0..num_clients-1 per round, `attackers` of them from
    `malicious` when that is set (None: attackers are drawn like everyone)."""

    num_clients: int
    size: int
    seed: int
    malicious: frozenset[int] = frozenset()
    attackers: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.size <= self.num_clients:
            raise ConfigError(f"federated.clients_per_round: {self.size} of {self.num_clients} clients")
        if self.attackers is None:
            return
        bad, good = len(self.malicious), self.num_clients - len(self.malicious)
        if not 0 <= self.attackers <= min(self.size, bad) or self.size - self.attackers > good:
            raise ConfigError(f"federated.attackers_per_round: {self.attackers} attackers in rounds of "
                              f"{self.size} cannot be drawn from {bad} malicious and {good} honest clients")

    @property
    def everyone(self) -> bool:
        """Every client trains in every round (no draw needed)."""
        return self.size == self.num_clients

    def partitions(self, server_round: int) -> list[int]:
        """The round's partitions, ascending; a pure function of the fields and `server_round`."""
        if self.everyone:
            return list(range(self.num_clients))
        gen = generator(self.seed, server_round, "client-sampling")
        if self.attackers is None:
            return sorted(torch.randperm(self.num_clients, generator=gen)[: self.size].tolist())
        bad = sorted(self.malicious)
        good = sorted(set(range(self.num_clients)) - self.malicious)
        picked = [bad[i] for i in torch.randperm(len(bad), generator=gen)[: self.attackers].tolist()]
        picked += [good[i] for i in torch.randperm(len(good), generator=gen)[: self.size - self.attackers].tolist()]
        return sorted(picked)
