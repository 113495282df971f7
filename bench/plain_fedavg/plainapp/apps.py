"""Flower's built-in FedAvg with the same model, data, local training and central evaluation as
the lab, but none of the lab's security bookkeeping (reply validation, update matrix, norms,
decisions, metrics.jsonl, checkpoints): one message per client, what a user would write.

The experiment arrives as YAML text in the run config (`experiment-text`), so any lab setting runs
here, the paper-scale one of bench/round_time.py included (the bias split, one step of 32). Central
evaluation follows `training.eval_every` as the lab's does (round 0, every eval_every-th round, the
last one). Per-round wall times go to <output-dir>/rounds.jsonl, `accuracy` null on rounds that
were not evaluated."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from lab.config import from_run_config
from lab.data import load_data, partition_indices
from lab.metrics import evaluate
from lab.task import (
    LocalHyperparams,
    build_for,
    generator,
    load_state,
    set_threads,
    state_of,
    train_local,
)
from lab.triggers import make_trigger

HERE = Path(__file__).resolve().parents[1]
server = ServerApp()
client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config, HERE)
    set_threads(cfg.execution.num_threads)
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = load_data(cfg.dataset, cfg.seed)
    local = data.train.subset(partition_indices(data.train.y, pid, n, cfg.federated, cfg.seed))
    model = load_state(build_for(cfg, data), msg.content["arrays"].to_torch_state_dict())
    hp = LocalHyperparams.from_config(msg.content["config"])
    stats = train_local(model, local, hp, generator(cfg.seed, int(msg.content["config"]["server-round"]), pid))
    return Message(RecordDict({"arrays": ArrayRecord(state_of(model)),
                               "metrics": MetricRecord({"num-examples": stats.examples})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = from_run_config(context.run_config, HERE)
    set_threads(cfg.execution.num_threads)
    out = Path(str(context.run_config["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.dataset, cfg.seed)
    model = build_for(cfg, data, seed=cfg.seed)
    trigger = make_trigger(cfg.attack.trigger, *data.image_shape[1:])
    last = [time.time()]
    t = cfg.training

    def central(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        accuracy = None
        if rnd == 0 or rnd >= t.rounds or rnd % t.eval_every == 0:  # the lab's schedule
            accuracy = evaluate(load_state(model, arrays.to_torch_state_dict()), data.test, trigger,
                                cfg.dataset.target_class, cfg.dataset.source_class).accuracy
        now = time.time()
        with open(out / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps({"round": rnd, "accuracy": accuracy, "round_seconds": now - last[0]}) + "\n")
        last[0] = now
        return None if accuracy is None else MetricRecord({"accuracy": accuracy})

    n = cfg.federated.num_clients
    FedAvg(fraction_evaluate=0.0, min_available_nodes=n, min_train_nodes=n).start(
        grid=grid, initial_arrays=ArrayRecord(state_of(model)), num_rounds=t.rounds,
        train_config=ConfigRecord(LocalHyperparams.of(cfg).to_config()), evaluate_fn=central)
