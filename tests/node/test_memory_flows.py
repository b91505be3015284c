"""Client flows in memory (RFC 5626 5.3): a phone connected straight to a node over TCP is
reached over its connection only; once that is gone, a request for it is answered 430 Flow
Failed at once, never by dialling the phone's ephemeral port and waiting for Timer B.

:meth:`MemFarm.disconnect` closes a phone's connection: a request the node sends over that
flow then fails to send (as ``TransportManager.send(..., connect=False)`` does), and anything
the node would dial instead shows up in :attr:`MemFarm.stray`.
"""

from __future__ import annotations

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.sip.message import SipMessage

BOB = f"sip:bob@{DOMAIN}"


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


def flow_failures(farm: MemFarm, node: int = 0) -> float:
    value = farm.nodes[node].metrics.registry.get_sample_value("sipfarm_node_errors_total", {"kind": "flow_failed"})
    return value or 0.0


def test_a_call_to_a_phone_whose_connection_is_gone_gets_430_at_once(farm: MemFarm, alice: Phone) -> None:
    bob = tcp_bob(farm)
    farm.disconnect(bob)
    answer = call(alice)  # no time passes: no connect timeout, no Timer B
    assert answer is not None
    assert answer.status == 430
    assert answer.reason == b"Flow Failed"
    assert finals(alice) == [430]
    assert farm.stray_to("10.0.0.3") == []  # the node dialled neither the flow's port nor the Contact's
    assert flow_failures(farm) == 1
    farm.advance(40)  # nothing more comes later (a 408 at Timer B, a second final)
    assert finals(alice) == [430]


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
    assert finals(alice, b"BYE") == [430]
    assert farm.stray_to("10.0.0.3") == []


def test_a_phone_still_connected_is_reached_over_its_connection(farm: MemFarm, alice: Phone) -> None:
    bob = tcp_bob(farm)
    bob.answer = 486
    call(alice)
    assert len(bob.requests(b"INVITE")) == 1
    assert finals(alice) == [486]
    assert flow_failures(farm) == 0
