"""How a node names itself on the wire, in memory: a worker of a multi-worker node and an IPv6
node.  A dialog must outlive the worker that set it up (its Record-Route names the port every
worker shares, its Via the worker's private port), and an IPv6 node writes bracketed references
(RFC 3261 25.1) that it then recognises as its own in Route headers."""

from __future__ import annotations

from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.sip.headers import parse_name_addr
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import SipURI

BOB = f"sip:bob@{DOMAIN}"


def _call(farm: MemFarm) -> tuple[Phone, Phone, SipMessage, SipMessage]:
    alice = farm.phone("alice", "10.0.0.1")
    bob = farm.phone("bob", "10.0.0.2")
    assert alice.register().status == 200  # type: ignore[union-attr]
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.inbox.clear()
    bob.answer = 200
    answer = alice.authenticated(alice.request("INVITE", BOB))
    assert answer is not None and answer.status == 200
    invite = next(m for m in bob.inbox if m.method == b"INVITE")
    return alice, bob, answer, invite


def _uri(value: bytes) -> SipURI:
    uri = parse_name_addr(value).uri
    assert isinstance(uri, SipURI)
    return uri


def test_a_workers_record_route_names_the_shared_port_and_its_via_the_private_one() -> None:
    farm = MemFarm(worker_via_port=40123)
    alice, bob, answer, invite = _call(farm)
    assert [(_uri(v).host, _uri(v).port) for v in invite.values("record-route")] == [("127.0.1.1", 5060)]
    assert invite.top_via.port == 40123  # responses come back to the worker holding the transaction
    # the callee hangs up through the Record-Route: it reaches the shared port, and the caller
    bye = bob.in_dialog("BYE", _as_uas_answer(invite, answer))
    bob.send(bye, bob.first_hop(bye))
    assert [m.method for m in alice.inbox if m.method == b"BYE"] == [b"BYE"]


def test_an_ipv6_node_brackets_its_addresses_and_knows_its_own_route() -> None:
    farm = MemFarm(node_hosts=["2001:db8::10"])
    alice, bob, answer, invite = _call(farm)
    assert b"SIP/2.0/UDP [2001:db8::10]:5060;" in invite.top_via_value
    (record_route,) = invite.values("record-route")
    assert record_route.startswith(b"<sip:[2001:db8::10]:5060;lr")
    alice.ack(answer)
    bye = alice.in_dialog("BYE", answer)
    alice.send(bye)
    received = [m for m in bob.inbox if m.method == b"BYE"]
    assert len(received) == 1 and not received[0].has("route")


def _as_uas_answer(invite: SipMessage, answer: SipMessage) -> SipMessage:
    """The callee's view of the dialog: the caller's Contact and the Record-Route reversed is
    what ``Phone.in_dialog`` builds from a 2xx; give it a 2xx-shaped message from the INVITE."""
    view = answer.copy()
    view.remove("contact")
    view.append("contact", invite.get("contact") or b"")
    view.remove("record-route")
    for value in reversed(invite.values("record-route")):
        view.append("record-route", value)
    view.remove("to")
    view.append("to", invite.get("from") or b"")
    view.remove("from")
    view.append("from", answer.get("to") or b"")
    return view
