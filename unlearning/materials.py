"""What the unlearning strategies draw on: the trigger recovered from the reconstructions, its
family of nearby boxes, the relabelled reconstructions, and (only on an explicit oracle request)
the true trigger. Split from `unlearning.cli` so the command line stays one idea."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from lab.config import UnlearningConfig
from lab.data import Split
from lab.errors import LabError
from unlearning.family import refine_pattern, trigger_family
from unlearning.methods import STRATEGIES, Materials, relabel_targets
from unlearning.search import search_near
from unlearning.trigger import (
    RecoveredTrigger,
    box_iou,
    recover_trigger,
    score_against,
    server_flip_rate,
)
from unlearning.verify import Reconstructions, Run, RunFolderError


class TriggerNotConfirmed(LabError):
    """The server's own check says the recovered trigger is not a trigger: unlearning with it would
    change nothing (Fashion-MNIST with a final-round probe: it flipped 0.1 % of the clean images)."""

    exit_code = 3  # refused, as opposed to bad input (2)


def confirm(found: RecoveredTrigger, min_flip_rate: float, target: int, note: str = "") -> None:
    """Refuse a recovered trigger whose server flip rate is below `min_flip_rate`."""
    rate = found.server_flip_rate
    if rate < min_flip_rate:  # NaN (no non-target clean image) cannot be judged and passes
        top, left, h, w = found.box
        raise TriggerNotConfirmed(
            f"refusing to unlearn: the recovered trigger ({h}x{w} at ({top}, {left})) sends {rate:.1%} of the "
            f"server's clean images to class {target}, below --min-flip-rate {min_flip_rate:.1%}, so it is not the "
            f"backdoor's trigger and unlearning with it would change nothing{note}; capture more evidence (an "
            f"earlier probe round) or pass --force to unlearn anyway")


@dataclass(frozen=True)
class Plan:
    strategies: tuple[str, ...]
    hp: UnlearningConfig
    sanitized: str
    seed: int
    box_slack: int = 1
    refine_steps: int = 100
    min_flip_rate: float = 0.05  # below it the recovered trigger is refused (TriggerNotConfirmed)
    force: bool = False  # unlearn with a refused trigger anyway
    search_steps: int = 200  # a refused box gets a mask search near it (`unlearning.search`); 0 = none


def recover(run: Run, recon: Reconstructions, train: Split,
            p: Plan) -> tuple[RecoveredTrigger | None, Materials, dict[str, Any]]:
    """Recover the trigger and build the strategies' materials; the true trigger only for the oracle.

    Refuses (`TriggerNotConfirmed`) a trigger that fails the server's own check, unless `p.force`."""
    needs = [n for n in p.strategies if STRATEGIES[n].needs_reconstructions]
    try:
        found = recover_trigger(run.model, recon.images, train.x, run.target)
    except LabError as exc:
        if needs:
            raise RunFolderError(f"{exc} (needed by {', '.join(needs)})") from None
        return None, Materials(None, None, _oracle_trigger(run, p), p.hp.mix_ratio), {"found": False, "reason": str(exc)}
    info: dict[str, Any] = {"found": True, **found.summary(),
                            "sources": [f"{recon.origin[i][0]}[{recon.origin[i][1]}]" for i in found.used]}
    searched = None
    if needs and found.server_flip_rate < p.min_flip_rate and p.search_steps > 0:
        searched = search_near(run.model, found.box, train.x, run.target, steps=p.search_steps)
        info["searched"] = {"rule": "mask and pattern fitted in a window 2 px around the refused box on the server's "
                                    "clean images (Neural Cleanse-style); used when it passes the flip-rate check and "
                                    "flips more than 3x the same search in the window's mirror images",
                            **searched.summary()}
    rescued = searched is not None and searched.anomalous and searched.flip_rate >= p.min_flip_rate
    if searched is not None and rescued:  # from here on the searched mask IS the recovered trigger
        info["consensus"] = {"box": info["box"], "server_flip_rate": info["server_flip_rate"]}
        found = replace(found, trigger=searched.trigger, server_flip_rate=searched.flip_rate)
        info.update({k: v for k, v in found.summary().items()
                     if k in ("box", "mask_pixels", "pattern_mean", "pattern", "server_flip_rate")})
    if needs:
        info["confirmation"] = {"rule": "the recovered trigger sends at least min_flip_rate of the server's clean "
                                        "non-target images to the target", "min_flip_rate": p.min_flip_rate,
                                "forced": p.force, "passed_by": "search" if rescued else "consensus"}
        if not p.force:
            confirm(found, p.min_flip_rate, run.target, "" if searched is None else
                    f"; a mask search near it flipped {searched.flip_rate:.1%} (its mirror-image controls: "
                    f"{', '.join(f'{f:.1%}' for f in searched.control_flip_rates)})")
    firing = list(found.stats["firing_reconstructions"])
    labels = relabel_targets(run.model, recon.images[firing], found.trigger, train.x.mean(0), run.target,
                             recon.labels[firing])
    keep = labels >= 0
    info["relabel"] = {
        "rule": "model prediction with the recovered trigger box occluded by the clean mean; else the "
                "attack's recovered label if it is not the target; else left out",
        "labels": labels.tolist(), "sources": [f"{recon.origin[i][0]}[{recon.origin[i][1]}]" for i in firing],
    }
    relabelled = Split(recon.images[firing][keep], labels[keep])
    stamp = found.trigger
    if p.refine_steps > 0:
        stamp = refine_pattern(run.model, found.trigger, train.x, run.target, steps=p.refine_steps)
        info["refined"] = {"rule": f"pattern inside the recovered mask re-fitted on the server's clean images "
                                   f"to send them to the target ({p.refine_steps} Adam steps)",
                           "pattern_mean": [round(float(v), 4) for v in stamp.pattern[:, stamp.mask.bool()].mean(1)],
                           "server_flip_rate": server_flip_rate(run.model, stamp, train.x, run.target)}
    family: tuple[Any, ...] = ()
    if p.box_slack > 0 and found.median is not None:
        # The boxes are filled with the reconstructions' median, the refined values inside the recovered box.
        fill = found.median * (1 - stamp.mask) + stamp.pattern * stamp.mask
        fam = trigger_family(run.model, fill, found.box, train.x, run.target, slack=p.box_slack)
        family = fam.members
        info["family"] = {"rule": f"boxes within {p.box_slack} px of the recovered box whose server flip rate is "
                                  "within 0.05 of the best, filled with the reconstructions' median (the refined pattern inside the "
                                  "recovered box)", **fam.summary()}
    true = run.true_trigger()
    if true is not None:
        info["scoring"] = {"note": "SCORING ONLY: compares with the true trigger; not used to unlearn",
                           **score_against(found, true),
                           **({"family_best_box_iou": round(box_iou(fam.boxes[0], true.box), 4),
                               "family_covers_true_box": true.box in fam.boxes} if family else {})}
    return found, Materials(stamp, relabelled, _oracle_trigger(run, p), p.hp.mix_ratio, family), info


def _oracle_trigger(run: Run, p: Plan) -> Any:
    # The only place the true trigger reaches a strategy: an explicit oracle request.
    return run.true_trigger() if any(STRATEGIES[n].oracle for n in p.strategies) else None
