"""The farm on a Redis Cluster (3 masters + 3 replicas on loopback, ``redis+cluster://``).

1. SIPp registers 300 users through a balancer and a node; every AOR is found afterwards and the
   AORs landed on every master (their keys spread over the slots); then authenticated calls
   between registered users go through.
2. A master is killed (SIGKILL) while a node takes registrations with ``replicas_ack = 1``;
   its replica is promoted after ``cluster-node-timeout`` (1 s). Every AOR that got a 200 OK,
   before or after the kill, is found after the promotion; those refused meanwhile (503 or no
   answer) register once the dead node is back as the promoted one's replica (until then its
   slots have no replica to acknowledge a write: 503, by design).
3. The master of the membership slot is killed under a balancer and a node: REGISTERs through
   the balancer succeed again once its replica is promoted.
4. The CLI (accounts, status, drain, bans) and ``sipfarm up --redis-cluster`` on a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.farm import DOMAIN, NodeProcess, SipClient, add_accounts, free_udp_tcp_port, wait_nodes_usable
from fixtures.startup import process_state
from test_up import wait_registers

from benchmarks.sipp import REGISTER_AUTH, UAS_ANSWER, SippResult, SippServer, run_sipp
from sipfarm.ports import is_free
from sipfarm.store import LocationStore, create_redis
from sipfarm.store.location import location_key
from sipfarm.store.redis_server import RedisClusterProcesses, query

pytestmark = pytest.mark.timeout(180)

UAC_CALL = Path(__file__).resolve().parents[1] / "node" / "scenarios" / "uac_call.xml"
USERS = 300
RATE = 60
CALLS = 20


def registered(url: str, aors: list[str]) -> dict[str, list[str]]:
    async def run() -> dict[str, list[str]]:
        redis = create_redis(url)
        try:
            found = await LocationStore(redis).lookup_many(aors, time.time())
        finally:
            await redis.aclose()
        return {aor: [b.contact for b in bindings] for aor, bindings in found.items()}

    return asyncio.run(run())


def write_injection(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("SEQUENTIAL\n" + "".join(";".join(row) + "\n" for row in rows))
    return path


def assert_clean(result: SippResult, calls: int) -> None:
    print(result.summary())
    assert result.calls_succeeded == calls, f"{result.summary()}\n{result.errors_tail}"
    assert result.calls_failed == 0, f"{result.summary()}\n{result.errors_tail}"


@pytest.fixture
def sipp_uas(tmp_path: Path) -> Iterator[SippServer]:
    with SippServer(tmp_path / "uas", scenario=UAS_ANSWER) as server:
        yield server


def test_registrations_and_calls_through_a_farm_on_a_redis_cluster(
    redis_cluster: RedisClusterProcesses, redis_cluster_url: str, start_node, start_balancer, sipp_uas, tmp_path: Path
) -> None:
    users = {f"user{i:04d}": f"pw-{i:04d}" for i in range(USERS)}
    add_accounts(redis_cluster_url, {**users, "alice": "alice-secret", "bob": "bob-secret"})
    start_node(redis_cluster_url, "node1")
    # no overload shedding: on a loaded CI machine it may turn a registration away (503), and
    # what is tested here is the store, not the balancer's admission
    lb = start_balancer(redis_cluster_url, allow_loopback=True, extra=["--no-shed"])
    wait_nodes_usable(lb, 1, timeout=20)
    farm = f"{lb.address[0]}:{lb.address[1]}"
    contact_port = free_udp_tcp_port()
    csv = write_injection(tmp_path / "users.csv", list(users.items()))
    result = run_sipp(REGISTER_AUTH, farm, workdir=tmp_path / "register", rate=RATE, calls=USERS, injection=csv,
                      variables={"domain": DOMAIN, "contact": f"127.0.0.1:{contact_port}", "expires": "300"},
                      timeout_s=USERS / RATE + 30)  # fmt: skip
    assert_clean(result, USERS)
    found = registered(redis_cluster_url, [f"{u}@{DOMAIN}" for u in users])
    missing = [aor for aor, contacts in found.items() if len(contacts) != 1]
    assert not missing, f"{len(missing)} AORs without their binding, e.g. {missing[:5]}"
    # the location data of these AORs lives on every master
    masters = [port for port, role in redis_cluster.roles().items() if role == "master"]
    holders = {redis_cluster.master_of(location_key(aor, True).encode()).port for aor in found}
    assert holders == set(masters)
    assert all(int(query("127.0.0.1", port, "DBSIZE")) > 0 for port in masters)

    # calls: alice -> bob (bob registered by the UAS), through the balancer
    bob = write_injection(tmp_path / "bob.csv", [("bob", "bob-secret")])
    assert_clean(run_sipp(REGISTER_AUTH, farm, workdir=tmp_path / "register-bob", rate=10, calls=1, injection=bob,
                          variables={"domain": DOMAIN, "contact": sipp_uas.contact, "expires": "300"},
                          timeout_s=15), 1)  # fmt: skip
    calls = write_injection(tmp_path / "calls.csv", [("bob", "alice", "alice-secret")])
    result = run_sipp(UAC_CALL, farm, workdir=tmp_path / "calls", rate=10, calls=CALLS, injection=calls,
                      variables={"domain": DOMAIN}, timeout_s=CALLS / 10 + 30)  # fmt: skip
    assert_clean(result, CALLS)


def redis_events(port: int, kind: str) -> float:
    """``sipfarm_node_redis_events_total{kind=...}`` of a node's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(f'sipfarm_node_redis_events_total{{kind="{kind}"}}'):
                return float(line.rpartition(" ")[2])
    return 0.0


