"""A phone connected straight to a node process over TCP (no balancer): once its connection is
gone, a call to it fails with 430 Flow Failed at once (RFC 5626 5.3; the caller hears 480), not after a connection
attempt to its ephemeral port and Timer B.  The in-memory tier (test_memory_flows.py) covers
forking and in-dialog requests; this checks the real transport's ``connect=False`` path.
"""

from __future__ import annotations

import secrets
import socket
import struct
import time
import urllib.request

import pytest
from fixtures.farm import DOMAIN, SipClient, TcpPhone, free_udp_tcp_port
from fixtures.startup import START_TIMEOUT_S

from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def invite(caller: SipClient, node: tuple[str, int], callee: str, password: str) -> SipMessage | None:
    """An INVITE from alice, its 407 answered; the final response to the authenticated one."""
    uri = f"sip:{callee}@{DOMAIN}"
    call_id = secrets.token_hex(8)
    caller.send(caller.request("INVITE", uri, call_id=call_id), node)
    challenge = caller.recv_final(call_id=call_id, cseq=1)
    assert challenge is not None and challenge.status == 407, challenge
    parsed = auth.parse_challenge(challenge.get_all("proxy-authenticate")[0])
    creds = auth.build_credentials(parsed, "alice", password, "INVITE", uri, secrets.token_hex(4))
    headers = (("proxy-authorization", creds.decode()), ("contact", f"<sip:alice@127.0.0.1:{caller.port}>"))
    caller.send(caller.request("INVITE", uri, call_id=call_id, cseq=2, headers=headers), node)
    return caller.recv_final(timeout=5.0, call_id=call_id, cseq=2)


def sample(port: int, series: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rpartition(" ")[2])
    return 0.0


def flow_failures(port: int) -> float:
    return sample(port, 'sipfarm_node_errors_total{kind="flow_failed"}')


def test_a_call_to_a_tcp_phone_whose_connection_closed_gets_480_within_a_second(redis_url, accounts, start_node):
    metrics_port = free_udp_tcp_port()
    node = start_node(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    # bob's port outside the ephemeral range: nothing else takes it once bob's connection is reset
    bob = TcpPhone(node.address, "bob", accounts["bob"], contact_port=5060, local_port=free_udp_tcp_port())
    caller = SipClient()
    nat = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert bob.register() == 200, node.log()[-2000:]
        # reset, as a NAT box forgetting the mapping leaves it (and the port free at once)
        bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        bob.close()
        # the node sees the connection go (its transport counts the close; metrics synced each
        # second): a fixed sleep would be a guess on a loaded machine
        closed = 'sipfarm_node_transport_events_total{kind="connections_closed"}'
        deadline = time.monotonic() + 5
        while sample(metrics_port, closed) < 1:
            assert time.monotonic() < deadline, node.log()[-2000:]
            time.sleep(0.1)
        # what a node dialling bob's port would reach (on loopback a refused connection fails
        # as fast as no connection at all; behind a NAT it hangs until the connect timeout)
        nat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        nat.bind((bob.host, bob.port))
        nat.listen(4)
        nat.setblocking(False)
        started = time.monotonic()
        final = invite(caller, node.address, "bob", accounts["alice"])
        elapsed = time.monotonic() - started
        assert final is not None and final.status == 480, node.log()[-2000:]
        # at once: not a connection attempt to bob's port and Timer B's 32 s (3 s: room for a
        # loaded CI machine; the listener below proves no dial either)
        assert elapsed < 3.0, elapsed
        with pytest.raises(BlockingIOError):
            nat.accept()  # the node never dialled bob's port
        assert flow_failures(metrics_port) == 1
    finally:
        bob.close()
        nat.close()
        caller.close()
