"""Connection limits at a real balancer (issue 12): a source over its per-source limit is
refused while a phone on another address still connects and registers over TCP; a WebSocket
opened by a page of another origin gets 403; both counted in the balancer's metrics."""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures.farm import free_udp_tcp_port, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from lbhelpers import TcpSip
from test_balancer_tcp import recv_until, tcp_register
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from sipfarm.sip import auth

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

CONFIG = """\
[balancer]
exempt = []                  # loopback is limited too: the sources are 127.0.0.2 and .3
max_connections_per_source = 2
first_message_timeout = 2.0
ws_origins = ["https://phone.farm.test", "https://*.farm.test"]
"""


def refused_counts(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    pattern = r'^sipfarm_balancer_connections_refused_total\{reason="(\w+)"\} ([0-9.e+]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


def closed_by_balancer(sock: socket.socket, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def ws_status(port: int, origin: str) -> int:
    try:
        ws = await connect(f"ws://127.0.0.1:{port}", subprotocols=["sip"], origin=origin)  # type: ignore[list-item,arg-type]
    except InvalidStatus as exc:
        return exc.response.status_code
    await ws.close()
    return 101


def test_source_over_its_limit_is_refused_while_another_registers(
    redis_url, accounts, start_node, start_balancer, tmp_path: Path
):
    start_node(redis_url, "node1")
    config = tmp_path / "balancer.toml"
    config.write_text(CONFIG)
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(redis_url, extra=["--config", str(config), "--metrics", f"127.0.0.1:{metrics_port}"])
    wait_nodes_usable(lb, 1)
    held = [TcpSip(lb.address, source="127.0.0.2") for _ in range(2)]
    phone: TcpSip | None = None
    try:
        for conn in held:
            conn.send(b"\r\n\r\n")  # spoken: not closed as silent
        time.sleep(0.2)
        over = TcpSip(lb.address, source="127.0.0.2")
        assert closed_by_balancer(over.sock), lb.log()[-2000:]
        over.close()

        phone = TcpSip(lb.address, source="127.0.0.3")  # another address: registers as usual
        call_id = secrets.token_hex(8)
        phone.send(tcp_register(phone, call_id, 1))
        challenge_msg = recv_until(phone, status=401)
        assert challenge_msg is not None, lb.log()[-2000:]
        challenge = auth.parse_challenge(challenge_msg.get_all("www-authenticate")[0])
        creds = auth.build_credentials(
            challenge, "carol", accounts["carol"], "REGISTER", "sip:farm.test", secrets.token_hex(4)
        )
        phone.send(tcp_register(phone, call_id, 2, creds))
        assert recv_until(phone, status=200) is not None, lb.log()[-2000:]

        held[0].close()  # a slot of 127.0.0.2 is free again
        deadline = time.monotonic() + 3
        while True:
            again = TcpSip(lb.address, source="127.0.0.2")
            again.send(b"\r\n\r\n")
            if not closed_by_balancer(again.sock, 0.5):
                break
            again.close()
            assert time.monotonic() < deadline, "the closed connection's slot was not freed"
        again.close()

        assert asyncio.run(ws_status(lb.ws_port, "https://evil.example")) == 403
        assert asyncio.run(ws_status(lb.ws_port, "https://app.farm.test")) == 101

        deadline = time.monotonic() + 5
        while (counts := refused_counts(metrics_port)).get("origin", 0) < 1 or counts.get("per_source", 0) < 1:
            assert time.monotonic() < deadline, counts
            time.sleep(0.1)
    finally:
        for conn in [*held, *([phone] if phone is not None else [])]:
            conn.close()
