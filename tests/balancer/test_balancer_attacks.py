"""Attacks on the balancer's public port with real sockets: nothing an outsider sends makes the
balancer send to a destination the farm did not choose.

* A forged response whose second Via names ``SIP/2.0/TCP 127.0.0.1:<port>`` once made the
  balancer dial that port and write the response (with Redis there, every body line ran as a
  command).  A "local service" here is a plain TCP listener that records any connection.
* A request from a node with no flow token goes to its Request-URI: one naming loopback (reached
  by an outsider through a Route set bouncing off a node) is refused with 403.
* The ACK of a 486 through the balancer reaches the node's INVITE server transaction: the
  caller gets the 486 once, not five times (RFC 3261 17.2.1, 16.11).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from fixtures.farm import DOMAIN, SipClient, free_udp_tcp_port, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from lbhelpers import Caller, answer, wait_request

from sipfarm.cluster.membership import Member, MembershipStore, Role
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message
from sipfarm.store import create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


class LocalService:
    """A TCP listener on loopback standing in for Redis: records every connection and byte."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", free_udp_tcp_port()))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(0.5)
            try:
                while chunk := conn.recv(65536):
                    self.received.append(chunk)
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def service() -> Iterator[LocalService]:
    svc = LocalService()
    yield svc
    svc.close()


