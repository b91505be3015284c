"""NAT and flows (RFC 5626) through a real farm: a node and a balancer on loopback, the
balancer's intervals shortened (keepalive every 1 s, 2 unanswered OPTIONS; streams idle after
2 s) so each scenario takes seconds.

* UDP: a phone sending STUN keep-alives keeps its binding (and reads its address from the
  answer); a phone answering the balancer's OPTIONS keeps its binding; a silent phone is
  unregistered after its keepalive budget, and a call to it then gets 480.
* TCP: a registered phone idle for longer than the idle timeout still receives an INVITE over
  its connection (an unregistered idle connection is closed meanwhile); a call to a phone
  whose connection died fails with 430 Flow Failed (480 at the caller) within 1 s, and its binding is
  removed from Redis.
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from attack_support import Caller, Phone
from fixtures.farm import (
    DOMAIN,
    BalancerProcess,
    NodeProcess,
    SipClient,
    TcpPhone,
    free_udp_tcp_port,
    wait_nodes_usable,
)
from fixtures.startup import START_TIMEOUT_S

from sipfarm.balancer.keepalive import KEEPALIVE_PREFIX
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import parse_message
from sipfarm.store.location import location_key
from sipfarm.transport.stun import BINDING_REQUEST, BINDING_SUCCESS, MAGIC_COOKIE, parse_header

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)

NAT_SETTINGS = """\
[balancer]
keepalive_interval = 1.0
keepalive_failures = 2
stream_idle_timeout = 2.0
"""


def nat_farm(
    tmp_path: Path,
    redis_url: str,
    start_node: Callable[..., NodeProcess],
    start_balancer: Callable[..., BalancerProcess],
    workers: int = 1,
    metrics_port: int | None = None,
) -> BalancerProcess:
    config = tmp_path / "balancer-nat.toml"
    config.write_text(NAT_SETTINGS)
    start_node(redis_url, "node1")
    metrics = ["--metrics", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    lb = start_balancer(redis_url, extra=["--config", str(config), "--workers", str(workers), *metrics])
    wait_nodes_usable(lb, 1)
    return lb


def bindings(redis_url: str, user: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.hlen(location_key(f"{user}@{DOMAIN}")))
    finally:
        client.close()


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def stun_binding(sock: socket.socket, dest: tuple[str, int], sip: list[SipMessage]) -> tuple[str, int] | None:
    """One STUN Binding request (RFC 5389, no attributes, as RFC 5626 4.4.2 sends it); the
    address the XOR-MAPPED-ADDRESS of the answer names; SIP arriving meanwhile goes to ``sip``."""
    tid = secrets.token_bytes(12)
    sock.sendto(struct.pack("!HHI", BINDING_REQUEST, 0, MAGIC_COOKIE) + tid, dest)
    deadline = time.monotonic() + 2
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(65535)
        except TimeoutError:
            return None
        if data[:1] >= b"A":
            sip.append(parse_message(data))  # not the answer
            continue
        header = parse_header(data)
        assert header.type == BINDING_SUCCESS and header.transaction_id == tid
        xport = struct.unpack_from("!H", data, 26)[0] ^ (MAGIC_COOKIE >> 16)
        xaddr = struct.unpack_from("!I", data, 28)[0] ^ MAGIC_COOKIE
        return socket.inet_ntoa(struct.pack("!I", xaddr)), xport
    return None


def drain(sock: socket.socket) -> list[SipMessage]:
    """Every SIP datagram waiting on ``sock``."""
    got: list[SipMessage] = []
    sock.setblocking(False)
    try:
        while True:
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return got
            if data[:1] >= b"A":
                got.append(parse_message(data))
    finally:
        sock.setblocking(True)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_udp_phones_keep_their_binding_with_stun_or_options_and_a_silent_one_loses_it(
    tmp_path, redis_url, accounts, start_node, start_balancer, workers
):
    """With two workers, each phone's flow is one worker's (SO_REUSEPORT hashes its 4-tuple),
    and only that worker watches it: the silent phone still gets exactly its budget."""
    lb = nat_farm(tmp_path, redis_url, start_node, start_balancer, workers)
    stun_phone = SipClient()  # bob: keeps its NAT binding with STUN, answers nothing
    answering = Phone("carol")  # answers every request, the balancer's OPTIONS included
    silent = SipClient()  # alice: registers, then never sends or answers anything
    caller = Caller("bob", accounts["bob"])
    try:
        reply = stun_phone.register(lb.address, "bob", accounts["bob"])
        assert reply is not None and reply.status == 200, lb.log()[-2000:]
        assert answering.register(lb.address, accounts["carol"]) == 200
        answering.start()
        reply = silent.register(lb.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 200
        registered = time.monotonic()
        assert [bindings(redis_url, u) for u in ("alice", "bob", "carol")] == [1, 1, 1]

        # 5 s = five keepalive intervals: more than the silent phone's budget (1 + 2 x 1 s)
        to_stun_phone: list[SipMessage] = []
        while time.monotonic() - registered < 5.0:
            assert stun_binding(stun_phone.sock, lb.address, to_stun_phone) == ("127.0.0.1", stun_phone.port)
            time.sleep(0.4)
        assert wait_until(lambda: bindings(redis_url, "alice") == 0, 5.0), lb.log()[-2000:]
        assert time.monotonic() - registered < 9.0
        assert bindings(redis_url, "bob") == 1  # STUN kept it alive
        assert bindings(redis_url, "carol") == 1  # answering OPTIONS kept it alive

        # what each phone saw: OPTIONS from the balancer, to its contact, never for bob
        keepalives = answering.received(settle=0, method=b"OPTIONS")
        assert len(keepalives) >= 2
        assert all(m.top_via.branch.startswith(KEEPALIVE_PREFIX.decode()) for m in keepalives)
        assert str(keepalives[0].request_uri) == f"sip:carol@127.0.0.1:{answering.client.port}"
        assert [m.method for m in to_stun_phone + drain(stun_phone.sock)] == []
        to_silent = [m for m in drain(silent.sock) if m.method == b"OPTIONS"]
        assert len(to_silent) == 2  # its budget, then it is gone

        # the farm now sees alice unregistered: a call to her gets 480 (RFC 3261 21.4.18)
        placed = caller.invite(lb.address, "alice")
        assert placed.final is not None and placed.final.status == 480, lb.log()[-2000:]
        assert "event=keepalive_flow_expired" in lb.log()
    finally:
        for closeable in (stun_phone, answering, silent, caller):
            closeable.close()


def open_connections(metrics_port: int) -> float:
    """The balancer's ``sipfarm_balancer_connections_open`` (synced every 2 probe intervals)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as page:
        for line in page.read().decode().splitlines():
            if line.startswith("sipfarm_balancer_connections_open "):
                return float(line.rpartition(" ")[2])
    return -1.0


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_tcp_phone_idle_past_the_idle_timeout_still_rings_and_a_dead_connection_gets_480_at_once(
    tmp_path, redis_url, accounts, start_node, start_balancer
):
    metrics_port = free_udp_tcp_port()
    lb = nat_farm(tmp_path, redis_url, start_node, start_balancer, metrics_port=metrics_port)
    carol = TcpPhone(lb.address, "carol", accounts["carol"])
    bob: TcpPhone | None = None
    idle = socket.create_connection(lb.address, timeout=5)  # connected, never registered
    caller = Caller("alice", accounts["alice"])
    try:
        assert carol.register() == 200, lb.log()[-2000:]
        opened = time.monotonic()
        # the unregistered connection is closed for idleness (2 s here, 300 s by default) ...
        assert closed_by_peer(idle, 6.0)
        assert time.monotonic() - opened < 6.0
        time.sleep(max(0.0, opened + 3.5 - time.monotonic()))  # carol idle for 3.5 s > 2 s

        # ... carol's is held for her registration: a call reaches her over it
        placed: list[object] = []
        thread = threading.Thread(target=lambda: placed.append(caller.invite(lb.address, "carol", timeout=8.0)))
        thread.start()
        invite = carol.recv(8.0)
        assert invite is not None and invite.method == b"INVITE", lb.log()[-2000:]
        carol.sock.sendall(make_response(invite, 486, to_tag=b"busy1", record_route=True).to_bytes())
        thread.join(10)
        final = getattr(placed[0], "final", None) if placed else None
        assert final is not None and final.status == 486

        # bob registers over TCP, then his connection dies: 480 at the caller (the node's 430), at once
        bob = TcpPhone(lb.address, "bob", accounts["bob"])
        assert bob.register() == 200
        assert bindings(redis_url, "bob") == 1
        # the balancer sees the connection close: carol's and bob's open, then carol's alone (a
        # fixed sleep would be a guess; had the balancer not noticed, it would write the INVITE
        # to the dead connection and the caller wait for Timer B)
        assert wait_until(lambda: open_connections(metrics_port) == 2, 5.0), lb.log()[-2000:]
        bob.close()
        assert wait_until(lambda: open_connections(metrics_port) == 1, 5.0), lb.log()[-2000:]
        started = time.monotonic()
        result = caller.invite(lb.address, "bob", timeout=5.0)
        elapsed = time.monotonic() - started
        assert result.final is not None and result.final.status == 480, lb.log()[-2000:]
        # at once, not a connection attempt and Timer B's 32 s (3 s: room for a loaded CI machine)
        assert elapsed < 3.0, elapsed
        # the node removed the binding of the dead flow (RFC 5626 11): no later call forks to it
        assert wait_until(lambda: bindings(redis_url, "bob") == 0, 2.0), lb.log()[-2000:]
    finally:
        for closeable in (carol, bob, caller):
            if closeable is not None:
                closeable.close()
        idle.close()


