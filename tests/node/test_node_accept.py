"""A node that takes requests only from the farm's balancers (``--accept-from balancers``),
with real processes: a REGISTER through the balancer works, the same REGISTER sent straight
to the node from another address gets nothing and is counted; a balancer that starts later
is accepted within its heartbeat, and one that stops is refused again."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port, options_request, sip_options, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S

from sipfarm.cluster.membership import Member, MembershipStore, Role
from sipfarm.store import create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)


def node_dropped(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    for line in text.splitlines():
        if line.startswith('sipfarm_node_dropped_total{reason="unknown_source"}'):
            return float(line.rpartition(" ")[2])
    return 0.0


async def heartbeat_once(redis_url: str, member: Member) -> None:
    redis = create_redis(redis_url)
    try:
        await MembershipStore(redis).heartbeat(member)
    finally:
        await redis.aclose()


def answered_within(seconds: float, node: tuple[str, int], source: str) -> float | None:
    """Seconds until the node answers OPTIONS from ``source`` (None: not within ``seconds``)."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if sip_options(*node, 0.2, source=source) is not None:
            return time.monotonic() - start
    return None


def test_node_takes_requests_from_balancers_only(redis_url, accounts, start_node, start_balancer):
    lb = start_balancer(redis_url)  # on 127.0.0.1, before the node: known when it starts
    metrics_port = free_udp_tcp_port()
    extra = ["--accept-from", "balancers", "--metrics", f"127.0.0.1:{metrics_port}"]
    node = start_node(redis_url, "node1", extra=extra)
    assert "event=accept_from reason=started accepted=127.0.0.1/32" in node.log()
    wait_nodes_usable(lb, 1)
    phone, stranger = SipClient("127.0.0.3"), SipClient("127.0.0.5")
    try:
        reply = phone.register(lb.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 200
        assert stranger.register(node.address, "alice", accounts["alice"]) is None
        stranger.send(options_request(*node.address, stranger.port), node.address)
        assert stranger.recv(0.5) is None
        assert not stranger.skipped  # nothing register() passed over either
        # a connection from the stranger is closed as it is accepted
        with socket.create_connection(node.address, timeout=2, source_address=("127.0.0.5", 0)) as sock:
            try:
                sock.sendall(options_request(*node.address, sock.getsockname()[1]))
                assert sock.recv(4096) == b""
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and node_dropped(metrics_port) < 3:
            time.sleep(0.2)
        assert node_dropped(metrics_port) >= 3  # the REGISTER, the OPTIONS, the connection
        # the balancer still gets through
        reply = phone.register(lb.address, "alice", accounts["alice"], cseq=10)
        assert reply is not None and reply.status == 200
    finally:
        phone.close()
        stranger.close()


def test_a_balancer_starting_later_is_accepted_and_one_gone_refused(redis_url, start_node, start_balancer):
    node = start_node(redis_url, "node1", extra=["--accept-from", "balancers,10.9.0.0/16"], wait_options=False)
    assert "event=accept_from reason=started accepted=10.9.0.0/16" in node.log()
    assert answered_within(1.0, node.address, "127.0.0.2") is None
    late = start_balancer(redis_url, host="127.0.0.2")  # heartbeats every 0.5 s from its start
    # its first heartbeat, then the node's membership poll (0.5 s): about a second; 3 s and more
    # to answer leave room for a loaded CI machine
    took = answered_within(5.0, node.address, "127.0.0.2")
    assert took is not None and took < 3.0, took
    assert answered_within(0.5, node.address, "127.0.0.6") is None  # only the balancer's address
    # a balancer heartbeating only a wildcard address: nothing to accept, and the node says so
    asyncio.run(heartbeat_once(redis_url, Member("lb-ghost", Role.BALANCER, ("udp:0.0.0.0:5060",))))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "balancer=lb-ghost" not in node.log():
        time.sleep(0.1)
    assert "event=accept_from_balancer_unknown_address balancer=lb-ghost" in node.log()
    late.stop()
    # its record expires (1.5 s after its last heartbeat), then the node refuses its address
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and sip_options(*node.address, 0.2, source="127.0.0.2") is not None:
        time.sleep(0.2)
    assert sip_options(*node.address, 0.3, source="127.0.0.2") is None
    assert "reason=balancers_changed" in node.log()


def test_an_open_node_says_so(redis_url, start_node):
    node = start_node(redis_url, "node1")
    assert "event=node_open accept_from=anyone" in node.log()
    assert sip_options(*node.address, source="127.0.0.5") is not None
