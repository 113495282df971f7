"""`fl-lab`: the lab's one command line.

    fl-lab demo                                   # the whole story on the embedded digits
    fl-lab run experiments/default.yaml [--set attack.boost=auto ...] [--out runs/x]
    fl-lab run --check experiments/default.yaml [--set ...]   # every problem, nothing started
    fl-lab sweep experiments/sweeps/defenses.yaml
    fl-lab reproduce experiments/papers/poisoning-guide.yaml --quick [--check]
    fl-lab invert RUN ; fl-lab verify RUN ; fl-lab unlearn RUN ; fl-lab report RUN
    fl-lab deploy up --nodes 3 --malicious 1 ; fl-lab deploy run EXP.yaml ; fl-lab deploy down

The commands are the top layer (README, Layout): this package may import every other one. The tools
of other packages are imported when their subcommand runs, so `fl-lab --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from commands.console import guarded, progress_printer, say
from commands.preflight import (
    check_experiment,
    load_dataset,
    rule_problems,
    claim_collection_dir,
    collection_dir_problem,
    run_dir_problem,
)
from commands.tools import TOOLS, invert
from lab import log as lablog
from lab.config import ExperimentConfig
from lab.errors import ConfigError
from lab.pins import check_flwr
from lab.runfolder import RUN_MARKER

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    from commands.launch import claim_run_dir, expand_ratios, run_experiment
    from commands.local_run import LocalWorkers

    cfg = check_experiment(args.experiment, args.set or ())
    base = Path(args.out) if args.out else Path(cfg.execution.output_dir) / cfg.name
    if cfg.execution.reconstruction_only:
        # The original project's mode: invert an existing run's captures, no training.
        if args.check:
            say(f"ok: {args.experiment}: reconstruction only, inverts the captures of {base}")
            return 0
        return invert([str(base)])
    runs = [(sub, one, base / sub if sub else base) for sub, one in expand_ratios(cfg)]
    problems = [p for p in dict.fromkeys(run_dir_problem(d) for d in [base, *(out for _, _, out in runs)]) if p]
    if problems:
        raise ConfigError(problems)
    if args.check:
        fed = cfg.federated
        say(f"ok: {args.experiment}: {cfg.name}, rule {fed.aggregator.name}, attack {cfg.attack.type}, "
            f"{cfg.training.rounds} rounds, {fed.round_size} of {fed.num_clients} clients per round"
            f"{f', {len(runs)} runs (attackers_ratio)' if len(runs) > 1 else ''} -> {base.resolve()}")
        return 0
    load_dataset(cfg)
    if len(runs) > 1:
        claim_run_dir(base)  # the runs' parent: ours too, so a later run there is allowed
    results = []
    with contextlib.ExitStack() as stack:
        workers = stack.enter_context(LocalWorkers(1, base / "logs")) if args.in_process else None
        for sub, one, out in runs:
            say(f"running {one.name} ({one.federated.aggregator.name}, attack {one.attack.type}, "
                 f"attackers {one.attack.ratios[0]:g}) -> {out}{' (in-process)' if workers else ''}")
            progress = progress_printer(one, sub or "")
            summary = workers.run(one, out, progress) if workers else run_experiment(one, out, progress)
            results.append((out, summary))
    for out, s in results:
        asr = s.get("final_asr")
        say(f"done: {out}  accuracy {s['final_accuracy']:.4f}  asr {'-' if asr is None else f'{asr:.4f}'}  "
             f"{s['wall_seconds']:.0f} s wall, {s['rounds']} rounds")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from commands.sweep import Setting, load_sweep, run_sweep

    path = Path(args.sweep)
    name, settings = load_sweep(path)
    out = Path(args.out) if args.out else Path(settings[0].cfg.execution.output_dir) / "sweeps" / name
    problems = [p for p in [collection_dir_problem(out)] if p]
    checked = set()
    for s in settings:  # every distinct rule and every run folder is checked before the first run starts
        agg = s.cfg.federated.aggregator
        key = (agg.name, repr(agg.params), repr(agg.pre), s.cfg.federated.round_size)
        if key not in checked:
            checked.add(key)
            problems += [f"[{', '.join(label for _, label in s.labels)}] {p}" for p in rule_problems(s.cfg)]
        folder = _run_dir_refusal(out / "runs" / s.slug, s.cfg)
        if folder:
            problems.append(folder)
    if problems:
        raise ConfigError(problems)
    load_dataset(settings[0].cfg)
    claim_collection_dir(out)

    def start(i: int, total: int, setting: Setting) -> None:
        say(f"[{i + 1}/{total}] {setting.slug}")

    with _continues_by_itself(), _runner(args, out / "logs") as runner:
        run_sweep(path, out, runner, start, jobs=args.jobs)
    say((out / "results.md").read_text())
    say(f"results: {out / 'results.csv'}, {out / 'results.md'}, {out / 'plots'}")
    return 0


@contextlib.contextmanager
def _continues_by_itself() -> Iterator[None]:
    """Ctrl-C in a sweep or a card: its unfinished runs continue after their last checkpoint when
    the same command runs again (commands.run_reuse), so say that, not a single run's resume flag."""
    from commands.interrupt import RunInterrupted

    again = "the same command"
    try:
        yield
    except RunInterrupted as exc:
        raise exc.continued_by(again) from None
    except KeyboardInterrupt:  # with --jobs the runs stop in their threads; this one was waiting
        raise RunInterrupted(f"interrupted: {again} continues each unfinished run after its last checkpoint") from None


