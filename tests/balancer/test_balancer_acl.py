"""The balancer's allow and deny lists (``--allow``/``--deny``) with real sockets: a denied or
unlisted source gets nothing (UDP, TCP, STUN), a listed one is served, the farm's nodes pass
even from a denied address, and every refusal is counted in ``/metrics``."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port, options_request, wait_nodes_usable

from sipfarm.transport.stun import BINDING_REQUEST

pytestmark = pytest.mark.timeout(60)


def protect_counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sipfarm_balancer_protect_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rpartition(" ")[2])
    return counts


def stun_binding(source: str, dest: tuple[str, int]) -> bytes | None:
    request = BINDING_REQUEST.to_bytes(2, "big") + b"\x00\x00" + b"\x21\x12\xa4\x42" + b"t" * 12
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(0.5)
        sock.sendto(request, dest)
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def tcp_options(source: str, dest: tuple[str, int]) -> bytes:
    """OPTIONS over a TCP connection from ``source``: what comes back before the connection
    ends (b"" when the balancer closed it unanswered)."""
    with socket.create_connection(dest, timeout=2, source_address=(source, 0)) as sock:
        try:
            sock.sendall(options_request(dest[0], dest[1], sock.getsockname()[1]))
            return sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except TimeoutError:
            return b"(timeout)"


def test_denied_and_unlisted_sources_dropped_nodes_pass(redis_url, accounts, start_node, start_balancer):
    start_node(redis_url, "node1")  # on 127.0.0.1: a denied address, but a node's
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(
        redis_url,
        extra=["--metrics", f"127.0.0.1:{metrics_port}", "--allow", "127.0.0.0/29", "--deny", "127.0.0.1,127.0.0.2"],
        probe_from="127.0.0.3",
    )
    wait_nodes_usable(lb, 1)
    time.sleep(0.6)  # the node's probes answered: usable
    served, denied, unlisted = SipClient("127.0.0.3"), SipClient("127.0.0.2"), SipClient("127.0.0.9")
    try:
        # a listed source registers through the node (whose answers come from a denied address)
        reply = served.register(lb.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 200
        for client in (denied, unlisted):
            for _ in range(3):
                client.send(options_request(*lb.address, client.port), lb.address)
            assert client.register(lb.address, "bob", accounts["bob"]) is None
            assert client.recv(0.3) is None
        # keep-alives and connections: nothing for a refused source
        assert stun_binding("127.0.0.3", lb.address) is not None
        assert stun_binding("127.0.0.2", lb.address) is None
        assert tcp_options("127.0.0.2", lb.address) == b""
        assert tcp_options("127.0.0.3", lb.address).startswith(b"SIP/2.0 ")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counts = protect_counts(metrics_port)
            if counts.get("denied", 0) >= 6 and counts.get("not_allowed", 0) >= 4:
                break
            time.sleep(0.2)
        # 3 OPTIONS + a REGISTER each; the STUN request and the connection from 127.0.0.2
        assert counts.get("denied", 0) >= 6, counts
        assert counts.get("not_allowed", 0) >= 4, counts
        assert "allow=127.0.0.0/29 deny=127.0.0.1,127.0.0.2" in lb.log()
    finally:
        for client in (served, denied, unlisted):
            client.close()


def test_lists_apply_with_protect_off(redis_url, accounts, start_node, start_balancer, tmp_path):
    start_node(redis_url, "node1")
    config = tmp_path / "lb.toml"
    config.write_text('[balancer]\nprotect = false\ndeny = ["127.0.0.2"]\n')
    lb = start_balancer(redis_url, extra=["--config", str(config)])
    wait_nodes_usable(lb, 1)
    time.sleep(0.6)
    denied, served = SipClient("127.0.0.2"), SipClient("127.0.0.3")
    try:
        assert denied.register(lb.address, "alice", accounts["alice"]) is None
        reply = served.register(lb.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 200
    finally:
        denied.close()
        served.close()
