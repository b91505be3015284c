"""Client flows in memory (RFC 5626 5.3): a phone connected straight to a node over TCP is
reached over its connection only; once that is gone, a request for it fails with 430 Flow
Failed at once (the caller of an initial request hears 480: RFC 5626 11.5 keeps 430 between
proxies), never by dialling the phone's ephemeral port and waiting for Timer B.

:meth:`MemFarm.disconnect` closes a phone's connection: a request the node sends over that
flow then fails to send (as ``TransportManager.send(..., connect=False)`` does), and anything
the node would dial instead shows up in :attr:`MemFarm.stray`.

A 430 on a branch of an initial request to a registered binding (the node's own flow failure,
or a 430 from downstream: the balancer's, or the phone's) removes that binding, unless the
phone registered it again over a new flow meanwhile (RFC 5626 11): the next call does not fork
to the dead flow again, and with no other device it gets 480 at once.
"""

from __future__ import annotations

import logging

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.sip.message import SipMessage
from sipfarm.store.location import Binding

BOB = f"sip:bob@{DOMAIN}"
INSTANCE = "urn:uuid:00000000-0000-4000-8000-00000000b0b0"


@pytest.fixture
def farm() -> MemFarm:
    return MemFarm()


@pytest.fixture
def alice(farm: MemFarm) -> Phone:
    phone = farm.phone("alice", "10.0.0.1")
    assert phone.register().status == 200  # type: ignore[union-attr]
    return phone


def tcp_bob(farm: MemFarm, host: str = "10.0.0.3") -> Phone:
    """Bob registered straight to node A over TCP (from port 40001; his Contact's 5060 does not listen)."""
    bob = farm.tcp_phone("bob", host)
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.inbox.clear()
    return bob


def call(caller: Phone, uri: str = BOB) -> SipMessage | None:
    return caller.authenticated(caller.request("INVITE", uri))


def finals(phone: Phone, method: bytes = b"INVITE") -> list[int]:
    return [m.status for m in phone.inbox if m.is_response and m.status >= 200 and m.cseq[1] == method]


def flow_failures(farm: MemFarm, node: int = 0, kind: str = "flow_failed") -> float:
    value = farm.nodes[node].metrics.registry.get_sample_value("sipfarm_node_errors_total", {"kind": kind})
    return value or 0.0


def bob_bindings(farm: MemFarm) -> list[Binding]:
    return list(farm.state.bindings.get(f"bob@{DOMAIN}", {}).values())


def test_a_call_to_a_phone_whose_connection_is_gone_gets_480_at_once(farm: MemFarm, alice: Phone) -> None:
    bob = tcp_bob(farm)
    farm.disconnect(bob)
    answer = call(alice)  # no time passes: no connect timeout, no Timer B
    assert answer is not None
    assert answer.status == 480  # the branch's 430, never for the caller (RFC 5626 11.5)
    assert answer.reason == b"Temporarily Unavailable"
    assert finals(alice) == [480]
    assert farm.stray_to("10.0.0.3") == []  # the node dialled neither the flow's port nor the Contact's
    assert flow_failures(farm) == 1
    farm.advance(40)  # nothing more comes later (a 408 at Timer B, a second final)
    assert finals(alice) == [480]


def test_with_a_second_device_the_call_rings_there_and_is_answered(farm: MemFarm, alice: Phone) -> None:
    bob_tcp = tcp_bob(farm)
    desk = farm.phone("bob", "10.0.0.2")
    assert desk.register().status == 200  # type: ignore[union-attr]
    farm.disconnect(bob_tcp)
    call(alice)
    assert len(desk.requests(b"INVITE")) == 1  # the other branch rings
    assert finals(alice) == []  # the 430 is that branch's answer, not the call's
    desk.answer_call(200)
    assert finals(alice) == [200]
    assert farm.stray_to("10.0.0.3") == []
    assert flow_failures(farm) == 1


