"""Flower ServerApp: load the experiment, build model + rule + wrapper, run, write artifacts.

    flwr run . --run-config 'experiment="experiments/smoke.yaml" output-dir="/abs/runs/smoke"'

(`fl-lab run` does this for you, with overrides, progress and a non-zero exit on failure.)
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from byzantine.collusion import build_colluder
from lab import log as lablog
from lab.attack_triggers import trigger_for
from lab.cohort import RUN_CONFIG_KEY as COHORT_SIZE
from lab.config import ExperimentConfig, from_run_config
from lab.data import DataBundle, load_data, malicious_partitions, partition_sizes
from lab.errors import RunError
from lab.records import ParamLayout, nonfinite_entries
from lab.runfolder import STOP_FILE
from lab.task import (
    LocalHyperparams,
    build_for,
    generator,
    load_state,
    set_threads,
    state_of,
    train_local,
)
from server.capture import CapturePlan, CaptureUpdates
from server.recorder import RunRecorder
from strategies.flower import RobustFedAvg, ShiftRounds
from strategies.registry import build_aggregator
from strategies.types import AggregatorContext, Checkpointable, ModelSpec

log = logging.getLogger(__name__)
APP_DIR = Path(__file__).resolve().parents[1]

app = ServerApp()
REPLY_POLL_SECONDS = 0.01

class StopRequested(Exception):
    """The run folder holds STOP_FILE at a round boundary; the argument is the last round done."""


def output_dir(run_config: dict[str, object], cfg: ExperimentConfig) -> Path:
    """Absolute run folder: run-config `output-dir`, else <execution.output_dir>/<name> from the cwd."""
    given = str(run_config.get("output-dir", "") or "")
    path = Path(given) if given else Path(cfg.execution.output_dir) / cfg.name
    return path.resolve()


def ground_truth(run_config: dict[str, object], cfg: ExperimentConfig) -> frozenset[int]:
    """Malicious partitions, for scoring only: run-config override (deployment) or the seed rule."""
    given = str(run_config.get("malicious-partitions", "") or "").strip()
    if given == "none":  # deployment with no malicious node
        return frozenset()
    if given:
        return frozenset(int(p) for p in given.split(","))
    if cfg.attack.type == "none":
        return frozenset()
    return frozenset(malicious_partitions(cfg.federated.num_clients, cfg.attack.ratios[0], cfg.seed))


def examples_per_client(cfg: ExperimentConfig, data: DataBundle) -> tuple[float, ...]:
    """The num-examples each client reports in a training round, all clients (`fedavg_divisor: total`).

    `lab.task.train_local`'s count for an honest client: its partition's size, or
    min(local_steps * batch_size, size) with `training.local_steps`. The server holds the same
    training split and partition function as the clients, so this is exact, not an estimate.
    """
    t = cfg.training
    sizes = partition_sizes(data.train.y, cfg.federated.num_clients, cfg.federated, cfg.seed, data.num_classes)
    return tuple(float(min(t.local_steps * t.batch_size, n) if t.local_steps else n) for n in sizes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    lablog.configure()
    run_config = dict(context.run_config)
    cfg = from_run_config(run_config, APP_DIR)
    set_threads(cfg.execution.num_threads)
    if hasattr(grid, "pull_interval"):
        # Flower's in-memory grid (simulation) looks for replies every 0.1 s, half of which is lost per
        # round on average: 5-20% of a paper-scale round. A 10 ms poll of its in-memory state is cheap.
        grid.pull_interval = min(float(grid.pull_interval), REPLY_POLL_SECONDS)
    out = output_dir(run_config, cfg)
    log.info("experiment %s -> %s", cfg.name, out)

    data = load_data(cfg.dataset, cfg.seed)
    model = build_for(cfg, data, seed=cfg.seed)
    initial = state_of(model)
    layout = ParamLayout.of(initial)
    hp = LocalHyperparams.of(cfg)
    all_examples = examples_per_client(cfg, data) if cfg.federated.fedavg_divisor == "total" else None
    ctx = AggregatorContext(layout=layout, clients_per_round=cfg.federated.round_size, seed=cfg.seed,
                            output_slice=layout.output_slice(), all_examples=all_examples,
                            model=ModelSpec(lambda: build_for(cfg, data).cpu(), data.image_shape, data.num_classes))
    aggregator = build_aggregator(cfg.federated.aggregator.name, dict(cfg.federated.aggregator.params), ctx,
                                  pre=cfg.federated.aggregator.pre)
    trigger = trigger_for(cfg.attack, *data.image_shape[1:])  # the full trigger (DBA's union, Blended's blend)
    stateful = aggregator if isinstance(aggregator, Checkpointable) else None
    malicious = ground_truth(run_config, cfg)
    recorder = RunRecorder(out, cfg, data, build_for(cfg, data), trigger, malicious,
                           aggregator_state=stateful.state_dict if stateful is not None else None)
    per_message = int(run_config.get(COHORT_SIZE, 1))  # type: ignore[call-overload]
    recorder.extra_settings["execution.clients_per_message"] = per_message
    if all_examples is not None:
        weighted = bool(cfg.federated.aggregator.params.get("weighted", True))
        recorder.extra_settings["federated.fedavg_total_weight"] = sum(all_examples) if weighted else len(all_examples)
    # Resume before the capture hook is built: it counts the capture bytes already written.
    done, resumed = recorder.resume() if cfg.execution.resume else (0, None)
    if done and stateful is not None:
        saved = recorder.aggregator_checkpoint(done)
        if saved is None:
            log.warning("resume: no %s state saved with round %d; its per-client history starts empty",
                        cfg.federated.aggregator.name, done)
        else:
            stateful.load_state_dict(saved)

    def reference_update(global_flat, server_round):  # type: ignore[no-untyped-def]
        """FLTrust's server update: the same local procedure on the server's clean set."""
        ref = build_for(cfg, data)
        load_state(ref, layout.unflatten(global_flat, initial))
        train_local(ref, data.server, hp, generator(cfg.seed, server_round, "server"))
        return layout.flatten(state_of(ref)) - global_flat

    strategy = RobustFedAvg(
        aggregator, layout,
        clients_per_round=cfg.federated.round_size,
        num_clients=cfg.federated.num_clients,
        train_config={**hp.to_config(), "server-lr": cfg.federated.server_lr},
        server_lr=cfg.federated.server_lr,
        reference_update=reference_update,
        on_round=recorder.on_round,
        # attack.knowledge: full: the colluding adversary of the simulation (experiment harness; it
        # replaces the malicious rows before the rule runs, and the rule is never told which).
        collude=build_colluder(cfg, malicious),
        seed=cfg.seed,
        # Ground truth, for the experiment's design only: exactly attackers_per_round of each round's
        # sampled clients are malicious (None: drawn like everyone). No rule ever sees it.
        malicious=malicious,
        attackers_per_round=cfg.federated.attackers_per_round,
        cohort=per_message > 1,  # fl-lab's simulation launch chose several clients per message
    )
    runner: Strategy = strategy
    if cfg.capture.enabled:
        plan = CapturePlan.of(cfg.capture, hp, recorder.malicious, data.image_shape)
        runner = CaptureUpdates(strategy, out / "captures", plan, read_replies=strategy.client_replies)
        log.info("capturing rounds %s (clients: %s, probe: %s)", sorted(plan.rounds), cfg.capture.clients, plan.probe)
    start_arrays = initial
    if done:
        # Flower counts rounds from 1 again; ShiftRounds keeps every round number true.
        runner = ShiftRounds(runner, done)
        start_arrays = {k: resumed[k] for k in initial}  # the model's key order (safetensors sorts keys)
        log.info("resuming after round %d of %d", done, cfg.training.rounds)

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        if done and rnd == 0:  # the checkpoint's round: already evaluated and logged
            return MetricRecord({k: float(v) for k, v in recorder.last.items()
                                 if k in ("accuracy", "loss", "asr", "source_accuracy") and v is not None})
        return MetricRecord(recorder.evaluate(rnd + done, arrays.to_torch_state_dict()))

    def stop_at_boundary(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate_fn(rnd, arrays)  # the round's metrics line and checkpoint are written
        if (out / STOP_FILE).exists():
            raise StopRequested(rnd + done)
        return metrics

    try:
        result = runner.start(
            grid=grid,
            initial_arrays=ArrayRecord(start_arrays),
            num_rounds=cfg.training.rounds - done,
            train_config=ConfigRecord(),
            evaluate_fn=stop_at_boundary,
        )
    except StopRequested as stop:
        log.warning("stopped after round %s of %d as %s asked: no final model, no summary", stop,
                    cfg.training.rounds, out / STOP_FILE)
        return
    # Flower's Result holds an empty ArrayRecord when no round changed the model.
    final = result.arrays.to_torch_state_dict() if result.arrays is not None and len(result.arrays) else start_arrays
    bad = nonfinite_entries(final)
    if bad:  # fails the Flower run, so `fl-lab run` exits non-zero; no final.safetensors, no summary
        raise RunError(f"the final model is not finite (in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    summary = recorder.finish(dict(final))
    log.info("finished: accuracy %s, asr %s, %.1f s", summary["final_accuracy"], summary["final_asr"],
             summary["seconds"])
