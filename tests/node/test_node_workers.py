"""`sipfarm node --workers 2`: two processes share the SIP port (SO_REUSEPORT), each answers at
its own Via port, and the supervisor's metrics add both workers up."""

from __future__ import annotations

import time
import urllib.request

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port

pytestmark = pytest.mark.timeout(60)


def total(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_two_workers_serve_one_port_and_metrics_add_up(redis_url, accounts, start_node):
    metrics_port = free_udp_tcp_port()
    node = start_node(redis_url, extra=["--workers", "2", "--metrics", f"127.0.0.1:{metrics_port}"])
    time.sleep(1.0)  # the second worker binds a moment after the first answers
    clients = [SipClient() for _ in range(16)]  # distinct source ports spread over the workers
    try:
        for client in clients:
            reply = client.register(node.address, "alice", accounts["alice"], contact="<sip:alice@127.0.0.1:5999>")
            assert reply is not None and reply.status == 200
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 5
    requests = 0.0
    while time.monotonic() < deadline:
        requests = total(metrics_port, "sipfarm_node_requests_total")
        if requests >= 32:
            break
        time.sleep(0.2)
    assert requests >= 32  # 16 x (REGISTER -> 401 -> REGISTER), summed over both workers
    assert node.process.poll() is None
