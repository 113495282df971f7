"""Why does a residual ASR survive unlearning? Isolate the trigger's part from the data's part.

    .venv/bin/python bench/cure_isolate.py RUN [RUN ...] [--json OUT.json]

For each RUN (with inversion/), the same fine-tune (the `fl-lab unlearn` defaults: 100 steps, lr
0.005, 20% stamped, distillation, frozen BN) is run with one trigger at a time:

- `recovered`: what the reconstructions gave (the honest chain);
- `true`: the ground truth (the oracle upper bound);
- `true box, recovered pattern` / `recovered box, true value`: which half of the recovered trigger is
  wrong, the box or the stamp;
- `true shifted 1 col/row`, `true minus 1 col`, `true plus 1 col`: what a box off by one pixel line
  costs when the stamp is otherwise right.

It prints ASR and the indices of the source-class test images that still fire, with each image's
clean confidence in its own class (an atypical image has a low one). SCORING AND DIAGNOSIS ONLY:
the true trigger is used here to explain the chain's result, never by the chain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.metrics import predict
from lab.task import generator
from lab.triggers import Trigger
from unlearning.cli import clean_sets, plan, unlearn_parser
from unlearning.family import boxed_trigger, near_boxes, refine_pattern, trigger_family
from unlearning.methods import Budget, accuracy, finetune, stamp_family, stamp_share
from unlearning.trigger import box_iou, recover_trigger
from unlearning.verify import load_reconstructions, load_run


def boxed(box: tuple[int, int, int, int], pattern: torch.Tensor, h: int, w: int) -> Trigger:
    top, left, bh, bw = box
    mask = torch.zeros(h, w)
    mask[max(0, top): top + bh, max(0, left): left + bw] = 1
    return Trigger(mask, pattern * mask)


def variants(found: Trigger, true: Trigger, h: int, w: int) -> dict[str, Trigger]:
    t, left, bh, bw = true.box
    c = found.pattern.shape[0] if found.pattern.ndim == 3 else 1
    ones = torch.ones(c, h, w)
    return {
        "recovered": found,
        "true": true,
        "true box, recovered pattern": boxed(true.box, found.pattern if found.pattern.ndim == 3 else ones, h, w),
        "recovered box, true value": boxed(found.box, ones * float(true.pattern.max()), h, w),
        "true shifted 1 col left": boxed((t, left - 1, bh, bw), ones, h, w),
        "true shifted 1 row up": boxed((t - 1, left, bh, bw), ones, h, w),
        "true minus 1 col": boxed((t, left + 1, bh, bw - 1), ones, h, w),
        "true plus 1 col": boxed((t, left - 1, bh, bw + 1), ones, h, w),
    }


ONLY: list[str] = []  # --only: a subset of the variants


def isolate(run_dir: Path) -> dict[str, object]:
    run = load_run(run_dir)
    args = unlearn_parser().parse_args([str(run_dir)])
    p = plan(run, args)
    recon = load_reconstructions(run_dir / "inversion", run.data.image_shape, run.data.num_classes)
    train, val = clean_sets(run, p, args.val_fraction)
    found = recover_trigger(run.model, recon.images, train.x, run.target)
    true = run.true_trigger()
    assert true is not None
    _, h, w = run.data.image_shape
    budget = Budget(p.hp.steps, p.hp.lr, p.hp.momentum, p.hp.batch_size, p.hp.freeze_bn,
                    min_accuracy=accuracy(run.model, val) - p.hp.max_accuracy_drop, eval_every=args.eval_every,
                    patience=args.patience, distill=args.distill, target_penalty=args.target_penalty,
                    penalty_margin=args.penalty_margin)
    test = run.data.test
    src = torch.nonzero(test.y == run.source).flatten()
    clean_conf = predict(run.model, test.x[src]).softmax(1)[:, run.source]
    rows: dict[str, object] = {"run": str(run_dir), "firing_reconstructions": found.stats["firing_reconstructions"],
                               "reconstructions": len(recon), "recovered_box": list(found.box),
                               "true_box": list(true.box), "box_iou": box_iou(found.box, true.box)}
    before = run.evaluate()
    rows["before"] = {"accuracy": before.accuracy, "asr": before.asr}
    fam = trigger_family(run.model, found.median, found.box, train.x, run.target)
    rows["family"] = {**fam.summary(), "covers_true_box": true.box in fam.boxes}
    transforms = {name: stamp_share(trig, p.hp.mix_ratio) for name, trig in variants(found.trigger, true, h, w).items()}
    transforms["recovered + family"] = stamp_family((found.trigger, *fam.members), p.hp.mix_ratio)
    refined = refine_pattern(run.model, found.trigger, train.x, run.target)
    rows["refined_pattern_mean"] = float(refined.pattern[:, refined.mask.bool()].mean())
    rows["recovered_pattern_mean"] = float(found.trigger.pattern[:, found.trigger.mask.bool()].mean())
    transforms["refined"] = stamp_share(refined, p.hp.mix_ratio)
    transforms["refined + family"] = stamp_family((refined, *fam.members), p.hp.mix_ratio)
    t0, l0, h0, w0 = found.box
    grown_box = (max(0, t0 - 1), max(0, l0 - 1), min(h, t0 + h0 + 1) - max(0, t0 - 1), min(w, l0 + w0 + 1) - max(0, l0 - 1))
    grown = refine_pattern(run.model, boxed_trigger(grown_box, found.median), train.x, run.target)
    transforms["refined grown"] = stamp_share(grown, p.hp.mix_ratio)
    transforms["refined + refined grown"] = stamp_family((refined, grown), p.hp.mix_ratio)
    transforms["recovered + refined + refined grown"] = stamp_family((found.trigger, refined, grown), p.hp.mix_ratio)
    near = [boxed_trigger(b, grown.pattern) for b in near_boxes(found.box, 1, h, w)]
    transforms["refined + all near boxes (grown fill)"] = stamp_family((refined, *near), p.hp.mix_ratio)
    only = set(ONLY) if ONLY else set(transforms)
    for name, transform in ((n, t) for n, t in transforms.items() if n in only):
        res = finetune(run.model, train, val, transform, budget,
                       generator(p.seed, "unlearning-order"), generator(p.seed, "unlearning", "transplant"),
                       target=run.target)
        model = _copy(run.model, res.state)
        ev = run.evaluate(model)
        fire = predict(model, true.stamp(test.x[src])).argmax(1) == run.target
        which = [int(i) for i in torch.nonzero(fire).flatten()]
        rows[name] = {"asr": ev.asr, "accuracy": ev.accuracy, "firing": which,
                      "clean_confidence": [round(float(clean_conf[i]), 3) for i in which]}
        print(f"{run_dir.name:<16} {name:<30} asr {ev.asr:.3f} acc {ev.accuracy:.4f} firing {which} "
              f"clean conf {[round(float(clean_conf[i]), 3) for i in which]}", flush=True)
    rows["source_clean_confidence_median"] = float(clean_conf.median())
    return rows


def _copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", action="append", default=[], help="run only this variant (repeatable)")
    a = ap.parse_args()
    ONLY.extend(a.only)
    torch.set_num_threads(1)
    out = []
    for r in a.runs:
        out.append(isolate(r))
        print(f"{r.name}: recovered box {out[-1]['recovered_box']} true {out[-1]['true_box']} "
              f"IoU {out[-1]['box_iou']:.2f}; firing reconstructions {out[-1]['firing_reconstructions']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
