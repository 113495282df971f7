"""Invert several captured updates at once, one worker process per entry.

Inverting one update is a long chain of small, sequential autograd steps that one torch thread
runs best (notes/inversion.md §5.4: under contention, extra OpenMP threads spin-wait), so the
way to use a second core is a second entry in a second process. Each worker uses
`execution.num_threads` threads and the same seed as the sequential path, so the outputs are
the same as `--jobs 1`.

Ctrl-C: the workers ignore SIGINT; the parent sets a shared stop flag, which each worker's
progress callback turns into the KeyboardInterrupt the optimiser already handles (it returns the
best iterate so far), and entries not yet started are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import queue as queue_mod
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import log as lablog
from lab.config import ExperimentConfig, load_experiment
from lab.errors import LabError
from lab.runfolder import ManifestEntry
from lab.task import set_threads
from inversion.entry import Progress, Tools, entry_bar, invert_one, load_tools

log = logging.getLogger(__name__)

_REPORT_EVERY = 0.1  # seconds between progress messages from one worker

@dataclass
class _Worker:
    """What one worker process reads once and uses for every entry it inverts."""

    cfg: ExperimentConfig
    tools: Tools
    progress_queue: Any
    stop: Any


_worker: _Worker | None = None  # set in each worker process by _start_worker
# A LabError while a worker starts (e.g. a corrupt final.safetensors): kept and raised by the first
# entry the worker is given, so the parent reports it as one line rather than a broken pool.
_start_error: LabError | None = None


def _start_worker(threads: int, run_dir: str, progress_queue: Any, stop: Any) -> None:
    global _worker, _start_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; see the module docstring
    set_threads(threads)
    lablog.configure("WARNING")
    try:
        cfg = load_experiment(Path(run_dir) / "config.yaml")  # the parent checked it lies inside the run
        _worker = _Worker(cfg, load_tools(cfg, Path(run_dir)), progress_queue, stop)
    except LabError as exc:
        _start_error = exc


def _invert_in_worker(args: dict[str, Any], row: ManifestEntry, out: str) -> dict[str, Any] | None:
    if _start_error is not None:
        raise _start_error
    w = _worker
    assert w is not None, "_start_worker did not run"
    if w.stop.is_set():
        return None  # queued before the interrupt (the pool hands out work ahead), not started
    last = 0.0

    def progress(iteration: int, loss: float) -> None:
        nonlocal last
        if w.stop.is_set():
            raise KeyboardInterrupt  # caught by the optimiser: it keeps the best iterate so far
        now = time.monotonic()
        if now - last >= _REPORT_EVERY:
            last = now
            w.progress_queue.put((row.id, iteration, loss))

    return invert_one(w.cfg, argparse.Namespace(**args), row, w.tools, Path(out), progress)


def _drain(progress_queue: Any, feeds: dict[str, Progress]) -> None:
    while True:
        try:
            entry, iteration, loss = progress_queue.get_nowait()
        except queue_mod.Empty:
            return
        feeds[entry](iteration, loss)


def invert_parallel(args: argparse.Namespace, run_dir: Path, rows: list[ManifestEntry], outs: dict[str, Path],
                    jobs: int, threads: int) -> list[dict[str, Any]]:
    """Metrics of every entry inverted (in `rows` order); raises the first worker's error.

    `rows` are checked manifest entries and `outs` their checked output folders (by entry id).
    """
    ctx = mp.get_context("spawn")  # no fork of a process that may hold torch threads
    progress_queue, stop = ctx.Queue(), ctx.Event()
    with contextlib.ExitStack() as stack:
        feeds = {row.id: stack.enter_context(entry_bar(row.id, args.quiet, position=i))
                 for i, row in enumerate(rows)}
        pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_start_worker,
                                                       initargs=(threads, str(run_dir), progress_queue, stop)))
        futures = {pool.submit(_invert_in_worker, vars(args), row, str(outs[row.id])): row.id
                   for row in rows}
        pending: set[Future[dict[str, Any] | None]] = set(futures)
        while pending:
            try:
                _, pending = wait(pending, timeout=0.2)
                _drain(progress_queue, feeds)
                if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
                    for f in pending:
                        f.cancel()  # fail fast: entries not started yet are not worth the wait
            except KeyboardInterrupt:
                if stop.is_set():
                    raise
                log.warning("interrupted: the running entries keep their best iterate; the others are skipped")
                stop.set()
                for f in pending:
                    f.cancel()
        _drain(progress_queue, feeds)
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()  # type: ignore[misc]
    results = {entry: None if f.cancelled() else f.result() for f, entry in futures.items()}
    skipped = [entry for entry, metrics in results.items() if metrics is None]
    if skipped:
        log.warning("not inverted (interrupted before they started): %s", ", ".join(skipped))
    return [metrics for metrics in results.values() if metrics is not None]
