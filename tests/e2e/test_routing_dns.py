"""A gateway by name, located by RFC 3263 through a real DNS server on loopback: the node's
[routing] table forwards +1 numbers to ``sip:gw.test``, whose SRV records name a dead address
first (a closed port: ICMP port unreachable) and a live one second; the call reaches the second,
and the DNS answers are cached (a second call asks no SRV again)."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.dns_server import ZoneServer, dns_server
from fixtures.farm import DOMAIN, NodeProcess, SipClient
from fixtures.media_phones import phone_sdp, send_invite
from fixtures.startup import START_TIMEOUT_S

from sipfarm.ports import free_port
from sipfarm.sip.message import make_response
from sipfarm.sip.parser import parse_message

__all__ = ["dns_server"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def invite_to(sock: socket.socket, uri: bytes, within: float) -> bool:
    """Whether an INVITE for ``uri`` reaches ``sock`` (each INVITE is answered 486, so none
    is retransmitted into the next call's wait)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            data, source = sock.recvfrom(65535)
        except TimeoutError:
            continue
        msg = parse_message(data)
        if msg.is_request and msg.method == b"INVITE":
            sock.sendto(make_response(msg, 486, to_tag=b"gw").to_bytes(), source)
            if msg.uri == uri:
                return True
    return False


def test_the_call_reaches_the_second_srv_target_when_the_first_is_dead(
    dns_server: ZoneServer, redis_url: str, accounts: dict[str, str], start_node: Callable[..., NodeProcess],
    tmp_path: Path,
) -> None:  # fmt: skip
    dead = free_port("127.0.0.1", tcp=False)  # nothing listens: ICMP port unreachable
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    live.bind(("127.0.0.1", 0))
    live.settimeout(0.2)
    live_port = live.getsockname()[1]
    dns_server.zone.update({
        "_sip._udp.gw.test": [("SRV", (10, 1, dead, "a.gw.test")), ("SRV", (20, 1, live_port, "b.gw.test"))],
        "a.gw.test": [("A", "127.0.0.1")],
        "b.gw.test": [("A", "127.0.0.1")],
    })  # fmt: skip
    config = tmp_path / "farm.toml"
    config.write_text(
        "[routing]\n"
        f'nameservers = ["127.0.0.1:{dns_server.port}"]\n'
        "[[routing.rules]]\n"
        'user_prefix = "+1"\naction = "forward"\nuri = "sip:gw.test"\n'
    )
    node = start_node(redis_url, extra=["--config", str(config)])
    try:
        for number in ("+15551234", "+15555678"):
            phone = SipClient("127.0.0.4")  # a fresh one: the last call's 486 is not this one's 407
            try:
                uri = f"sip:{number}@{DOMAIN}"
                send_invite(phone, node.address, phone_sdp("127.0.0.4", 40000), secrets.token_hex(8), uri=uri)
                assert invite_to(live, f"sip:{number}@gw.test".encode(), 10.0), node.log()[-3000:]
            finally:
                phone.close()
        assert dns_server.count("_sip._udp.gw.test", "SRV") == 1  # cached for the second call
    finally:
        live.close()