def test_an_open_node_answers_stun_only_on_the_udp_flows_registered_to_it(redis_url, accounts, start_node):
    """A node with no balancer in front is its phones' edge proxy: it answers the STUN
    keep-alives of a flow that registered through it, as long as the binding lasts, and no
    other source's (a STUN answer goes to a source anyone can forge: no reflector)."""
    node = start_node(redis_url, "node1")
    phone = SipClient()
    stranger = SipClient()
    forger = SipClient("127.0.0.66")
    call_id = secrets.token_hex(8)
    try:
        assert stun_binding(phone.sock, node.address, []) is None  # not registered yet
        reply = phone.register(node.address, "bob", accounts["bob"], call_id=call_id)
        assert reply is not None and reply.status == 200, node.log()[-2000:]
        assert stun_binding(phone.sock, node.address, []) == ("127.0.0.1", phone.port)
        assert stun_binding(stranger.sock, node.address, []) is None
        assert stun_binding(forger.sock, node.address, []) is None
        # its binding removed, the flow is answered no more
        reply = phone.register(node.address, "bob", accounts["bob"], expires=0, call_id=call_id, cseq=3)
        assert reply is not None and reply.status == 200, node.log()[-2000:]
        assert stun_binding(phone.sock, node.address, []) is None
    finally:
        for client in (phone, stranger, forger):
            client.close()
