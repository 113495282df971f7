"""compose.yaml and docker/: checked against the pinned flwr itself (no Docker engine here).

Every flag of every service must be one the installed Flower's own `--help` lists, every image tag
must be the pinned flwr version (tests/conftest.py has already stopped the session if the installed
Flower is another one), every SuperNode a distinct partition, and every mounted secret
a file that `fl-lab deploy certs` really makes.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from commands.compose import compose_yaml
from commands.launch import BIN
from commands.secrets import make_certificates, make_secrets
from lab.pins import pinned_flwr

ROOT = Path(__file__).resolve().parents[2]
VERSION = pinned_flwr()
BINARY = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
          "fl-security-lab-superexec": "flower-superexec"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@cache
def help_flags(binary: str) -> frozenset[str]:
    res = subprocess.run([str(BIN / binary), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", res.stdout))


def image_name(service: dict) -> str:
    return service["image"].rsplit(":", 1)[0]


def flower_services(compose: dict) -> dict[str, dict]:
    """The services that run a Flower binary (the offline jobs' entry point is fl-lab)."""
    return {n: s for n, s in compose["services"].items() if "entrypoint" not in s}


def test_offline_jobs_run_fl_lab_on_the_run_folder_without_a_network(compose: dict) -> None:
    services = compose["services"]
    for name, profile in (("lab-job", "jobs"), ("lab-job-gpu", "gpu-jobs")):
        job = services[name]
        assert job["entrypoint"] == ["fl-lab"] and job["profiles"] == [profile]  # never started by `up`
        assert job["network_mode"] == "none" and "./runs:/app/runs" in job["volumes"]
        assert job["image"] == services["superexec-serverapp"]["image"]
    devices = services["lab-job-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["lab-job"]  # the CPU job must start where no GPU is


def test_compose_v1_can_read_it(compose: dict) -> None:
    assert "name" not in compose and "version" not in compose  # Compose 1.29 refuses a top-level name


def test_host_network_override_keeps_every_packet_on_loopback() -> None:
    from commands.compose import compose_spec, host_network_override
    from lab.errors import ConfigError

    spec = compose_spec(3, 1, VERSION)["services"]
    over = host_network_override(3, 1, 18000, [18001, 18002, 18003], "/s", "/r", VERSION)["services"]
    for name, svc in over.items():
        if name == "lab-job":
            assert svc == {"volumes": ["/r:/app/runs"]}
            continue
        assert svc["network_mode"] == "host"
        cmd = svc["command"]
        assert len(cmd) == len(spec[name]["command"])  # the same flags, only addresses and ports swapped
        assert "0.0.0.0" not in cmd and not any(a.startswith(("superlink:", "supernode-")) for a in cmd)
        if "--host" in cmd:
            assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert over["superlink"]["command"][over["superlink"]["command"].index("--port") + 1] == "18000"
    node = over["supernode-2"]["command"]
    assert node[node.index("--port") + 1] == "18003" and node[node.index("--superlink") + 1] == "127.0.0.1:18000"
    assert "malicious=true" in node[-1] and node[-1] == spec["supernode-2"]["command"][-1]
    assert over["superexec-clientapp-2"]["command"][-1] == "127.0.0.1:18003"
    assert "/s/keys/node-1:/app/keys/node-1:ro" in over["supernode-1"]["volumes"]
    with pytest.raises(ConfigError, match="3 node ports"):
        host_network_override(3, 1, 18000, [18001], "/s", "/r", VERSION)


def test_the_host_network_file_is_compose_yaml_with_the_override_applied(compose: dict) -> None:
    from commands.compose import host_network_spec

    test = host_network_spec(3, 1, 18000, [18001, 18002, 18003], "/s", "/r", VERSION)
    assert test["services"].keys() == compose["services"].keys() and test["volumes"] == compose["volumes"]
    for name, svc in test["services"].items():
        shipped = compose["services"][name]
        assert "ports" not in svc  # Compose v1 refuses a published port with the host network
        assert {k: v for k, v in svc.items() if k not in ("command", "volumes", "network_mode")} == \
               {k: v for k, v in shipped.items() if k not in ("command", "volumes", "network_mode", "ports")}
        assert [v.split(":")[1] for v in svc.get("volumes", [])] == [v.split(":")[1] for v in shipped.get("volumes", [])]
    assert "superlink-state:/app/state" in test["services"]["superlink"]["volumes"]
    assert test["services"]["lab-job"]["network_mode"] == "none"  # the offline job keeps no network


def test_compose_yaml_is_what_the_generator_makes_for_the_pinned_flwr() -> None:
    assert (ROOT / "compose.yaml").read_text() == compose_yaml(3, 1, VERSION), \
        "stale compose.yaml: regenerate with `fl-lab deploy compose > compose.yaml`"


def test_image_tags_are_the_pinned_flwr_version(compose: dict) -> None:
    for name, svc in compose["services"].items():
        assert svc["image"].rsplit(":", 1)[1] == VERSION, name
        if "build" in svc:
            assert svc["build"]["args"]["FLWR_VERSION"] == VERSION
            assert (ROOT / svc["build"]["dockerfile"]).exists()
    dockerfile = (ROOT / "docker" / "superexec.Dockerfile").read_text()
    # the base and the torch index are build arguments; the official image and the CPU index by default
    assert "ARG SUPEREXEC_IMAGE=flwr/superexec\n" in dockerfile and "FROM ${SUPEREXEC_IMAGE}:${FLWR_VERSION}" in dockerfile
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu\n" in dockerfile
    assert not re.search(r"\b1\.\d+\.\d+\b", dockerfile)  # no second copy of the version


@pytest.mark.integration
def test_every_flag_is_one_the_pinned_flower_lists(compose: dict) -> None:
    for name, svc in flower_services(compose).items():
        binary = BINARY[image_name(svc)]
        flags = {a for a in svc["command"] if a.startswith("--")}
        unknown = flags - help_flags(binary)
        assert not unknown, f"{name}: {binary} {VERSION} has no {sorted(unknown)}"
    assert "--auth-list-public-keys" not in str(compose)  # refused by 1.41 and 1.42 (exit 104)
    assert "--fleet-api-address" not in str(compose)  # ignored since the one HTTP port


def test_topology_nodes_partitions_executors_and_security(compose: dict) -> None:
    services = compose["services"]
    nodes = {n: s for n, s in services.items() if image_name(s) == "flwr/supernode"}
    configs = [s["command"][s["command"].index("--node-config") + 1] for s in nodes.values()]
    parsed = [dict(kv.split("=", 1) for kv in c.split()) for c in configs]
    partitions = [int(p["partition-id"]) for p in parsed]
    assert sorted(partitions) == list(range(len(nodes))) and len(set(partitions)) == len(nodes) == 3
    assert all(int(p["num-partitions"]) == len(nodes) for p in parsed)
    assert sorted(p["malicious"] for p in parsed) == ["false", "false", "true"]
    link = services["superlink"]["command"]
    assert "--enable-supernode-auth" in link and "--insecure" not in link and "--ssl-certfile" in link
    assert link[link.index("--isolation") + 1] == "process"
    serverapp = services["superexec-serverapp"]
    assert serverapp["command"][serverapp["command"].index("--runtime-api-address") + 1] == "superlink:8000"
    assert any(v.endswith(":/app/runs") for v in serverapp["volumes"])  # captures + checkpoints on a volume
    for name, svc in nodes.items():
        cmd = svc["command"]
        assert "--insecure" not in cmd and "--root-certificates" in cmd and "--auth-supernode-private-key" in cmd
        assert cmd[cmd.index("--superlink") + 1] == "superlink:8000"
        executor = services[f"superexec-clientapp-{name.split('-')[1]}"]["command"]
        assert executor[executor.index("--runtime-api-address") + 1] == f"{name}:{cmd[cmd.index('--port') + 1]}"


def test_mounted_secrets_are_what_deploy_certs_makes(compose: dict, tmp_path: Path) -> None:
    make_secrets(tmp_path, 3)
    made = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    for name, svc in flower_services(compose).items():
        for volume in svc.get("volumes", []):
            host, container = volume.split(":")[:2]
            if host.startswith("./docker/secrets/"):
                rel = host.removeprefix("./docker/secrets/")
                assert rel in made or any(m.startswith(rel + "/") for m in made), (name, volume)
                for arg in svc["command"]:  # every secret path the command names is under a mount
                    if arg.startswith(container + "/"):
                        assert arg.removeprefix(container + "/") in {m.removeprefix(rel + "/") for m in made}
            if container.startswith("/app/keys/"):
                assert f"keys/{Path(container).name}" in made


def test_generated_certificates_verify_and_cover_the_superlink_names(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    certs, keys = make_secrets(tmp_path, 2)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert oct(certs.server_key.stat().st_mode & 0o777) == "0o600"
    for k in keys:  # what flower-supernode and `flwr supernode register` load
        private = load_ssh_private_key(k.read_bytes(), None)
        public = load_ssh_public_key(k.with_name(k.name + ".pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key() == public
    other = x509.load_pem_x509_certificate(make_certificates(tmp_path / "other").ca_cert.read_bytes())
    with pytest.raises((ValueError, InvalidSignature)):
        server.verify_directly_issued_by(other)  # a different CA does not vouch for it
