"""SIP over WebSocket (RFC 7118) through the balancer: a browser-like UA registers over ws,
a UDP caller's call reaches it on that WebSocket (node -> Path -> balancer -> ws flow), and
the WebSocket UA's answer reaches the caller."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from fixtures.farm import DOMAIN, SipClient, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from fixtures.ws_phone import ws_contact, ws_recv, ws_register
from lbhelpers import Caller, answer
from websockets.asyncio.client import connect

from sipfarm.sip import auth

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

WS_CONTACT = ws_contact("alice")


async def ws_scenario(ws_url: str, lb_address: tuple[str, int], accounts: dict[str, str]) -> None:
    async with connect(ws_url, subprotocols=["sip"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "sip"
        # offered permessage-deflate (the client library's default), not negotiated: its zlib
        # state would be most of each connection's memory
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers
        call_id = secrets.token_hex(8)
        await ws.send(ws_register("alice", call_id, 1))
        challenge_msg = await ws_recv(ws, 401)
        challenge = auth.parse_challenge(challenge_msg.get_all("www-authenticate")[0])
        creds = auth.build_credentials(
            challenge, "alice", accounts["alice"], "REGISTER", f"sip:{DOMAIN}", secrets.token_hex(4)
        )
        await ws.send(ws_register("alice", call_id, 2, creds))
        ok = await ws_recv(ws, 200)
        assert any(b"xyz.invalid" in c for c in ok.values("contact"))

        # bob calls alice from UDP: the INVITE must arrive on this WebSocket
        client = SipClient()
        try:
            caller = Caller(client, lb_address, "bob", accounts["bob"])
            invite_task = asyncio.create_task(asyncio.to_thread(caller.invite, "alice", 8.0))
            invite = await ws_recv(ws, b"INVITE", 8.0)
            assert invite.call_id == caller.call_id.encode()
            assert invite.top_via.transport == "WS"
            await ws.send(answer(invite, WS_CONTACT).to_bytes().decode())
            final = await invite_task
            assert final is not None and final.status == 200, final
            assert final.body.startswith(b"v=0")

            # the caller's ACK and BYE reach the WebSocket UA too, and its 200 to the BYE returns
            await asyncio.to_thread(caller.ack)
            await ws_recv(ws, b"ACK")
            bye_task = asyncio.create_task(asyncio.to_thread(caller.bye))
            bye = await ws_recv(ws, b"BYE")
            await ws.send(answer(bye, WS_CONTACT).to_bytes().decode())
            bye_final = await bye_task
            assert bye_final is not None and bye_final.status == 200
        finally:
            client.close()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_ws_register_and_call_arrives_on_the_websocket(redis_url, accounts, start_node, start_balancer, workers):
    start_node(redis_url, "node1")
    start_node(redis_url, "node2")
    lb = start_balancer(redis_url, extra=["--workers", str(workers)])
    wait_nodes_usable(lb, 2)
    try:
        asyncio.run(ws_scenario(f"ws://127.0.0.1:{lb.ws_port}", lb.address, accounts))
    except BaseException:
        print(lb.log()[-3000:])
        raise
