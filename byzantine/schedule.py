"""Which malicious clients act in a round: the attack window and the behaviour rate.

The ClientApp (partial knowledge) and the server-side colluding adversary (full knowledge) ask
the same question, so the answer lives here, below both.
"""

from __future__ import annotations

import torch

from lab.config import ExperimentConfig
from lab.task import generator


def attacks_this_round(cfg: ExperimentConfig, partition_id: int, server_round: int) -> bool:
    """Start/end rounds and the malicious behaviour rate (a seeded coin per round and client)."""
    a = cfg.attack
    if server_round < a.start_round or (a.end_round is not None and server_round > a.end_round):
        return False
    if a.malicious_behavior_rate >= 1.0:
        return True
    coin = generator(cfg.seed, server_round, partition_id, "behave")
    return bool(torch.rand(1, generator=coin) < a.malicious_behavior_rate)
