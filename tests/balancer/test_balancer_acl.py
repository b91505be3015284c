"""The balancer's allow and deny lists (``--allow``/``--deny``) with real sockets: a denied or
unlisted source gets nothing (UDP, TCP, TLS, WebSocket, STUN), a listed one is served, the farm's nodes pass
even from a denied address, and every refusal is counted in ``/metrics``."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port, options_request, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S

from sipfarm.transport.stun import BINDING_REQUEST
from sipfarm.transport.tls import make_self_signed_cert

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def protect_counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sipfarm_balancer_protect_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.rpartition(" ")[2])
    return counts


def stun_binding(source: str | socket.socket, dest: tuple[str, int]) -> bytes | None:
    """One STUN Binding request from a new socket on ``source``, or from that socket; the answer."""
    request = BINDING_REQUEST.to_bytes(2, "big") + b"\x00\x00" + b"\x21\x12\xa4\x42" + b"t" * 12
    if isinstance(source, socket.socket):
        return _exchange(source, request, dest)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        return _exchange(sock, request, dest)


def _exchange(sock: socket.socket, request: bytes, dest: tuple[str, int]) -> bytes | None:
    timeout = sock.gettimeout()
    sock.settimeout(0.5)
    sock.sendto(request, dest)
    try:
        return sock.recv(2048)
    except TimeoutError:
        return None
    finally:
        sock.settimeout(timeout)


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


def ws_upgrade(source: str, dest: tuple[str, int]) -> bytes:
    """A WebSocket upgrade from ``source``: the first bytes of the answer (b"": closed)."""
    request = (
        f"GET / HTTP/1.1\r\nHost: {dest[0]}:{dest[1]}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: sip\r\n\r\n"
    ).encode()
    with socket.create_connection(dest, timeout=2, source_address=(source, 0)) as sock:
        try:
            sock.sendall(request)
            return sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def tls_handshake(source: str, dest: tuple[str, int]) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(dest, timeout=2, source_address=(source, 0)) as raw,
            context.wrap_socket(raw, server_hostname=dest[0]),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def test_denied_and_unlisted_sources_dropped_nodes_pass(redis_url, accounts, start_node, start_balancer, tmp_path):
    start_node(redis_url, "node1")  # on 127.0.0.1: a denied address, but a node's
    metrics_port = free_udp_tcp_port()
    tls_port = free_udp_tcp_port()
    cert, key = make_self_signed_cert(tmp_path, ip="127.0.0.1")
    lb = start_balancer(
        redis_url,
        extra=[
            "--metrics", f"127.0.0.1:{metrics_port}", "--allow", "127.0.0.0/29", "--deny", "127.0.0.1,127.0.0.2",
            "--listen", f"tls:127.0.0.1:{tls_port}", "--tls-cert", str(cert), "--tls-key", str(key),
        ],
        probe_from="127.0.0.3",
    )  # fmt: skip
    wait_nodes_usable(lb, 1)
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
            assert not client.skipped  # nor an answer to the OPTIONS, which register() passed over
        # keep-alives and connections: nothing for a refused source
        # (STUN over the registered flow only: RFC 5626 keepalives; never a reflector)
        assert stun_binding(served.sock, lb.address) is not None
        assert stun_binding("127.0.0.3", lb.address) is None
        assert stun_binding("127.0.0.2", lb.address) is None
        assert tcp_options("127.0.0.2", lb.address) == b""
        assert tcp_options("127.0.0.3", lb.address).startswith(b"SIP/2.0 ")
        ws = (lb.address[0], lb.ws_port)
        assert ws_upgrade("127.0.0.2", ws) == b""  # closed at accept: no HTTP answer at all
        assert ws_upgrade("127.0.0.3", ws).startswith(b"HTTP/1.1 101")
        assert not tls_handshake("127.0.0.2", ("127.0.0.1", tls_port))  # closed before the handshake
        assert tls_handshake("127.0.0.3", ("127.0.0.1", tls_port))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counts = protect_counts(metrics_port)
            if counts.get("denied", 0) >= 8 and counts.get("not_allowed", 0) >= 4:
                break
            time.sleep(0.2)
        # 3 OPTIONS + a REGISTER each; the STUN request and the three connections from 127.0.0.2
        assert counts.get("denied", 0) >= 8, counts
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
    denied, served = SipClient("127.0.0.2"), SipClient("127.0.0.3")
    try:
        assert denied.register(lb.address, "alice", accounts["alice"]) is None
        assert not denied.skipped  # nothing else came back either
        reply = served.register(lb.address, "alice", accounts["alice"])
        assert reply is not None and reply.status == 200
    finally:
        denied.close()
        served.close()
