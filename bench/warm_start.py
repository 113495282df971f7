"""Where a simulation run's start-up goes, and what one SuperLink + one Ray head per sweep saves.

    python bench/warm_start.py [--experiment experiments/no-attack.yaml] [--rounds 3] [--repeats 3]
                               [--parts timeline,shared-timeline,ray,ab] [--out FILE] [--label L]

Parts (all real processes, the lab's own environment: loopback-only Ray with token authentication):

- timeline: one `run_experiment` with Flower's verbose logging, its phases read from the timestamps of
  the SuperLink log (uvicorn, UTC) and flwr.log (Flower, local time): SuperLink start, `flwr run`
  (FAB build and upload), the flwr-simulation process, ClientApp import there, `ray.init` and the
  actor pool, the ServerApp's own start (in parallel), round 1 against the later rounds, the shutdown.
- shared-timeline: the same for a run on a `commands.sweep.shared_simulation` that has already run
  one experiment (a sweep's second run and after).
- ray: `ray.init` of a new cluster, actor start and shutdown, against joining a running head
  (`commands.sweep.ray_head`, which must refuse a client without its token); in each, what a
  ClientApp actor pays on its first message, replayed inside the actor: imports, `load_data`,
  partitions, model, the first and a second client through the lab's ClientApp.
- ab: `--repeats` runs each way, alternating: a SuperLink and Ray per run (`fl-lab run`) against
  one `shared_simulation` (what `fl-lab sweep` does), with the shared session's one-off start-up, the
  actor PIDs (fresh per run?) and whether both ways give bit-identical final models.

Every number comes with the load average (`os.getloadavg`) at its start and end: on a shared 2-core
box the spread between repeats is large.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commands import launch, sweep
from commands.procs import family, terminate
from lab.artifacts import read_jsonl
from lab.config import dump_yaml, load_experiment


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- timeline -----------------------------------------------------------------------------------

UVICORN = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)Z .*?(Started server process|Application startup "
                     r"complete|/v1/control/start-run|/v1/runtime/pull-task-input|/v1/runtime/push-task-output|"
                     r"/v1/control/list-runs|Finished server process)")
FLOWER = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\S*:\s+(.*)$")
FLOWER_EVENTS = {
    "Pre-registering run": "sim_ready",
    "Loading ClientApp": "clientapp_load",
    "Initialising: RayBackend": "ray_init",
    "Constructed ActorPool": "ray_pool",
    "Initial global evaluation results": "server_round0",
    "Strategy execution finished": "training_done",
}


def superlink_events(path: Path, since: float) -> dict[str, float]:
    """First time (epoch s) of each SuperLink event from `since` on; uvicorn writes UTC."""
    out: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = UVICORN.search(line)
        if m:
            t = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + float(m.group(2))
            if t >= since:
                out.setdefault(m.group(3).rsplit("/", 1)[-1], t)
    return out


def flower_events(path: Path) -> tuple[dict[str, float], dict[int, float]]:
    """Flower's verbose log (local time): named events and the start of each round."""
    events: dict[str, float] = {}
    rounds: dict[int, float] = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace")).splitlines():
        m = FLOWER.search(line)
        if not m:
            continue
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        text = m.group(3)
        r = re.match(r"\[ROUND (\d+)/\d+\]", text)
        if r:
            rounds.setdefault(int(r.group(1)), t)
        for key, name in FLOWER_EVENTS.items():
            if text.startswith(key):
                events.setdefault(name, t)
    return events, rounds


@contextlib.contextmanager
def verbose_flower() -> Iterator[None]:
    """`run_experiment` with Flower's DEBUG log and timestamps (federation option `verbose`)."""
    original = launch.flwr_run

    def flwr_run(*args: Any, **kwargs: Any) -> launch.RunOutcome:
        args = list(args)
        args[4] = f"{args[4] or ''} verbose=true".strip()
        return original(*args, **kwargs)

    launch.flwr_run = flwr_run  # type: ignore[assignment]
    try:
        yield
    finally:
        launch.flwr_run = original  # type: ignore[assignment]


