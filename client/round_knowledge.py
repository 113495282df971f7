"""What a backdoor attacker knows in a round beyond its own data, for the 2025 backdoors.

- DBA (Xie et al., ICLR 2020): its rank among the attackers, which picks its part of the trigger.
  In simulation the attackers are `malicious_partitions` (seeded, known to the colluding
  adversary); a deployed node (`malicious=true` in its node config) knows only its partition id,
  and takes part `partition_id mod k`.
- A3FL (Zhang et al., NeurIPS 2023): the global model it received, which its trigger is optimised
  against. Nothing carries over between rounds: the trigger starts from `attack.trigger` each
  round, so it is a function of the round's global model, the attacker's data and the seed.
- Neurotoxin (Zhang et al., ICML 2022): the previous round's change of the global model. A ClientApp
  is called afresh every round, so the node remembers the last global model each of its malicious
  partitions received in its Flower node state (`context.state`, kept by Flower between rounds of a
  run, in simulation and deployment) and the change is global_now - global_then. Until a partition
  has seen two global models (its first round, or a new node) there is no change and Neurotoxin
  sends its update unprojected. An attacker sampled only now and then sees the change since its
  last round, the paper's "attacker sees the global model each round" holds when it is sampled
  every round (the smoke runs: all clients every round).
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, RecordDict
from torch import Tensor, nn

from lab.backdoor_validation import dba_parts
from lab.config import ExperimentConfig
from lab.data import malicious_partitions
from lab.records import ParamLayout
from lab.task import derive_seed

log = logging.getLogger(__name__)
REMEMBERS_GLOBAL = frozenset({"neurotoxin"})


def memory_key(partition_id: int) -> str:
    return f"attack.last-global.{partition_id}"


def global_change(memory: RecordDict, partition_id: int, global_state: dict[str, Tensor]) -> Tensor | None:
    """(d,) flat global_state minus the last global model this partition received here, or None the
    first time; `global_state` is remembered in its place."""
    layout = ParamLayout.of(global_state)
    now = layout.flatten(global_state)
    key = memory_key(partition_id)
    before = memory[key].to_torch_state_dict()["global"] if key in memory else None
    memory[key] = ArrayRecord({"global": now.clone()})
    if before is None or before.shape != now.shape:
        return None
    return now - before


def attacker_rank(cfg: ExperimentConfig, partition_id: int) -> int:
    """This attacker's index among the simulation's attackers (its partition id when it is not one)."""
    attackers = malicious_partitions(cfg.federated.num_clients, cfg.attack.ratios[0], cfg.seed)
    return attackers.index(partition_id) if partition_id in attackers else partition_id


def round_knowledge(cfg: ExperimentConfig, memory: RecordDict, partition_id: int, server_round: int,
                    model: nn.Module, global_state: dict[str, Tensor]) -> dict[str, object]:
    """`AttackSpec`'s round fields for a malicious partition; call it every round the partition
    trains, attacking or not, so Neurotoxin's memory follows the global model. `model` holds the
    global weights (A3FL reads it and leaves it as it is)."""
    a = cfg.attack
    change = global_change(memory, partition_id, global_state) if a.type in REMEMBERS_GLOBAL else None
    if a.type in REMEMBERS_GLOBAL:
        log.debug("partition %d round %d: previous global change %s", partition_id, server_round,
                  "unknown (first round seen)" if change is None else f"norm {float(change.norm()):.4g}")
    return {
        "dba_rank": attacker_rank(cfg, partition_id),
        "dba_parts": dba_parts(cfg, a.ratios[0]),
        "global_model": model,
        "global_change": change,
        "seed": derive_seed(cfg.seed, server_round, partition_id, "attack"),
        "batch_size": cfg.training.batch_size,
        "lr": cfg.training.lr,
    }
