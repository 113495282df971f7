"""The cure over many seeds: capture -> inversion -> trigger recovery -> unlearning (issues 5, 16).

    .venv/bin/python bench/unlearning.py RUN [RUN ...] [--floor NOATTACK_RUN ...] [--out DIR] \
        [--variant NAME='--box-slack 0' ...] [--json OUT.json] [-- extra unlearn flags]

Each RUN must already hold `inversion/` (`fl-lab run` with capture, then `fl-lab invert`); the run
folders are only read, outputs go to OUT/<variant>/<run name>/ (`fl-lab unlearn --oracle --out`).
For every strategy and the oracle it reports mean, sd and worst case over the runs of: ASR after,
source-class test images still firing, accuracy change; and the recovered trigger's box IoU with
the true one (scoring only), the capture's precision (captured partitions that were attackers,
scoring only) and whether the capture was honest. Every run is unlearned with `--force`; a run whose
recovered trigger the server's own check refuses (`--min-flip-rate`, exit 3 without --force) is
listed as refused and counted as uncured (its ASR before) by the acceptance. The acceptance of issue 16 is checked on the
sanitized strategy: mean ASR <= floor + 0.02, at most one source image firing on every run,
accuracy >= before - 0.01 on every run. The floor is the mean ASR of the `--floor` runs' final
models with the attacked runs' trigger (0.0 when none is given, and then said so).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.artifacts import load_tensors, read_jsonl
from lab.config import load_experiment
from lab.data import load_data
from lab.metrics import evaluate
from lab.task import build_for, load_state
from lab.triggers import make_trigger
from unlearning.cli import unlearn_main


def floor_asr(run: Path, trigger_from: Path) -> float:
    """ASR of a no-attack run's final model, measured with the attacked run's trigger."""
    cfg = load_experiment(run / "config.yaml")
    attacked = load_experiment(trigger_from / "config.yaml")
    data = load_data(cfg.dataset, cfg.seed)
    model = load_state(build_for(cfg, data), load_tensors(run / "final.safetensors"))
    trig = make_trigger(attacked.attack.trigger, *data.image_shape[1:])
    ev = evaluate(model, data.test, trig, attacked.dataset.target_class, attacked.dataset.source_class)
    return float(ev.asr or 0.0)


def source_images(run: Path) -> int:
    cfg = load_experiment(run / "config.yaml")
    data = load_data(cfg.dataset, cfg.seed)
    src = cfg.dataset.source_class
    return int((data.test.y == src).sum()) if src is not None else int((data.test.y != cfg.dataset.target_class).sum())


def capture_precision(run: Path) -> dict[str, Any]:
    """SCORING ONLY: the captured partitions and how many of them were attackers."""
    rows = read_jsonl(run / "captures" / "manifest.jsonl")
    captured = sorted({int(r["partition_id"]) for r in rows})
    metrics = read_jsonl(run / "metrics.jsonl")
    attackers = set().union(*[set(m.get("malicious") or []) for m in metrics[-1:]]) if metrics else set()
    modes = sorted({str((r.get("selection") or {}).get("mode", "unknown")) for r in rows})
    return {"captured": captured, "attackers": sorted(attackers), "hits": len(attackers & set(captured)),
            "modes": modes}


def stats(values: list[float], worst: str) -> dict[str, float]:
    if not values:
        return {}
    pick = max if worst == "max" else min
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "worst": pick(values), "n": len(values)}


def fmt(s: dict[str, float], spec: str = ".4f") -> str:
    return "-" if not s else f"{s['mean']:{spec}} ± {s['sd']:{spec}} (worst {s['worst']:{spec}})"


def summarise(rows: list[tuple[Path, dict[str, Any], dict[str, Any], int]], floor: float,
              failed: list[str] | None = None) -> dict[str, Any]:
    """Per strategy: ASR after, images firing, accuracy change; trigger IoU; acceptance.

    `failed`: runs `fl-lab unlearn` could not cure at all (no trigger recovered): they fail the acceptance."""
    strategies = [s for s in rows[0][1]["after"] if all(s in m["after"] for _, m, _, _ in rows)]
    out: dict[str, Any] = {"runs": [str(r) for r, *_ in rows], "floor": floor, "strategies": {}}
    for s in strategies:
        asr = [m["after"][s]["asr"] for _, m, _, _ in rows]
        firing = [round(m["after"][s]["asr"] * n) for _, m, _, n in rows]
        delta = [m["after"][s]["accuracy"] - m["before"]["accuracy"] for _, m, _, _ in rows]
        out["strategies"][s] = {"asr": stats(asr, "max"), "firing": stats([float(f) for f in firing], "max"),
                                "accuracy_change": stats(delta, "min"), "per_run_asr": asr, "per_run_firing": firing,
                                "per_run_accuracy_change": delta, "oracle": rows[0][1]["after"][s]["oracle"]}
    ious = [m["trigger"].get("scoring", {}).get("box_iou", 0.0) if m["trigger"].get("found") else 0.0
            for _, m, _, _ in rows]
    out["trigger_iou"] = {**stats(ious, "min"), "per_run": ious}
    out["before"] = {"asr": stats([m["before"]["asr"] for _, m, _, _ in rows], "min"),
                     "accuracy": stats([m["before"]["accuracy"] for _, m, _, _ in rows], "min")}
    out["capture"] = [c for _, _, c, _ in rows]
    s = rows[0][1]["sanitized"]["strategy"]
    st = out["strategies"][s]
    # A run the server's own check refuses (`fl-lab unlearn` exit 3) leaves the user the original model:
    # the bench measures it with --force, but the acceptance counts it as uncured.
    out["refused"] = [str(r) for r, m, _, _ in rows if refused(m)]
    asr = [m["before"]["asr"] if refused(m) else a for (_, m, _, _), a in zip(rows, st["per_run_asr"])]
    firing = [round(a * n) for (_, _, _, n), a in zip(rows, asr)]
    out["acceptance"] = {
        "strategy": s,
        f"mean ASR <= floor + 0.02 ({floor + 0.02:.4f})": statistics.mean(asr) <= floor + 0.02,
        "<= 1 source image firing on every run": max(firing) <= 1,
        "accuracy >= before - 0.01 on every run": min(st["per_run_accuracy_change"]) >= -0.01 - 1e-9,
        "every run unlearned": not failed,
    }
    out["failed"] = list(failed or [])
    return out


def refused(metrics: dict[str, Any]) -> bool:
    """Would `fl-lab unlearn` without --force have refused this run's recovered trigger?"""
    t = metrics["trigger"]
    check = t.get("confirmation")
    return bool(t.get("found") and check and t["server_flip_rate"] < check["min_flip_rate"])