def timeline(cfg: Any, out: Path, shared: sweep.SharedSimulation | None = None) -> dict[str, Any]:
    """One run's phases; on `shared` (already open), a sweep's run after the first."""
    before = load()
    t0 = time.time()
    with verbose_flower(), sweep.using(shared):
        summary = launch.run_experiment(cfg, out)
    t_end = time.time()
    link = superlink_events((shared.logs if shared else out / "logs") / "superlink.log", t0)
    ev, rounds = flower_events(out / "flwr.log")
    n = max(rounds)
    ends = {r: rounds.get(r + 1, ev.get("training_done", t_end)) for r in rounds}
    durations = {r: ends[r] - rounds[r] for r in rounds}
    steady = statistics.median([durations[r] for r in rounds if r > 1]) if n > 1 else 0.0
    pool = ev.get("ray_pool", rounds[1])

    def d(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 2)

    phases = {
        "superlink_start": d(t0, link.get("Application startup complete")),
        "flwr_run_submit (CLI start, FAB build and upload)": d(link.get("Application startup complete", t0),
                                                               link.get("start-run")),
        "simulation_process_start (superexec spawns flwr-simulation)": d(link.get("start-run"),
                                                                         link.get("pull-task-input")),
        "fab_install_and_config": d(link.get("pull-task-input"), ev.get("sim_ready")),
        "clientapp_import_in_simulation_process": d(ev.get("clientapp_load"), ev.get("ray_init")),
        "ray_init_and_actor_pool": d(ev.get("ray_init"), ev.get("ray_pool")),
        "serverapp_start_to_round0_done (parallel thread)": d(ev.get("sim_ready"), ev.get("server_round0")),
        "round1": round(durations[1], 2),
        "later_round_median": round(steady, 2),
        "round1_extra": round(durations[1] - steady, 2),
        "actor_first_message (worker start, imports, data, first training) minus a later round":
            round(ends[1] - max(rounds[1], pool) - steady, 2),
        "rounds_total": round(sum(durations.values()), 2),
        "training_done_to_simulation_exit (summary, Ray shutdown)": d(ev.get("training_done"),
                                                                       link.get("push-task-output")),
        "flwr_run_exit_and_status": d(link.get("push-task-output"), link.get("list-runs")),
        "superlink_stop_and_cleanup": d(link.get("list-runs"), t_end),
        "wall": round(t_end - t0, 2),
    }
    return {"phases_s": phases, "load_before": before, "load_after": load(),
            "flower_wall_seconds": round(summary["wall_seconds"], 2), "rounds": n}


# --- actor and Ray probes (run in a subprocess with the lab's Ray environment) --------------------

