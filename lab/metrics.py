"""Security metrics of a model on the test set: clean accuracy, loss, ASR, source-class accuracy.

ASR (attack success rate) is the share of stamped test images, whose true label is not the target
(or is the source class, for a source-specific attack), that the model classifies as the target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lab.data import Split
from lab.models import device_of
from lab.triggers import Trigger


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    asr: float | None  # None when there is no trigger to test
    source_accuracy: float | None  # clean accuracy on the source class (None for all-to-one)

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def asr_population(y: Tensor, target: int, source: int | None) -> Tensor:
    """(N,) bool: the test samples ASR is measured on."""
    return y == source if source is not None else y != target


def attack_success_rate(pred: Tensor, y: Tensor, target: int, source: int | None) -> float:
    """ASR from predictions `pred` (N,) on stamped inputs with true labels `y` (N,)."""
    eligible = asr_population(y, target, source)
    if not bool(eligible.any()):
        return float("nan")
    return float((pred[eligible] == target).float().mean())


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """(N, num_classes) logits, in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    out = torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def evaluate(
    model: nn.Module, test: Split, trigger: Trigger | None, target: int, source: int | None
) -> Evaluation:
    logits = predict(model, test.x)
    loss = float(F.cross_entropy(logits, test.y))
    pred = logits.argmax(1)
    accuracy = float((pred == test.y).float().mean())
    source_acc = None
    if source is not None and bool((test.y == source).any()):
        source_acc = float((pred[test.y == source] == source).float().mean())
    asr = None
    if trigger is not None:
        eligible = asr_population(test.y, target, source)
        stamped = predict(model, trigger.stamp(test.x[eligible])).argmax(1)
        asr = float((stamped == target).float().mean()) if len(stamped) else float("nan")
    return Evaluation(accuracy, loss, asr, source_acc)


@dataclass(frozen=True)
class Detection:
    precision: float | None  # None when the rule flagged nobody
    recall: float | None  # None when no attacker took part
    f1: float | None
    tp: int
    fp: int
    fn: int

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def detection(flagged: set[int], malicious: set[int], participants: set[int]) -> Detection:
    """Precision/recall/F1 of a rule's flags against the ground truth, over this round's clients."""
    flagged, malicious = flagged & participants, malicious & participants
    tp, fp, fn = len(flagged & malicious), len(flagged - malicious), len(malicious - flagged)
    return _scores(tp, fp, fn)


def _scores(tp: int, fp: int, fn: int) -> Detection:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    # 2tp / (2tp + fp + fn) equals the harmonic mean where both exist and stays defined (0) when
    # a rule flags nobody while attackers took part.
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    return Detection(precision, recall, f1, tp, fp, fn)


def pooled_detection(rounds: list[Detection]) -> Detection:
    """Overall scores from the summed confusion counts of every round."""
    return _scores(sum(d.tp for d in rounds), sum(d.fp for d in rounds), sum(d.fn for d in rounds))
