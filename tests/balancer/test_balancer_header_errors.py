"""A value only the full grammar rejects, read where a handler needed it (the balancer's branch
of a top Via that says ``branch =`` and nothing more): a 400 Bad Request from the transport
manager, counted as ``bad_message``, never a handler failure (``callback_errors``) left
unanswered.  The same mapping serves the node (its handler runs under the same manager)."""

from __future__ import annotations

import pytest

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.nodes import NodeSet
from sipfarm.cluster.membership import Member, Role
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address
from sipfarm.sip.parser import parse_message
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.manager import TransportManager

SECRET = b"header-errors-test-secret-012345"
LB = Address("udp", "127.0.0.1", 5060)
NODE = Address("udp", "127.0.0.1", 5070)
CLIENT = Address("udp", "127.0.0.2", 5062)


def balancer() -> tuple[TransportManager, list[tuple[bytes, Address]]]:
    sent: list[tuple[bytes, Address]] = []

    def send(data: bytes, dest: Address, local: Address) -> bool:
        sent.append((data, dest))
        return True

    def send_response(data: bytes, dest: Address) -> bool:
        sent.append((data, dest))
        return True

    nodes = NodeSet()
    nodes.update_members([Member("node1", Role.NODE, (str(NODE),))])
    core = BalancerCore(
        nodes,
        FlowTokens(SECRET),
        public={"udp": LB},
        internal=LB,
        send=send,
        send_response=send_response,
        destinations=DestinationPolicy(allow=["127.0.0.0/8"], own=[LB]),
        hop_secret=SECRET,
        stamp_via=True,
    )
    transports = TransportManager(core.on_message)

    def manager_send(data: bytes, dest: Address, *, local: Address | None = None, connect: bool = True) -> bool:
        sent.append((data, dest))
        return True

    transports.send = manager_send  # type: ignore[method-assign]
    return transports, sent


@pytest.mark.parametrize(
    "via",
    [
        b"SIP/2.0/UDP 127.0.0.2:5062;branch =",
        b"SIP/2.0/UDP 127.0.0.2:5062;rport;branch = ",
    ],
)
@pytest.mark.parametrize("to_tag", [b"", b";tag=b2"])
def test_a_top_via_the_grammar_rejects_gets_400(via: bytes, to_tag: bytes) -> None:
    transports, sent = balancer()
    request = (
        b"BYE sip:bob@127.0.0.3:5064 SIP/2.0\r\nVia: " + via + b"\r\nMax-Forwards: 70\r\n"
        b"From: <sip:alice@example.com>;tag=a1\r\nTo: <sip:bob@example.com>" + to_tag + b"\r\n"
        b"Call-ID: odd-via-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    transports.deliver(request, CLIENT, LB)
    assert transports.stats.callback_errors == 0
    assert transports.stats.rejected.get("bad_message") == 1
    assert len(sent) == 1
    answer, dest = sent[0]
    assert dest == CLIENT and parse_message(answer).status == 400
