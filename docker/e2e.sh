#!/usr/bin/env bash
# The compose stack end to end, on this machine, leaving nothing behind:
#
#   docker/e2e.sh [--rounds N] [--faults] [--keep] [--work DIR]
#                 [--experiment FILE] [--set "KEY=VALUE ..."] [--no-jobs]   (bench/deploy.py)
#
# 1. engine   : uses a running Docker engine, else starts one (root: installs docker.io,
#               docker-compose and debootstrap with apt when missing; `dockerd --bridge=none
#               --iptables=false`: no bridge, no firewall rules, every packet on loopback)
# 2. images   : builds what is missing: the official flwr/superlink|supernode|superexec at the pinned
#               Flower (pulled, or stand-ins from docker/standin on a debootstrap base when Docker
#               Hub is out of reach) and the lab's executor image (docker/superexec.Dockerfile;
#               rebuilt when the lab's sources change; torch from the host's CPU wheel if it has one)
# 3. secrets  : CA, SuperLink certificate, one key pair per SuperNode (`fl-lab deploy certs`)
# 4. up       : compose.yaml's topology with a host-network test override (127.0.0.1, free ports):
#               SuperLink, the ServerApp executor, 3 SuperNodes (partition 2 malicious) with their
#               ClientApp executors; TLS and node auth; the node keys registered
# 5. run      : experiments/smoke.yaml with `flwr run`, the final status asked from Flower
# 6. check    : metrics.jsonl, summary.json, checkpoints/, captures/ in the mounted run folder
# 7. jobs     : `fl-lab invert`, `verify`, `unlearn` in the lab-job container (CPU, no network)
# 8. faults   : (--faults) an unregistered key refused; a SuperNode container stopped mid-run (the
#               round completes, the failure is in metrics.jsonl); the ServerApp executor stopped
#               after round 1 and the run resumed (no round lost or repeated)
# 9. teardown : containers, networks, volumes (unless --keep), the wheel server and any engine it
#               started, also when a step fails
#
# Last line: `e2e: ok rounds=N accuracy=A asr=S seconds=T` or `e2e: FAILED at <step>: <reason>`;
# exit 0 only for ok. Work files (secrets, runs, logs) go to --work (default /var/tmp/fl-e2e).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=/var/tmp/fl-e2e
ROUNDS=2
FAULTS=0
KEEP=0
NODES=3
MALICIOUS=1
PROJECT=fl-e2e
EXPERIMENT=experiments/smoke.yaml
EXTRA=""
JOBS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS=$2; shift ;;
        --faults) FAULTS=1 ;;
        --keep) KEEP=1 ;;
        --work) WORK=$2; shift ;;
        --experiment) EXPERIMENT=$2; shift ;;
        --set) EXTRA=$2; shift ;;
        --no-jobs) JOBS=0 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "e2e: FAILED at arguments: unknown option $1"; exit 2 ;;
    esac
    shift
done

STEP=start
RESULT=""
STARTED=$(date +%s)
ENGINE_PID=""
WHEELS_PID=""
COMPOSE=()
VERSION=$(sed -n 's/.*"flwr\[simulation\]==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" | head -n 1)
LAB_IMAGE="fl-security-lab-superexec:$VERSION"
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} COMPOSE_DOCKER_CLI_BUILD=0

say() { echo "e2e: $*" >&2; }
fail() { RESULT="e2e: FAILED at $STEP: $*"; exit 1; }
step() { STEP=$1; say "[$(( $(date +%s) - STARTED )) s] $STEP"; }
logs_tail() { tail -n "${2:-5}" "$1" 2>/dev/null | tr '\n' ' ' | cut -c1-400; }

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if [ ${#COMPOSE[@]} -gt 0 ] && [ -f "$WORK/compose.test.yaml" ] && docker info >/dev/null 2>&1; then
        local vol=(-v)
        [ "$KEEP" = 1 ] && vol=()
        "${COMPOSE[@]}" logs --no-color >"$WORK/logs/compose.log" 2>&1 || true
        "${COMPOSE[@]}" --profile jobs down --remove-orphans "${vol[@]}" >>"$WORK/logs/teardown.log" 2>&1 || true
    fi
    if docker info >/dev/null 2>&1; then  # the one-off containers (CLI, refused node), by our label
        docker ps -aq --filter "label=fl-e2e=$PROJECT" | xargs -r docker rm -f >/dev/null 2>&1 || true
    fi
    [ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2>/dev/null
    if [ -n "$ENGINE_PID" ]; then
        kill "$ENGINE_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$ENGINE_PID" 2>/dev/null || break; sleep 1; done
        kill -0 "$ENGINE_PID" 2>/dev/null && { kill -9 "$ENGINE_PID"; RESULT=${RESULT:-"e2e: FAILED at teardown: dockerd $ENGINE_PID needed SIGKILL"}; }
    fi
    [ "$KEEP" = 1 ] || rm -rf "$WORK/secrets"
    [ -z "$RESULT" ] && RESULT="e2e: FAILED at $STEP: interrupted (exit $rc)"
    echo "$RESULT"
    case "$RESULT" in "e2e: ok"*) exit 0 ;; *) exit 1 ;; esac
}
trap teardown EXIT
trap 'fail "interrupted"' INT TERM

