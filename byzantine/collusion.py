"""The full-knowledge adversary (`attack.knowledge: full`): experiment harness, simulation only.

A colluding adversary that is handed the round's benign updates cannot exist in a real deployment
(the lab's clients have no channel to each other's updates), so it runs on the server side of the
simulation, as a hook between building the update matrix and the aggregator: it replaces the rows
of the malicious partitions that act this round with the attack's output. It uses the ground truth
(which partitions are malicious) to do so; the aggregator gets only the matrix, as always, and
never learns which rows were replaced. `fl-lab deploy run` refuses full knowledge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from byzantine.registry import MatrixAttack, build_matrix_attack, rule_byzantine
from byzantine.schedule import attacks_this_round
from lab.config import ExperimentConfig
from lab.task import generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Colluder:
    """Replaces the acting malicious rows of an update matrix with `attack(benign, own, gen)`.

    Args:
        attack: the update-matrix attack.
        malicious: the malicious partitions (ground truth of the simulation).
        active: (partition, round) -> does that attacker act this round.
        seed: the experiment seed (the attack's generator is derived from it and the round).
        name: for the log.
    """

    attack: MatrixAttack
    malicious: frozenset[int]
    active: Callable[[int, int], bool]
    seed: int
    name: str = "attack"

    def __call__(self, updates: Tensor, client_ids: Sequence[int], server_round: int) -> Tensor:
        """`updates` (n, d), row i from partition client_ids[i]; returns it with the acting
        malicious rows replaced (in place). Rows of malicious partitions that do not act this
        round stay as sent and count as known honest updates.

        Raises:
            ValueError: the row count and `client_ids` disagree, or the attack's own precondition
                fails (validation checks those before the run, for the worst round).
        """
        if updates.shape[0] != len(client_ids):
            raise ValueError(f"colluder: {updates.shape[0]} rows but {len(client_ids)} client ids")
        acting = torch.tensor([c in self.malicious and self.active(c, server_round) for c in client_ids],
                              dtype=torch.bool)  # (n,)
        if not bool(acting.any()):
            return updates
        if bool(acting.all()):
            log.warning("round %d: every row is malicious; no benign update to attack with (%s): rows left "
                        "as sent", server_round, self.name)
            return updates
        benign, own = updates[~acting], updates[acting]  # copies: (k, d), (m, d)
        updates[acting] = self.attack(benign, own, generator(self.seed, server_round, "collude")).to(updates.dtype)
        log.info("round %d: colluding adversary (%s, full knowledge) replaced the rows of partitions %s",
                 server_round, self.name, [c for c, a in zip(client_ids, acting.tolist()) if a])
        return updates


def build_colluder(cfg: ExperimentConfig, malicious: frozenset[int]) -> Colluder | None:
    """The colluding adversary when `attack.knowledge` resolves to full, else None."""
    if cfg.attack.resolved_knowledge != "full":
        return None
    return Colluder(build_matrix_attack(cfg.attack, rule_byzantine(cfg)), frozenset(malicious),
                    lambda partition, rnd: attacks_this_round(cfg, partition, rnd), cfg.seed, cfg.attack.type)
