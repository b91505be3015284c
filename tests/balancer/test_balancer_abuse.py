"""Garbage at the balancer: answered or dropped, counted in its metrics, and it keeps serving."""

from __future__ import annotations

import time
import urllib.request

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

GARBAGE = [
    b"\x00\xff\xfe garbage",
    b"INVITE sip:bob@farm.test SIP/2.0\r\nVia: nonsense\r\n\r\n",
    b"SIP/2.0 200 OK\r\nCSeq: x\r\n\r\n",
    b"REGISTER sip:farm.test SIP/2.0\r\nContent-Length: 99999\r\n\r\nshort",
    b"OPTIONS sip:farm.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\nFrom: <sip:a@farm.test>;tag=1"
    b"\r\nTo: <sip:b@farm.test>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nRoute: <sip:forged@127.0.0.1:1;lr>\r\n"
    b"Max-Forwards: 0\r\n\r\n",
    bytes(range(256)),
]


def counted_rejections(port: int) -> float:
    """Parse errors and rejected requests the balancer's metrics show."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("sipfarm_balancer_events_total{"):
            continue
        kind = line.split('kind="', 1)[1].split('"', 1)[0]
        if kind.startswith(("parse_errors", "error_", "rejected")):
            total += float(line.rpartition(" ")[2])
    return total


def test_flood_of_garbage_is_counted_and_the_balancer_keeps_serving(redis_url, accounts, start_node, start_balancer):
    start_node(redis_url, "node1")
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    wait_nodes_usable(lb, 1)
    client = SipClient()
    try:
        for i in range(1200):
            client.send(GARBAGE[i % len(GARBAGE)] + str(i).encode(), lb.address)
            if i % 200 == 199:
                time.sleep(0.01)
        time.sleep(0.3)
        while client.recv(0.05) is not None:
            pass
        assert lb.process.poll() is None
        reply = client.register(lb.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 200
        deadline = time.monotonic() + 5
        counted = 0.0
        while time.monotonic() < deadline:
            counted = counted_rejections(metrics_port)
            if counted >= 600:
                break
            time.sleep(0.2)
        assert counted >= 600, counted
    finally:
        client.close()
