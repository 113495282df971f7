"""The compose stack for real: docker/e2e.sh builds, runs and tears down the containers.

`docker`: the end-to-end run with quick settings (2 rounds of smoke.yaml on SuperLink + 3 SuperNodes,
TLS and node auth, then the offline jobs on the CPU). `docker_faults`: the same plus the fault cases
(an unregistered key, the ServerApp executor killed and resumed, a SuperNode container killed); they
cost a few minutes of heartbeats, so they run only when asked for (`-m docker_faults`, or
FL_DOCKER_FAULTS=1). A machine that cannot run Docker skips with the reason. Afterwards nothing of
the test may be left: no container, no network of its project, no engine it started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "docker" / "e2e.sh"
LAST = re.compile(r"^e2e: ok rounds=(\d+) accuracy=([\d.]+) asr=([\d.]+|-) seconds=(\d+)$")


def docker_problem() -> str | None:
    """Why this machine cannot run the stack (None: it can; e2e.sh installs/starts what is missing)."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no running Docker engine, and not root to start one"
    if not (shutil.which("dockerd") or (shutil.which("apt-get") and Path("/etc/debian_version").exists())):
        return "no Docker engine and no apt to install one (tests/system-deps.sh installs it as root on Debian)"
    return None


def dockerd_pids() -> set[int]:
    out = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == "dockerd":
                    out.add(int(proc.name))
            except OSError:
                continue
    return out


@pytest.fixture
def work() -> Iterator[Path]:
    # Under /var/tmp, world-traversable: the containers' user (UID 49999) reads the mounted folders.
    folder = Path(tempfile.mkdtemp(prefix="fl-e2e-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_e2e(work: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess[str], str]:
    problem = docker_problem()
    if problem:
        pytest.skip(f"docker: {problem}")
    engines = dockerd_pids()
    res = subprocess.run(["bash", str(E2E), "--work", str(work), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if res.returncode != 0:  # e2e.sh's own log, kept beside the (removed) work folder for a failed CI run
        (work.parent / f"{work.name}.log").write_text(res.stderr + res.stdout)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    # nothing left behind, whatever the outcome
    assert dockerd_pids() <= engines, "e2e.sh left a dockerd it started running"
    if engines:  # an engine that was already running is still there: ask it
        ps = subprocess.run(["docker", "ps", "-aq", "--filter", "label=com.docker.compose.project=fl-e2e"],
                            capture_output=True, text=True, check=False)
        assert ps.stdout.strip() == "", "containers of the e2e project left behind"
        nets = subprocess.run(["docker", "network", "ls", "-q", "--filter", "name=fl-e2e"], capture_output=True,
                              text=True, check=False)
        assert nets.stdout.strip() == ""
    return res, last


@pytest.mark.docker
@pytest.mark.integration
def test_compose_stack_end_to_end(work: Path) -> None:
    res, last = run_e2e(work, "--rounds", "2", timeout=3600)
    assert res.returncode == 0 and LAST.match(last), res.stderr[-3000:] + res.stdout[-1000:]
    rounds, accuracy, asr, _ = LAST.match(last).groups()
    assert int(rounds) == 2 and 0.0 <= float(accuracy) <= 1.0 and asr != "-"
    assert "compose v" in res.stderr  # it says which Compose ran
    assert not (work / "secrets").exists()  # the private keys go with the stack


@pytest.mark.docker_faults
@pytest.mark.docker
@pytest.mark.integration
def test_compose_stack_fault_cases(work: Path, request: pytest.FixtureRequest) -> None:
    if "docker_faults" not in (request.config.getoption("-m") or "") and os.environ.get("FL_DOCKER_FAULTS") != "1":
        pytest.skip("docker fault cases (minutes of heartbeats): run with -m docker_faults or FL_DOCKER_FAULTS=1")
    res, last = run_e2e(work, "--rounds", "2", "--faults", timeout=3600)
    assert res.returncode == 0 and LAST.match(last), res.stderr[-3000:] + res.stdout[-1000:]
    for line in ("unregistered key refused", "resumed: rounds=2", "failure logged: rounds=2"):
        assert line in res.stderr, res.stderr[-3000:]


def test_e2e_refuses_an_unknown_option_in_one_line() -> None:
    res = subprocess.run(["bash", str(E2E), "--bogus"], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and res.stdout.strip() == "e2e: FAILED at arguments: unknown option --bogus"