# --------------------------------------------------------------------------------------------
step engine
mkdir -p "$WORK/logs" || fail "cannot create $WORK"
if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
   || ! { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; }; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || fail "no Docker engine, compose or debootstrap, and not root with apt"
    say "installing docker.io docker-compose debootstrap (apt)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        docker.io docker-compose debootstrap; } >"$WORK/logs/apt.log" 2>&1 || fail "apt: $(logs_tail "$WORK/logs/apt.log" 2)"
fi
if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "no Docker engine running and not root to start one"
    dockerd --bridge=none --iptables=false --ip-masq=false >"$WORK/logs/dockerd.log" 2>&1 &
    ENGINE_PID=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || fail "dockerd did not start: $(logs_tail "$WORK/logs/dockerd.log" 3)"
    say "started dockerd (pid $ENGINE_PID)"
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE_KIND="v2 ($(docker compose version --short 2>/dev/null))"
    COMPOSE=(docker compose)
else
    COMPOSE_KIND="v1 ($(docker-compose version --short 2>/dev/null))"
    COMPOSE=(docker-compose)
fi
# The shipped topology (the same generator as compose.yaml) with the host-network test override
# applied: every service on 127.0.0.1 at free ports, no published port (v1 refuses one with the
# host network), the secrets and runs/ from $WORK.
COMPOSE+=(--project-directory "$ROOT" -p "$PROJECT" -f "$WORK/compose.test.yaml")
say "compose $COMPOSE_KIND, engine $(docker version --format '{{.Server.Version}}' 2>/dev/null), flwr $VERSION"

# --------------------------------------------------------------------------------------------
step images
have() { docker image inspect "$1" >/dev/null 2>&1; }
SOURCES=(pyproject.toml README.md docker/superexec.Dockerfile lab commands strategies byzantine server client
         inversion unlearning experiments)  # the image's build context, and the app `flwr run` ships
