"""`fl-lab demo`: the whole story on the embedded digits data, in a few minutes on 2 CPU cores.

    fl-lab demo                 # runs/demo/{fedavg,foolsgold,no-attack}/, report.md, report.html
    fl-lab demo --quick         # seconds-sized runs (the test suite's end-to-end check)
    fl-lab demo --dataset fashion-mnist   # the same story on Fashion-MNIST (experiments/fmnist-cure.yaml)

1. three real Flower simulations of the same scenario (`experiments/default.yaml`, shortened: see
   FULL_OVERRIDES), run side by side: FedAvg under the backdoor (the curious server probes every
   client in the last round and keeps its own top-3 suspects: `capture.clients: suspects`, no
   ground truth), the best defense under the same backdoor, and nobody attacking (its ASR is the
   floor);
2. `fl-lab invert` on the FedAvg run's captured updates (the suspects');
3. `fl-lab verify` and `fl-lab unlearn` on the FedAvg run's final model;
4. `fl-lab report` on the demo folder, and a summary table on the terminal.

Each step is the same code as its own subcommand (dispatched through `commands.tools.TOOLS`), so the
demo shows exactly what the tools do.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commands.console import guarded, progress_printer, say
from commands.launch import claim_run_dir
from commands.preflight import preflight, run_dir_problem
from commands.tools import TOOLS
from lab import log as lablog
from lab.artifacts import write_json
from lab.config import ExperimentConfig, load_experiment, with_values
from lab.errors import ConfigError, RunError

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]

# Why FoolsGold: the demo's scenario (default.yaml, boost 1.0, 15 rounds, seed 0) measured on 2 cores:
# foolsgold final ASR 0.000 at accuracy 0.978, dropping exactly the three attackers from round 5 on;
# fl-defender 0.935 (it held at 1 local epoch, not at 2), flame 0.935, multi-krum 0.29 (20 rounds,
# 1 epoch). Against the boosted backdoor (boost auto) multi-krum, bulyan and fl-defender hold and
# FoolsGold does not (runs/sweeps/defenses): pick the rule for the attack, hence --defense.
DEFENSES: dict[str, str] = {
    "foolsgold": "federated.aggregator={name: foolsgold, params: {}}",
    "fl-defender": "federated.aggregator={name: fl-defender, params: {}}",
    "multi-krum": "federated.aggregator={name: multi-krum, params: {num_byzantine: 3}}",
    "bulyan": "federated.aggregator={name: bulyan, params: {num_byzantine: 1}}",
}
DEFAULT_DEFENSE = "foolsgold"

# default.yaml trains 40 rounds (about 100 s per run alone). The demo keeps 2 local epochs (the
# backdoor is stable from round 13: ASR 1.0, accuracy 0.97-0.98 on seed 0; at 1 epoch the FedAvg ASR
# swung between 0.19 and 0.97 up to round 20) and stops at 15, probing the last round. Inversion
# keeps the CPU preset (1500 iterations x 4 restarts), one update per core: with 1000 x 2 the
# recovered trigger was a 2x7 strip (IoU 0.36) and unlearning left ASR at 0.032; with the preset
# the box is exact (IoU 1.0) and ASR goes to 0 (seed 0, bench/RESULTS.md). The probe sends the
# last round's own model, not default.yaml's round 5: at 15 rounds the model is not yet fit enough
# to hide the poisoned images, and on 10 seeds the last round's probe cured every seed within the
# accuracy budget where round 5's missed two (one refused trigger, one -1.1 points; issue 16).
FULL_OVERRIDES = ("training.rounds=15", "capture.rounds=[15]", "capture.probe.model_round=null")


@dataclass(frozen=True)
class Scenario:
    experiment: str  # under experiments/
    overrides: tuple[str, ...]
    budget: str  # what the demo promises on 2 idle cores


# fashion-mnist: 10 rounds of 50 local steps on ~5,900 images per client and a probe in round 3
# (experiments/fmnist-cure.yaml): the whole story on real data.
SCENARIOS: dict[str, Scenario] = {
    "digits": Scenario("default.yaml", FULL_OVERRIDES, "under 3 minutes on 2 idle CPU cores"),
    # 279 s measured at load 3-6, all four checks holding (bench/RESULTS.md, issue 16).
    "fashion-mnist": Scenario("fmnist-cure.yaml", (), "under 6 minutes on 2 CPU cores"),
}


@dataclass(frozen=True)
class DemoRun:
    dir: str
    label: str
    role: str  # attack | defense | clean
    cfg: ExperimentConfig


def plan(quick: bool, defense: str, dataset: str = "digits") -> tuple[list[DemoRun], str]:
    """The three runs of the demo and a sentence on how they were derived."""
    if quick and dataset != "digits":
        raise ConfigError("--quick runs the embedded digits only; drop --quick or --dataset")
    scenario = SCENARIOS[dataset]
    overrides: tuple[str, ...] = () if quick else scenario.overrides
    base_path = APP_DIR / "experiments" / ("demo-quick.yaml" if quick else scenario.experiment)
    base = load_experiment(base_path, list(overrides))
    attack = base if base.federated.aggregator.name == "fedavg" else with_values(base, ["federated.aggregator={name: fedavg}"])
    runs = [
        DemoRun("fedavg", "FedAvg, backdoor", "attack", _named(attack, "demo-fedavg")),
        DemoRun(defense, f"{defense}, backdoor", "defense", _named(with_values(attack, [DEFENSES[defense]]), f"demo-{defense}")),
        DemoRun("no-attack", "FedAvg, no attack", "clean", _named(with_values(attack, ["attack.type=none"]), "demo-no-attack")),
    ]
    note = (f"Scenario: {base_path.relative_to(APP_DIR)}"
            + (f" with {' '.join(overrides)}" if overrides else "")
            + f". The defense run changes only the rule ({defense}); the clean run only sets attack.type=none "
              "(its final ASR is the floor). Inversion, verification and unlearning work on the FedAvg run."
            + (" --quick: too short to plant the backdoor; it checks the pipeline, not the numbers." if quick
               else f" Budget: {scenario.budget}."))
    return runs, note


def _named(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    return with_values(cfg, [f"name={name}"])


def run_all(runs: list[DemoRun], out: Path) -> dict[str, dict[str, Any]]:
    """The Flower runs side by side (each has its own SuperLink): most of a round is Flower's
    messaging and evaluation, not arithmetic, so three at once on 2 cores cost far less than three
    in a row. The first failure is raised after all have stopped."""
    from commands.launch import run_experiment

    results: dict[str, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def one(r: DemoRun) -> None:
        try:
            results[r.dir] = run_experiment(r.cfg, out / r.dir, progress_printer(r.cfg, r.dir))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(r,), name=f"demo-{r.dir}") for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _tool(argv: list[str]) -> None:
    """One `fl-lab` subcommand (invert, verify, unlearn, report), through the CLI's own dispatch."""
    code = TOOLS[argv[0]][1](argv[1:])
    if code != 0:
        raise RunError(f"`fl-lab {' '.join(argv)}` exited with {code}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fl-lab demo", description="Backdoor, defense, inversion, unlearning and the "
                                "report, on the embedded digits data.")
    p.add_argument("--quick", action="store_true", help="seconds-sized runs (experiments/demo-quick.yaml)")
    p.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    p.add_argument("--defense", choices=sorted(DEFENSES), default=DEFAULT_DEFENSE,
                   help=f"the rule compared with FedAvg (default: {DEFAULT_DEFENSE})")
    p.add_argument("--dataset", choices=sorted(SCENARIOS), default="digits",
                   help="digits (embedded, " + SCENARIOS["digits"].budget + ") or fashion-mnist ("
                        + SCENARIOS["fashion-mnist"].budget + "; experiments/fmnist-cure.yaml)")
    args = p.parse_args(argv)
    lablog.configure("WARNING")
    return guarded("demo", lambda: demo(Path(args.out), args.quick, args.defense, args.dataset))


