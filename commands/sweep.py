"""`fl-lab sweep SWEEP.yaml`: a grid of real Flower runs and the comparison table.

A sweep file names a base experiment and a grid of dotted keys, each with a list of values; every
combination (times every seed) is one run in its own folder. A mapping value is merged into that
section, and its optional `label` names it in the tables:

    name: defenses
    base: ../default.yaml              # relative to the sweep file
    seeds: [0]
    overrides: [training.rounds=40]    # applied to every run
    grid:
      federated.aggregator: [{name: fedavg}, {name: median}]
      attack: [{label: boosted, type: backdoor, boost: auto}, {label: none, type: none}]
      attack.poison_ratio: [0.5, 1.0]

Writes `results.csv`, `results.md` (one row per setting: clean accuracy, ASR, ASR floor, detection
F1 and AUC (`lab.detection`), seconds per round, averaged over seeds with their spread) and
`plots/*.png`. Finished runs are kept: re-running the sweep skips every run folder that already
has its summary.json and was run with the same training config, and an interrupted run continues
after its last checkpoint (`commands.run_reuse`). The simulations share
one SuperLink and one Ray head (`shared_simulation`, FLWR_HOME and logs in the sweep folder)
instead of starting both per run.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import itertools
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from commands.launch import (
    SHARED_SUPERLINK,
    simulation_env,
    simulation_superlink,
    stop_process,
)
from commands.local_run import run_all
from commands.run_reuse import continuing, finished_run, run_identity
from lab.artifacts import atomic_write_text, read_jsonl
from lab.config import (
    ExperimentConfig,
    load_experiment,
    read_yaml,
    to_dict,
)
from lab.errors import ConfigError, RunError

log = logging.getLogger(__name__)

SWEEP_KEYS = {"name", "base", "seeds", "overrides", "grid"}


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its labels per grid key and the resolved experiment per seed."""

    labels: tuple[tuple[str, str], ...]  # (grid key, value label)
    seed: int
    cfg: ExperimentConfig

    @property
    def slug(self) -> str:
        parts = [f"{v}" for _, v in self.labels] + [f"seed{self.seed}"]
        return "__".join(p.replace("/", "-").replace(" ", "") for p in parts)


def load_sweep(path: Path) -> tuple[str, list[Setting]]:
    """Every run of the sweep, validated up front (all problems of all runs at once)."""
    raw = read_yaml(path)
    problems = [f"{k}: unknown sweep key; known: {', '.join(sorted(SWEEP_KEYS))}" for k in raw if k not in SWEEP_KEYS]
    if "base" not in raw or "grid" not in raw or not isinstance(raw.get("grid"), dict):
        problems.append("a sweep needs `base` (an experiment file) and `grid` (a mapping of key: [values])")
    if problems:
        raise ConfigError(problems)
    base = to_dict(load_experiment((path.parent / str(raw["base"])).resolve(), list(raw.get("overrides", []))))
    seeds = list(raw.get("seeds", [base["training"]["seed"]]))
    grid: dict[str, list[Any]] = raw["grid"]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: expected a non-empty list of values")
    if problems:
        raise ConfigError(problems)
    settings = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid.items()]):
        for seed in seeds:
            data = json.loads(json.dumps(base))  # deep copy of plain data
            labels = []
            for key, value in combo:
                label, value = _label(value)
                labels.append((key, label))
                _assign(data, key, value)
            data["training"]["seed"] = seed
            data["name"] = f"{raw.get('name', path.stem)}"
            try:
                cfg = load_experiment(data)
            except ConfigError as exc:
                problems.extend(f"[{', '.join(lab for _, lab in labels)}] {p}" for p in exc.problems)
                continue
            settings.append(Setting(tuple(labels), seed, cfg))
    if problems:
        raise ConfigError(problems)
    return str(raw.get("name", path.stem)), settings


def _label(value: Any) -> tuple[str, Any]:
    if isinstance(value, dict):
        value = dict(value)
        label = value.pop("label", None) or value.get("name") or value.get("type") or yaml.safe_dump(value).strip()
        return str(label), value
    return f"{value}", value


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        # A mapping replaces the section's named fields; aggregator params are replaced whole.
        merged = dict(node[last])
        merged.update(value)
        if "name" in value and "params" not in value and "params" in merged:
            merged["params"] = {}
        node[last] = merged
    else:
        node[last] = value


