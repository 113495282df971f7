"""Server-side bookkeeping of a run: central evaluation, metrics.jsonl, checkpoints, summary.

The recorder is the only place that knows the ground truth (which partitions are malicious); it
uses it to score the rule's decisions, never to make them (and, as experiment design, to draw a
fixed number of attackers per round: `strategies.sampling`). metrics.jsonl and summary.json are strict
JSON: a NaN or infinite value is written as null and named under "nonfinite" (`finite_record`).

Central evaluation runs every `training.eval_every` rounds, always on round 0 and the last round;
the other rounds still write their metrics.jsonl line (accuracy, loss, asr and source_accuracy
null) and their checkpoint. summary.json's `settings` names the federation settings the run used.

Detection (`lab.detection`): each round's line carries `detection` = the precision/recall/F1 of the
rule's drops and clips (null for rules that neither drop nor clip), `scores` = the rule's suspicion
{partition: score} and `auc` = that round's ROC AUC; the summary pools them (`auc`,
`rounds_to_detect`, `false_alarm_rate`) and `rule_cost` sums up the aggregator's seconds and peak
memory per round. Every summary number is derived from the metrics lines (`_account`), the same
way live and after a resume.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lab.artifacts import (
    append_jsonl,
    atomic_write_text,
    finite_record,
    load_tensors,
    read_jsonl,
    save_tensors,
    write_json,
)
from lab.config import ExperimentConfig, dump_yaml
from lab.data import DataBundle
from lab.detection import (
    RoundEvidence,
    evidence_of,
    false_alarm_rate,
    pooled_auc,
    round_auc,
    rounds_to_detect,
)
from lab.metrics import Detection, detection, evaluate, pooled_detection
from lab.task import load_state
from lab.triggers import Trigger
from strategies.flower import RoundDecisions

log = logging.getLogger(__name__)
METRIC_KEYS = ("accuracy", "loss", "asr", "source_accuracy")  # central evaluation's, null when not evaluated
DETECTION_KEYS = ("precision", "recall", "f1", "tp", "fp", "fn")  # `lab.metrics.Detection`


def evaluates(cfg: ExperimentConfig, server_round: int) -> bool:
    """Is the global model evaluated centrally after `server_round` (`training.eval_every`)?"""
    t = cfg.training
    return server_round == 0 or server_round >= t.rounds or server_round % t.eval_every == 0


class RunRecorder:
    def __init__(
        self,
        out_dir: Path,
        cfg: ExperimentConfig,
        data: DataBundle,
        model: nn.Module,
        trigger: Trigger,
        malicious: frozenset[int],
        aggregator_state: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        """`aggregator_state`, for a rule that keeps state across rounds, is checkpointed with the
        model (`checkpoints/aggregator_round_NNNN.safetensors`) so that a resumed run has it."""
        self.out_dir = out_dir
        self.aggregator_state = aggregator_state
        self.cfg = cfg
        self.data = data
        self.model = model
        self.trigger = trigger
        self.malicious = malicious
        self.started = time.time()
        self._round_started = self.started
        self._pending: RoundDecisions | None = None
        self._detections: list[Detection] = []
        self._evidence: list[RoundEvidence] = []
        self._costs: list[tuple[float, float | None]] = []  # (rule seconds, rule peak MB) per round
        self.last: dict[str, object] = {}
        self.evaluated: dict[str, object] = {}  # the last row with central evaluation
        self.extra_settings: dict[str, object] = {}  # settings the server derives (fedavg total weight)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))

    def resume(self) -> tuple[int, dict[str, Tensor] | None]:
        """Continue an interrupted run in `out_dir` (`execution.resume`).

        Returns the last round R whose checkpoint and metrics line both exist, with that
        checkpoint's weights, or (0, None) when there is nothing to continue from. Everything of
        rounds after R (their metrics lines, capture entries and manifest lines, probe evidence)
        is dropped, since those rounds run again; temporary files a killed writer left are
        removed. Every rewrite is atomic, so a second crash during resume is harmless too.
        """
        out = self.out_dir
        for tmp in [*out.glob(".*.tmp"), *out.glob("checkpoints/.*.tmp"), *out.glob("captures/**/.*.tmp")]:
            tmp.unlink(missing_ok=True)
        rows = read_jsonl(out / "metrics.jsonl")
        logged = {int(r["round"]) for r in rows if "round" in r}
        rounds = sorted((int(m.group(1)) for f in out.glob("checkpoints/round_*.safetensors")
                         if (m := re.fullmatch(r"round_(\d+)\.safetensors", f.name))), reverse=True)
        start = next((r for r in rounds if r in logged and r <= self.cfg.training.rounds), 0)
        kept = [r for r in rows if 0 < start and int(r.get("round", -1)) <= start]
        atomic_write_text(out / "metrics.jsonl",
                          "".join(json.dumps(finite_record(r), allow_nan=False) + "\n" for r in kept))
        self._drop_captures_after(start)
        for f in out.glob("checkpoints/*round_*.safetensors"):
            m = re.fullmatch(r"(?:aggregator_)?round_(\d+)\.safetensors", f.name)
            if m and int(m.group(1)) > start:
                f.unlink()
        if start == 0:
            log.info("resume: no checkpoint with a metrics line in %s; starting from round 1", out)
            return 0, None
        for r in kept:
            self._account(r)
        self.last = kept[-1]
        self.evaluated = next((r for r in reversed(kept) if r.get("accuracy") is not None), {})
        self.started = time.time() - float(kept[-1].get("seconds", 0.0))
        self._round_started = time.time()
        log.info("resume: continuing %s after round %d", out, start)
        return start, load_tensors(out / "checkpoints" / f"round_{start:04d}.safetensors")

    def aggregator_checkpoint(self, server_round: int) -> dict[str, Tensor] | None:
        """The rule's state saved with round `server_round`'s model, if it was saved."""
        path = self.out_dir / "checkpoints" / f"aggregator_round_{server_round:04d}.safetensors"
        return load_tensors(path) if path.exists() else None

    def _drop_captures_after(self, start: int) -> None:
        captures = self.out_dir / "captures"
        manifest = captures / "manifest.jsonl"
        if manifest.exists():
            entries = read_jsonl(manifest)
            atomic_write_text(manifest, "".join(json.dumps(e) + "\n" for e in entries
                                                if int(e.get("round", 0)) <= start))
        for d in captures.glob("round_*"):
            m = re.fullmatch(r"round_(\d+)", d.name)
            if m and int(m.group(1)) > start and d.is_dir():
                shutil.rmtree(d)
        for f in captures.glob("evidence/round_*.safetensors"):
            m = re.match(r"round_(\d+)_", f.name)
            if m and int(m.group(1)) > start:
                f.unlink()

    def on_round(self, decisions: RoundDecisions) -> None:
        self._pending = decisions

    def evaluate(self, server_round: int, state: dict[str, Tensor]) -> dict[str, float]:
        """Central evaluation after `server_round` (0 = initial model) when `evaluates` says so;
        writes the round's line either way (metrics null without evaluation) and its checkpoint."""
        ev = None
        if evaluates(self.cfg, server_round):
            load_state(self.model, state)
            ev = evaluate(self.model, self.data.test, self.trigger, self.cfg.dataset.target_class,
                          self.cfg.dataset.source_class)
        values: dict[str, float | None] = ev.as_dict() if ev is not None else dict.fromkeys(METRIC_KEYS)
        now = time.time()
        row: dict[str, object] = {"round": server_round, **values,
                                  "seconds": now - self.started, "round_seconds": now - self._round_started}
        decisions, self._pending = self._pending, None
        if decisions is not None and decisions.server_round == server_round:
            participants = set(decisions.partitions)
            row["malicious"] = sorted(self.malicious & participants)
            row.update(decisions.as_metrics())
            row["detection"] = self._detection(decisions, participants)
        record = finite_record(row)
        self._account(record)  # as written: the same numbers a resume reads back
        append_jsonl(self.out_dir / "metrics.jsonl", record, allow_nan=False)
        every = self.cfg.execution.checkpoint_every
        if server_round > 0 and (server_round % every == 0 or server_round == self.cfg.training.rounds):
            if self.aggregator_state is not None:
                # Before the model: a model checkpoint (what resume looks for) implies this file.
                save_tensors(self.out_dir / "checkpoints" / f"aggregator_round_{server_round:04d}.safetensors",
                             self.aggregator_state(), {"round": str(server_round)})
            save_tensors(self.out_dir / "checkpoints" / f"round_{server_round:04d}.safetensors", state,
                         {"round": str(server_round)})
        self._round_started = now
        self.last = row
        if ev is None:
            log.info("round %d/%d: not evaluated (training.eval_every=%d)", server_round,
                     self.cfg.training.rounds, self.cfg.training.eval_every)
            return {}
        self.evaluated = row
        asr = "-" if ev.asr is None else f"{ev.asr:.3f}"
        log.info("round %d/%d: accuracy %.4f, asr %s, loss %.4f", server_round, self.cfg.training.rounds,
                 ev.accuracy, asr, ev.loss)
        return {k: float(v) for k, v in values.items() if v is not None}

    def _detection(self, decisions: RoundDecisions, participants: set[int]) -> dict[str, object]:
        """The round's `detection` block: drop/clip precision-recall-F1, suspicion scores, AUC."""
        flagged = self._flagged(decisions)
        det = None if flagged is None else detection(flagged, set(self.malicious), participants).as_dict()
        scores = decisions.suspicion
        return {**(det or dict.fromkeys(DETECTION_KEYS)), "scores": scores,
                "auc": None if scores is None else round_auc(scores, self.malicious)}

    def _account(self, row: dict[str, object]) -> None:
        """Add one metrics line (written now, or read back on resume) to what the summary pools."""
        evidence = evidence_of(row)
        if evidence is None:
            return
        self._evidence.append(evidence)
        det: dict[str, Any] = row["detection"]  # type: ignore[assignment]  # evidence_of checked it
        if det.get("tp") is not None:
            self._detections.append(Detection(**{k: det[k] for k in DETECTION_KEYS}))
        if row.get("rule_seconds") is not None:
            peak = row.get("rule_peak_mb")
            self._costs.append((float(row["rule_seconds"]), None if peak is None else float(peak)))  # type: ignore[arg-type]

    def _pooled_detection(self) -> dict[str, object] | None:
        if not self._evidence:
            return None
        pooled = pooled_detection(self._detections).as_dict() if self._detections else dict.fromkeys(DETECTION_KEYS)
        first = rounds_to_detect(self._evidence, self.malicious)
        return {**pooled, "auc": pooled_auc(self._evidence, self.malicious),
                "rounds_to_detect": {str(p): r for p, r in first.items()},
                "false_alarm_rate": false_alarm_rate(self._evidence, self.malicious)}

    def _rule_cost(self) -> dict[str, float | None] | None:
        if not self._costs:
            return None
        seconds = [c[0] for c in self._costs]
        peaks = [c[1] for c in self._costs if c[1] is not None]
        return {"seconds_mean": sum(seconds) / len(seconds), "seconds_max": max(seconds),
                "peak_mb_max": max(peaks) if peaks else None, "rounds": len(seconds)}

    @staticmethod
    def _flagged(decisions: RoundDecisions) -> set[int] | None:
        """Clients the rule acted against: dropped or clipped (None for coordinate-wise rules)."""
        if decisions.dropped is None and decisions.clipped is None:
            return None
        return set(decisions.dropped or ()) | set(decisions.clipped or ())

    def finish(self, state: dict[str, Tensor]) -> dict[str, object]:
        save_tensors(self.out_dir / "final.safetensors", state, {"round": str(self.cfg.training.rounds)})
        cfg = self.cfg
        last = self.evaluated  # the last round is always evaluated; this is it
        summary = {
            "name": cfg.name,
            "final_accuracy": last.get("accuracy"),
            "final_asr": last.get("asr"),
            # A run without attackers *is* the clean model: its ASR is the floor of this task.
            "asr_floor": last.get("asr") if cfg.attack.type == "none" else None,
            "final_source_accuracy": last.get("source_accuracy"),
            "final_round_evaluated": last.get("round"),
            "rounds": cfg.training.rounds,
            "strategy": cfg.federated.aggregator.name,
            "attack": cfg.attack.type,
            "attack_knowledge": cfg.attack.resolved_knowledge,  # full, partial, or null without an attack
            "attackers_ratio": cfg.attack.ratios[0],
            "malicious_partitions": sorted(self.malicious),
            "detection": self._pooled_detection(),
            "rule_cost": self._rule_cost(),
            "seed": cfg.seed,
            "settings": {**cfg.settings(), **self.extra_settings},
            "seconds": time.time() - self.started,
            "torch": torch.__version__,
        }
        write_json(self.out_dir / "summary.json", finite_record(summary), allow_nan=False)
        return summary