PROBE = r'''
import json, os, sys, time
T0 = time.perf_counter()
import ray
t_import = time.perf_counter() - T0
ROOT, TEXT, CPUS, ADDRESS = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] or None
sys.path.insert(0, ROOT)

@ray.remote
class Probe:
    def __init__(self):
        self.born = time.time()

    def ready(self):
        return self.born, os.getpid()

    def first_message(self, text):
        steps = {}
        t = time.perf_counter()
        def lap(name):
            nonlocal t
            now = time.perf_counter(); steps[name] = round(now - t, 3); t = now
        import torch; lap("import torch")
        import flwr.clientapp; lap("import flwr")
        import client.app as ca; lap("import client.app (lab)")
        from pathlib import Path
        from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        from lab.config import from_run_config
        from lab.data import load_data, partition_indices
        from lab.task import LocalHyperparams, build_for, state_of
        run_config = {"experiment-text": TEXT, "output-dir": ""}
        cfg = from_run_config(run_config, Path(ROOT)); lap("config")
        data = load_data(cfg.dataset, cfg.seed); lap("load_data")
        n = cfg.federated.num_clients
        partition_indices(data.train.y, 0, n, cfg.federated, cfg.seed); lap("partition_indices (first)")
        model = build_for(cfg, data, seed=cfg.seed); lap("build model")
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        config = {**LocalHyperparams.of(cfg).to_config(), "server-lr": cfg.federated.server_lr, "server-round": 1}
        for pid, name in ((0, "first client (train)"), (1, "second client (train)")):
            msg = Message(content=RecordDict({"arrays": ArrayRecord(state_of(model)), "config": ConfigRecord(config)}),
                          dst_node_id=1000 + pid, message_type=MessageType.TRAIN)
            ctx = Context(run_id=1, node_id=1000 + pid, node_config={"partition-id": pid, "num-partitions": n},
                          state=RecordDict(), run_config=run_config)
            try:
                ca.app(msg, ctx)
            except Exception as exc:  # a changed ClientApp contract: report it, keep the rest
                steps[name + " error"] = repr(exc)[:200]
            lap(name)
        return steps

t = time.perf_counter()
ray.init(address=ADDRESS, include_dashboard=False, logging_level="WARNING",
         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
t_init = time.perf_counter() - t
t = time.time()
actor = Probe.options(num_cpus=CPUS).remote()
born, pid = ray.get(actor.ready.remote())
t_actor = time.time() - t
t = time.perf_counter()
steps = ray.get(actor.first_message.remote(TEXT))
t_first = time.perf_counter() - t
t = time.perf_counter()
ray.kill(actor)
ray.shutdown()
t_down = time.perf_counter() - t
print("PROBE " + json.dumps({"import ray": round(t_import, 3), "ray.init": round(t_init, 3),
                             "actor start (create to ready)": round(t_actor, 3),
                             "first message, total": round(t_first, 3), "first message steps": steps,
                             "ray shutdown": round(t_down, 3), "actor pid": pid}))
'''


def probe(cfg: Any, env: dict[str, str], address: str = "") -> dict[str, Any]:
    before = load()
    res = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), dump_yaml(cfg), f"{cfg.execution.client_cpus:g}",
                          address], env=env, capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")]
    if not lines:
        return {"error": (res.stdout + res.stderr)[-1500:]}
    return {**json.loads(lines[-1][6:]), "load_before": before, "load_after": load()}


def ray_probes(cfg: Any, work: Path) -> dict[str, Any]:
    """A fresh cluster per probe (what every `fl-lab run` pays) against joining a running head."""
    home = work / ".flwr"
    env = launch.simulation_env(home)
    out: dict[str, Any] = {}
    try:
        out["fresh cluster"] = probe(cfg, env)
        t = time.time()
        with sweep.ray_head(env, work / "ray-head.log") as head:
            out["start a Ray head (once per sweep)"] = round(time.time() - t, 2)
            out["join the running head, 1st"] = probe(cfg, {**env, "RAY_ADDRESS": head})
            out["join the running head, 2nd"] = probe(cfg, {**env, "RAY_ADDRESS": head})
            out["a client without the token is refused"] = "PROBE" not in subprocess.run(
                [sys.executable, "-c", PROBE, str(ROOT), dump_yaml(cfg), "1", head],
                env={**env, "RAY_AUTH_TOKEN": os.urandom(32).hex()}, capture_output=True, text=True, timeout=300,
                check=False).stdout
    finally:
        terminate(family([], home))
    return out


# --- A/B: a SuperLink and Ray per run against one shared session --------------------------------

def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def actor_pids(flwr_home: Path) -> set[int]:
    pids = set()
    for pid in family([], flwr_home):
        with contextlib.suppress(OSError):
            if b"ClientAppActor" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
    return pids


