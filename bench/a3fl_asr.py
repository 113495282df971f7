"""A3FL's ASR with its own optimised trigger, recomputed from a finished run.

    .venv/bin/python bench/a3fl_asr.py RUN_DIR

The server's central ASR stamps `attack.trigger`, A3FL's starting point, because the optimised
trigger never leaves the attacker: that number is a lower bound. A3FL's trigger of round R is a
function of the global model it received (checkpoint R-1), the attacker's data and the seed
(`client.a3fl`), so this script rebuilds exactly the trigger each attacker planted in the last
round, through the ClientApp's own code path, and measures the final model's ASR with it. It prints
one JSON object: the run's ASR, each attacker's recomputed-trigger ASR, and their mean; and, as a
check of the optimisation, the ASR of the model each trigger was optimised against (round R-1)
with the configured and with the optimised trigger.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.app import RecordDict

from client.attacks import AttackSpec, PixelBackdoor, build_attack
from client.round_knowledge import round_knowledge
from lab.artifacts import load_tensors
from lab.attack_triggers import trigger_for
from lab.config import load_experiment
from lab.data import load_data, malicious_partitions, partition_split
from lab.metrics import evaluate
from lab.task import build_for, load_state, state_of


def a3fl_asr(run: Path) -> dict[str, object]:
    cfg = load_experiment(run / "config.yaml")
    if cfg.attack.type != "a3fl":
        raise SystemExit(f"{run}: attack.type is {cfg.attack.type!r}, not a3fl")
    data = load_data(cfg.dataset, cfg.seed)
    last = cfg.training.rounds
    previous = (load_tensors(run / "checkpoints" / f"round_{last - 1:04d}.safetensors") if last > 1
                else state_of(build_for(cfg, data, seed=cfg.seed)))
    final = load_state(build_for(cfg, data), load_tensors(run / "final.safetensors"))
    summary = json.loads((run / "summary.json").read_text())
    d, n = cfg.dataset, cfg.federated.num_clients
    per_attacker: dict[str, float | None] = {}
    against: dict[str, float | None] = {}  # ASR on the model the trigger was optimised against
    before = load_state(build_for(cfg, data), previous)
    for p in malicious_partitions(n, cfg.attack.ratios[0], cfg.seed):
        model = load_state(build_for(cfg, data), previous)
        local = partition_split(data.train, p, n, cfg.federated, cfg.seed)
        knowledge = round_knowledge(cfg, RecordDict(), p, last, model, previous)
        spec = AttackSpec(cfg.attack, trigger_for(cfg.attack, *data.image_shape[1:]), d.target_class, d.source_class,
                          data.num_classes, local, **knowledge)  # type: ignore[arg-type]
        backdoor = build_attack(spec).parts[0]
        assert isinstance(backdoor, PixelBackdoor)
        per_attacker[str(p)] = evaluate(final, data.test, backdoor.trigger, d.target_class, d.source_class).asr
        against[str(p)] = evaluate(before, data.test, backdoor.trigger, d.target_class, d.source_class).asr
    asrs = [v for v in per_attacker.values() if v is not None]
    return {"run": str(run), "round": last, "asr_configured_trigger": summary.get("final_asr"),
            "asr_optimised_trigger": per_attacker, "asr_optimised_mean": sum(asrs) / len(asrs) if asrs else None,
            "previous_model_asr_configured_trigger": evaluate(before, data.test, spec.trigger, d.target_class,
                                                              d.source_class).asr,
            "previous_model_asr_optimised_trigger": against}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: bench/a3fl_asr.py RUN_DIR\n")
        return 2
    sys.stdout.write(json.dumps(a3fl_asr(Path(args[0]))) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