sources_tar() { (cd "$ROOT" && tar -c --exclude=__pycache__ --exclude='*.pyc' "${SOURCES[@]}"); }
source_hash() {
    (cd "$ROOT" && find "${SOURCES[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
        -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
build_standins() {
    if ! have fl-security-lab-base:bookworm; then
        say "base image: debootstrap --variant=minbase bookworm (about a minute)"
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" >"$WORK/logs/debootstrap.log" 2>&1 \
            || fail "debootstrap: $(logs_tail "$WORK/logs/debootstrap.log" 2)"
        tar -C "$WORK/rootfs" -c . | docker import - fl-security-lab-base:bookworm >/dev/null \
            || fail "docker import of the debootstrap base"
        rm -rf "$WORK/rootfs"
    fi
    local ctx="$WORK/standin-context" target
    rm -rf "$ctx" && mkdir -p "$ctx" && cp "$ROOT/docker/standin/Dockerfile" "$ctx/" \
        && cp /etc/ssl/certs/ca-certificates.crt "$ctx/" || fail "stand-in build context"
    for target in superlink supernode superexec; do
        have "flwr/$target:$VERSION" && continue
        say "building stand-in flwr/$target:$VERSION"
        docker build --force-rm --network host --build-arg "FLWR_VERSION=$VERSION" --target "$target" \
            -t "flwr/$target:$VERSION" "$ctx" >"$WORK/logs/build-$target.log" 2>&1 \
            || fail "stand-in flwr/$target: $(logs_tail "$WORK/logs/build-$target.log" 3)"
    done
    rm -rf "$ctx"
}
if ! have "flwr/superlink:$VERSION" || ! have "flwr/supernode:$VERSION" || ! have "flwr/superexec:$VERSION"; then
    pulled=1
    for target in superlink supernode superexec; do
        have "flwr/$target:$VERSION" || timeout 60 docker pull -q "flwr/$target:$VERSION" >/dev/null 2>&1 \
            || { pulled=0; break; }
    done
    [ "$pulled" = 1 ] || { say "Docker Hub out of reach: stand-in images"; build_standins; }
fi
HASH=$(source_hash)
if [ "$(docker image inspect -f '{{index .Config.Labels "fl-security-lab.sources"}}' "$LAB_IMAGE" 2>/dev/null)" != "$HASH" ]; then
    build_args=(--build-arg "FLWR_VERSION=$VERSION")
    PYTAG=$(docker run --rm --network none --entrypoint python "flwr/superexec:$VERSION" \
        -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)
    WHEEL=$(ls "${FL_TORCH_WHEELHOUSE:-/opt/wheels}"/torch-*+cpu-"$PYTAG"-*.whl 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$PYTAG" ] && [ -n "$WHEEL" ]; then
        # The host's CPU torch wheel, served on loopback to the build (which runs on the host's
        # network): no 5 GB CUDA download, no wheel copied into a layer.
        TORCH=$(basename "$WHEEL" | cut -d- -f2)
        # A fixed port when free: the URL is a build argument, and the torch layer stays cached.
        PORT=$(python3 -c 'import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 47391))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
        python3 -m http.server --bind 127.0.0.1 "$PORT" --directory "$(dirname "$WHEEL")" >"$WORK/logs/wheels.log" 2>&1 &
        WHEELS_PID=$!
        # torchvision only as a CPU wheel beside it: PyPI's is built against CUDA torch and fails to
        # import on a CPU one ("operator torchvision::nms does not exist"). Without it the image runs
        # every experiment whose data needs no torchvision download (digits, local MNIST-family files).
        VISION=$(ls "$(dirname "$WHEEL")"/torchvision-*+cpu-"$PYTAG"-*.whl 2>/dev/null | sort -V | tail -n 1)
        PACKAGES="torch==$TORCH${VISION:+ torchvision==$(basename "$VISION" | cut -d- -f2)}"
        build_args+=(--build-arg "TORCH_INDEX=https://pypi.org/simple" --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$PORT/"
                     --build-arg "TORCH_PACKAGES=$PACKAGES")
        say "torch: the host's $(basename "$WHEEL"), $([ -n "$VISION" ] && basename "$VISION" || echo "no torchvision (no CPU wheel here)")"
    fi
    say "building $LAB_IMAGE (sources $HASH)"
    t0=$(date +%s)
    sources_tar | docker build --force-rm --network host -f docker/superexec.Dockerfile --label "fl-security-lab.sources=$HASH" \
          "${build_args[@]}" -t "$LAB_IMAGE" - >"$WORK/logs/build-lab.log" 2>&1 \
      || fail "$LAB_IMAGE: $(logs_tail "$WORK/logs/build-lab.log" 3)"
    say "built $LAB_IMAGE in $(( $(date +%s) - t0 )) s"
    # the lab's image it replaced (the same label, now untagged): its layers other than the cached ones
    docker image prune -f --filter "label=fl-security-lab.sources" >/dev/null 2>&1
    [ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2>/dev/null
    WHEELS_PID=""
fi
for image in "flwr/superlink:$VERSION" "flwr/supernode:$VERSION" "$LAB_IMAGE"; do
    say "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
done

# --------------------------------------------------------------------------------------------
step secrets
# The containers run as UID 49999 (user app): the folders they read and write are given to it, and
# the app is a copy, since the clone may sit where that user cannot read (root's home).
rm -rf "$WORK/secrets" "$WORK/runs" "$WORK/app" && mkdir -p "$WORK/secrets" "$WORK/runs" "$WORK/app" \
    && chmod 755 "$WORK" && sources_tar | tar -x -C "$WORK/app" && chmod -R a+rX "$WORK/app" \
    && chown 49999:49999 "$WORK/secrets" "$WORK/runs" || fail "cannot prepare $WORK/secrets, runs, app (root needed)"
# A CLI container: the lab and Flower of the image, on the host's network, as the containers' user.
cli() {
    docker run --rm --network host --label "fl-e2e=$PROJECT" -e FLWR_HOME=/app/runs/.flwr -e PYTHONUNBUFFERED=1 \
        -v "$WORK/app:/src:ro" -v "$WORK/runs:/app/runs" -v "$WORK/secrets:/app/secrets" \
        --entrypoint python "$LAB_IMAGE" -m "$@"
}
cli commands.cli deploy certs --out /app/secrets --nodes "$((NODES + 1))" >"$WORK/logs/certs.log" 2>&1 \
    || fail "$(logs_tail "$WORK/logs/certs.log" 2)"
# node-3 is never registered: the refused key of the fault cases
mv "$WORK/secrets/keys/node-$NODES" "$WORK/secrets/rogue" && mv "$WORK/secrets/keys/node-$NODES.pub" "$WORK/secrets/rogue.pub"

PORTS=$(python3 -c "
import socket
socks = [socket.socket() for _ in range($NODES + 1)]
for s in socks: s.bind(('127.0.0.1', 0))
print(' '.join(str(s.getsockname()[1]) for s in socks))")
read -r LINK_PORT NODE_PORTS <<<"$PORTS"
LINK="127.0.0.1:$LINK_PORT"
cli commands.compose_stack test-compose --nodes "$NODES" --malicious "$MALICIOUS" --link-port "$LINK_PORT" \
    --node-ports "$(echo "$NODE_PORTS" | tr ' ' ',')" --secrets "$WORK/secrets" --runs "$WORK/runs" \
    >"$WORK/compose.test.yaml" 2>"$WORK/logs/test-compose.log" || fail "$(logs_tail "$WORK/logs/test-compose.log" 2)"

# --------------------------------------------------------------------------------------------
step up
"${COMPOSE[@]}" up -d --no-build superlink superexec-serverapp >"$WORK/logs/up.log" 2>&1 \
    || fail "$(logs_tail "$WORK/logs/up.log" 3)"
STACK=(--address "$LINK" --ca /app/secrets/certs/ca.crt)
KEYS=()
for i in $(seq 0 $((NODES - 1))); do KEYS+=("/app/secrets/keys/node-$i.pub"); done
registered=0
for _ in $(seq 30); do  # the SuperLink needs a few seconds before its Control API answers
    cli commands.compose_stack register "${STACK[@]}" "${KEYS[@]}" >"$WORK/logs/register.log" 2>&1 && { registered=1; break; }
    sleep 2
done
[ "$registered" = 1 ] || fail "registering the node keys: $(logs_tail "$WORK/logs/register.log" 2)"
"${COMPOSE[@]}" up -d --no-build >>"$WORK/logs/up.log" 2>&1 || fail "$(logs_tail "$WORK/logs/up.log" 3)"
cli commands.compose_stack wait-nodes "$NODES" --timeout 180 >"$WORK/logs/wait-nodes.log" 2>&1 \
    || fail "$(logs_tail "$WORK/logs/wait-nodes.log" 2)"
say "$NODES SuperNodes online at $LINK ($(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) containers)"

# --------------------------------------------------------------------------------------------
step run
SMOKE=(federated.num_clients="$NODES" attack.boost=5 training.rounds="$ROUNDS" capture.enabled=true
       "capture.rounds=[1]" "capture.clients=[2]")  # quick: the attacker's update only
read -r -a EXTRA_SET <<<"$EXTRA"
cli commands.compose_stack run "/src/$EXPERIMENT" --set "${SMOKE[@]}" ${EXTRA_SET[@]+"${EXTRA_SET[@]}"} \
    --malicious-partitions "$(seq -s, $((NODES - MALICIOUS)) $((NODES - 1)))" \
    --out /app/runs/smoke --app /src "${STACK[@]}" >"$WORK/logs/run.log" 2>&1 || fail "$(logs_tail "$WORK/logs/run.log" 2)"
say "run: $(tail -n 1 "$WORK/logs/run.log")"

step check
cli commands.compose_stack check /app/runs/smoke >"$WORK/logs/check.log" 2>&1 || fail "$(logs_tail "$WORK/logs/check.log" 2)"
SCORES=$(tail -n 1 "$WORK/logs/check.log")

# --------------------------------------------------------------------------------------------
[ "$JOBS" = 1 ] && step jobs
job() { "${COMPOSE[@]}" --profile jobs run --rm --no-deps -T lab-job "$@"; }
if [ "$JOBS" = 1 ]; then
    { job invert /app/runs/smoke --device cpu --num-images 8 --iterations 20 --restarts 1 --quiet \
      && job verify /app/runs/smoke \
      && job unlearn /app/runs/smoke --steps 5 --quiet; } >"$WORK/logs/jobs.log" 2>&1 \
        || fail "$(logs_tail "$WORK/logs/jobs.log" 2)"
    cli commands.compose_stack check /app/runs/smoke --jobs >"$WORK/logs/check-jobs.log" 2>&1 \
        || fail "$(logs_tail "$WORK/logs/check-jobs.log" 2)"
fi

# --------------------------------------------------------------------------------------------
if [ "$FAULTS" = 1 ]; then
    # shellcheck source=docker/faults.sh
    . "$ROOT/docker/faults.sh"
fi

STEP=teardown
RESULT="e2e: ok $SCORES seconds=$(( $(date +%s) - STARTED ))"