def register_once(client: SipClient, node: NodeProcess, user: str, password: str) -> int:
    """The final status of one REGISTER with digest (0: no answer)."""
    reply = client.register(node.address, user, password, contact=f"<sip:{user}@127.0.0.1:{client.port}>",
                            call_id=secrets.token_hex(8))  # fmt: skip
    return reply.status if reply is not None else 0


def test_master_killed_mid_registrations_loses_no_acknowledged_registration(
    start_node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RedisClusterProcesses(tmp_path / "cluster", node_timeout_ms=1000) as cluster:
        users = {f"u{i:03d}": f"pw{i:03d}" for i in range(150)}
        add_accounts(cluster.url, users)
        monkeypatch.setenv("SIPFARM_REPLICAS_ACK", "1")
        monkeypatch.setenv("SIPFARM_REPLICAS_ACK_TIMEOUT", "0.5")
        metrics = free_udp_tcp_port()
        node = start_node(cluster.url, "node1", extra=["--metrics", f"127.0.0.1:{metrics}"])
        client = SipClient()
        acknowledged: set[str] = set()
        killed_at = promoted_after = 0.0
        refused_count = 0
        refused: list[str] = []
        victim = None
        try:
            for i, (user, password) in enumerate(users.items()):
                if i == 50:
                    # the master of the next user's account: the kill lands on registrations
                    victim = cluster.master_of(f"sipfarm:acct:{{{user}@{DOMAIN}}}".encode())
                    cluster.kill(victim)
                    killed_at = time.monotonic()
                status = register_once(client, node, user, password)
                if status == 200:
                    acknowledged.add(user)
                else:
                    refused.append(user)
            assert victim is not None
            cluster.wait_ok(30, replicated=False)  # the replica took over the dead master's slots
            promoted_after = time.monotonic() - killed_at
            refused_count = len(refused)
            assert refused, "the killed master's slots should have refused some registrations"
            # the promoted replica has no replica of its own, so with replicas_ack = 1 its slots
            # answer 503 until the dead node comes back: it rejoins as the new master's replica
            victim.start()
            cluster.wait_ok(30)
            # the refused register now (the node has followed the new map)
            deadline = time.monotonic() + 30
            while refused and time.monotonic() < deadline:
                user = refused[0]
                if register_once(client, node, user, users[user]) == 200:
                    acknowledged.add(user)
                    refused.pop(0)
                else:
                    time.sleep(0.2)
            assert not refused, f"still refused after the failover: {refused[:5]}"
        finally:
            client.close()
        # the node's client read the map again after losing the master (counted)
        deadline = time.monotonic() + 10
        while redis_events(metrics, "cluster_map_refreshes") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert redis_events(metrics, "cluster_map_refreshes") >= 2
        node.stop()  # before the cluster goes
        found = registered(cluster.url, [f"{u}@{DOMAIN}" for u in acknowledged])
        lost = sorted(aor for aor, contacts in found.items() if not contacts)
        print(
            f"master killed after 50 registrations: replica promoted within {promoted_after:.2f} s; "
            f"{refused_count} of the {len(users) - 50} registrations after the kill refused (503 or none); "
            f"{len(acknowledged)} acknowledged, {len(lost)} of them lost"
        )
        assert not lost, f"{len(lost)} acknowledged registrations lost: {lost[:5]}"
        assert len(acknowledged) == len(users)


def sipfarm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipfarm", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_cli_on_a_redis_cluster(redis_cluster_url: str, start_node) -> None:
    """Accounts, status (members and registrations), drain and bans, all on the cluster."""
    url = ["--redis", redis_cluster_url]
    done = sipfarm("user", "add", f"alice@{DOMAIN}", "--password", "alice-secret", *url)
    assert done.returncode == 0, done.stderr
    assert sipfarm("user", "add", f"alice@{DOMAIN}", "--password", "x", *url).returncode != 0  # exists
    assert f"alice@{DOMAIN}" in sipfarm("user", "list", *url).stdout
    node = start_node(redis_cluster_url, "node1")
    client = SipClient()
    try:
        assert register_once(client, node, "alice", "alice-secret") == 200
    finally:
        client.close()
    deadline = time.monotonic() + 20  # the node counts registrations every 5 s, heartbeats them
    status = ""
    while time.monotonic() < deadline:
        status = sipfarm("status", *url).stdout
        if "node1" in status and "1 registrations in the farm" in status:
            break
        time.sleep(0.5)
    assert "node1" in status and "1 registrations in the farm" in status, status
    assert sipfarm("drain", "node1", *url).returncode == 0
    assert sipfarm("drain", "node1", "--undo", *url).returncode == 0
    assert sipfarm("ban", "add", "192.0.2.7", "--seconds", "60", *url).returncode == 0
    assert "192.0.2.7" in sipfarm("ban", "list", *url).stdout
    assert sipfarm("ban", "del", "192.0.2.7", *url).returncode == 0
    assert "192.0.2.7" not in sipfarm("ban", "list", *url).stdout
    assert sipfarm("user", "del", f"alice@{DOMAIN}", *url).returncode == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_on_a_private_redis_cluster(tmp_path: Path) -> None:
    """`sipfarm up --redis-cluster`: a 3+3 cluster with a password, the farm on it, all stopped."""
    port = free_udp_tcp_port()  # the balancer's; the node's is port + 10, metrics on others
    while not all(is_free("127.0.0.1", port + d) for d in (1, 2, 10, 11)):
        port = free_udp_tcp_port()
    metrics = free_udp_tcp_port()
    while not is_free("127.0.0.1", metrics + 1) or metrics in (port + 1, port + 2, port + 10, port + 11):
        metrics = free_udp_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipfarm", "up", "--redis-cluster", "--nodes", "1", "--relays", "0",
         "--sip-port", str(port), "--metrics-port", str(metrics), "--dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ready: dict[str, Any] | None = None
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while ready is None and time.monotonic() < deadline and (line := proc.stdout.readline()):
            lines.append(line)
            if line.startswith("READY "):
                ready = json.loads(line[len("READY ") :])
        assert ready is not None, f"no READY line in 90 s ({process_state(proc)}):\n{''.join(lines)}"
        assert ready["redis"].startswith("redis+cluster://:")  # with a password
        assert sorted(p["role"] for p in ready["processes"]).count("redis") == 6
        wait_registers(proc, ("127.0.0.1", port), lines)  # the balancer's first membership poll and probes
        assert f"alice@{DOMAIN}" in registered(ready["redis"], [f"alice@{DOMAIN}"])
        assert registered(ready["redis"], [f"alice@{DOMAIN}"])[f"alice@{DOMAIN}"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    pids = [p["pid"] for p in (ready or {"processes": []})["processes"]]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)]
    assert proc.returncode == 0


