"""A desk phone (UDP) calls a browser (registered over WebSocket through the balancer) with
Debian's rtpengine as the node's relay: the INVITE reaching the browser carries a WebRTC SDP
(UDP/TLS/RTP/SAVPF, a=fingerprint, a=ice-ufrag), since a browser cannot accept plain RTP/AVP.
The proxy knows from the callee's Contact (``;transport=ws``, RFC 7118) and asks rtpengine for
ICE, DTLS-SRTP and rtcp-mux towards it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest
from fixtures.farm import DOMAIN, BalancerProcess, NodeProcess, SipClient, wait_nodes_usable
from fixtures.media_phones import CALLER_HOST, phone_sdp, send_invite
from fixtures.rtpengine import RtpengineProcess, rtpengine
from fixtures.startup import START_TIMEOUT_S
from fixtures.ws_phone import ws_recv, ws_register
from websockets.asyncio.client import connect

from sipfarm.sip import auth

__all__ = ["rtpengine"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


async def scenario(ws_url: str, lb_address: tuple[str, int], accounts: dict[str, str]) -> None:
    async with connect(ws_url, subprotocols=["sip"]) as ws:
        call_id = secrets.token_hex(8)
        await ws.send(ws_register("bob", call_id, 1))
        chal = auth.parse_challenge((await ws_recv(ws, 401)).get_all("www-authenticate")[0])
        creds = auth.build_credentials(chal, "bob", accounts["bob"], "REGISTER", f"sip:{DOMAIN}", "0a1b2c3d")
        await ws.send(ws_register("bob", call_id, 2, creds))
        await ws_recv(ws, 200)
        alice = SipClient(CALLER_HOST)
        try:
            await asyncio.to_thread(send_invite, alice, lb_address, phone_sdp(CALLER_HOST, 40000), secrets.token_hex(8))
            invite = await ws_recv(ws, b"INVITE", 8.0)
            assert b"UDP/TLS/RTP/SAVPF" in invite.body and b"a=fingerprint" in invite.body, invite.body
            assert b"a=ice-ufrag" in invite.body
        finally:
            alice.close()


def test_desk_phone_calls_browser_offer_is_webrtc(
    redis_url: str,
    accounts: dict[str, str],
    start_node: Callable[..., NodeProcess],
    start_balancer: Callable[..., BalancerProcess],
    rtpengine: RtpengineProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIPFARM_RELAYS", f"{rtpengine.ng[0]}:{rtpengine.ng[1]}")
    start_node(redis_url, "node1")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 1)
    asyncio.run(scenario(f"ws://127.0.0.1:{lb.ws_port}", lb.address, accounts))
