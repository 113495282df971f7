"""The cured model as a weight-space ensemble: several fine-tunes averaged, then blended with the original.

Why: on the 40-round digits default the unlearning fine-tune's accuracy cost is mostly its own
randomness (which clean images are drawn and stamped): on held-out seed 10, the same recovered
trigger, four fine-tune seeds cost -1.39 / +0.56 / -1.11 / -0.56 test points and the mean of their
weights 0.00 (bench/RESULTS.md, issue 16); the acceptance budget is 1 point. Two remedies from
the fine-tuning literature, both free of ground truth:

- a uniform soup (Wortsman et al., "Model soups", ICML 2022): average the weights of `k`
  fine-tunes that start from the same model and differ only in their draws;
- a weight-space ensemble with the original (WiSE-FT, Wortsman et al., CVPR 2022): keep
  `alpha` of the change; the last part of a fine-tune's change bought no ASR and cost accuracy.

Either can bring part of the backdoor back, so the ensemble answers to the server's own check: the
ASR of the RECOVERED trigger (the true one only for the oracle) on the validation images. It is kept
only when that is no higher than the first fine-tune's alone; else the first fine-tune, which is
what the lab returned before (and what `k` = 1, `alpha` = 1 return). Falling back to the plain soup
instead was measured worse where the blend was refused: Fashion-MNIST's seed 0 lost 1.04 points with
the soup against 0.88 with one fine-tune, and failed the demo's 1-point check (bench/RESULTS.md).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

from torch import Tensor, nn

from lab.data import Split
from lab.triggers import Trigger
from unlearning.methods import FinetuneResult, accuracy, snapshot, stamped_val_asr

log = logging.getLogger(__name__)


def blend_states(original: dict[str, Tensor], tuned: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """original + alpha (tuned - original) on floating tensors; the others (BN's batch counter) as tuned."""
    return {k: original[k].to(v.device) + alpha * (v - original[k].to(v.device)) if v.is_floating_point() else v
            for k, v in tuned.items()}


def average_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform mean of floating tensors; the others from the first state."""
    first = states[0]
    return {k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v for k, v in first.items()}


def ensemble(model: nn.Module, members: list[FinetuneResult], val: Split, trigger: Trigger | None,
             target: int | None, alpha: float) -> FinetuneResult:
    """blend(mean of `members`, alpha) when its ASR with `trigger` on `val` is no higher than
    members[0]'s, else members[0]. `model` is the original (never changed)."""
    first = members[0]
    seconds = sum(m.seconds for m in members)
    if alpha >= 1 and len(members) == 1:
        return first
    mean = average_states([m.state for m in members]) if len(members) > 1 else first.state
    state = blend_states(snapshot(model), mean, alpha) if alpha < 1 else mean
    probe = copy.deepcopy(model)
    probe.load_state_dict(state)
    rate = stamped_val_asr(probe, val, trigger, target)
    if rate is None or first.val_asr is None or rate <= first.val_asr:
        return replace(first, state=state, val_accuracy=accuracy(probe, val), val_asr=rate, blend=alpha,
                       members=len(members), seconds=seconds)
    log.info("ensemble of %d at %.2f: the trigger fires on %.4f of the validation images (%.4f after one "
             "fine-tune); keeping the one fine-tune", len(members), alpha, rate, first.val_asr)
    return replace(first, seconds=seconds)