def run_sweep(
    path: Path,
    out: Path,
    runner: Callable[[ExperimentConfig, Path], dict[str, Any]],
    on_start: Callable[[int, int, Setting], None] | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run (or reuse) every setting; returns one result row per run. `jobs` > 1 calls `runner` from
    that many threads at once: only for a runner whose runs are processes of their own (the
    in-process executor), never for `flwr run` on the shared SuperLink."""
    name, settings = load_sweep(path)
    done: dict[str, Path] = {}  # identical resolved configs (e.g. no-attack x poison ratio) run once
    run_dirs = [done.setdefault(run_identity(s.cfg), out / "runs" / s.slug) for s in settings]
    todo: dict[Path, tuple[int, Setting]] = {}
    for i, (setting, run_dir) in enumerate(zip(settings, run_dirs, strict=True)):
        if run_dir not in todo and not finished_run(run_dir, setting.cfg):
            todo[run_dir] = (i, setting)

    def one(run_dir: Path) -> None:
        i, setting = todo[run_dir]
        if on_start is not None:
            on_start(i, len(settings), setting)
        runner(continuing(run_dir, setting.cfg), run_dir)

    # One SuperLink and one Ray head serve every simulation of the sweep (bench/warm_start.py).
    try:
        with shared_simulation(out):
            run_all([functools.partial(one, run_dir) for run_dir in todo], jobs)
    finally:  # also when stopped: the table of what finished, the missing runs named (nothing lost)
        # A run is in the table when it was finished before (not in `todo`) or finished now.
        missing = {d for d in todo if not (d / "summary.json").exists()}
        rows = [result_row(setting, json.loads((run_dir / "summary.json").read_text()),
                           read_jsonl(run_dir / "metrics.jsonl"), run_dir)
                for setting, run_dir in zip(settings, run_dirs, strict=True) if run_dir not in missing]
        fill_floors(rows)
        write_results(out, name, rows, len(missing))
    return rows


# A Ray head that stays up for the runs of a sweep: `ray.init` as Flower calls it, in the same
# loopback-only, token-authenticated environment (`simulation_env`); then it waits for SIGTERM, on
# which Ray's exit handler stops the processes it started.
_RAY_HEAD = """
import os, signal, sys, ray
ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False, _temp_dir=sys.argv[1])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(ray.get_runtime_context().gcs_address)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
"""


@contextlib.contextmanager
def ray_head(env: dict[str, str], log_path: Path, timeout: float = 120) -> Iterator[str]:
    """A local Ray cluster for many runs, started with `env` (a `simulation_env`): it binds to
    loopback and admits only clients holding that environment's token, like the cluster Flower's
    own `ray.init` starts. Yields its GCS address (for RAY_ADDRESS). Its temporary folder (sockets,
    Ray's logs) is private and removed afterwards.

    Raises:
        RunError: the head exited or did not come up within `timeout` seconds.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="fl-lab-ray-"))
    address_file = temp_dir / "address"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", _RAY_HEAD, str(temp_dir), str(address_file)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not address_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RunError(f"the Ray head did not start (within {timeout:.0f} s); see {log_path}")
            time.sleep(0.2)
        yield address_file.read_text().strip()
    finally:
        stop_process(proc, grace=20)
        shutil.rmtree(temp_dir, ignore_errors=True)


class SharedSimulation:
    """One simulation SuperLink and one Ray head for all the runs of a sweep (bench/warm_start.py:
    a run then skips the SuperLink's start and stop and Ray's start and shutdown).

    Started when the first run asks (`open`), so a sweep whose runs are all reused starts nothing;
    stopped by `close`, with every process that carries its FLWR_HOME. The runs stay apart: each is
    its own Flower run, with its own `flwr-simulation` process (the ServerApp) and its own Ray job,
    whose ClientApp actors are new processes that Ray ends when the job's driver exits. If the
    SuperLink or the head dies, the runs after fail, as any failed run stops a sweep. Ray takes no
    `num_cpus`/`num_gpus` from a client joining a running cluster: a federation config with
    `init-args-num-cpus`/`-gpus` would fail here (`run_experiment` sets neither).
    """

    def __init__(self, root: Path) -> None:
        self.flwr_home = root.resolve() / ".flwr"
        self.logs = root.resolve() / "logs"
        self._stack: contextlib.ExitStack | None = None

    def open(self) -> Path:
        """FLWR_HOME of the shared SuperLink (its config.toml names it), started with the Ray head on
        first use."""
        if self._stack is None:
            with contextlib.ExitStack() as stack, using(None):  # these two are no run's own
                env = simulation_env(self.flwr_home)
                address = stack.enter_context(ray_head(env, self.logs / "ray-head.log"))
                stack.enter_context(simulation_superlink(self.flwr_home, self.logs / "superlink.log",
                                                         {**env, "RAY_ADDRESS": address}))
                self._stack = stack.pop_all()
        return self.flwr_home

    def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


