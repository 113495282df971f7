"""Server-side bookkeeping of a run: central evaluation, metrics.jsonl, checkpoints, summary.

The recorder is the only place that knows the ground truth (which partitions are malicious); it
uses it to score the rule's decisions, never to make them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lab.artifacts import append_jsonl, atomic_write_text, save_tensors, write_json
from lab.config import ExperimentConfig, dump_yaml
from lab.data import DataBundle
from lab.metrics import Detection, detection, evaluate, pooled_detection
from lab.task import load_state
from lab.triggers import Trigger
from strategies.flower import RoundDecisions

log = logging.getLogger(__name__)


class RunRecorder:
    def __init__(
        self,
        out_dir: Path,
        cfg: ExperimentConfig,
        data: DataBundle,
        model: nn.Module,
        trigger: Trigger,
        malicious: frozenset[int],
    ) -> None:
        self.out_dir = out_dir
        self.cfg = cfg
        self.data = data
        self.model = model
        self.trigger = trigger
        self.malicious = malicious
        self.started = time.time()
        self._round_started = self.started
        self._pending: RoundDecisions | None = None
        self._detections: list[Detection] = []
        self.last: dict[str, object] = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))

    def on_round(self, decisions: RoundDecisions) -> None:
        self._pending = decisions

    def evaluate(self, server_round: int, state: dict[str, Tensor]) -> dict[str, float]:
        """Central evaluation after `server_round` (0 = initial model); writes the round's line."""
        load_state(self.model, state)
        ev = evaluate(self.model, self.data.test, self.trigger, self.cfg.dataset.target_class,
                      self.cfg.dataset.source_class)
        now = time.time()
        row: dict[str, object] = {"round": server_round, **ev.as_dict(),
                                  "seconds": now - self.started, "round_seconds": now - self._round_started}
        decisions, self._pending = self._pending, None
        if decisions is not None and decisions.server_round == server_round:
            participants = set(decisions.partitions)
            row["malicious"] = sorted(self.malicious & participants)
            row.update(decisions.as_metrics())
            flagged = self._flagged(decisions)
            if flagged is not None and self.malicious is not None:
                det = detection(flagged, set(self.malicious), participants)
                self._detections.append(det)
                row["detection"] = det.as_dict()
        append_jsonl(self.out_dir / "metrics.jsonl", row)
        every = self.cfg.execution.checkpoint_every
        if server_round > 0 and (server_round % every == 0 or server_round == self.cfg.training.rounds):
            save_tensors(self.out_dir / "checkpoints" / f"round_{server_round:04d}.safetensors", state,
                         {"round": str(server_round)})
        asr = "-" if ev.asr is None else f"{ev.asr:.3f}"
        log.info("round %d/%d: accuracy %.4f, asr %s, loss %.4f", server_round, self.cfg.training.rounds,
                 ev.accuracy, asr, ev.loss)
        self._round_started = now
        self.last = row
        return {k: float(v) for k, v in ev.as_dict().items() if v is not None}

    @staticmethod
    def _flagged(decisions: RoundDecisions) -> set[int] | None:
        """Clients the rule acted against: dropped or clipped (None for coordinate-wise rules)."""
        if decisions.dropped is None and decisions.clipped is None:
            return None
        return set(decisions.dropped or ()) | set(decisions.clipped or ())

    def finish(self, state: dict[str, Tensor]) -> dict[str, object]:
        save_tensors(self.out_dir / "final.safetensors", state, {"round": str(self.cfg.training.rounds)})
        cfg = self.cfg
        overall = pooled_detection(self._detections).as_dict() if self._detections else None
        summary = {
            "name": cfg.name,
            "final_accuracy": self.last.get("accuracy"),
            "final_asr": self.last.get("asr"),
            # A run without attackers *is* the clean model: its ASR is the floor of this task.
            "asr_floor": self.last.get("asr") if cfg.attack.type == "none" else None,
            "final_source_accuracy": self.last.get("source_accuracy"),
            "rounds": cfg.training.rounds,
            "strategy": cfg.federated.aggregator.name,
            "attack": cfg.attack.type,
            "attackers_ratio": cfg.attack.ratios[0],
            "malicious_partitions": sorted(self.malicious),
            "detection": overall,
            "seed": cfg.seed,
            "seconds": time.time() - self.started,
            "torch": torch.__version__,
        }
        write_json(self.out_dir / "summary.json", summary)
        return summary