def balancer_events(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as page:
        text = page.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sipfarm_balancer_events_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = float(line.rpartition(" ")[2])
    return out


def wait_events(metrics_port: int, kind: str, at_least: float, timeout: float = 5.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    events = balancer_events(metrics_port)
    while events.get(kind, 0) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
        events = balancer_events(metrics_port)
    return events


def forged_response(lb_port: int, branch: str, service_port: int) -> bytes:
    body = b"SET owned 1\r\nCONFIG SET dir /tmp\r\n"
    return (
        f"SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{lb_port};branch={branch}\r\n"
        f"Via: SIP/2.0/TCP 127.0.0.1:{service_port};branch=z9hG4bK{secrets.token_hex(4)}\r\n"
        f"From: <sip:a@{DOMAIN}>;tag=1\r\nTo: <sip:b@{DOMAIN}>;tag=2\r\nCall-ID: {secrets.token_hex(6)}\r\n"
        f"CSeq: 1 INVITE\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_forged_response_never_reaches_a_local_service(redis_url, start_balancer, service: LocalService):
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    attacker = SipClient()
    try:
        # branches as the old balancer wrote them, as this one writes them, and anything else
        branches = ["z9hG4bKlb" + secrets.token_hex(10), "z9hG4bKlb-" + "a" * 29, "z9hG4bK" + secrets.token_hex(5)]
        for branch in branches:
            attacker.send(forged_response(lb.port, branch, service.port), lb.address)
        events = wait_events(metrics_port, "dropped_forged", len(branches))
        time.sleep(0.5)
        assert service.connections == 0 and service.received == []
        assert events.get("dropped_forged", 0) == len(branches), events
        assert lb.process.poll() is None
    finally:
        attacker.close()


class FakeNode:
    """A UDP socket the balancer believes is a node (a membership record in Redis); it answers
    the balancer's OPTIONS probes and sends what the test tells it to."""

    def __init__(self, redis_url: str) -> None:
        self.client = SipClient()
        self.redis_url = redis_url
        self.member = Member("fake-node", Role.NODE, (f"udp:127.0.0.1:{self.client.port}",))
        asyncio.run(self._heartbeat())
        self.replies: list[SipMessage] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    async def _heartbeat(self) -> None:
        redis = create_redis(self.redis_url)
        try:
            await MembershipStore(redis, ttl=60).heartbeat(self.member)
        finally:
            await redis.aclose()

    def _serve(self) -> None:
        self.client.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, source = self.client.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            msg = parse_message(data)
            if msg.method == b"OPTIONS":
                self.client.send(answer(msg, f"<sip:127.0.0.1:{self.client.port}>"), source)
            elif msg.status:
                self.replies.append(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.client.close()


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_request_uri_naming_a_local_service_is_refused(redis_url, start_balancer, service: LocalService,
                                                        transport: str):
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    node = FakeNode(redis_url)
    try:
        wait_nodes_usable(lb, 1)
        uri = f"sip:x@127.0.0.1:{service.port};transport={transport}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # until the balancer's membership watcher knows the node, it answers 503 (no node)
            bye = node.client.request("BYE", uri, to=f"<sip:x@{DOMAIN}>;tag=t1")
            node.client.send(bye, lb.address)
            time.sleep(0.3)
            if any(r.status == 403 for r in node.replies):
                break
        assert any(r.status == 403 for r in node.replies), [r.status for r in node.replies]
        events = wait_events(metrics_port, "error_destination_refused", 1)
        assert events.get("error_destination_refused", 0) >= 1, events
        assert service.connections == 0 and service.received == []
    finally:
        node.close()


def _one_node_farm(redis_url: str, start_node: Any, start_balancer: Any) -> tuple[Any, int]:
    """A node and a balancer with metrics: the balancer and its metrics port."""
    start_node(redis_url, "node1")
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    wait_nodes_usable(lb, 1)
    return lb, metrics_port


def _bob_answers(lb: Any, alice: SipClient, bob: SipClient, accounts: dict[str, str], status: int
                 ) -> tuple[Caller, SipMessage]:  # fmt: skip
    """bob registered through ``lb``; alice calls him (answering the 407); bob answers
    ``status``: alice's Caller and the final answer she got."""
    reply = bob.register(lb.address, "bob", accounts["bob"])
    assert reply is not None and reply.status == 200, lb.log()[-2000:]
    caller = Caller(alice, lb.address, "alice", accounts["alice"])
    result: list[SipMessage | None] = []
    thread = threading.Thread(target=lambda: result.append(caller.invite("bob", 8.0)))
    thread.start()
    invite = wait_request(bob, b"INVITE", 8.0)
    assert invite is not None, lb.log()[-2000:]
    bob.send(answer(invite, f"<sip:bob@127.0.0.1:{bob.port}>", status), lb.address)
    thread.join(10)
    final = result[0] if result else None
    assert final is not None and final.status == status, final
    return caller, final


def test_caller_acking_a_486_through_the_balancer_gets_it_once(redis_url, accounts, start_node, start_balancer):
    """The ACK of the node's stateless 407 ends at the balancer (the farm's secret in its To
    tag); the ACK of the 486 the node's transaction forwarded reaches that transaction."""
    lb, metrics_port = _one_node_farm(redis_url, start_node, start_balancer)
    alice, bob = SipClient(), SipClient()
    try:
        _, busy = _bob_answers(lb, alice, bob, accounts, 486)
        # RFC 3261 17.1.1.3: the ACK of a non-2xx carries the INVITE's top Via (its branch)
        ack = SipMessage.request("ACK", f"sip:bob@{DOMAIN}", [
            ("via", busy.top_via_value), ("max-forwards", "70"), ("from", busy.get("from") or b""),
            ("to", busy.get("to") or b""), ("call-id", busy.call_id), ("cseq", f"{busy.cseq[0]} ACK"),
        ])
        alice.send(ack, lb.address)
        # Timer G would retransmit at +0.5, +1.5, +3.5 s if the ACK missed the transaction
        copies = 0
        deadline = time.monotonic() + 4.5
        while (left := deadline - time.monotonic()) > 0:
            msg = alice.recv(left)
            if msg is None:
                break
            copies += msg.status == 486
        assert copies == 0, f"{copies} retransmitted 486s after the ACK"
        events = wait_events(metrics_port, "acks_ended", 1)
        assert events.get("acks_ended") == 1, events  # the 407's, not the 486's
    finally:
        alice.close()
        bob.close()


def test_the_2xx_ack_goes_past_the_node_and_the_bye_through_it(redis_url, accounts, start_node, start_balancer):
    """In real processes: the caller's ACK of a 200 reaches the callee straight from the
    balancer (counted; the node holds nothing for it and would only send it back), with the
    caller's Via below the balancer's and no Route left; the BYE goes through the node, which
    answers it through the callee as before."""
    lb, metrics_port = _one_node_farm(redis_url, start_node, start_balancer)
    alice, bob = SipClient(), SipClient()
    try:
        caller, _ = _bob_answers(lb, alice, bob, accounts, 200)
        result: list[SipMessage | None] = []
        assert len(caller.route) >= 3  # ours, the node's, ours with bob's flow token
        caller.ack()
        ack = wait_request(bob, b"ACK", 5.0, call_id=caller.call_id)
        assert ack is not None
        assert not ack.values("route") and len(ack.vias) == 2, ack.to_bytes()
        assert ack.vias[1].host == alice.host and ack.vias[1].port == alice.port
        events = wait_events(metrics_port, "acks_past_node", 1)
        assert events.get("acks_past_node") == 1, events
        bye = threading.Thread(target=lambda: result.append(caller.bye()))
        bye.start()
        request = wait_request(bob, b"BYE", 5.0, call_id=caller.call_id)
        assert request is not None and len(request.vias) == 4  # the balancer, the node, the balancer, alice
        bob.send(answer(request, f"<sip:bob@127.0.0.1:{bob.port}>"), lb.address)
        bye.join(10)
        assert result[-1] is not None and result[-1].status == 200, result[-1]
    finally:
        alice.close()
        bob.close()