def demo(out: Path, quick: bool, defense: str, dataset: str = "digits") -> int:
    from commands.report import collect, demo_checks, environment, write_report

    started = time.perf_counter()
    runs, note = plan(quick, defense, dataset)
    for r in runs[:2]:  # the two rules: a bad setting fails before anything starts
        preflight(r.cfg)
    # Only a folder the lab created (or an empty one) is cleaned: never `--out .` or `--out ~`.
    problems = [p for p in (run_dir_problem(d) for d in [out, *(out / r.dir for r in runs)]) if p]
    if problems:
        raise ConfigError(problems)
    out = claim_run_dir(out)
    # A fresh demo: remove only what an earlier demo wrote here.
    for r in runs:
        shutil.rmtree(out / r.dir, ignore_errors=True)
    shutil.rmtree(out / "plots", ignore_errors=True)
    for name in ("report.md", "report.html", "demo.json"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    attack = out / runs[0].dir
    todo = [
        ((f"three Flower simulations side by side ({', '.join(r.label for r in runs)}), "
         f"{runs[0].cfg.training.rounds} rounds each -> {out}"), "flower runs", lambda: run_all(runs, out)),
        ("the curious server inverts its suspects' captured updates (fl-lab invert)", "inversion",
         lambda: _tool(["invert", str(attack), "--jobs", "0"])),
        ("does the final model fire on the reconstructions? (fl-lab verify)", "verification",
         lambda: _tool(["verify", str(attack)])),
        ("unlearning with the reconstructions (fl-lab unlearn)", "unlearning", lambda: _tool(["unlearn", str(attack)])),
    ]
    for i, (title, key, fn) in enumerate(todo):
        say(f"\n== [{i + 1}/{len(todo) + 1}] {title}")
        t = time.perf_counter()
        fn()
        steps[key] = time.perf_counter() - t
    say(f"\n== [{len(todo) + 1}/{len(todo) + 1}] the report (fl-lab report)")
    capture = capture_summary(attack)
    write_json(out / "demo.json", {
        "quick": quick, "defense": defense, "dataset": dataset, "note": note, "environment": environment(),
        "capture": capture,
        "runs": [{"dir": r.dir, "label": r.label, "role": r.role} for r in runs],
        "step_seconds": steps, "wall_seconds": time.perf_counter() - started})
    md, page = write_report(out)
    col = collect(out)
    say(summary(col, demo_checks(col), time.perf_counter() - started) + "\n" + capture_text(capture))
    say(f"\nreport: {md}\n        {page} (one self-contained file: open it in a browser)")
    return 0


def summary(col: Any, checks: list[tuple[str, bool | None, str]], seconds: float) -> str:
    head = f"{'run':<22} {'rule':<12} {'accuracy':>8} {'ASR':>6} {'floor':>6} {'det. F1':>7}"
    lines = ["", "== summary", head, "-" * len(head)]

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in col.runs:
        s = r.summary
        lines.append(f"{r.label:<22} {r.rule:<12} {f(s.get('final_accuracy'), '8.4f')} {f(s.get('final_asr'), '6.3f')} "
                     f"{f(r.floor, '6.3f')} {f((s.get('detection') or {}).get('f1'), '7.3f')}")
    lines.append("")
    mark = {True: "yes", False: "NO ", None: " ? "}
    lines += [f"[{mark[ok]}] {what}: {numbers}" for what, ok, numbers in checks]
    lines.append(f"demo wall time {seconds:.0f} s (report included)")
    return "\n".join(lines)


def capture_summary(run: Path) -> dict[str, Any]:
    """How the FedAvg run's captured updates were chosen, and (scoring only) how many were attackers'."""
    from lab.artifacts import read_jsonl

    rows = read_jsonl(run / "captures" / "manifest.jsonl")
    metrics = read_jsonl(run / "metrics.jsonl")
    attackers = set(metrics[-1].get("malicious") or []) if metrics else set()
    captured = sorted({int(r["partition_id"]) for r in rows})
    selections = [r.get("selection") or {} for r in rows]
    return {"modes": sorted({str(c.get("mode", "unknown")) for c in selections}),
            "upper_bound": any(bool(c.get("upper_bound")) for c in selections),
            "captured": captured, "attackers_captured_scoring_only": len(attackers & set(captured)),
            "attackers": len(attackers)}


def capture_text(c: dict[str, Any]) -> str:
    head = ("capture: UPPER BOUND (attackers picked by ground truth)" if c["upper_bound"]
            else f"capture: honest ({', '.join(c['modes'])}: the server's own choice)")
    return (f"{head}; partitions {c['captured']}, of which {c['attackers_captured_scoring_only']} of the "
            f"{c['attackers']} attackers (scoring only)")
