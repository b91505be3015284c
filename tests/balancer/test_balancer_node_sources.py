"""Who is a node: a message claiming a node's source address is the farm's only when it came in
on the balancer's socket facing the nodes, when that socket is its own (``--internal``).

In memory, at the core (``BalancerCore.on_message``) and at the transport's entry
(``TransportManager.deliver`` with the balancer's ``ClientScreen``): the balancer faces clients
on 10.0.0.1:5060 and the nodes on 10.0.0.1:5070; node1 is 10.0.1.1:5060.  A node's INVITE for a
registered phone (routed by our Path entry with the phone's flow token) goes to the phone when
it arrives on the internal socket; the very same datagram arriving on the public socket (a
forger on the Internet writing the node's address as its source) is dropped before parsing and
counted (``dropped_forged_node_source``), never sent to the phone, never marks the node alive,
never spends a client's budget; without an internal socket of its own (one socket faces both)
the source address decides, as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_balancer_unit import CLIENT, LB_TCP, LB_UDP, LB_WS, NODES, Harness, members, register, request

from sipfarm.balancer.frontdoor import FORGED_NODE_SOURCE, ClientScreen, FrontDoor, FrontDoorPolicy
from sipfarm.balancer.nodes import NodeSet
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.transport.manager import TransportManager

LB_INTERNAL = Address("udp", "10.0.0.1", 5070)
NODE = NODES["node1"]


def harness(*, internal: bool) -> Harness:
    h = Harness(internal=LB_INTERNAL if internal else LB_UDP)
    h.nodes.update_members(members())
    if internal:
        h.nodes.facing = LB_INTERNAL  # as `sipfarm balancer --internal udp:10.0.0.1:5070`
    return h


def node_invite(h: Harness) -> bytes:
    """A node's INVITE for the phone CLIENT registered through ``h``: routed by our Path."""
    msg, _ = h.one(register(via="SIP/2.0/UDP 192.168.1.5:5062;rport"), CLIENT, LB_UDP)
    routes = "".join(f"Route: {p.decode()}\r\n" for p in msg.values("path"))
    return request("INVITE", "sip:alice@192.168.1.5:5062", via="SIP/2.0/UDP 10.0.1.1:5060", extra=routes)


def node_response() -> bytes:
    return (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnotours\r\n"
        b"From: <sip:a@farm.test>;tag=1\r\nTo: <sip:b@farm.test>;tag=2\r\nCall-ID: c1\r\n"
        b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )


# -- the core: NodeSet.sender ------------------------------------------------------------------


def test_a_nodes_request_on_the_internal_socket_goes_to_the_phone() -> None:
    h = harness(internal=True)
    _, dest = h.one(node_invite(h), NODE, LB_INTERNAL)
    assert dest == CLIENT


@pytest.mark.parametrize("local", [LB_UDP, LB_TCP, LB_WS])
def test_a_nodes_address_on_a_public_socket_is_a_clients_to_the_core(local: Address) -> None:
    h = harness(internal=True)
    data = node_invite(h)
    source = Address(local.transport, NODE.host, NODE.port)
    msg, dest = h.one(data, source, local)
    # a client's request: hashed to a node (its own Route entries consumed), never the phone's flow
    assert dest != CLIENT and dest in NODES.values()
    assert h.core.stats.to_client == 0 and msg.method == b"INVITE"


def test_without_an_internal_socket_the_source_address_decides_as_before() -> None:
    h = harness(internal=False)
    _, dest = h.one(node_invite(h), NODE, LB_UDP)
    assert dest == CLIENT


def test_a_forged_response_from_a_nodes_address_does_not_keep_the_node_alive() -> None:
    h = harness(internal=True)
    entry = h.nodes.by_address(NODE.host, NODE.port)
    assert entry is not None
    h.feed(node_response(), NODE, LB_UDP)
    assert not entry.heard
    h.feed(node_response(), NODE, LB_INTERNAL)
    assert entry.heard


