"""`fl-lab deploy`: the lab as a real Flower deployment on this machine (loopback only), secured.

    fl-lab deploy up --nodes 3 --malicious 1          # SuperLink + 3 SuperNodes, TLS + node auth
    fl-lab deploy run experiments/smoke.yaml --set federated.num_clients=3
    fl-lab deploy down                                 # stops exactly the processes `up` started

`up` starts one `flower-superlink` (one HTTP port carrying the Fleet, Control and Runtime APIs) and N
`flower-supernode` processes, each with its own runtime port and a node config giving its partition
(`partition-id`, `num-partitions`), whether it is malicious (`malicious=true` for the last K) and a
`data-dir`. It records every PID (with its kernel start time, so a recycled PID is never mistaken
for ours) and one log per process in the deployment folder, and writes a Flower connection
(`$FLWR_HOME/config.toml`) for `flwr run . lab-deploy`.

Security (on by default): a local CA signs the SuperLink's certificate (SAN localhost, 127.0.0.1
and `superlink` for compose); SuperNodes and the `flwr` CLI trust only that CA (`--root-certificates`,
connection key `root-certificates`). Node authentication: each SuperNode has its own P-384 key
pair; the SuperLink runs with `--enable-supernode-auth` and accepts only the public keys registered
through its Control API (`flwr supernode register`), which is how Flower 1.41 and 1.42 list keys (the
old `--auth-list-public-keys` CSV is refused by both). Flower requires TLS for node auth. The Control
API itself authenticates nobody: open-source Flower 1.42 has no account auth (OIDC needs the
enterprise plugin; FLWR_OIDC_ENABLED=1 exits) and its TLS asks no client certificate, so any local
user who reaches the loopback port can submit an app, which runs as us. Trust the machine's users.

Isolation: in both of Flower's modes every message starts a fresh `flwr-clientapp` process (which
imports torch); 1.41/1.42's warm executor pools exist only for Kubernetes and not for ClientApps. The
default `subprocess` (the SuperLink and each SuperNode start their own `flower-superexec`) needs
half the long-lived processes; `process` runs those executors as separate processes, as in
compose.yaml. bench/deploy.py measured 114 s (subprocess) and 84 s (process) per round of the
default experiment on the shared 2-core machine, against 3.3 s in simulation (warm Ray actors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from commands import procs
from commands.interrupt import interrupted_where
from commands.launch import (
    BIN,
    finished_summary,
    flower_env,
    flwr_run,
    free_port,
    prepare_run_dir,
    wait_http,
    write_connection,
)
from commands.procs import stat, terminate
from commands.secrets import Certificates, make_certificates, make_node_key
from lab.artifacts import read_jsonl, write_json
from lab.config import ExperimentConfig, dump_yaml
from lab.errors import ConfigError, RunError

log = logging.getLogger(__name__)

CONNECTION = "lab-deploy"
HOST = "127.0.0.1"  # loopback only: nothing here listens on another interface
DEFAULT_DIR = Path("runs") / "deploy"
ISOLATIONS = ("subprocess", "process")


# --------------------------------------------------------------------------------------------
# Processes: started in their own session, recorded with their kernel start time


@dataclass(frozen=True)
class ProcRecord:
    name: str
    pid: int
    start: int  # /proc/<pid>/stat field 22: distinguishes our process from a recycled PID
    log: str
    cmd: list[str] = field(default_factory=list)


def alive(rec: ProcRecord) -> bool:
    return procs.running(rec.pid, rec.start)


def family(records: Iterable[ProcRecord], flwr_home: Path) -> list[int]:
    """Live PIDs that belong to this deployment (see commands.procs.family); recorded processes count
    only while they are still the same process (start time), not a recycled PID."""
    return procs.family((r.pid for r in records if alive(r)), flwr_home)


def spawn(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> ProcRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    st = stat(proc.pid)
    # The Popen object is dropped on purpose: `up` exits and the processes keep running.
    proc.returncode = 0  # silences Popen.__del__'s "still running" warning; we track the PID
    return ProcRecord(name, proc.pid, st[3] if st else -1, str(log_path), cmd)


# --------------------------------------------------------------------------------------------
# The deployment


@dataclass
class Deployment:
    folder: str
    address: str
    tls: bool
    auth: bool
    isolation: str
    num_nodes: int
    malicious: list[int]
    ca_cert: str | None
    processes: list[ProcRecord] = field(default_factory=list)
    node_keys: list[str] = field(default_factory=list)

    @property
    def flwr_home(self) -> Path:
        return Path(self.folder) / ".flwr"

    def save(self) -> None:
        write_json(Path(self.folder) / "deployment.json", asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Deployment:
        path = folder / "deployment.json"
        if not path.exists():
            raise RunError(f"no deployment in {folder} (run `fl-lab deploy up` first)")
        raw = json.loads(path.read_text())
        raw["processes"] = [ProcRecord(**p) for p in raw.get("processes", [])]
        return cls(**raw)

    def node_config(self, partition: int) -> str:
        data_dir = Path(self.folder) / "data" / f"node-{partition}"
        mal = "true" if partition in self.malicious else "false"
        return (f"partition-id={partition} num-partitions={self.num_nodes} malicious={mal} "
                f"data-dir={json.dumps(str(data_dir))}")


def malicious_partitions(nodes: int, malicious: int) -> list[int]:
    """The last `malicious` partitions (a fixed, documented choice; the ground truth for scoring)."""
    if not 0 <= malicious <= nodes:
        raise ConfigError(f"--malicious must be between 0 and --nodes ({nodes}), got {malicious}")
    return list(range(nodes - malicious, nodes))


def tls_args(dep: Deployment) -> list[str]:
    return ["--root-certificates", str(dep.ca_cert)] if dep.tls else ["--insecure"]


def _ssl_context(dep: Deployment) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=dep.ca_cert) if dep.tls and dep.ca_cert else None


def superlink_cmd(dep: Deployment, port: int, certs: Certificates | None) -> list[str]:
    cmd = [str(BIN / "flower-superlink")]
    if certs is not None:
        cmd += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key)]
    else:
        cmd += ["--insecure"]
    if dep.auth:
        cmd += ["--enable-supernode-auth"]
    return cmd + ["--isolation", dep.isolation, "--host", HOST, "--port", str(port),
                  "--disable-runtime-dependency-installation"]


def supernode_cmd(dep: Deployment, partition: int, port: int, key: Path | None) -> list[str]:
    cmd = [str(BIN / "flower-supernode"), *tls_args(dep), "--superlink", dep.address]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    return cmd + ["--isolation", dep.isolation, "--host", HOST, "--port", str(port),
                  "--node-config", dep.node_config(partition)]


def superexec_cmd(dep: Deployment, runtime_address: str, over_tls: bool) -> list[str]:
    security = tls_args(dep) if over_tls else ["--insecure"]
    return [str(BIN / "flower-superexec"), *security, "--runtime-api-address", runtime_address]


def flwr_cli(dep: Deployment, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "flwr"), *args], env=flower_env(dep.flwr_home), cwd=dep.folder,
                          capture_output=True, text=True, timeout=timeout, check=False)


def register_node(dep: Deployment, public_key: Path) -> None:
    res = flwr_cli(dep, "supernode", "register", str(public_key), CONNECTION)
    if res.returncode != 0:
        raise RunError(f"could not register {public_key}: {(res.stdout + res.stderr).strip()[-400:]}")


def online_nodes(dep: Deployment) -> list[dict[str, Any]]:
    """The SuperLink's view of its SuperNodes that are online (`flwr supernode ls --format json`)."""
    res = flwr_cli(dep, "supernode", "ls", CONNECTION, "--format", "json")
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        return []
    nodes = data.get("nodes") or []
    return [n for n in nodes if str(n.get("status", "")).lower() == "online"]


