"""An external routing helper in the node's path: ``examples/route_helper.py`` run as the
node's helper program ([routing.helper]) by an ``action = "helper"`` rule.  Its answers route
a call (+1555... forwarded to the gateway, +1900... refused 403, others local), and a helper
that hangs costs one timeout and then the configured default answer, never a stuck call."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.farm import DOMAIN, NodeProcess, SipClient
from fixtures.media_phones import phone_sdp, send_invite
from fixtures.startup import START_TIMEOUT_S
from test_routing_dns import invite_to

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

EXAMPLE_HELPER = Path(__file__).resolve().parents[2] / "examples" / "route_helper.py"


def config(tmp_path: Path, program: list[str], gateway_port: int) -> Path:
    path = tmp_path / "farm.toml"
    path.write_text(
        "[[routing.rules]]\n"
        'domain = "farm.test"\nuser_prefix = "+1"\naction = "helper"\n'
        "[routing.helper]\n"
        f"program = {program!r}\n".replace("'", '"')
        + "timeout = 0.5\n"
        + f'default = {{ action = "forward", uri = "sip:127.0.0.1:{gateway_port}" }}\n'
    )
    return path


def place(node: NodeProcess, number: str) -> SipClient:
    phone = SipClient("127.0.0.4")
    send_invite(phone, node.address, phone_sdp("127.0.0.4", 40000), secrets.token_hex(8), uri=f"sip:{number}@{DOMAIN}")
    return phone


def test_the_helper_program_routes_calls(
    redis_url: str, accounts: dict[str, str], start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    import socket  # noqa: PLC0415

    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.bind(("127.0.0.1", 0))  # a free port, given to the helper (a fixed one may be another test's)
    gateway.settimeout(0.2)
    where = f"127.0.0.1:{gateway.getsockname()[1]}"
    helper = [sys.executable, str(EXAMPLE_HELPER), where]
    node = start_node(redis_url, extra=["--config", str(config(tmp_path, helper, 9))])
    try:
        phone = place(node, "+15551234")
        try:
            assert invite_to(gateway, f"sip:+15551234@{where}".encode(), 10.0), node.log()[-3000:]
        finally:
            phone.close()
        phone = place(node, "+19005550000")
        try:
            final = phone.recv_final(5.0, cseq=2, method="INVITE")  # the authenticated INVITE's
            assert final is not None and (final.status, final.reason) == (403, b"Premium numbers barred")
        finally:
            phone.close()
    finally:
        gateway.close()


def test_a_hanging_helper_gives_the_default_after_its_timeout(
    redis_url: str, accounts: dict[str, str], start_node: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    import socket  # noqa: PLC0415

    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.bind(("127.0.0.1", 0))
    gateway.settimeout(0.2)
    hang = [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"]
    node = start_node(redis_url, extra=["--config", str(config(tmp_path, hang, gateway.getsockname()[1]))])
    try:
        started = time.monotonic()
        phone = place(node, "+15551234")
        try:
            uri = f"sip:+15551234@127.0.0.1:{gateway.getsockname()[1]}".encode()
            assert invite_to(gateway, uri, 5.0), node.log()[-3000:]
            assert time.monotonic() - started < 5.0  # the 0.5 s timeout, not a hang (room for a loaded CI machine)
        finally:
            phone.close()
    finally:
        gateway.close()
