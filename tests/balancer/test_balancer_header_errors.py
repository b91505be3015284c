"""A value only the full grammar rejects, read where a handler needed it (the balancer's branch
of a top Via that says ``branch =`` and nothing more): a 400 Bad Request from the transport
manager, counted as ``bad_message``, never a handler failure (``callback_errors``) left
unanswered.  The same mapping serves the node (its handler runs under the same manager)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.nodes import NodeSet
from sipfarm.cluster.membership import Member, Role
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import parse_message
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.manager import TransportManager

SECRET = b"header-errors-test-secret-012345"
NODE = Address("udp", "127.0.0.1", 5070)


async def exchange(request: bytes) -> tuple[TransportManager, bytes | None]:
    """A balancer on a free loopback port takes ``request`` from a client socket; its answer."""
    sent: list[tuple[bytes, Address]] = []

    def send(data: bytes, dest: Address, local: Address) -> bool:
        sent.append((data, dest))
        return True

    nodes = NodeSet()
    nodes.update_members([Member("node1", Role.NODE, (str(NODE),))])

    def on_message(msg: SipMessage, source: Address, local: Address) -> None:
        core.on_message(msg, source, local)

    transports = TransportManager(on_message)
    lb = await transports.listen("udp:127.0.0.1:0")
    core = BalancerCore(
        nodes,
        FlowTokens(SECRET),
        public={"udp": lb},
        internal=lb,
        send=send,
        send_response=lambda data, dest: transports.send(data, dest, local=lb, connect=False),
        destinations=DestinationPolicy(allow=["127.0.0.0/8"], own=[lb]),
        hop_secret=SECRET,
        stamp_via=True,
    )
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.2", 0))
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        client.sendto(request.replace(b"CLIENTPORT", b"%d" % client.getsockname()[1]), (lb.host, lb.port))
        try:
            answer: bytes | None = await asyncio.wait_for(loop.sock_recv(client, 65535), 5.0)
        except TimeoutError:
            answer = None
        assert not sent, sent  # nothing went on to a node
        return transports, answer
    finally:
        client.close()
        await transports.close()


@pytest.mark.parametrize(
    "via",
    [
        b"SIP/2.0/UDP 127.0.0.2:CLIENTPORT;branch =",
        b"SIP/2.0/UDP 127.0.0.2:CLIENTPORT;rport;branch = ",
    ],
)
@pytest.mark.parametrize("to_tag", [b"", b";tag=b2"])
def test_a_top_via_the_grammar_rejects_gets_400(via: bytes, to_tag: bytes) -> None:
    request = (
        b"BYE sip:bob@127.0.0.3:5064 SIP/2.0\r\nVia: " + via + b"\r\nMax-Forwards: 70\r\n"
        b"From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>" + to_tag + b"\r\n"
        b"Call-ID: odd-via-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    transports, answer = asyncio.run(exchange(request))
    assert transports.stats.callback_errors == 0
    assert transports.stats.rejected.get("bad_message") == 1
    assert answer is not None and parse_message(answer).status == 400
