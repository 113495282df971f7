"""`fl-lab run`: one experiment as a real Flower simulation (`flwr run`), with progress and an honest
exit code.

Flower facts this works around (see notes/flower.md; re-checked on the pinned 1.42.0, README "Flower
version"): `flwr run` exits 0 even when the run failed (we ask `flwr ls` for the status), the managed local SuperLink on port 39091 is detached, shared by
every user of the machine and keeps the environment it was first started with (so we start our own
simulation SuperLink on a free port, in a private FLWR_HOME, and stop it by PID), and runtime
dependency installation would `uv sync` torch per run (disabled).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commands.interrupt import (
    STOP_GRACE,
    clear_stop,
    interrupted_where,
    request_stop,
)
from commands.preflight import model_bytes, run_dir_problem
from commands.procs import family, terminate
from lab.artifacts import atomic_write_text, read_jsonl
from lab.cohort import RUN_CONFIG_KEY as COHORT_SIZE
from lab.cohort import clients_per_message, usable_cores
from lab.config import ExperimentConfig, dump_yaml
from lab.errors import ConfigError, RunError
from lab.runfolder import RUN_MARKER

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FAB_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl", ".gitignore", ".editorconfig", "LICENSE")
# FLWR_HOME of a SuperLink and Ray shared by many runs, started on the first call (`commands.sweep.using`).
SHARED_SUPERLINK: contextvars.ContextVar[Callable[[], Path] | None] = contextvars.ContextVar("shared_superlink")


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
        # Flower spawns flower-superexec / flwr-simulation by name: our venv's bin must come first.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    return env


def simulation_env(flwr_home: Path) -> dict[str, str]:
    """flower_env for a simulation SuperLink; flwr-simulation and every Ray process inherit it.

    Ray (2.55, pinned by flwr 1.42) binds its GCS, raylets, workers and agents to the node IP, on
    every interface, and Flower calls `ray.init` with no way to pass `_node_ip_address` (which Ray
    would turn from 127.0.0.1 back into the machine's IP anyway). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    is Ray's own "this machine only" switch (its macOS/Windows default): the node IP becomes loopback
    and every Ray server binds there. Loopback still admits any local user, and Ray runs what it is
    sent: token authentication, with a fresh 256-bit token per SuperLink (a run's, or a sweep's) kept in the
    environment only (readable by our user alone), keeps them out.
    """
    return {**flower_env(flwr_home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": os.urandom(32).hex()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, alive: Callable[[], bool], context: ssl.SSLContext | None = None) -> None:
    """Poll `url` until it answers 200; `context` verifies an https server (e.g. against a local CA)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RunError(f"the process serving {url} exited during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RunError(f"{url} did not answer within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group we started (the process and its children), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def write_connection(flwr_home: Path, name: str, address: str, extra: dict[str, str | bool] | None = None) -> None:
    """A Flower config.toml whose default connection is `name` at `address`."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    for key, value in {"insecure": True, **(extra or {})}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    flwr_home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(flwr_home / "config.toml", "\n".join(lines) + "\n")


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A private simulation SuperLink on a free loopback port (env: a `simulation_env`), or the shared one of
    SHARED_SUPERLINK if set (`flwr_home` then only points the flwr CLI at it); yields the connection name."""
    shared = SHARED_SUPERLINK.get(None)
    if shared is not None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared() / "config.toml", flwr_home / "config.toml")
        yield "lab-sim"
        return
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env or simulation_env(flwr_home), start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, lambda: proc.poll() is None)
        write_connection(flwr_home, "lab-sim", f"127.0.0.1:{port}")
        yield "lab-sim"
    finally:
        stop_process(proc)
        # flwr-simulation (and its Ray workers) run detached from the SuperLink's process group;
        # an interrupted run would leave them behind. They carry our private FLWR_HOME.
        left = terminate(family([], flwr_home))
        if left:
            log.warning("processes of %s still alive after SIGKILL: %s", flwr_home, left)


