#!/usr/bin/env bash
# System packages the tests use, installed where this machine allows it (the README's test
# command runs this first). It never fails the command: when it cannot install, it says why in
# one line and the tests that need the package skip, with the reason in pytest's summary.
#
#   bash tests/system-deps.sh
#
# Debian's dataset-fashion-mnist (the four gzipped idx files in
# /usr/share/datasets/fashion-mnist/, which lab/torchvision_data.py searches). Installed with apt
# when running as root on Debian or Ubuntu; `apt-get update` runs only when apt does not know the
# package yet. Already there: silent, no apt call.
set -u

PKG=dataset-fashion-mnist
DIR=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"

say() { echo "system-deps: $*"; }

have_files() {
    local f
    for f in $FILES; do
        [ -f "$DIR/$f.gz" ] || [ -f "$DIR/$f" ] || return 1
    done
}

# Every apt call is quiet, bounded and non-interactive; its last output line is the reason shown.
apt_quiet() {
    local bound=()
    command -v timeout >/dev/null 2>&1 && bound=(timeout 600)
    APT_OUT=$(DEBIAN_FRONTEND=noninteractive ${bound[@]+"${bound[@]}"} apt-get -q -y \
        -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=60 "$@" 2>&1)
}

known_to_apt() {
    apt-cache show "$PKG" 2>/dev/null | grep -q "^Package: $PKG\$"
}

main() {
    have_files && return 0
    local why=""
    if [ "$(id -u)" != 0 ]; then
        why="not root"
    elif ! command -v apt-get >/dev/null 2>&1; then
        why="no apt-get on this machine"
    elif [ ! -f /etc/debian_version ]; then
        why="not Debian or Ubuntu"
    fi
    if [ -n "$why" ]; then
        say "skipping $PKG ($why): the Fashion-MNIST tests will skip; to get it: apt-get install $PKG, or put the files in $DIR"
        return 0
    fi
    if ! known_to_apt; then
        if ! apt_quiet update; then
            say "apt-get update failed ($(tail -n 1 <<<"$APT_OUT")): the Fashion-MNIST tests will skip"
            return 0
        fi
    fi
    say "installing $PKG (apt-get)"
    if ! apt_quiet install --no-install-recommends "$PKG"; then
        say "apt-get install $PKG failed ($(tail -n 1 <<<"$APT_OUT")): the Fashion-MNIST tests will skip"
        return 0
    fi
    have_files || say "$PKG is installed but $DIR lacks its files: the Fashion-MNIST tests will skip"
    return 0
}

# The container end-to-end test (tests/integration/test_containers.py, docker/e2e.sh): a Docker
# engine, Compose (Debian's v1) and debootstrap (the stand-in base where Docker Hub is out of reach).
# Installed only as root on Debian or Ubuntu and only when one is missing; e2e.sh starts the engine
# itself (no systemd) and stops it again. Otherwise the docker tests skip with the reason.
DOCKER_PKGS="docker.io docker-compose debootstrap"

docker_deps() {
    if command -v dockerd >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 \
        && { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; }; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || [ ! -f /etc/debian_version ]; then
        say "skipping $DOCKER_PKGS (not root on Debian or Ubuntu): the docker tests will skip"
        return 0
    fi
    if ! apt-cache show docker.io >/dev/null 2>&1; then
        apt_quiet update || { say "apt-get update failed ($(tail -n 1 <<<"$APT_OUT")): the docker tests will skip"; return 0; }
    fi
    say "installing $DOCKER_PKGS (apt-get)"
    # shellcheck disable=SC2086
    apt_quiet install --no-install-recommends $DOCKER_PKGS \
        || say "apt-get install $DOCKER_PKGS failed ($(tail -n 1 <<<"$APT_OUT")): the docker tests will skip"
    return 0
}

main
docker_deps
exit 0