def report(name: str, summary: dict[str, Any]) -> str:
    n = len(summary["runs"])
    lines = [f"\n== {name}: {n} run(s), floor {summary['floor']:.4f}",
             f"{'model':<34} {'ASR after':>32} {'firing':>26} {'accuracy change':>32}"]
    b = summary["before"]
    lines.append(f"{'before':<34} {fmt(b['asr']):>32} {'':>26} {'accuracy ' + fmt(b['accuracy']):>32}")
    for s, st in summary["strategies"].items():
        label = f"{s} (ORACLE upper bound)" if st["oracle"] else s
        lines.append(f"{label:<34} {fmt(st['asr']):>32} {fmt(st['firing'], '.1f'):>26} "
                     f"{fmt(st['accuracy_change']):>32}")
    lines.append(f"trigger box IoU (scoring only): {fmt(summary['trigger_iou'], '.2f')} per run "
                 f"{[round(v, 2) for v in summary['trigger_iou']['per_run']]}")
    lines.append("capture (scoring only): " + "; ".join(
        f"{Path(r).name} {c['modes']} {c['hits']}/{len(c['captured'])} attackers"
        for r, c in zip(summary["runs"], summary["capture"])))
    if summary["failed"]:
        lines.append("FAILED (no trigger recovered, nothing unlearned; left out of the statistics above): "
                     + ", ".join(Path(r).name for r in summary["failed"]))
    if summary["refused"]:
        lines.append("REFUSED by the server's check (measured with --force, counted as uncured): "
                     + ", ".join(Path(r).name for r in summary["refused"]))
    lines += [f"{'PASS' if ok else 'FAIL'}  {k}" for k, ok in summary["acceptance"].items() if k != "strategy"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("/tmp/unl/bench"))
    p.add_argument("--floor", nargs="*", type=Path, default=[])
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=FLAGS: also run `fl-lab unlearn` with these flags (default variant: no flags)")
    p.add_argument("--json", type=Path)
    p.add_argument("--reuse", action="store_true", help="keep an OUT/<variant>/<run>/metrics.json already there")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = {"default": []} | {v.split("=", 1)[0]: shlex.split(v.split("=", 1)[1]) for v in args.variant}
    floors = [floor_asr(f, args.runs[0]) for f in args.floor]
    floor = statistics.mean(floors) if floors else 0.0
    meta = {r: (capture_precision(r), source_images(r)) for r in args.runs}
    results: dict[str, Any] = {"floor_runs": [str(f) for f in args.floor], "floor_measured": bool(floors)}
    for name, flags in variants.items():
        rows, failed = [], []
        for run in args.runs:
            out = args.out / name / run.name
            done = args.reuse and (out / "metrics.json").is_file()
            code = 0 if done else unlearn_main([str(run), "--out", str(out), "--quiet", "--oracle", "--force",
                                                *extra, *flags])
            if code != 0:
                sys.stdout.write(f"{run}: unlearn exited {code}; counted as a failed cure\n")
                failed.append(str(run))
                continue
            rows.append((run, json.loads((out / "metrics.json").read_text()), *meta[run]))
        if rows:
            results[name] = summarise(rows, floor, failed)
            sys.stdout.write(report(name, results[name]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
