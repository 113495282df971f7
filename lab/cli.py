"""`fl-lab`: the lab's one command line.

    fl-lab run experiments/default.yaml [--set attack.boost=auto ...] [--out runs/x]

Subcommands that live in other packages are resolved lazily by dotted path, so `lab` imports
nothing of ours at import time (and `fl-lab --help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab import log as lablog
from lab.config import ExperimentConfig, load_experiment
from lab.errors import ConfigError, LabError

log = logging.getLogger(__name__)

# name -> (help, "module:function" taking argv and returning an exit code)
EXTERNAL: dict[str, tuple[str, str]] = {
    "invert": ("reconstruct client images from a run's captured updates", "inversion.cli:main"),
    "verify": ("does the backdoor fire, and on the reconstructions?", "unlearning.cli:verify_main"),
    "unlearn": ("fine-tune the backdoor away with the reconstructions", "unlearning.cli:unlearn_main"),
}


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress_printer(cfg: ExperimentConfig, label: str = "") -> Callable[[dict[str, Any]], None]:
    """A per-round terminal line: round, accuracy, ASR, elapsed seconds."""
    total = cfg.training.rounds
    prefix = f"[{label}] " if label else ""

    def show(row: dict[str, Any]) -> None:
        asr = row.get("asr")
        asr_txt = "-" if asr is None else f"{asr:.3f}"
        dropped = row.get("dropped")
        extra = f"  dropped {dropped}" if dropped else ""
        _out(f"{prefix}round {row['round']:>3}/{total}  accuracy {row['accuracy']:.4f}  asr {asr_txt}"
             f"  ({row.get('seconds', 0.0):.1f} s){extra}")

    return show


def cmd_run(args: argparse.Namespace) -> int:
    from lab.launch import expand_ratios, run_experiment

    cfg = load_experiment(args.experiment, args.set or ())
    base = Path(args.out) if args.out else Path(cfg.execution.output_dir) / cfg.name
    if cfg.execution.reconstruction_only:
        # The original project's mode: invert an existing run's captures, no training.
        return int(importlib.import_module("inversion.cli").main([str(base)]))
    _preflight(cfg)
    results = []
    for sub, one in expand_ratios(cfg):
        out = base / sub if sub else base
        _out(f"running {one.name} ({one.federated.aggregator.name}, attack {one.attack.type}, "
             f"attackers {one.attack.ratios[0]:g}) -> {out}")
        summary = run_experiment(one, out, progress_printer(one, sub or ""))
        results.append((out, summary))
    for out, s in results:
        asr = s.get("final_asr")
        _out(f"done: {out}  accuracy {s['final_accuracy']:.4f}  asr {'-' if asr is None else f'{asr:.4f}'}  "
             f"{s['wall_seconds']:.0f} s wall, {s['rounds']} rounds")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lab.launch import run_experiment
    from lab.sweep import Setting, load_sweep, run_sweep

    path = Path(args.sweep)
    name, settings = load_sweep(path)
    checked = set()
    for s in settings:  # every distinct rule is checked before the first run starts
        key = (s.cfg.federated.aggregator.name, repr(s.cfg.federated.aggregator.params), s.cfg.federated.round_size)
        if key not in checked:
            _preflight(s.cfg)
            checked.add(key)
    out = Path(args.out) if args.out else Path(settings[0].cfg.execution.output_dir) / "sweeps" / name

    def start(i: int, total: int, setting: Setting) -> None:
        _out(f"[{i + 1}/{total}] {setting.slug}")

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        return run_experiment(cfg, run_dir, progress_printer(cfg, "  ") if args.verbose else None)

    run_sweep(path, out, runner, start)
    _out((out / "results.md").read_text())
    _out(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'plots'}")
    return 0


def _preflight(cfg: ExperimentConfig) -> None:
    """Config-time checks that need the model and the rule registry (before any process starts)."""
    from lab.data import load_data
    from lab.records import ParamLayout
    from lab.task import build_for, state_of

    registry = importlib.import_module("strategies.registry")
    types = importlib.import_module("strategies.types")
    data = load_data(cfg.dataset, cfg.seed)
    layout = ParamLayout.of(state_of(build_for(cfg, data)))
    ctx = types.AggregatorContext(layout=layout, clients_per_round=cfg.federated.round_size, seed=cfg.seed)
    problems = registry.check_config(cfg, ctx)
    if problems:
        raise ConfigError(problems)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-lab", description="FL Security Lab")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in Flower simulation")
    run.add_argument("experiment", help="experiment YAML file")
    run.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override keys, e.g. training.rounds=5")
    run.add_argument("--out", help="run folder (default: <execution.output_dir>/<name>)")
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run a grid of experiments and compare them")
    sweep.add_argument("sweep", help="sweep YAML file (see experiments/sweeps/)")
    sweep.add_argument("--out", help="sweep folder (default: <execution.output_dir>/sweeps/<name>)")
    sweep.add_argument("--verbose", action="store_true", help="a line per round of every run")
    sweep.set_defaults(func=cmd_sweep)
    for name, (help_text, _) in EXTERNAL.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the Ctrl-C path, so the Flower run is stopped and our SuperLink shut down.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lablog.configure("WARNING")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    if argv and argv[0] in EXTERNAL:
        module, func = EXTERNAL[argv[0]][1].split(":")
        handler: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
        return handler(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        sys.stderr.write(f"fl-lab: invalid experiment:{'' if len(exc.problems) > 1 else ' '}{exc}\n")
        return 2
    except LabError as exc:
        sys.stderr.write(f"fl-lab: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("fl-lab: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
