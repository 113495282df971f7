"""`--in-process`: experiments run by worker processes of the lab's own, each calling the ServerApp
and the ClientApps directly, without the SuperLink, Ray and gRPC of `flwr run` (server/local_grid.py
says what is left out, and why).

Worker processes, not the caller's: a run never shares an interpreter with the command (Ctrl-C, a
crash, torch's thread settings stay apart), several runs of a grid train side by side on separate
cores (`fl-lab sweep --in-process --jobs N`), and a worker serves run after run, so torch and
Flower are imported once per worker instead of once per run (8 s of a 26 s digits run at load 5).
Each run logs to RUN_DIR/logs/local.log.

    python -m commands.local_run --serve    # a worker: reads run folders, one per line, on stdin
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from commands.interrupt import interrupted_where
from commands.launch import follow_metrics, prepare_run_dir
from commands.procs import terminate
from lab import log as lablog
from lab.config import ExperimentConfig
from lab.errors import RunError

EXECUTOR = "in-process"
ROOT = Path(__file__).resolve().parents[1]


class LocalWorkers:
    """Up to `jobs` worker processes (started on first use, one torch thread each); `run` may be
    called from `jobs` threads at once."""

    def __init__(self, jobs: int, log_dir: Path) -> None:
        self._slots: queue.Queue[subprocess.Popen[str] | None] = queue.Queue()
        for _ in range(max(1, jobs)):
            self._slots.put(None)
        self._log_dir = log_dir
        self._started: list[subprocess.Popen[str]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[str]:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        # One thread: the runs of a grid go side by side, one per core (an OpenMP thread without a
        # core of its own made a training step 6x slower, lab.task.set_threads).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self._log_dir / f"worker-{len(self._started) + 1}.log", "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "commands.local_run", "--serve"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log_file, env=env, cwd=ROOT, text=True)
        self._started.append(proc)
        return proc

    def run(self, cfg: ExperimentConfig, out_dir: Path,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run one experiment on a free worker (`on_progress` gets each metrics.jsonl line as it is
        written); returns summary.json's content, with `wall_seconds` and `executor` added.

        Raises:
            RunError: the run failed (the last lines of its log are in the message).
            RunInterrupted: Ctrl-C; the message says after which round the run stopped.
        """
        out_dir = prepare_run_dir(cfg, out_dir)
        proc = self._slots.get()
        started = time.monotonic()
        stop = threading.Event()
        follower = threading.Thread(target=follow_metrics, args=(out_dir / "metrics.jsonl", on_progress, stop),
                                    daemon=True) if on_progress is not None else None
        if follower is not None:
            follower.start()
        try:
            if proc is None or proc.poll() is not None:
                proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"{out_dir}\n")
            proc.stdin.flush()
            reply = proc.stdout.readline()
        except KeyboardInterrupt:
            raise interrupted_where(out_dir, cfg.training.rounds) from None
        except BrokenPipeError:
            reply = ""
        finally:
            self._slots.put(proc)
            stop.set()
            if follower is not None:  # the last rounds are printed before the caller's "done"
                follower.join(timeout=5)
        outcome = json.loads(reply) if reply else {"ok": False, "error": "the worker process died"}
        summary_path = out_dir / "summary.json"
        if not outcome["ok"] or not summary_path.exists():
            log_path = out_dir / "logs" / "local.log"
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.exists() else []
            raise RunError(f"in-process run failed ({outcome.get('error')}); see {log_path}:\n  " + "\n  ".join(tail))
        summary: dict[str, Any] = json.loads(summary_path.read_text())
        summary["wall_seconds"] = time.monotonic() - started
        summary["executor"] = EXECUTOR
        return summary

    def close(self) -> None:
        """Stop every worker: end of input, then SIGTERM / SIGKILL for one that does not exit."""
        for proc in self._started:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self._started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                terminate([proc.pid], grace=5)
                proc.wait()
        self._started.clear()


def run_all(calls: Sequence[Callable[[], Any]], jobs: int = 1) -> None:
    """Call each in order, or from `jobs` threads at once (only for runners whose runs are processes
    of their own). The first failure stops the batch: no new call starts, running ones finish."""
    if jobs <= 1:
        for call in calls:
            call()
        return
    pool = concurrent.futures.ThreadPoolExecutor(jobs)
    try:
        for future in [pool.submit(call) for call in calls]:
            future.result()
    finally:  # on a failure or Ctrl-C no new run starts; running ones end with their process
        pool.shutdown(wait=False, cancel_futures=True)


def run_experiment_in_process(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """One experiment on a worker of its own (see `LocalWorkers.run`)."""
    with LocalWorkers(1, out_dir / "logs") as workers:
        return workers.run(cfg, out_dir)


def _run_one(folder: Path) -> None:
    from client.app import app as client_app
    from lab.config import load_experiment
    from server.local_grid import run_local

    cfg = load_experiment(folder / "config.yaml")
    run_local(client_app, {"experiment-text": (folder / "config.yaml").read_text(), "output-dir": str(folder)},
              cfg.federated.num_clients)


def serve(replies: IO[str]) -> int:
    """The worker: for each run folder read on stdin, run it and answer one JSON line on `replies`."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    # Flower's records reach the root logger; the lab's packages do not propagate (lab.log).
    loggers = [root, *(logging.getLogger(name) for name in lablog.PACKAGES)]
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for line in sys.stdin:
        folder = Path(line.strip())
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / "logs" / "local.log", mode="w")
        handler.setFormatter(fmt)
        for logger in loggers:
            logger.addHandler(handler)
        try:
            _run_one(folder)
            outcome: dict[str, Any] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - one failed run is reported, the worker serves the next
            root.error("run failed:\n%s", traceback.format_exc())
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.close()
        replies.write(json.dumps(outcome) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m commands.local_run --serve  (a worker of `--in-process`; not for direct use)")
    # Replies go on the original stdout; anything else the run prints to fd 1 joins the log on fd 2.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(serve(protocol))