@contextlib.contextmanager
def _runner(args: argparse.Namespace, logs: Path) -> Iterator[Callable[[ExperimentConfig, Path], dict[str, Any]]]:
    """The runner of a sweep or a card: one `fl-lab run` simulation per experiment, with a line per
    round when `--verbose`; with `--in-process`, the same apps on `--jobs` workers of the lab's own
    (logs in `logs`), without Flower's transport."""
    from commands.launch import run_experiment
    from commands.local_run import LocalWorkers

    if getattr(args, "jobs", 1) > 1 and not args.in_process:
        raise ConfigError("--jobs N > 1 needs --in-process (the runs of `flwr run` share one SuperLink and Ray)")
    if args.in_process:
        with LocalWorkers(getattr(args, "jobs", 1), logs) as workers:
            yield workers.run
        return

    def runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
        return run_experiment(cfg, run_dir, progress_printer(cfg, "  ") if args.verbose else None)

    yield runner


def _run_dir_refusal(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """Why a sweep or card may not use `run_dir`, or None; a finished run of the same experiment
    there is reused as it is, whoever made the folder."""
    from commands.run_reuse import finished_run

    problem = run_dir_problem(run_dir)
    if problem and not finished_run(run_dir, cfg):
        return problem
    return None


def _no_runner(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    raise AssertionError(f"--score started a run ({run_dir})")


def cmd_reproduce(args: argparse.Namespace) -> int:
    """`fl-lab reproduce CARD`: a paper's table as real Flower runs (commands/cards.py, reproduce.py)."""
    from commands.card_record import card_folder, measured_dir
    from commands.cards import load_card
    from commands.reproduce import planned_runs, reproduce
    from commands.sweep import shared_simulation

    card = load_card(Path(args.card), quick=args.quick, seeds=args.seeds, only=args.cells, subset=args.subset)
    default = Path("runs") / "reproduce" / card_folder(card)
    out = Path(args.out) if args.out else default
    runs = planned_runs(card, out)
    problems = [p for p in [collection_dir_problem(out)] if p]
    problems += [p for run_dir, cfg in runs if (p := _run_dir_refusal(run_dir, cfg))]
    if problems:
        raise ConfigError(problems)
    kind = "CPU proxy" if card.proxy else f"subset {card.subset}: {card.subset_label}" if card.subset else "paper setting"
    if args.check:
        say(f"ok: {args.card}: {card.name} ({kind}), {len(card.cells)} cells, {len(runs)} runs "
            f"({len(card.seeds)} seeds) -> {out.resolve()}")
        return 0
    claim_collection_dir(out)
    record = measured_dir(card)
    measured = None if args.ignore_records else record
    if args.score:
        reproduce(card, out, _no_runner, score_only=True, measured=measured)
        say((out / "reproduction.md").read_text())
        say(f"scored ({kind}, nothing run): {out / 'reproduction.json'}, {out / 'reproduction.md'}")
        return _record(args, runs, record)
    load_dataset(runs[0][1])

    def start(i: int, total: int, run_dir: Path, state: str) -> None:
        say(f"[{i + 1}/{total}] {run_dir.name}{f' ({state})' if state else ''}")

    # one SuperLink and one Ray head for all the card's runs (started only if a run uses them)
    with _continues_by_itself(), shared_simulation(out), _runner(args, out / "logs") as runner:
        reproduce(card, out, runner, start, jobs=args.jobs, measured=measured)
    say((out / "reproduction.md").read_text())
    say(f"results ({kind}): {out / 'reproduction.json'}, {out / 'reproduction.md'}")
    return _record(args, runs, record)


def _record(args: argparse.Namespace, runs: list[tuple[Path, ExperimentConfig]], record: Path) -> int:
    """`--record`: keep the finished runs' evidence beside the card (commands/card_record.py)."""
    from commands.card_record import record_finished

    if args.record:
        names = record_finished(runs, record)
        say(f"recorded {len(names)} finished run(s) in {record}" + "".join(f"\n  {n}" for n in names))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """`fl-lab deploy up|run|down|status|certs|compose` (commands/deploy.py, secrets.py, compose.py)."""
    from commands import compose, deploy, secrets

    folder = Path(args.dir)
    if args.action == "up":
        dep = deploy.up(folder, args.nodes, args.malicious, tls=args.tls, auth=args.auth, isolation=args.isolation,
                        timeout=args.timeout)
        say(f"deployment up in {dep.folder}: SuperLink {dep.address} "
             f"({'TLS' if dep.tls else 'no TLS'}, {'node auth' if dep.auth else 'no node auth'}, "
             f"isolation {dep.isolation}), {dep.num_nodes} SuperNodes, malicious partitions {dep.malicious}")
        for p in dep.processes:
            say(f"  {p.name:<24} pid {p.pid:<8} log {p.log}")
        say(f"Flower connection `{deploy.CONNECTION}`: FLWR_HOME={dep.flwr_home} flwr run . {deploy.CONNECTION}")
        return 0
    if args.action == "run":
        cfg = check_experiment(args.experiment, args.set or ())
        dep = deploy.Deployment.load(folder.resolve())
        deploy.check_fits(cfg, dep)
        out = Path(args.out) if args.out else folder / "runs" / cfg.name
        problem = run_dir_problem(out)
        if problem:
            raise ConfigError(problem)
        load_dataset(cfg)
        say(f"running {cfg.name} on the deployment in {dep.folder} -> {out}")
        s = deploy.run_experiment(folder, cfg, out, progress_printer(cfg))
        asr = s.get("final_asr")
        say(f"done: {out}  accuracy {s['final_accuracy']:.4f}  asr {'-' if asr is None else f'{asr:.4f}'}  "
             f"{s['wall_seconds']:.0f} s wall, {s['rounds']} rounds, {s['failures']} failed replies")
        return 0
    if args.action == "down":
        stopped = deploy.down(folder)
        say(f"stopped {len(stopped)} processes: {stopped}")
        return 0
    if args.action == "status":
        import json

        say(json.dumps(deploy.status(folder), indent=2))
        return 0
    if args.action == "certs":
        hosts = args.host or ["localhost", "127.0.0.1", "superlink"]
        certs, keys = secrets.make_secrets(folder, args.nodes, hosts)
        say(f"CA {certs.ca_cert}, SuperLink certificate {certs.server_cert} (SAN {', '.join(hosts)}), "
             f"{len(keys)} node key pairs in {folder / 'keys'}")
        return 0
    if args.action == "compose":
        sys.stdout.write(compose.compose_yaml(args.nodes, args.malicious))
        return 0
    raise AssertionError(args.action)


def _deploy_parser(sub: Any) -> None:
    dep = sub.add_parser("deploy", help="a real SuperLink + SuperNodes on this machine (loopback, TLS, node auth)")
    actions = dep.add_subparsers(dest="action", required=True)

    def with_dir(p: argparse.ArgumentParser, default: str = "runs/deploy") -> argparse.ArgumentParser:
        p.add_argument("--dir", default=default, help=f"deployment folder (default: {default})")
        p.set_defaults(func=cmd_deploy)
        return p

    up = with_dir(actions.add_parser("up", help="start a SuperLink and N SuperNodes, wait until all are connected"))
    up.add_argument("--nodes", type=int, required=True, help="number of SuperNodes (partitions)")
    up.add_argument("--malicious", type=int, default=0, help="the last K partitions get malicious=true")
    up.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True, help="TLS (default: on)")
    up.add_argument("--auth", action=argparse.BooleanOptionalAction, default=True,
                    help="SuperNode authentication with per-node keys (default: on; needs TLS)")
    up.add_argument("--isolation", choices=("subprocess", "process"), default="process",
                    help="process (default): the apps run under separate flower-superexec processes, as in "
                         "compose.yaml; subprocess: the SuperLink and SuperNodes launch them (both measured "
                         "about 62 s per round of the default experiment here, bench/RESULTS.md)")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for start-up")
    up.add_argument("--out", dest="dir", help="same as --dir")
    run = with_dir(actions.add_parser("run", help="run an experiment on the deployment"))
    run.add_argument("experiment", help="experiment YAML file")
    run.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override keys, e.g. federated.num_clients=3")
    run.add_argument("--out", help="run folder (default: <dir>/runs/<name>)")
    with_dir(actions.add_parser("down", help="stop exactly the processes `up` started"))
    with_dir(actions.add_parser("status", help="the recorded processes and the connected nodes"))
    certs = with_dir(actions.add_parser("certs", help="a local CA, a SuperLink certificate and node key pairs"),
                     default="docker/secrets")
    certs.add_argument("--nodes", type=int, default=3, help="node key pairs to make")
    certs.add_argument("--host", action="append", help="subjectAltName of the SuperLink (repeatable)")
    certs.add_argument("--out", dest="dir", help="same as --dir")
    comp = with_dir(actions.add_parser("compose", help="print compose.yaml for N nodes (pinned flwr version)"))
    comp.add_argument("--nodes", type=int, default=3)
    comp.add_argument("--malicious", type=int, default=1)


# `fl-lab demo` runs the other commands, so it is dispatched here rather than in `commands.tools`.
def _demo(argv: list[str]) -> int:
    from commands.demo import main as demo

    return demo(argv)


EXTERNAL: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    **TOOLS, "demo": ("the whole story on the embedded digits data, with its report", _demo)}