def test_the_farm_survives_the_loss_of_the_membership_master(start_node, start_balancer, tmp_path: Path) -> None:
    """The master holding the membership slot (``{cluster}``: every heartbeat, the balancer's view
    of the nodes) SIGKILLed: the balancer keeps its last view meanwhile, and REGISTERs through it
    succeed again once the replica is promoted."""
    with RedisClusterProcesses(tmp_path / "cluster", node_timeout_ms=1000) as cluster:
        users = {f"m{i:02d}": f"pw{i:02d}" for i in range(20)}
        add_accounts(cluster.url, users)
        start_node(cluster.url, "node1")
        lb = start_balancer(cluster.url, allow_loopback=True, extra=["--no-shed"])
        wait_nodes_usable(lb, 1, timeout=20)
        client = SipClient()
        try:
            reply = client.register(lb.address, "m00", "pw00")
            assert reply is not None and reply.status == 200
            cluster.kill(cluster.master_of(b"sipfarm:{cluster}:members"))
            killed_at = time.monotonic()
            cluster.wait_ok(30, replicated=False)
            statuses: list[int] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                user = f"m{1 + len(statuses) % 19:02d}"
                reply = client.register(lb.address, user, users[user])
                statuses.append(reply.status if reply is not None else 0)
                if statuses[-3:] == [200, 200, 200]:
                    break
                time.sleep(0.2)
            print(f"membership master killed: registrations through the balancer again after "
                  f"{time.monotonic() - killed_at:.1f} s ({statuses})")  # fmt: skip
            assert statuses[-3:] == [200, 200, 200], statuses
        finally:
            client.close()