def test_an_in_dialog_request_over_a_gone_flow_gets_430(farm: MemFarm, alice: Phone) -> None:
    bob = tcp_bob(farm)
    bob.answer = 200
    answer = call(alice)
    assert answer is not None
    assert answer.status == 200
    alice.ack(answer)
    farm.disconnect(bob)
    alice.inbox.clear()
    bye = alice.in_dialog("BYE", answer)
    alice.send(bye, alice.first_hop(bye))
    # as it came: this node followed the Route, it looked no binding up (a balancer in front
    # turns it into 480 for the phone)
    assert finals(alice, b"BYE") == [430]
    assert farm.stray_to("10.0.0.3") == []
    # in dialog a 430 says nothing about the registration (it went by Record-Route, not a lookup)
    assert [b.contact for b in bob_bindings(farm)] == [bob.contact]
    assert flow_failures(farm, kind="binding_flow_failed") == 0


def test_a_phone_still_connected_is_reached_over_its_connection(farm: MemFarm, alice: Phone) -> None:
    bob = tcp_bob(farm)
    bob.answer = 486
    call(alice)
    assert len(bob.requests(b"INVITE")) == 1
    assert finals(alice) == [486]
    assert flow_failures(farm) == 0


def test_after_a_430_the_binding_is_gone_and_the_next_call_gets_480_at_once(
    farm: MemFarm, alice: Phone, caplog: pytest.LogCaptureFixture
) -> None:
    bob = tcp_bob(farm)
    farm.disconnect(bob)
    with caplog.at_level(logging.INFO, logger="sipfarm.proxy"):
        assert call(alice).status == 480  # type: ignore[union-attr]
    assert bob_bindings(farm) == []
    assert flow_failures(farm, kind="binding_flow_failed") == 1
    (line,) = [r.getMessage() for r in caplog.records if "event=binding_removed" in r.getMessage()]
    assert line.startswith(f"event=binding_removed reason=flow_failed aor=bob@{DOMAIN} contact={bob.contact} call_id=")
    alice.inbox.clear()
    assert call(alice).status == 480  # type: ignore[union-attr]
    assert farm.stray_to("10.0.0.3") == []


def test_a_430_from_downstream_removes_the_binding_and_other_devices_ring_on(farm: MemFarm, alice: Phone) -> None:
    """A 430 the branch hears (the balancer's FlowFailed; here the phone's own, which may only
    remove its own binding) counts as the node's own flow failure."""
    gone = farm.phone("bob", "10.0.0.4")
    assert gone.register().status == 200  # type: ignore[union-attr]
    gone.answer = 430
    desk = farm.phone("bob", "10.0.0.2")
    assert desk.register().status == 200  # type: ignore[union-attr]
    call(alice)
    assert finals(alice) == []  # the desk rings on
    assert [b.contact for b in bob_bindings(farm)] == [desk.contact]
    desk.answer_call(200)
    assert finals(alice) == [200]
    alice.inbox.clear()
    call(alice)
    assert len(gone.requests(b"INVITE")) == 1  # the second call went to the desk only
    assert len(desk.requests(b"INVITE")) == 2


def test_a_newer_binding_of_the_same_instance_on_a_new_flow_is_kept(farm: MemFarm, alice: Phone) -> None:
    """The 430 of the old flow comes after the phone registered again over a new connection
    with the same +sip.instance and reg-id (RFC 5626 6: same binding key, new flow)."""
    contact = f'<sip:bob@10.0.0.3:5060;transport=tcp>;+sip.instance="<{INSTANCE}>";reg-id=1'
    old = farm.tcp_phone("bob", "10.0.0.3")
    assert old.register(contact=contact).status == 200  # type: ignore[union-attr]
    call(alice)  # rings on the old flow
    assert len(old.ringing) == 1
    new = farm.tcp_phone("bob", "10.0.0.3", connection_port=40002)
    assert new.register(contact=contact).status == 200  # type: ignore[union-attr]
    (binding,) = bob_bindings(farm)
    old.answer_call(430)
    assert finals(alice) == [480]  # the caller still hears the branch's answer (as 480)
    assert bob_bindings(farm) == [binding]  # registered over 40002: kept
    assert flow_failures(farm, kind="binding_flow_failed") == 0
    alice.inbox.clear()
    new.answer = 200
    assert call(alice).status == 200  # type: ignore[union-attr]
