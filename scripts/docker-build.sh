#!/usr/bin/env bash
# Build the images of docker/compose.yaml with no registry reached: the Debian base
# (scripts/docker-base.sh), the wheelhouse (docker/wheels/), sipfarm:latest (docker/Dockerfile,
# the mypyc-compiled hot path) and sipfarm-prometheus:latest (docker/prometheus.Dockerfile).
#
#   scripts/docker-build.sh          # needs a running Docker engine, root for debootstrap
#
# The wheels are built on this host by Debian's python3 (the interpreter the image runs: the base
# is this host's Debian release) with the host's pip settings, so the image's pip reaches no index.
# SIPFARM_IMAGE / SIPFARM_PROMETHEUS_IMAGE / BASE_IMAGE name the images.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DOCKER=${DOCKER:-docker}
SUITE=${SUITE:-$(. /etc/os-release && echo "$VERSION_CODENAME")}
export BASE_IMAGE=${BASE_IMAGE:-sipfarm-base:$SUITE}
IMAGE=${SIPFARM_IMAGE:-sipfarm:latest}
PROM_IMAGE=${SIPFARM_PROMETHEUS_IMAGE:-sipfarm-prometheus:latest}
MYPY_VERSION=$(sed -n 's/^ARG MYPY_VERSION=//p' docker/Dockerfile)

bash scripts/docker-base.sh

# The wheels are made again only when the dependencies may have changed: new files (even the
# same wheels) would void the engine's cache of every later build step, the mypyc compile too.
start=$(date +%s)
stamp=docker/wheels/.stamp
if [ -f "$stamp" ] && [ -z "$(find pyproject.toml docker/Dockerfile -newer "$stamp" -print -quit)" ]; then
    echo "docker-build: docker/wheels is up to date ($(ls docker/wheels/*.whl | wc -l) wheels)"
else
    test -x build/docker-pip/bin/pip || /usr/bin/python3 -m venv build/docker-pip
    rm -f docker/wheels/*.whl "$stamp"
    build/docker-pip/bin/pip wheel -q --disable-pip-version-check -w docker/wheels \
        . "mypy==$MYPY_VERSION" "setuptools>=77" wheel 2> >(grep -v 'is ignored: it is neither' >&2)
    rm -f docker/wheels/sipfarm-*.whl  # the image installs the project from its sources
    touch "$stamp"
    echo "docker-build: $(ls docker/wheels/*.whl | wc -l) wheels in docker/wheels in $(($(date +%s) - start)) s"
fi

for spec in "$IMAGE:docker/Dockerfile" "$PROM_IMAGE:docker/prometheus.Dockerfile"; do
    image=${spec%:docker/*}
    file=docker/${spec#*:docker/}
    start=$(date +%s)
    log=build/docker-build-$(basename "$file").log
    if ! $DOCKER build --network host --build-arg "BASE=$BASE_IMAGE" -f "$file" -t "$image" . >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "docker-build: building $image failed (log: $log)" >&2
        exit 1
    fi
    grep -h '^build-compiled: compiled' "$log" || true
    echo "docker-build: $image built in $(($(date +%s) - start)) s" \
        "($($DOCKER image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
done
