"""``--internal`` with real sockets: a datagram whose source is forged as a node's address.

A balancer faces the phones on 127.0.0.1:P and the node on its own socket (``--internal
udp:127.0.0.1:I``).  alice registers through it; then a node-shaped INVITE for her (routed by
the Path entries of her registration, her flow token in them) is sent from a raw socket with
the node's address as its source: to the public socket it is a forgery, dropped unparsed and
counted (``dropped_forged_node_source``), alice gets nothing; the very same datagram to the
internal socket is the node's, and reaches her (so the forgery did reach the balancer).  Raw
sockets need root (scripts/in-netns.sh); elsewhere the test skips.
"""

from __future__ import annotations

import socket
import struct

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from test_balancer_attacks import balancer_events

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def spoofed_udp(source: tuple[str, int], dest: tuple[str, int], payload: bytes) -> None:
    """One UDP datagram with any source address (IP_HDRINCL; the kernel fills in the IP
    checksum, a zero UDP checksum means none)."""
    udp = struct.pack("!HHHH", source[1], dest[1], 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(source[0]), socket.inet_aton(dest[0]),
    )  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, (dest[0], 0))


def test_a_nodes_address_forged_on_the_public_socket_is_dropped(redis_url, accounts, start_node, start_balancer):
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        pytest.skip("raw sockets need root (scripts/in-netns.sh)")
    node = start_node(redis_url, "node1")
    internal = free_udp_tcp_port()
    metrics = free_udp_tcp_port()
    lb = start_balancer(
        redis_url, extra=["--internal", f"udp:127.0.0.1:{internal}", "--metrics", f"127.0.0.1:{metrics}"]
    )
    wait_nodes_usable(lb, 1)  # probes and their answers go through the internal socket
    alice = SipClient()
    try:
        reply = alice.register(lb.address, "alice", accounts["alice"], extra=(("supported", "path"),))
        assert reply is not None and reply.status == 200, lb.log()[-2000:]
        routes = "".join(f"Route: {value.decode()}\r\n" for value in reply.values("path"))

        def invite(n: int) -> bytes:
            return (
                f"INVITE sip:alice@127.0.0.1:{alice.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{node.port};branch=z9hG4bKforged{n}\r\n{routes}"
                "Max-Forwards: 70\r\nFrom: <sip:mallory@farm.test>;tag=m\r\nTo: <sip:alice@farm.test>\r\n"
                f"Call-ID: forged-{n}@x\r\nCSeq: 1 INVITE\r\nContact: <sip:mallory@127.0.0.1:9>\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()

        node_address = ("127.0.0.1", node.port)
        spoofed_udp(node_address, lb.address, invite(1))
        assert alice.recv_request("INVITE", 1.0) is None
        spoofed_udp(node_address, ("127.0.0.1", internal), invite(2))
        got = alice.recv_request("INVITE", 3.0)
        assert got is not None and got.call_id == b"forged-2@x", lb.log()[-2000:]
        counted = balancer_events(metrics)  # synced every other probe interval
        for _ in range(20):
            if counted.get("dropped_forged_node_source"):
                break
            alice.recv(0.1)
            counted = balancer_events(metrics)
        assert counted.get("dropped_forged_node_source") == 1, counted
    finally:
        alice.close()
