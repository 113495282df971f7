#!/bin/sh
# Secrets for compose.yaml, then the host's Flower connection and the SuperNode keys registered.
#
#   docker/secrets.sh make [NODES]   # CA + SuperLink certificate (SAN superlink, localhost, 127.0.0.1)
#                                    # + one P-384 key pair per SuperNode, in docker/secrets/
#   docker/secrets.sh register [NODES]  # after `docker compose up -d superlink`: the `docker`
#                                    # connection in docker/flwr-home and `flwr supernode register`
#
# The containers run as UID 49999 (user `app`): the mounted secrets must be readable by it.
set -eu
cd "$(dirname "$0")/.."
ACTION=${1:-make}
NODES=${2:-3}
export FLWR_HOME="$PWD/docker/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
case "$ACTION" in
  make)
    fl-lab deploy certs --out docker/secrets --nodes "$NODES"
    echo "now: sudo chown -R 49999:49999 docker/secrets   (the containers' user)"
    ;;
  register)
    mkdir -p "$FLWR_HOME"
    printf '[superlink]\ndefault = "docker"\n\n[superlink.docker]\naddress = "127.0.0.1:8000"\ninsecure = false\nroot-certificates = "%s"\n' \
      "$PWD/docker/secrets/certs/ca.crt" > "$FLWR_HOME/config.toml"
    i=0
    while [ "$i" -lt "$NODES" ]; do
      flwr supernode register "docker/secrets/keys/node-$i.pub" docker
      i=$((i + 1))
    done
    ;;
  *) echo "usage: $0 make|register [NODES]" >&2; exit 2 ;;
esac