def stage_app(app_dir: Path) -> Path:
    """A temporary copy of the files of `app_dir` a FAB can hold (Flower's suffixes, outside .venv and the
    folders .gitignore names): `flwr run` packs the same FAB from it without walking .venv (~50,000 files, 5-11 s)."""
    text = (app_dir / ".gitignore").read_text() if (app_dir / ".gitignore").is_file() else ""
    skip = {".venv/", ".git/", "__pycache__/", *(text.split() if "!" not in text else ())}
    dest = Path(tempfile.mkdtemp(prefix="fl-lab-fab-"))
    for root, dirs, files in os.walk(app_dir):  # symlinked folders are not entered, as in Flower's own walk
        dirs[:] = [d for d in dirs if f"{d}/" not in skip]
        for src in (Path(root, f) for f in files if f.endswith(FAB_SUFFIXES) and not Path(root, f).is_symlink()):
            (dest / src.relative_to(app_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / src.relative_to(app_dir))
    return dest


def run_config_toml(values: dict[str, Any]) -> str:
    """TOML for `flwr run --run-config FILE`; JSON string escapes are valid TOML basic strings."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@dataclass(frozen=True)
class RunOutcome:
    run_id: str | None
    status: str
    details: str
    seconds: float


def flwr_run(
    connection: str,
    flwr_home: Path,
    run_config: dict[str, Any],
    work_dir: Path,
    federation_config: str | None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    metrics_path: Path | None = None,
    app_dir: Path = APP_DIR,
) -> RunOutcome:
    """`flwr run APP connection --stream`, progress from metrics.jsonl, status from `flwr ls`; on
    Ctrl-C the run stops at the next round boundary (commands.interrupt) and KeyboardInterrupt
    propagates."""
    env = flower_env(flwr_home)
    clear_stop(work_dir)  # an interrupted run's request would stop this one after round 0
    cfg_file = work_dir / "run_config.toml"
    atomic_write_text(cfg_file, run_config_toml(run_config))
    fab_src = stage_app(app_dir)  # removed when the run ends
    cmd = [str(BIN / "flwr"), "run", str(fab_src), connection, "--stream", "--run-config", str(cfg_file)]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    started = time.monotonic()
    stop = threading.Event()
    watcher = None
    if on_progress is not None and metrics_path is not None:
        watcher = threading.Thread(target=follow_metrics, args=(metrics_path, on_progress, stop), daemon=True)
        watcher.start()
    with open(work_dir / "flwr.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=work_dir,
                                start_new_session=True)
        run_id = None
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                out.write(raw)
                out.flush()
                match = re.search(rb"(?:Successfully started run|run[_ -]id[\"': ]+)\s*(\d{5,})", raw)
                if match and run_id is None:
                    run_id = match.group(1).decode()
            proc.wait()
        except KeyboardInterrupt:
            _stop_run(proc, out, run_id, connection, env, work_dir)
            raise
        finally:
            stop.set()
            shutil.rmtree(fab_src, ignore_errors=True)
            if watcher is not None:
                watcher.join(5)
    status, details = run_status(connection, flwr_home, run_id, work_dir)
    if proc.returncode != 0 and status == "unknown":
        status, details = "failed", f"`flwr run` exited with {proc.returncode}"
    return RunOutcome(run_id, status, details, time.monotonic() - started)


def _stop_run(proc: subprocess.Popen[bytes], log_file: Any, run_id: str | None, connection: str,
              env: dict[str, str], work_dir: Path) -> None:
    """Ctrl-C: the ServerApp stops at the next round boundary; `flwr stop` only when none comes
    within STOP_GRACE seconds, or on a second Ctrl-C."""
    request_stop(work_dir)
    sys.stderr.write("fl-lab: stopping after the current round (Ctrl-C again to stop at once)\n")
    # `flwr run --stream` prints on until the run ends: a full pipe would block it.
    drain = threading.Thread(target=shutil.copyfileobj, args=(proc.stdout, log_file), daemon=True)
    drain.start()
    try:
        with contextlib.suppress(KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.wait(STOP_GRACE)
        if proc.poll() is None and run_id is not None:
            subprocess.run([str(BIN / "flwr"), "stop", run_id, connection], env=env, cwd=work_dir,
                           capture_output=True, timeout=60, check=False)
    finally:
        stop_process(proc)
        drain.join(5)
        if run_id is not None:  # the run ended or Flower stopped it; without an id, a run may yet start
            clear_stop(work_dir)


def run_status(connection: str, flwr_home: Path, run_id: str | None, work_dir: Path) -> tuple[str, str]:
    """('finished:completed' | 'finished:failed' | ..., details) from `flwr ls --format json`."""
    if run_id is None:
        return "unknown", "no run id in the `flwr run` output"
    res = subprocess.run([str(BIN / "flwr"), "ls", connection, "--run-id", run_id, "--format", "json"],
                         env=flower_env(flwr_home), cwd=work_dir, capture_output=True, text=True, timeout=120,
                         check=False)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        return "unknown", (res.stdout + res.stderr).strip()[-300:]
    runs = data.get("runs") or []
    if not runs:
        return "unknown", json.dumps(data)[:300]
    run = runs[0]
    return str(run.get("status", "unknown")), str(run.get("status-details", "") or "")


def follow_metrics(path: Path, callback: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    seen = 0
    while True:
        rows = read_jsonl(path)
        for row in rows[seen:]:
            callback(row)
        seen = max(seen, len(rows))
        if stop.is_set():
            return
        stop.wait(0.5)


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one experiment in simulation; returns summary.json's content.

    Raises:
        RunError: the Flower run failed (with Flower's status details and the log path).
        RunInterrupted: Ctrl-C; the message says after which round the run stopped.
    """
    out_dir = prepare_run_dir(cfg, out_dir)
    flwr_home = out_dir / ".flwr"
    fed = cfg.federated
    run_config: dict[str, Any] = {"experiment-text": dump_yaml(cfg), "output-dir": str(out_dir)}
    federation = (f"num-supernodes={fed.num_clients} "
                  f"client-resources-num-cpus={cfg.execution.client_cpus:g}")
    workers = cfg.execution.workers or usable_cores()
    per_message = clients_per_message(cfg.execution.messages, fed.round_size, workers, model_bytes(cfg))
    if per_message > 1:  # lab.cohort: one node per cohort, `workers` of them training at a time
        run_config[COHORT_SIZE] = per_message
        federation = (f"num-supernodes={math.ceil(fed.round_size / per_message)} "
                      f"client-resources-num-cpus={usable_cores() / workers:g}")
    try:
        with simulation_superlink(flwr_home, out_dir / "logs" / "superlink.log") as connection:
            outcome = flwr_run(
                connection, flwr_home, run_config,
                out_dir, federation, on_progress, out_dir / "metrics.jsonl",
            )
    except KeyboardInterrupt:
        raise interrupted_where(out_dir, cfg.training.rounds) from None
    return finished_summary(outcome, out_dir)


def claim_run_dir(out_dir: Path) -> Path:
    """The absolute `out_dir`, created if needed and marked as a run folder of the lab.

    Raises:
        ConfigError: the folder is not empty and not one of the lab's (see `run_dir_problem`).
    """
    problem = run_dir_problem(out_dir)
    if problem:
        raise ConfigError(problem)
    out_dir = out_dir.resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / RUN_MARKER).is_file():
            atomic_write_text(out_dir / RUN_MARKER, "A run folder of fl-lab: a new run here replaces the earlier "
                                                    "run's results (metrics, checkpoints, captures, ...).\n")
    except OSError as exc:
        raise ConfigError(f"run folder {out_dir}: cannot be created ({exc.strerror or exc})") from None
    return out_dir


