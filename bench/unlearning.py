"""Unlearning acceptance benchmark: the default digits run, three seeds, every strategy.

    .venv/bin/python bench/unlearning.py /tmp/acc/default-s0 /tmp/acc/default-s1 /tmp/acc/default-s2 \
        [--oracle] [--floor /tmp/acc/no-attack-s0 ...] [--out /tmp/unl/bench] [-- extra unlearn flags]

Each RUN must already hold `inversion/` (`fl-lab invert RUN`). The run folders are only read:
outputs go to OUT/<run name>/ (`fl-lab unlearn --out`). Prints per-seed rows and mean ± std
per strategy, and checks the acceptance criteria of issue 5 on the mean over runs (and, for
information, on every run): ASR before >= 0.90; after `transplant` ASR within 2 points of the
no-attack floor and clean accuracy within 1 point of before. Recorded with `-- --lr 0.005`. The no-attack floor is the ASR of the `--floor` runs' final models (0.0 when not given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.artifacts import load_tensors  # noqa: E402
from lab.config import load_experiment  # noqa: E402
from lab.data import load_data  # noqa: E402
from lab.metrics import evaluate  # noqa: E402
from lab.task import build_for, load_state  # noqa: E402
from lab.triggers import make_trigger  # noqa: E402
from unlearning.cli import unlearn_main  # noqa: E402


def floor_asr(run: Path, trigger_from: Path) -> float:
    """ASR of a no-attack run's final model, measured with the attacked run's trigger."""
    cfg = load_experiment(run / "config.yaml")
    attacked = load_experiment(trigger_from / "config.yaml")
    data = load_data(cfg.dataset, cfg.seed)
    model = load_state(build_for(cfg, data), load_tensors(run / "final.safetensors"))
    trig = make_trigger(attacked.attack.trigger, *data.image_shape[1:])
    ev = evaluate(model, data.test, trig, attacked.dataset.target_class, attacked.dataset.source_class)
    return float(ev.asr or 0.0)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("/tmp/unl/bench"))
    p.add_argument("--oracle", action="store_true")
    p.add_argument("--floor", nargs="*", type=Path, default=[])
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for run in args.runs:
        out = args.out / run.name
        code = unlearn_main([str(run), "--out", str(out), "--quiet", *(["--oracle"] if args.oracle else []), *extra])
        if code != 0:
            print(f"{run}: unlearn exited {code}")
            return code
        rows.append((run, json.loads((out / "metrics.json").read_text())))
    floors = [floor_asr(f, args.runs[0]) for f in args.floor]
    floor = statistics.mean(floors) if floors else 0.0

    strategies = list(rows[0][1]["after"])
    print(f"\n{'seed run':<28} {'model':<16} {'accuracy':>8} {'asr':>6} {'source':>6} {'steps':>5}")
    for run, m in rows:
        b = m["before"]
        print(f"{run.name:<28} {'before':<16} {b['accuracy']:8.4f} {b['asr']:6.3f} {b['source_accuracy']:6.3f}")
        for s in strategies:
            a = m["after"][s]
            print(f"{'':<28} {s:<16} {a['accuracy']:8.4f} {a['asr']:6.3f} {a['source_accuracy']:6.3f} {a['steps']:>5}")
        t = m["trigger"]
        print(f"{'':<28} trigger box {t['box']} iou(scoring) {t.get('scoring', {}).get('box_iou')} "
              f"from {t['sources']}")
    print(f"\nmean ± std over {len(rows)} runs (no-attack ASR floor {floor:.4f}"
          f"{' measured' if floors else ' assumed'})")
    print(f"{'model':<16} {'accuracy':>17} {'asr':>17} {'source acc':>17} {'acc drop':>17}")
    before_acc = [m["before"]["accuracy"] for _, m in rows]
    print(f"{'before':<16} {mean_std(before_acc):>17} {mean_std([m['before']['asr'] for _, m in rows]):>17} "
          f"{mean_std([m['before']['source_accuracy'] for _, m in rows]):>17}")
    for s in strategies:
        acc = [m["after"][s]["accuracy"] for _, m in rows]
        print(f"{s:<16} {mean_std(acc):>17} {mean_std([m['after'][s]['asr'] for _, m in rows]):>17} "
              f"{mean_std([m['after'][s]['source_accuracy'] for _, m in rows]):>17} "
              f"{mean_std([b - a for a, b in zip(acc, before_acc)]):>17}")

    checks = {
        "ASR before >= 0.90 (every run)": all(m["before"]["asr"] >= 0.90 for _, m in rows),
    }
    if "transplant" in strategies:
        asr = [m["after"]["transplant"]["asr"] for _, m in rows]
        drop = [m["before"]["accuracy"] - m["after"]["transplant"]["accuracy"] for _, m in rows]
        checks["transplant ASR <= floor + 0.02 (mean)"] = statistics.mean(asr) <= floor + 0.02
        checks["transplant accuracy drop <= 0.01 (mean)"] = statistics.mean(drop) <= 0.01 + 1e-9
        checks["transplant ASR <= floor + 0.02 (every run)"] = all(a <= floor + 0.02 for a in asr)
        checks["transplant accuracy drop <= 0.01 (every run)"] = all(d <= 0.01 + 1e-9 for d in drop)
    if "clean-finetune" in strategies:
        checks["clean-finetune leaves ASR >= 0.5 (mean)"] = statistics.mean(
            m["after"]["clean-finetune"]["asr"] for _, m in rows) >= 0.5
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(ok for name, ok in checks.items() if "every run" not in name) else 1


if __name__ == "__main__":
    sys.exit(main())