def wait_nodes(dep: Deployment, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        dead = [p.name for p in dep.processes if not alive(p)]
        if dead:
            raise RunError(f"{', '.join(dead)} exited during start-up; see {Path(dep.folder) / 'logs'}")
        n = len(online_nodes(dep))
        if n >= count:
            return
        if time.monotonic() > deadline:
            raise RunError(f"only {n} of {count} SuperNodes connected within {timeout:.0f} s; "
                           f"see {Path(dep.folder) / 'logs'}")
        time.sleep(1.0)


def up(folder: Path, nodes: int, malicious: int, tls: bool = True, auth: bool = True,
       isolation: str = "process", timeout: float = 180.0) -> Deployment:
    """Start a SuperLink and `nodes` SuperNodes on loopback; returns once all are connected.

    Raises:
        ConfigError: impossible options (auth without TLS, K > N, a live deployment in `folder`).
        RunError: a process failed to start or the nodes did not connect (everything started is
            stopped again before the error propagates).
    """
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    if auth and not tls:
        raise ConfigError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth "
                          "with --insecure): drop --no-tls or add --no-auth")
    if isolation not in ISOLATIONS:
        raise ConfigError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    folder = folder.resolve()
    if (folder / "deployment.json").exists():
        old = Deployment.load(folder)
        if any(alive(p) for p in old.processes):
            raise ConfigError(f"a deployment is already running in {folder} (`fl-lab deploy down` first)")
    folder.mkdir(parents=True, exist_ok=True)
    certs = None
    keys: list[Path] = []
    if tls:
        certs = make_certificates(folder / "certs")
    if auth:
        keys = [folder / "keys" / f"node-{i}" for i in range(nodes)]
        for k in keys:
            make_node_key(k)
    port = free_port()
    dep = Deployment(str(folder), f"{HOST}:{port}", tls, auth, isolation, nodes,
                     malicious_partitions(nodes, malicious), str(certs.ca_cert) if certs else None,
                     node_keys=[str(k) for k in keys])
    env = flower_env(dep.flwr_home)
    logs = folder / "logs"
    try:
        dep.processes.append(spawn("superlink", superlink_cmd(dep, port, certs), logs / "superlink.log", env))
        dep.save()
        scheme = "https" if tls else "http"
        wait_http(f"{scheme}://{dep.address}/health", timeout, lambda: alive(dep.processes[0]),
                  context=_ssl_context(dep))
        extra: dict[str, str | bool] = {"insecure": False, "root-certificates": str(certs.ca_cert)} if certs else {}
        write_connection(dep.flwr_home, CONNECTION, dep.address, extra)
        if isolation == "process":  # the ServerApp executor, outside the SuperLink
            dep.processes.append(spawn("superexec-serverapp", superexec_cmd(dep, dep.address, over_tls=True),
                                       logs / "superexec-serverapp.log", env))
        for k in keys:
            register_node(dep, k.with_name(k.name + ".pub"))
        for i in range(nodes):
            node_port = free_port()
            dep.processes.append(spawn(f"supernode-{i}", supernode_cmd(dep, i, node_port, keys[i] if keys else None),
                                       logs / f"supernode-{i}.log", env))
            if isolation == "process":  # the node's ClientApp executor (its runtime API is plain loopback)
                dep.processes.append(spawn(f"superexec-clientapp-{i}",
                                           superexec_cmd(dep, f"{HOST}:{node_port}", over_tls=False),
                                           logs / f"superexec-clientapp-{i}.log", env))
            dep.save()
        wait_nodes(dep, nodes, timeout)
    except BaseException:
        with contextlib.suppress(RunError):
            down(folder)
        raise
    log.info("deployment up in %s: SuperLink %s, %d SuperNodes (malicious %s)", folder, dep.address, nodes,
             dep.malicious)
    return dep


