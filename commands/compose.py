"""`fl-lab deploy compose`: compose.yaml, generated from the exact flwr pin in pyproject.toml.

The topology is the one `fl-lab deploy up` starts with process isolation: a SuperLink, the ServerApp
executor, and per node a SuperNode plus its ClientApp executor; plus the offline jobs (`fl-lab
invert|verify|unlearn`) as services of their own profiles, on the CPU or with a GPU reservation.
Image tags are the pinned Flower version (lab.pins), so the images, the docs and the numbers name
one Flower. `host_network_spec` is the same topology with docker/e2e.sh's test override applied
(every service on the host's network at 127.0.0.1), for engines without a bridge network.
"""

from __future__ import annotations

from typing import Any

from commands.deploy import malicious_partitions
from lab.errors import ConfigError
from lab.pins import pinned_flwr


def compose_spec(nodes: int = 3, malicious: int = 1, version: str | None = None) -> dict[str, Any]:
    """The Docker Compose topology: SuperLink, the ServerApp executor, and per node a SuperNode
    plus its ClientApp executor (process isolation), TLS everywhere on the Fleet/Control/Runtime
    API of the SuperLink, node auth with the keys from `fl-lab deploy certs --out docker/secrets`."""
    version = version or pinned_flwr()
    bad = malicious_partitions(nodes, malicious)
    certs = "./docker/secrets/certs:/app/certs:ro"
    build = {"context": ".", "dockerfile": "docker/superexec.Dockerfile", "args": {"FLWR_VERSION": version}}
    services: dict[str, Any] = {
        "superlink": {
            "image": f"flwr/superlink:{version}",
            "command": ["--ssl-ca-certfile", "/app/certs/ca.crt", "--ssl-certfile", "/app/certs/server.crt",
                        "--ssl-keyfile", "/app/certs/server.key", "--enable-supernode-auth",
                        "--isolation", "process", "--host", "0.0.0.0", "--port", "8000",
                        "--database", "/app/state/state.db", "--disable-runtime-dependency-installation"],
            "ports": ["127.0.0.1:8000:8000"],  # the host's flwr CLI; loopback only
            "volumes": [certs, "superlink-state:/app/state"],
        },
        "superexec-serverapp": {
            "build": build,
            "image": f"fl-security-lab-superexec:{version}",
            "command": ["--root-certificates", "/app/certs/ca.crt", "--runtime-api-address", "superlink:8000"],
            "volumes": [certs, "./runs:/app/runs"],  # run-config output-dir=/app/runs/<name>
            "depends_on": ["superlink"],
            "restart": "on-failure:3",
        },
    }
    for i in range(nodes):
        config = f"partition-id={i} num-partitions={nodes} malicious={'true' if i in bad else 'false'} " \
                 f'data-dir="/app/data"'
        services[f"supernode-{i}"] = {
            "image": f"flwr/supernode:{version}",
            "command": ["--root-certificates", "/app/certs/ca.crt", "--superlink", "superlink:8000",
                        "--auth-supernode-private-key", f"/app/keys/node-{i}",
                        "--isolation", "process", "--host", "0.0.0.0", "--port", "9094",
                        "--node-config", config],
            "volumes": [certs, f"./docker/secrets/keys/node-{i}:/app/keys/node-{i}:ro"],
            "depends_on": ["superlink"],
        }
        services[f"superexec-clientapp-{i}"] = {
            "image": f"fl-security-lab-superexec:{version}",
            # The node's runtime API stays inside the compose network, like loopback.
            "command": ["--insecure", "--runtime-api-address", f"supernode-{i}:9094"],
            "depends_on": [f"supernode-{i}", "superexec-serverapp"],
        }
    # The offline jobs on the mounted run folders, never on a network: `docker compose run --rm lab-job
    # invert /app/runs/<name>`; lab-job-gpu reserves the GPUs (an image built with a CUDA torch index).
    def job(profile: str) -> dict[str, Any]:  # fresh lists each: YAML would otherwise write anchors
        return {"image": f"fl-security-lab-superexec:{version}", "entrypoint": ["fl-lab"], "command": ["--help"],
                "volumes": ["./runs:/app/runs"], "network_mode": "none", "profiles": [profile]}

    services["lab-job"] = job("jobs")
    services["lab-job-gpu"] = {**job("gpu-jobs"), "deploy": {"resources": {"reservations": {
        "devices": [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}
    # No top-level `name`: Compose v1 (1.29, Debian's) refuses it; the project is named with -p.
    return {"services": services, "volumes": {"superlink-state": {}}}


def host_network_spec(nodes: int, malicious: int, link_port: int, node_ports: list[int], secrets: str,
                      runs: str, version: str | None = None) -> dict[str, Any]:
    """compose.yaml's topology with `host_network_override` applied, as one file: Compose v1 cannot
    drop the SuperLink's published port in a merge, and refuses a port with the host network."""
    spec = compose_spec(nodes, malicious, version)
    for name, changes in host_network_override(nodes, malicious, link_port, node_ports, secrets, runs,
                                               version)["services"].items():
        svc = spec["services"][name]
        if changes.get("network_mode") == "host":
            svc.pop("ports", None)
        mounts = {v.split(":")[1]: v for v in [*svc.get("volumes", []), *changes.pop("volumes", [])]}
        svc.update(changes, volumes=list(mounts.values()))
    return spec


def host_network_override(nodes: int, malicious: int, link_port: int, node_ports: list[int], secrets: str,
                          runs: str, version: str | None = None) -> dict[str, Any]:
    """A test override of compose.yaml (`-f compose.yaml -f override.yaml`): every service on the
    host's network, listening on 127.0.0.1 only at the given ports, with the secrets and the run
    folder from absolute host paths. Engines started with `--bridge=none` (docker/e2e.sh) have no
    network to give the shipped topology, and no packet then leaves loopback."""
    if len(node_ports) != nodes:
        raise ConfigError(f"{nodes} SuperNodes need {nodes} node ports, got {len(node_ports)}")
    spec = compose_spec(nodes, malicious, version)["services"]
    link = f"127.0.0.1:{link_port}"
    certs = f"{secrets}/certs:/app/certs:ro"
    host = {"network_mode": "host"}

    def swap(cmd: list[str], values: dict[str, str]) -> list[str]:
        return [values.get(prev, arg) if prev in values else arg for prev, arg in zip(["", *cmd], cmd)]

    services: dict[str, Any] = {
        "superlink": {**host, "volumes": [certs],
                      "command": swap(spec["superlink"]["command"], {"--host": "127.0.0.1", "--port": str(link_port)})},
        "superexec-serverapp": {**host, "volumes": [certs, f"{runs}:/app/runs"],
                                "command": swap(spec["superexec-serverapp"]["command"], {"--runtime-api-address": link})},
        "lab-job": {"volumes": [f"{runs}:/app/runs"]},
    }
    for i, port in enumerate(node_ports):
        key = f"{secrets}/keys/node-{i}:/app/keys/node-{i}:ro"
        services[f"supernode-{i}"] = {**host, "volumes": [certs, key], "command": swap(
            spec[f"supernode-{i}"]["command"], {"--superlink": link, "--host": "127.0.0.1", "--port": str(port)})}
        services[f"superexec-clientapp-{i}"] = {**host, "command": swap(
            spec[f"superexec-clientapp-{i}"]["command"], {"--runtime-api-address": f"127.0.0.1:{port}"})}
    return {"services": services}


def compose_yaml(nodes: int = 3, malicious: int = 1, version: str | None = None) -> str:
    import yaml

    version = version or pinned_flwr()
    head = (f"# Generated by `fl-lab deploy compose` from the pinned flwr ({version}): do not edit by hand.\n"
            "# Secrets first: fl-lab deploy certs --out docker/secrets --nodes N  (see README, Deployment)\n")
    return head + yaml.safe_dump(compose_spec(nodes, malicious, version), sort_keys=False, width=120)
