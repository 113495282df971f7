"""Flower ClientApp: local training on this node's partition, honest or malicious.

Which partition a node holds comes from its node config (`partition-id`, `num-partitions`); whether
it is malicious comes from `malicious=true` in the node config (deployment) or, in simulation, from
`attackers_ratio` and the seed. The code path is the same either way.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
    UserConfig,
)
from flwr.clientapp import ClientApp

from client.attacks import AttackSpec, UpdateContext, attacks_this_round, build_attack
from client.round_knowledge import round_knowledge
from lab import log as lablog
from lab.attack_triggers import trigger_for
from lab.capture import evidence_path, write_evidence
from lab.cohort import COHORT_KEY, arrays_key, metrics_key
from lab.config import ExperimentConfig, from_run_config
from lab.data import DataBundle, load_data, malicious_partitions, partition_split
from lab.records import ParamLayout
from lab.task import (
    LocalHyperparams,
    build_for,
    derive_seed,
    generator,
    load_state,
    seed_torch,
    set_threads,
    state_of,
    train_local,
)

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parents[1]

app = ClientApp()


def is_malicious(cfg: ExperimentConfig, node_config: dict[str, object], partition_id: int) -> bool:
    if "malicious" in node_config:
        return bool(node_config["malicious"])
    ratio = cfg.attack.ratios[0]
    return cfg.attack.type != "none" and partition_id in malicious_partitions(
        cfg.federated.num_clients, ratio, cfg.seed)


# What Flower's simulation engine puts in a simulated node's config, and nothing more. A SuperNode's
# config is its operator's: the lab's (fl-lab deploy, compose.yaml) also name `malicious` and
# `data-dir`; one started by hand with only these two keys would count as simulated.
SIMULATED_NODE_CONFIG = frozenset({"partition-id", "num-partitions"})


def _leave_evidence(run_config: dict[str, object], node_config: dict[str, object], server_round: int,
                    partition_id: int, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Simulation only: the exact probe batch, for scoring reconstructions (never read by attacks).

    A real node never hands its raw images to the server's folder, whatever the run config (the
    server's to choose) asks: only a node whose config is a simulated one's writes evidence.
    """
    out = str(run_config.get("output-dir", "") or "")
    if not out or set(node_config) != SIMULATED_NODE_CONFIG:
        return
    path = evidence_path(Path(out) / "captures", server_round, partition_id)
    try:
        write_evidence(path, images.cpu(), labels.cpu())
    except OSError as exc:  # a folder this process cannot write
        log.warning("no evidence written to %s: %s", path, exc)


@app.train()
def train(msg: Message, context: Context) -> Message:
    lablog.configure()
    cfg = from_run_config(context.run_config, APP_DIR)
    if "data-dir" in context.node_config:  # deployment: the node's own copy of the dataset
        cfg = replace(cfg, dataset=replace(cfg.dataset, data_dir=str(context.node_config["data-dir"])))
    set_threads(cfg.execution.num_threads)
    node_config = dict(context.node_config)
    config = msg.content["config"]
    global_state = msg.content["arrays"].to_torch_state_dict()
    data = load_data(cfg.dataset, cfg.seed)
    model = build_for(cfg, data)
    cohort = config.get(COHORT_KEY)
    if cohort is None:  # Flower's way: this node's own partition
        partition_id = int(context.node_config["partition-id"])
        arrays, metrics = _train_partition(cfg, data, model, global_state, config, context.run_config, node_config,
                                           partition_id, int(context.node_config["num-partitions"]), context.state)
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
    if set(node_config) != SIMULATED_NODE_CONFIG:
        # A deployed node holds one partition, its operator's: it trains nothing it was not given.
        raise ValueError("a cohort order (several partitions in one message) is for simulation nodes only")
    content = RecordDict()
    for partition_id in cohort:  # type: ignore[union-attr]
        p = int(partition_id)
        arrays, metrics = _train_partition(cfg, data, model, global_state, config, context.run_config, node_config,
                                           p, cfg.federated.num_clients, context.state)
        content[arrays_key(p)] = arrays
        content[metrics_key(p)] = metrics
    return Message(content=content, reply_to=msg)


def _train_partition(cfg: ExperimentConfig, data: DataBundle, model: torch.nn.Module,
                     global_state: dict[str, torch.Tensor], config: ConfigRecord, run_config: UserConfig,
                     node_config: dict[str, object], partition_id: int,
                     num_partitions: int, memory: RecordDict) -> tuple[ArrayRecord, MetricRecord]:
    """One client's round, the same whether it has a message to itself or shares a cohort's."""
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    hp = LocalHyperparams.from_config(config)
    local = partition_split(data.train, partition_id, num_partitions, cfg.federated, cfg.seed)
    load_state(model, global_state)
    attack = None
    if is_malicious(cfg, node_config, partition_id):
        # Every round, attacking or not: Neurotoxin's memory of the global model lives in `memory`.
        knowledge = round_knowledge(cfg, memory, partition_id, server_round, model, global_state)
        if attacks_this_round(cfg, partition_id, server_round):
            trigger = trigger_for(cfg.attack, *data.image_shape[1:])
            attack = build_attack(AttackSpec(cfg.attack, trigger, cfg.dataset.target_class, cfg.dataset.source_class,
                                             data.num_classes, local, **knowledge))  # type: ignore[arg-type]
    gen = generator(cfg.seed, server_round, partition_id, "train")
    # Dropout draws from torch's global generator: seed it per client and round, so a client's update
    # does not depend on which clients its worker process trained before.
    seed_torch(derive_seed(cfg.seed, server_round, partition_id, "dropout"))
    probe = bool(config.get("fixed-batch", False))
    stats = train_local(model, local, hp, gen, poison=attack.poison_batch if attack else None, fixed_batch=probe)
    if probe and stats.batch is not None and cfg.capture.evidence:
        _leave_evidence(dict(run_config), node_config, server_round, partition_id, *stats.batch)
    state = state_of(model)
    if attack is not None and attack.transforms_update:
        layout = ParamLayout.of(global_state)
        delta = layout.flatten(state) - layout.flatten(global_state)
        ctx = UpdateContext(server_round, int(config.get("round-size", 1)),  # type: ignore[arg-type]
                            float(config.get("server-lr", 1.0)))  # type: ignore[arg-type]
        delta = attack.transform_update(delta, ctx, gen)
        state = layout.unflatten(layout.flatten(global_state) + delta, global_state)
    metrics = MetricRecord({"num-examples": stats.examples, "train-loss": stats.loss, "partition-id": partition_id})
    return ArrayRecord(state), metrics


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's roll call before it samples a round: which partition this node holds."""
    partition_id = int(context.node_config["partition-id"])
    return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)