@contextlib.contextmanager
def using(shared: SharedSimulation | None) -> Iterator[None]:
    """`commands.launch.run_experiment` runs on `shared` within the block (None: a SuperLink per run)."""
    token = SHARED_SUPERLINK.set(shared.open if shared is not None else None)
    try:
        yield
    finally:
        SHARED_SUPERLINK.reset(token)


@contextlib.contextmanager
def shared_simulation(root: Path) -> Iterator[SharedSimulation]:
    """A `SharedSimulation` (FLWR_HOME `root`/.flwr, logs in `root`/logs) for the runs of the block."""
    shared = SharedSimulation(root)
    try:
        with using(shared):
            yield shared
    finally:
        shared.close()


def result_row(setting: Setting, summary: Mapping[str, Any], metrics: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    rounds = [r for r in metrics if r["round"] > 0]
    det = summary.get("detection") or {}
    return {
        **{key: label for key, label in setting.labels},
        "seed": setting.seed,
        "accuracy": summary["final_accuracy"],
        "asr": summary["final_asr"],
        "asr_floor": summary.get("asr_floor"),
        "detection_f1": det.get("f1"),
        "detection_auc": det.get("auc"),  # pooled ROC AUC of the rule's suspicion (lab.detection)
        "seconds_per_round": statistics.mean(r["round_seconds"] for r in rounds[1:]) if len(rounds) > 1 else None,
        "attack_type": setting.cfg.attack.type,
        "rule": setting.cfg.federated.aggregator.name,
        "run": str(run_dir),
    }


def fill_floors(rows: list[dict[str, Any]]) -> None:
    """ASR floor of each row: the no-attack run of the same rule and seed, else FedAvg's."""
    clean = {(r["rule"], r["seed"]): r["asr"] for r in rows if r["attack_type"] == "none"}
    for r in rows:
        r["asr_floor"] = clean.get((r["rule"], r["seed"]), clean.get(("fedavg", r["seed"])))


def _group_key(row: Mapping[str, Any], keys: Sequence[str]) -> tuple[Any, ...]:
    return tuple(row[k] for k in keys)


def write_results(out: Path, name: str, rows: list[dict[str, Any]], missing: int = 0) -> None:
    """results.csv, results.md and the plots of `rows`; `missing` runs not finished are named in
    results.md (an interrupted or failed sweep)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    fields = list(rows[0]) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    note = (f"\n{missing} run(s) of the sweep not finished: run the same command again to add them "
            "(finished runs are reused).\n") if missing else ""
    atomic_write_text(out / "results.md", results_markdown(name, rows) + note)
    try:
        from lab.plots import sweep_plots

        sweep_plots(out, rows)
    except Exception as exc:  # a broken plot must not lose the table
        log.warning("plots failed: %s", exc)


def results_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"# {name}\n\n(no runs)\n"
    label_keys = [k for k in rows[0] if k not in {"seed", "accuracy", "asr", "asr_floor", "detection_f1",
                                                   "detection_auc", "seconds_per_round", "attack_type", "rule",
                                                   "run"}]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r, label_keys), []).append(r)
    head = [*label_keys, "seeds", "accuracy", "ASR", "ASR floor", "detection F1", "detection AUC", "s/round"]
    lines = [f"# {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        lines.append("| " + " | ".join([*map(str, key), str(len(rs)), _stat(rs, "accuracy"), _stat(rs, "asr"),
                                         _stat(rs, "asr_floor"), _stat(rs, "detection_f1"),
                                         _stat(rs, "detection_auc"), _stat(rs, "seconds_per_round", "{:.2f}")])
                     + " |")
    return "\n".join(lines) + "\n"


def _stat(rows: list[dict[str, Any]], key: str, fmt: str = "{:.3f}") -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values))}"