def test_node_set_sender_and_forged() -> None:
    nodes = NodeSet()
    nodes.update_members(members())
    client = Address("udp", "203.0.113.7", 5060)
    assert nodes.sender(NODE, LB_UDP) is not None and not nodes.forged(NODE, LB_UDP)  # no facing: as before
    nodes.facing = LB_INTERNAL
    assert nodes.sender(NODE, LB_INTERNAL) is not None and not nodes.forged(NODE, LB_INTERNAL)
    assert nodes.sender(NODE, LB_UDP) is None and nodes.forged(NODE, LB_UDP)
    assert nodes.sender(client, LB_INTERNAL) is None and not nodes.forged(client, LB_UDP)


# -- the transport's entry: the screen drops and counts ----------------------------------------


class Wired:
    """``h``'s core behind a TransportManager with the screen ``sipfarm balancer`` installs."""

    def __init__(self, h: Harness, front: FrontDoor | None = None, refuse: bool = False) -> None:
        self.h = h
        self.admitted: list[Address] = []

        def admit(source: Address) -> bool:
            self.admitted.append(source)
            return not refuse

        self.transports = TransportManager(h.core.on_message)
        self.transports.screen = ClientScreen(front, h.nodes, lambda: 100.0, admit=admit, forged=h.core.stats.drop)

    def deliver(self, data: bytes, source: Address, local: Address) -> list[tuple[SipMessage, Address]]:
        before = len(self.h.sent)
        self.transports.deliver(data, source, local)
        return self.h.sent[before:]


@pytest.fixture
def wired() -> Iterator[Wired]:
    yield Wired(harness(internal=True), front=FrontDoor(FrontDoorPolicy(domains=("farm.test",))))


def test_a_forged_node_datagram_on_a_public_socket_is_dropped_and_counted(wired: Wired) -> None:
    data = node_invite(wired.h)
    front = wired.transports.screen.front  # type: ignore[union-attr]
    budget_before = dict(front.stats)
    assert wired.deliver(data, NODE, LB_UDP) == []
    assert wired.deliver(node_response(), NODE, LB_UDP) == []
    stats = wired.h.core.stats
    assert stats.drops.get(FORGED_NODE_SOURCE) == 2 and stats.flat()[f"dropped_{FORGED_NODE_SOURCE}"] == 2
    assert wired.transports.stats.parse_errors == {} and sum(wired.transports.stats.received.values()) == 0
    assert front.stats == budget_before and wired.admitted == []  # no client's checks, no budget spent
    entry = wired.h.nodes.by_address(NODE.host, NODE.port)
    assert entry is not None and not entry.heard
    # the node itself, on the socket facing the nodes: the phone gets it
    out = wired.deliver(data, NODE, LB_INTERNAL)
    assert [dest for _, dest in out] == [CLIENT]


def test_a_node_on_the_internal_socket_passes_the_client_checks_unasked() -> None:
    wired = Wired(harness(internal=True), refuse=True)  # the allow/deny lists refuse everyone
    out = wired.deliver(node_invite(wired.h), NODE, LB_INTERNAL)
    assert [dest for _, dest in out] == [CLIENT] and wired.admitted == []
    assert wired.deliver(request("OPTIONS", "sip:bob@farm.test"), CLIENT, LB_UDP) == []
    assert wired.admitted == [CLIENT]


def test_without_an_internal_socket_the_screen_lets_a_nodes_address_by_anywhere() -> None:
    wired = Wired(harness(internal=False))
    out = wired.deliver(node_invite(wired.h), NODE, LB_UDP)
    assert [dest for _, dest in out] == [CLIENT]
    assert FORGED_NODE_SOURCE not in wired.h.core.stats.drops


def test_the_screen_costs_a_client_one_look_up_as_before(wired: Wired) -> None:
    """A client's datagram is screened as before: the node check is the one dict look-up."""
    out = wired.deliver(request("OPTIONS", "sip:bob@farm.test"), CLIENT, LB_UDP)
    assert len(out) == 1
    assert wired.admitted == [CLIENT]
