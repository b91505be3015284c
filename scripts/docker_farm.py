"""Bring docker/compose.yaml's farm up, register phones and place a call through it, bring it down.

    .venv/bin/python scripts/docker_farm.py            # the images must exist (scripts/docker-build.sh)
    .venv/bin/python scripts/docker_farm.py --keep     # leave the farm running afterwards

`make docker-test` runs it after building the images (scripts/docker-test.sh). What it checks,
in order, each step printing one `docker-test:` line:

1. `docker-compose up -d` (or `docker compose`): every container running;
2. `sipfarm status` from the image's admin service: 2 balancers, 3 nodes and 2 relays active;
3. each sipfarm process logged `event=build build=compiled` (the mypyc hot path runs);
4. two accounts added with `sipfarm user add` (admin service);
5. SIPp on this host: bob's phone (a UAS) registers through balancer lb2, alice registers
   through lb1, and alice calls bob through lb1 (digest-challenged INVITE, 200, ACK, BYE): the
   call crosses both balancers, a node and a relay;
6. Sentinel: `SENTINEL FAILOVER` makes the replica the master; once every sentinel names it,
   both phones register again (through the other balancer each) and alice calls bob again:
   the farm follows the new master. With --redis cluster (compose.redis-cluster.yaml), the
   master of slot 0 is stopped instead, and the same follows once its replica took its slots;
7. every /metrics endpoint answers, with the farm's counters for the calls (requests by method
   at the nodes, the SDPs anchored at a relay, ng offer and answer at the relays);
8. Prometheus scrapes every process (all its targets `up`).

The farm is brought down (`down -v`: containers and volumes) whatever happened, unless --keep.
Extra compose files (a Redis Cluster variant, say) come from SIPFARM_COMPOSE_FILES (colon-separated).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import redis  # noqa: E402

from benchmarks.sipp import REGISTER_AUTH, UAC_CALL, SippServer, run_sipp  # noqa: E402

COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
CLUSTER_FILE = ROOT / "docker" / "compose.redis-cluster.yaml"
CLUSTER_SERVERS = {f"redis-c{i + 1}": f"127.0.80.{40 + i}" for i in range(6)}
DOMAIN = "farm.test"
BALANCERS = {"lb1": "127.0.80.11", "lb2": "127.0.80.12"}
NODES = {"node1": "127.0.80.21", "node2": "127.0.80.22", "node3": "127.0.80.23"}
RELAYS = {"relay1": "127.0.80.31", "relay2": "127.0.80.32"}
REDIS_SERVERS = {"redis": "127.0.80.2", "redis-replica": "127.0.80.3"}
SENTINELS = {"sentinel1": "127.0.80.5", "sentinel2": "127.0.80.6", "sentinel3": "127.0.80.7"}
SENTINEL_PORT = 26379
SERVICE = "mymaster"
METRICS_PORT = 9100
PROMETHEUS = "127.0.80.9:9090"
SIP_PORT = 5060
USERS = {"alice": secrets.token_hex(8), "bob": secrets.token_hex(8)}


class FarmCheckFailed(RuntimeError):
    """A step of the check did not see what it expected; the message says what it saw."""


def say(text: str) -> None:
    print(f"docker-test: {text}", flush=True)


def compose_command() -> list[str]:
    """`docker compose` when the plugin is there, else Debian's `docker-compose`."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise FarmCheckFailed("neither 'docker compose' nor 'docker-compose' found: apt-get install docker-compose")