def in_process(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-process", action="store_true",
                        help="run the ServerApp and ClientApps of each run in one process, without Flower's "
                             "SuperLink/Ray transport: the same numbers, several times faster on small runs")


def jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="with --in-process: N runs at a time, one core each (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-lab", description="FL Security Lab")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment in Flower simulation")
    run.add_argument("experiment", help="experiment YAML file")
    run.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="override keys, e.g. training.rounds=5")
    run.add_argument("--out", help="run folder (default: <execution.output_dir>/<name>); a folder the lab did not "
                     f"create must be empty (the lab marks its run folders with {RUN_MARKER})")
    in_process(run)
    run.add_argument("--check", action="store_true",
                     help="check the experiment, the rule and the run folder, start nothing: exit 0 with one "
                          "'ok:' line, or 2 with every problem")
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run a grid of experiments and compare them")
    sweep.add_argument("sweep", help="sweep YAML file (see experiments/sweeps/)")
    sweep.add_argument("--out", help="sweep folder (default: <execution.output_dir>/sweeps/<name>)")
    sweep.add_argument("--verbose", action="store_true", help="a line per round of every run")
    in_process(sweep)
    jobs(sweep)
    sweep.set_defaults(func=cmd_sweep)
    rep = sub.add_parser("reproduce", help="run a paper's reproduction card and compare with the published table")
    rep.add_argument("card", help="reproduction card YAML (see experiments/papers/)")
    rep.add_argument("--cells", nargs="+", metavar="ID", help="only these cells (ids, e.g. median:scaling)")
    rep.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds (default: the card's)")
    rep.add_argument("--out", help="folder (default: runs/reproduce/<card name>, or <card name>-quick)")
    rep.add_argument("--quick", action="store_true",
                     help="the card's CPU proxy (its `proxy` overrides, its own measured expectations)")
    rep.add_argument("--check", action="store_true",
                     help="check the card and every cell's experiment, start nothing: exit 0 or 2 with every problem")
    rep.add_argument("--score", action="store_true",
                     help="start nothing: score the finished runs as the card stands (a card run in parts); "
                          "cells without a finished run read not-run, with how far their runs got")
    rep.add_argument("--subset", metavar="NAME",
                     help="a labelled part of the card's paper setting (its `subsets:`, e.g. rounds-300)")
    rep.add_argument("--record", action="store_true",
                     help="copy every finished run's evidence to the card's record, measured/<folder>/ beside "
                          "the card (versioned: a card run in parts over machines and days adds up there)")
    rep.add_argument("--ignore-records", action="store_true",
                     help="do not read the card's record: run (or reuse from the folder) every cell here")
    rep.add_argument("--verbose", action="store_true", help="a line per round of every run")
    in_process(rep)
    jobs(rep)
    rep.set_defaults(func=cmd_reproduce)
    _deploy_parser(sub)
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
    if argv and argv[0] not in ("-h", "--help"):
        # Before any Flower work: a venv whose flwr is not the pinned one (pyproject.toml) would run,
        # and record, another Flower than the docs, images and numbers name.
        code = guarded("fl-lab", _pinned_flower)
        if code:
            return code
    if argv and argv[0] in EXTERNAL:
        return EXTERNAL[argv[0]][1](argv[1:])
    args = build_parser().parse_args(argv)
    return guarded("fl-lab", lambda: int(args.func(args)))


def _pinned_flower() -> int:
    check_flwr()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