def prepare_run_dir(cfg: ExperimentConfig, out_dir: Path) -> Path:
    """The absolute run folder with the resolved config in it and no stale results; a resumed run
    (execution.resume) keeps the metrics the interrupted one wrote.

    Raises:
        ConfigError: `out_dir` is a folder the lab did not create and is not empty (nothing is
            removed from it).
    """
    out_dir = claim_run_dir(out_dir)
    (out_dir / "summary.json").unlink(missing_ok=True)
    if not cfg.execution.resume:
        # A new run in an old run folder: what the earlier run (and the tools after it) wrote would
        # otherwise sit beside the new results. Only our own artifacts are removed.
        for stale in ("metrics.jsonl", "final.safetensors", "verification.json"):
            (out_dir / stale).unlink(missing_ok=True)
        for folder in ("checkpoints", "captures", "inversion", "unlearning"):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    return out_dir


def finished_summary(outcome: RunOutcome, out_dir: Path) -> dict[str, Any]:
    """summary.json of a completed run, with Flower's run id and the wall time.

    Raises:
        RunError: Flower reports the run as not completed, or the ServerApp wrote no summary.
    """
    summary_path = out_dir / "summary.json"
    if outcome.status != "finished:completed" or not summary_path.exists():
        raise RunError(
            f"Flower run {outcome.run_id or '?'} did not complete (status {outcome.status}"
            f"{': ' + outcome.details if outcome.details else ''}); see {out_dir / 'flwr.log'}")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    summary["flower_run_id"] = outcome.run_id
    summary["wall_seconds"] = outcome.seconds
    return summary


def expand_ratios(cfg: ExperimentConfig) -> Sequence[tuple[str | None, ExperimentConfig]]:
    """One experiment per attackers_ratio value: (subfolder or None, config with a scalar ratio)."""
    from lab.config import with_values

    ratios = cfg.attack.ratios
    if not isinstance(cfg.attack.attackers_ratio, tuple):
        return [(None, cfg)]
    return [(f"attackers_{r:g}", with_values(cfg, [f"attack.attackers_ratio={r}"])) for r in ratios]
