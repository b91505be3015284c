"""SIPp against real nodes and a real redis-server: registrations with digest auth at a steady
rate, authenticated calls UAC -> node(s) -> UAS, and one AOR registered concurrently through
two nodes.

The scenarios are the benchmark's (``benchmarks/scenarios``; ``uac_call.xml`` from
``scenarios/`` here, see UAC_CALL), run by ``benchmarks.sipp``; every
run is bounded in calls and time and stays on 127.0.0.1. Each test prints SIPp's summary line
(rate, calls, failures, response times): ``pytest -s`` shows it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fixtures.farm import DOMAIN, NodeProcess, SipClient, free_udp_tcp_port
from fixtures.startup import START_TIMEOUT_S

from benchmarks.sipp import REGISTER_AUTH, UAS_ANSWER, SippResult, SippServer, run_sipp
from sipfarm.store import AccountStore, LocationStore, create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)

# benchmarks/scenarios/uac_call.xml ACKs the 407 on a new branch, which no server transaction
# matches (RFC 3261 17.2.3): this copy ACKs on the INVITE's branch.
UAC_CALL = Path(__file__).resolve().parent / "scenarios" / "uac_call.xml"

REGISTER_USERS = 1000
REGISTER_RATE = 200
CALLS = 100
CALL_RATE = 20
CONCURRENT_CONTACTS = 100


def hostport(node: NodeProcess) -> str:
    host, port = node.address
    return f"{host}:{port}"


def write_injection(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("SEQUENTIAL\n" + "".join(";".join(row) + "\n" for row in rows))
    return path


def assert_clean(result: SippResult, calls: int) -> None:
    print(result.summary())
    assert result.calls_attempted == calls, result.summary()
    assert result.calls_failed == 0, f"{result.summary()}\n{result.errors_tail}"
    assert result.calls_succeeded == calls, result.summary()


def unexpected_messages(result: SippResult) -> list[str]:
    """First lines of the messages SIPp received outside any call (e.g. retransmitted 407s)."""
    log = result.workdir / "errors.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [part.split("\n", 1)[0] for part in text.split("received '")[1:]]


def lookup_many(redis_url: str, aors: list[str]) -> dict[str, list[str]]:
    async def run() -> dict[str, list[str]]:
        redis = create_redis(redis_url)
        try:
            found = await LocationStore(redis).lookup_many(aors, time.time())
        finally:
            await redis.aclose()
        return {aor: [b.contact for b in bindings] for aor, bindings in found.items()}

    return asyncio.run(run())


def provision(redis_url: str, users: dict[str, str], batch: int = 32) -> None:
    """Accounts through AccountStore, ``batch`` adds in flight at once on as many connections."""
    async def run() -> None:
        redis = create_redis(redis_url, max_connections=batch)
        try:
            store = AccountStore(redis)
            items = list(users.items())
            for start in range(0, len(items), batch):
                await asyncio.gather(*(store.add(u, DOMAIN, p) for u, p in items[start:start + batch]))
        finally:
            await redis.aclose()

    asyncio.run(run())


def set_max_contacts(redis_url: str, user: str, limit: int) -> None:
    async def run() -> None:
        redis = create_redis(redis_url)
        try:
            await AccountStore(redis).set_max_contacts(user, DOMAIN, limit)
        finally:
            await redis.aclose()

    asyncio.run(run())


@pytest.fixture
def sipp_uas(tmp_path: Path) -> Iterator[SippServer]:
    """A SIPp UAS answering every call (180, 200, then ACK, BYE)."""
    with SippServer(tmp_path / "uas", scenario=UAS_ANSWER) as server:
        yield server


def register_with_sipp(tmp_path: Path, node: NodeProcess, user: str, password: str, contact: str) -> SippResult:
    csv = write_injection(tmp_path / f"register-{user}.csv", [(user, password)])
    return run_sipp(REGISTER_AUTH, hostport(node), workdir=tmp_path / f"register-{user}", rate=10, calls=1,
                    injection=csv, variables={"domain": DOMAIN, "contact": contact, "expires": "300"},
                    timeout_s=15)


def test_register_1000_users_with_digest_auth(redis_url, start_node, tmp_path: Path):
    users = {f"user{i:04d}": f"pw-{i:04d}" for i in range(REGISTER_USERS)}
    provision(redis_url, users)
    node = start_node(redis_url)
    contact_port = free_udp_tcp_port()
    csv = write_injection(tmp_path / "users.csv", list(users.items()))
    result = run_sipp(REGISTER_AUTH, hostport(node), workdir=tmp_path / "register", rate=REGISTER_RATE,
                      calls=REGISTER_USERS, injection=csv,
                      variables={"domain": DOMAIN, "contact": f"127.0.0.1:{contact_port}", "expires": "300"},
                      timeout_s=REGISTER_USERS / REGISTER_RATE + 20)
    assert_clean(result, REGISTER_USERS)
    found = lookup_many(redis_url, [f"{u}@{DOMAIN}" for u in users])
    missing = [aor for aor, contacts in found.items() if len(contacts) != 1]
    assert not missing, f"{len(missing)} AORs without their binding, e.g. {missing[:5]}"
    assert found[f"user0042@{DOMAIN}"] == [f"sip:user0042@127.0.0.1:{contact_port}"]


def test_calls_through_one_node(redis_url, accounts, start_node, sipp_uas, tmp_path: Path):
    node = start_node(redis_url)
    assert_clean(register_with_sipp(tmp_path, node, "bob", accounts["bob"], sipp_uas.contact), 1)
    csv = write_injection(tmp_path / "calls.csv", [("bob", "alice", accounts["alice"])])
    result = run_sipp(UAC_CALL, hostport(node), workdir=tmp_path / "calls", rate=CALL_RATE, calls=CALLS,
                      injection=csv, variables={"domain": DOMAIN}, timeout_s=CALLS / CALL_RATE + 20)
    assert_clean(result, CALLS)
    assert unexpected_messages(result) == []  # every 407 was ACKed on its transaction


def test_calls_across_two_nodes(redis_url, accounts, start_node, sipp_uas, tmp_path: Path):
    """The caller uses node 1; the callee registered through node 2 (found in the shared Redis)."""
    node1 = start_node(redis_url, "node1")
    node2 = start_node(redis_url, "node2")
    assert_clean(register_with_sipp(tmp_path, node2, "bob", accounts["bob"], sipp_uas.contact), 1)
    csv = write_injection(tmp_path / "calls.csv", [("bob", "alice", accounts["alice"])])
    result = run_sipp(UAC_CALL, hostport(node1), workdir=tmp_path / "calls", rate=CALL_RATE, calls=CALLS,
                      injection=csv, variables={"domain": DOMAIN}, timeout_s=CALLS / CALL_RATE + 20)
    assert_clean(result, CALLS)
    assert unexpected_messages(result) == []  # every 407 was ACKed on its transaction


def test_one_aor_registered_concurrently_through_two_nodes(redis_url, accounts, start_node):
    set_max_contacts(redis_url, "alice", 2 * CONCURRENT_CONTACTS)
    nodes = [start_node(redis_url, "node1"), start_node(redis_url, "node2")]
    clients = [SipClient() for _ in range(CONCURRENT_CONTACTS)]
    try:
        def register(i: int) -> int | None:
            # distinct Contact (the client's own port) and Call-ID per REGISTER
            reply = clients[i].register(nodes[i % 2].address, "alice", accounts["alice"])
            return reply.status if reply is not None else None

        with ThreadPoolExecutor(max_workers=CONCURRENT_CONTACTS) as pool:
            statuses = list(pool.map(register, range(CONCURRENT_CONTACTS)))
        assert statuses == [200] * CONCURRENT_CONTACTS
        contacts = set(lookup_many(redis_url, [f"alice@{DOMAIN}"])[f"alice@{DOMAIN}"])
        assert contacts == {f"sip:alice@127.0.0.1:{c.port}" for c in clients}
    finally:
        for c in clients:
            c.close()
