#!/usr/bin/env bash
# make docker-test: the Docker image and docker/compose.yaml, built and run for real (slow: not
# part of `make test`).
#
# 1. installs what is missing (Debian: docker.io for dockerd, docker-compose, debootstrap,
#    python3-venv, SIPp);
# 2. uses the Docker engine that answers `docker info`, or starts one of its own (dockerd
#    --iptables=false --bridge=none on a private socket and data root, /var/lib/sipfarm-docker:
#    the farm's containers use the host's network) and stops it at the end;
# 3. builds the base from Debian's packages, the wheelhouse and the images (scripts/docker-build.sh);
# 4. brings the compose farm up, registers phones and places a call through it with SIPp from this
#    host, fails Redis over and does it again, checks the metrics endpoints and Prometheus, and
#    brings it down (scripts/docker_farm.py): once on Redis behind Sentinel (compose.yaml), once
#    on a Redis Cluster (+ compose.redis-cluster.yaml); DOCKER_TEST_REDIS="sentinel" for one.
# The output is also written to build/docker-test.log.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p build
exec > >(tee build/docker-test.log) 2>&1
echo "docker-test: $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(. /etc/os-release && echo "$PRETTY_NAME"), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
start=$(date +%s)

bash scripts/system-deps.sh docker.io docker-compose debootstrap python3-venv sip-tester -- \
    dockerd docker-compose debootstrap sipp /usr/share/doc/python3-venv

DOCKERD_PID=""
PROJECT=sipfarm-test
run=/run/sipfarm-docker
cleanup() {
    if [ -n "$DOCKERD_PID" ]; then
        # containers left by an interrupted run would restart with the next engine (restart policy)
        ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null || true)
        [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null
        # dockerd leaves its default network namespace mounted in its exec root
        umount "$run/exec/netns/default" 2>/dev/null || true
        echo "docker-test: stopped the dockerd this run started (pid $DOCKERD_PID)"
    fi
}
trap cleanup EXIT

if docker info >/dev/null 2>&1; then
    echo "docker-test: using the running Docker engine ($(docker info -f '{{.ServerVersion}}'))"
else
    mkdir -p "$run"
    export DOCKER_HOST=unix://$run/docker.sock
    dockerd --iptables=false --ip6tables=false --bridge=none -H "$DOCKER_HOST" --pidfile "$run/dockerd.pid" \
        --exec-root "$run/exec" --data-root /var/lib/sipfarm-docker >"$ROOT/build/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -n 20 build/dockerd.log; echo "docker-test: dockerd did not start" >&2; exit 1; }
    echo "docker-test: started dockerd $(docker info -f '{{.ServerVersion}}') (pid $DOCKERD_PID, data root /var/lib/sipfarm-docker, --iptables=false --bridge=none)"
fi

bash scripts/docker-build.sh
# compose.yaml as it is (Redis behind Sentinel), then with compose.redis-cluster.yaml
for redis in ${DOCKER_TEST_REDIS:-sentinel cluster}; do
    .venv/bin/python scripts/docker_farm.py --project "$PROJECT" --redis "$redis"
done
echo "docker-test: done in $(($(date +%s) - start)) s"