def one_run(cfg: Any, out: Path) -> dict[str, Any]:
    before = load()
    t = time.time()
    summary = launch.run_experiment(cfg, out)
    wall = time.time() - t
    rows = read_jsonl(out / "metrics.jsonl")
    return {"wall": round(wall, 2), "flwr_run": round(summary["wall_seconds"], 2),
            "round1": round(rows[1]["round_seconds"], 2) if len(rows) > 1 else None,
            "final_model": digest(out / "final.safetensors"), "load_before": before, "load_after": load()}


def linger(flwr_home: Path, limit: float = 30) -> float:
    """Seconds until no ClientAppActor of `flwr_home` is left (after a run returned)."""
    t = time.time()
    while actor_pids(flwr_home) and time.time() - t < limit:
        time.sleep(0.25)
    return round(time.time() - t, 2)


def ab(cfg: Any, work: Path, repeats: int) -> dict[str, Any]:
    """Alternating runs: a SuperLink and Ray per run, then one on the shared session (kept up)."""
    fresh, shared_runs, pids = [], [], []
    shared = sweep.SharedSimulation(work / "shared")
    try:
        t = time.time()
        shared.open()
        session_start = round(time.time() - t, 2)
        for i in range(repeats):
            fresh.append(one_run(cfg, work / f"fresh{i}"))
            with sweep.using(shared):
                run = one_run(cfg, work / f"shared{i}")
            run["actor_pids"] = sorted(actor_pids(shared.flwr_home))
            run["actors_gone_after_s"] = linger(shared.flwr_home)
            shared_runs.append(run)
            pids.append(run["actor_pids"])
    finally:
        shared.close()
    return {
        "per_run_fresh": fresh, "per_run_shared": shared_runs,
        "shared_session_start_once": session_start,
        "median_wall_fresh": round(statistics.median(r["wall"] for r in fresh), 2),
        "median_wall_shared": round(statistics.median(r["wall"] for r in shared_runs), 2),
        "median_round1_fresh": round(statistics.median(r["round1"] for r in fresh), 2),
        "median_round1_shared": round(statistics.median(r["round1"] for r in shared_runs), 2),
        "same_final_model_per_pair": [f["final_model"] == r["final_model"] for f, r in zip(fresh, shared_runs)],
        "no_actor_pid_reused": len({p for ps in pids for p in ps}) == sum(len(ps) for ps in pids),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments/no-attack.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="timeline,shared-timeline,ray,ab")
    parser.add_argument("--out", default=str(ROOT / "bench/results/warm-start.json"))
    parser.add_argument("--label", default="", help="stored under '<experiment> <label>' in --out")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    cfg = load_experiment(args.experiment, [f"training.rounds={args.rounds}"])
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "experiment": Path(args.experiment).name, "rounds": args.rounds, "clients": cfg.federated.num_clients,
        "load_at_start": load(),
    }
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        work = Path(tmp)
        if "timeline" in parts:
            result["timeline"] = timeline(cfg, work / "timeline")
        if "shared-timeline" in parts:
            with sweep.shared_simulation(work / "sweep") as shared:
                t = time.time()
                shared.open()
                opened = round(time.time() - t, 2)
                launch.run_experiment(cfg, work / "warm-up")
                result["shared_timeline"] = {"session_start_once": opened,
                                             **timeline(cfg, work / "shared-timeline", shared)}
        if "ray" in parts:
            result["ray_and_actor"] = ray_probes(cfg, work / "probes")
        if "ab" in parts:
            result["ab"] = ab(cfg, work / "ab", args.repeats)
    result["load_at_end"] = load()
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    out = Path(args.out)
    if out.exists():  # one file, one entry per experiment
        with contextlib.suppress(json.JSONDecodeError):
            previous = json.loads(out.read_text())
            entries = previous if isinstance(previous, dict) and "runs" in previous else {"runs": {}}
            entries["runs"][f"{result['experiment']} {args.label}".strip()] = result
            out.write_text(json.dumps(entries, indent=2) + "\n")
            return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": {f"{result['experiment']} {args.label}".strip(): result}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