class Compose:
    def __init__(self, project: str, files: Sequence[Path]) -> None:
        self.argv = [*compose_command(), "-p", project]
        for path in files:
            self.argv += ["-f", str(path)]
        self.project = project

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
        )
        if check and proc.returncode != 0:
            raise FarmCheckFailed(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def admin(self, *args: str, timeout: float = 60) -> str:
        return self.run("run", "--rm", "-T", "admin", *args, timeout=timeout).stdout


def wait_for(what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.5) -> object:
    """The predicate's first truthy value within `timeout` seconds, else FarmCheckFailed."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except (OSError, FarmCheckFailed, ValueError, redis.RedisError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise FarmCheckFailed(f"{what}: not within {timeout:g} s (last: {last!r})")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback http only
        return str(response.read().decode())


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` (exact name, any other labels) in a Prometheus text page."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.MULTILINE)
    for match in pattern.finditer(text):
        label_text = match.group(1) or ""
        if all(f'{key}="{value}"' in label_text for key, value in labels.items()):
            total += float(match.group(2))
    return total


def sentinel_master() -> tuple[str, int]:
    """The master the first sentinel names."""
    with redis.Redis(host=SENTINELS["sentinel1"], port=SENTINEL_PORT, socket_timeout=5) as sentinel:
        host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return (host.decode() if isinstance(host, bytes) else str(host), int(port))


def sentinels_ready() -> bool:
    """Every sentinel knows one replica and the two other sentinels (a failover can be agreed)."""
    for ip in SENTINELS.values():
        with redis.Redis(host=ip, port=SENTINEL_PORT, socket_timeout=5) as sentinel:
            view = sentinel.sentinel_master(SERVICE)
            if int(view["num-slaves"]) < 1 or int(view["num-other-sentinels"]) < len(SENTINELS) - 1:
                return False
    return True


def _switched(old: tuple[str, int]) -> str | None:
    """The new master (host:port) once every sentinel names one other than ``old``."""
    seen = set()
    for ip in SENTINELS.values():
        with redis.Redis(host=ip, port=SENTINEL_PORT, socket_timeout=5) as sentinel:
            host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
            seen.add((host.decode() if isinstance(host, bytes) else str(host), int(port)))
    if len(seen) == 1 and old not in seen:
        host, port = seen.pop()
        return f"{host}:{port}"
    return None


def sentinel_failover() -> None:
    """SENTINEL FAILOVER (the replica becomes the master); back when every sentinel names it."""
    old = sentinel_master()
    wait_for("the sentinels to know the replica and each other", sentinels_ready, timeout=60, interval=1)
    with redis.Redis(host=SENTINELS["sentinel1"], port=SENTINEL_PORT, socket_timeout=5) as sentinel:
        sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
    new = wait_for("every sentinel to name the new master", lambda: _switched(old), timeout=90, interval=1)
    say(f"sentinel failover: master {old[0]}:{old[1]} -> {new} (all {len(SENTINELS)} sentinels agree)")


def cluster_info(ip: str) -> dict[str, str]:
    password = os.environ["SIPFARM_REDIS_PASSWORD"]
    with redis.Redis(host=ip, port=6379, password=password, socket_timeout=5) as server:
        text = server.execute_command("CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def cluster_master_stopped(compose: Compose) -> None:
    """Stop the master of slot 0 (a master with a replica): its replica is promoted."""
    first = next(iter(CLUSTER_SERVERS))
    info = cluster_info(CLUSTER_SERVERS[first])
    say(f"redis cluster: cluster_state {info['cluster_state']}, {info['cluster_size']} masters, "
        f"{info['cluster_known_nodes']} servers")  # fmt: skip
    password = os.environ["SIPFARM_REDIS_PASSWORD"]
    with redis.Redis(host=CLUSTER_SERVERS[first], port=6379, password=password, socket_timeout=5) as server:
        slots = server.execute_command("CLUSTER", "SLOTS")
    owner = next(row for row in slots if int(row[0]) == 0)
    master_ip = owner[2][0].decode() if isinstance(owner[2][0], bytes) else str(owner[2][0])
    victim = next(name for name, ip in CLUSTER_SERVERS.items() if ip == master_ip)
    witness = next(ip for ip in CLUSTER_SERVERS.values() if ip != master_ip)
    compose.run("stop", "--timeout", "1", victim)

    def promoted() -> str | None:
        with redis.Redis(host=witness, port=6379, password=password, socket_timeout=5) as server:
            rows = server.execute_command("CLUSTER", "SLOTS")
        row = next((r for r in rows if int(r[0]) == 0), None)
        if row is None or cluster_info(witness)["cluster_state"] != "ok":
            return None
        ip = row[2][0].decode() if isinstance(row[2][0], bytes) else str(row[2][0])
        return ip if ip != master_ip else None

    new = wait_for("a replica promoted in the stopped master's place", promoted, timeout=90, interval=1)
    say(f"redis cluster: master {victim} ({master_ip}) stopped; its replica {new} took its slots, cluster_state ok")


def farm_status(compose: Compose) -> dict[str, int]:
    members = json.loads(compose.admin("status", "--json"))
    rows = members if isinstance(members, list) else members.get("members", [])
    counts: dict[str, int] = {}
    for row in rows:
        if row.get("state", "active") == "active":
            counts[row["role"]] = counts.get(row["role"], 0) + 1
    return counts


def check(args: argparse.Namespace, compose: Compose, workdir: Path) -> None:
    started = time.monotonic()
    up_args = ["up", "-d"] + ([] if args.build else ["--no-build"])
    compose.run(*up_args, timeout=600)
    services = [*BALANCERS, *NODES, *RELAYS, *REDIS_SERVERS, *SENTINELS, "prometheus"]
    if args.redis == "cluster":
        services += list(CLUSTER_SERVERS)
    running = compose.run("ps", "--services", "--filter", "status=running").stdout.split()
    missing = sorted(set(services) - set(running))
    if missing:
        raise FarmCheckFailed(f"containers not running after up: {missing}")
    elapsed = time.monotonic() - started
    say(f"compose up: {len(running)} containers running ({', '.join(sorted(running))}) in {elapsed:.0f} s")

    want = {"balancer": len(BALANCERS), "node": len(NODES), "relay": len(RELAYS)}

    def complete() -> dict[str, int] | None:
        counts = farm_status(compose)
        return counts if all(counts.get(role, 0) >= n for role, n in want.items()) else None

    counts = wait_for("the farm's members active in 'sipfarm status'", complete, timeout=90, interval=1)
    say(f"sipfarm status (admin container): active members {counts}")

    builds = {}
    for service in [*BALANCERS, *NODES, *RELAYS]:
        logs = compose.run("logs", "--no-color", service).stdout
        found = re.search(r'"event": "build", "build": "(\w+)"', logs) or re.search(r"event=build build=(\w+)", logs)
        builds[service] = found.group(1) if found else "unknown"
    if set(builds.values()) != {"compiled"}:
        raise FarmCheckFailed(f"not every process runs the compiled build: {builds}")
    say(f"build: every sipfarm process logged build=compiled ({len(builds)} processes)")

    for user, password in USERS.items():
        compose.admin("user", "add", f"{user}@{DOMAIN}", "--password", password)
    say(f"accounts added through the admin container: {', '.join(f'{u}@{DOMAIN}' for u in USERS)}")

    lb1 = f"{BALANCERS['lb1']}:{SIP_PORT}"
    lb2 = f"{BALANCERS['lb2']}:{SIP_PORT}"
    uas = SippServer(workdir / "bob-phone")
    try:

        def register(user: str, target: str, contact: str) -> None:
            users = workdir / f"{user}.csv"
            users.write_text(f"SEQUENTIAL\n{user};{USERS[user]}\n")

            def attempt() -> bool:
                result = run_sipp(
                    REGISTER_AUTH, target, workdir=workdir / f"register-{user}", rate=1, calls=1,
                    injection=users, variables={"domain": DOMAIN, "contact": contact, "expires": "300"},
                    timeout_s=30,
                )  # fmt: skip
                return result.calls_succeeded == 1

            # the balancers learn the nodes from the membership within a second of their start
            wait_for(f"{user}'s REGISTER through {target}", attempt, timeout=60, interval=1)
            say(f"registered {user}@{DOMAIN} through {target} (contact {contact}): 401 challenge, then 200")

        def call(target: str, name: str) -> None:
            calls = workdir / "calls.csv"
            calls.write_text(f"SEQUENTIAL\nbob;alice;{USERS['alice']}\n")
            result = run_sipp(
                UAC_CALL, target, workdir=workdir / name, rate=1, calls=1, call_length_ms=500,
                injection=calls, variables={"domain": DOMAIN}, timeout_s=60,
            )  # fmt: skip
            if result.calls_succeeded != 1:
                output = (result.workdir / "sipp.out").read_text(errors="replace")[-1500:]
                raise FarmCheckFailed(
                    f"alice's call to bob through {target} failed: {result.calls_failed} failed; errors:\n"
                    f"{result.errors_tail}\nsipp output: {output}"
                )
            rtt = result.response_times_ms[0] if result.response_times_ms else float("nan")
            say(f"call alice -> bob through {target}: 1 of 1 completed (INVITE, 407, INVITE, 200, ACK, BYE, 200), "
                f"setup {rtt:.1f} ms")  # fmt: skip

        register("bob", lb2, uas.contact)
        register("alice", lb1, "127.0.0.1:5999")
        call(lb1, "call-1")  # bob registered through lb2: the call crosses both balancers

        if args.redis == "sentinel":
            sentinel_failover()
        else:
            cluster_master_stopped(compose)
        register("bob", lb1, uas.contact)
        register("alice", lb2, "127.0.0.1:5999")
        call(lb2, "call-2")
    finally:
        uas.stop()

    endpoints = {name: f"{ip}:{METRICS_PORT}" for name, ip in {**BALANCERS, **NODES, **RELAYS}.items()}
    pages = {name: http_get(f"http://{address}/metrics") for name, address in endpoints.items()}
    say(f"metrics: all {len(pages)} /metrics endpoints answer ({', '.join(f'{n}@{a}' for n, a in endpoints.items())})")
    offers = sum(metric_sum(pages[r], "sipfarm_relay_ng_commands_total", command="offer") for r in RELAYS)
    answers = sum(metric_sum(pages[r], "sipfarm_relay_ng_commands_total", command="answer") for r in RELAYS)
    if offers < 1 or answers < 1:
        raise FarmCheckFailed(f"the relays saw no offer/answer for the call (offer {offers:g}, answer {answers:g})")
    say(f"metrics: relays counted ng offer {offers:g}, answer {answers:g} for the calls")
    for name in BALANCERS:
        events = metric_sum(pages[name], "sipfarm_balancer_events_total")
        usable = metric_sum(pages[name], "sipfarm_balancer_nodes_usable")
        say(f"metrics: {name}: sipfarm_balancer_nodes_usable {usable:g}, sipfarm_balancer_events_total {events:g}")
    per_method = {
        method: sum(metric_sum(pages[n], "sipfarm_node_requests_total", method=method) for n in NODES)
        for method in ("REGISTER", "INVITE", "ACK", "BYE")
    }
    anchored = sum(metric_sum(pages[n], "sipfarm_node_media_total", outcome="anchored") for n in NODES)
    if per_method["REGISTER"] < 8 or per_method["INVITE"] < 4 or anchored < 2:
        raise FarmCheckFailed(f"the nodes' counters miss the traffic: {per_method}, media anchored {anchored:g}")
    say(f"metrics: nodes' sipfarm_node_requests_total {per_method}, media anchored {anchored:g}")

    def targets_up() -> list[str] | None:
        data = json.loads(http_get(f"http://{PROMETHEUS}/api/v1/targets"))
        active = data["data"]["activeTargets"]
        up = [t["scrapeUrl"] for t in active if t["health"] == "up"]
        return up if len(up) == len(active) >= len(pages) + 1 else None

    up = wait_for("every Prometheus target up", targets_up, timeout=60, interval=2)
    assert isinstance(up, list)
    say(f"prometheus: {len(up)} of {len(up)} targets up (every balancer, node and relay, and itself)")
    query = urllib.request.quote("sum(sipfarm_relay_ng_commands_total)")

    def scraped_offers() -> float:
        data = json.loads(http_get(f"http://{PROMETHEUS}/api/v1/query?query={query}"))
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    value = wait_for("Prometheus to have scraped the relays' ng commands", scraped_offers, timeout=30, interval=2)
    say(f"prometheus: sum(sipfarm_relay_ng_commands_total) = {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--project", default="sipfarm-test", help="compose project name (default sipfarm-test)")
    parser.add_argument("--build", action="store_true", help="let compose build the images (default: use them)")
    parser.add_argument("--keep", action="store_true", help="leave the farm running")
    parser.add_argument(
        "--redis", choices=("sentinel", "cluster"), default="sentinel",
        help="sentinel: compose.yaml as it is; cluster: with compose.redis-cluster.yaml (default sentinel)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("SIPFARM_REDIS_PASSWORD", secrets.token_hex(16))
    extra = [Path(p) for p in os.environ.get("SIPFARM_COMPOSE_FILES", "").split(":") if p]
    if args.redis == "cluster":
        extra.insert(0, CLUSTER_FILE)
    compose = Compose(args.project, [COMPOSE_FILE, *extra])
    say(f"farm: docker/compose.yaml{' + compose.redis-cluster.yaml' if args.redis == 'cluster' else ''}, "
        f"Redis {'Cluster' if args.redis == 'cluster' else 'behind Sentinel'}")  # fmt: skip
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sipfarm-docker-test-") as tmp:
        try:
            check(args, compose, Path(tmp))
        except (FarmCheckFailed, subprocess.TimeoutExpired, OSError, redis.RedisError) as exc:
            say(f"FAILED: {exc}")
            logs = compose.run("logs", "--no-color", "--tail", "15", check=False, timeout=60)
            print(logs.stdout[-6000:], file=sys.stderr)
            return 1
        finally:
            if not args.keep:
                down = compose.run("down", "-v", "--timeout", "20", check=False, timeout=180)
                say(f"compose down -v: exit {down.returncode}")
    say(f"PASSED in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