def down(folder: Path, grace: float = 10.0) -> list[int]:
    """Stop every process of the deployment in `folder` (by PID); returns the PIDs stopped.

    Raises:
        RunError: something of ours is still alive after SIGKILL.
    """
    folder = folder.resolve()
    dep = Deployment.load(folder)
    stopped: list[int] = []
    # Nodes before the link (as notes 4b), then a sweep for anything their children left.
    for group in ([p for p in dep.processes if p.name != "superlink"],
                  [p for p in dep.processes if p.name == "superlink"], []):
        pids = family(group, dep.flwr_home) if group else family([], dep.flwr_home)
        left = terminate(pids, grace)
        if left:
            raise RunError(f"processes {left} survived SIGKILL")
        stopped += pids
    return sorted(set(stopped))


def status(folder: Path) -> dict[str, Any]:
    dep = Deployment.load(folder.resolve())
    return {"folder": dep.folder, "address": dep.address, "tls": dep.tls, "auth": dep.auth,
            "isolation": dep.isolation, "malicious": dep.malicious,
            "processes": {p.name: {"pid": p.pid, "alive": alive(p)} for p in dep.processes},
            "online_nodes": len(online_nodes(dep)) if any(alive(p) for p in dep.processes) else 0}


# --------------------------------------------------------------------------------------------
# Running an experiment against it


def check_fits(cfg: ExperimentConfig, dep: Deployment) -> None:
    """The experiment must describe this federation: one client per SuperNode, and no colluding
    adversary that is handed the round's benign updates (the simulation's harness: `fl-lab run`)."""
    if cfg.attack.resolved_knowledge == "full":
        raise ConfigError(f"attack.knowledge: full ({cfg.attack.type}: a colluding adversary handed the round's "
                          "benign updates) runs in simulation only (fl-lab run); a deployment's attackers know "
                          "only their own update (attack.knowledge=partial)")
    if cfg.federated.num_clients != dep.num_nodes:
        raise ConfigError(f"federated.num_clients is {cfg.federated.num_clients} but the deployment has "
                          f"{dep.num_nodes} SuperNodes (add --set federated.num_clients={dep.num_nodes})")


def run_experiment(
    folder: Path,
    cfg: ExperimentConfig,
    out_dir: Path,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run one experiment on the deployment in `folder`; returns summary.json's content.

    The ground truth (which partitions are malicious) goes to the ServerApp through the run-config
    key `malicious-partitions`, for scoring only.

    Raises:
        RunError: the Flower run did not complete.
        RunInterrupted: Ctrl-C; the run stopped at a round boundary (see commands.interrupt).
    """
    dep = Deployment.load(folder.resolve())
    check_fits(cfg, dep)
    if not any(alive(p) for p in dep.processes if p.name == "superlink"):
        raise RunError(f"the deployment in {dep.folder} is not running (`fl-lab deploy up` first)")
    out_dir = prepare_run_dir(cfg, out_dir)
    run_config = {"experiment-text": dump_yaml(cfg), "output-dir": str(out_dir),
                  "malicious-partitions": ",".join(str(p) for p in dep.malicious) or "none"}
    try:
        outcome = flwr_run(CONNECTION, dep.flwr_home, run_config, out_dir, None, on_progress,
                           out_dir / "metrics.jsonl")
    except KeyboardInterrupt:
        raise interrupted_where(out_dir, cfg.training.rounds) from None
    summary = finished_summary(outcome, out_dir)
    summary["failures"] = sum(len(r.get("failures") or []) for r in read_jsonl(out_dir / "metrics.jsonl"))
    return summary
