"""The proxy in memory (RFC 3261 16): what a caller and the phones it calls see.

No sockets, no Redis, no sleeps: :mod:`memfarm` runs the node's sans-IO core, phones and a fake
clock, so Timer C's three minutes take microseconds.  Any exception other than a SipError out of
``NodeCore.on_message`` fails the test that caused it (the farm does not catch it).

Tests marked ``xfail(strict=True)`` are behaviour issue 8 asks for and the node does not have
yet: when the fix lands they pass, strict xfail turns that into a failure, and the mark goes.
"""

from __future__ import annotations

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.proxy.forking import ProxyCall
from sipfarm.sip.address import Address
from sipfarm.sip.headers import parse_name_addr
from sipfarm.sip.message import SipMessage
from sipfarm.sip.transaction import RELEASED, ServerInviteTransaction, TimerConfig
from sipfarm.sip.uri import SipURI
from sipfarm.store.errors import StoreUnavailable

BOB = f"sip:bob@{DOMAIN}"


@pytest.fixture
def farm() -> MemFarm:
    return MemFarm()


@pytest.fixture
def alice(farm: MemFarm) -> Phone:
    phone = farm.phone("alice", "10.0.0.1")
    assert phone.register().status == 200  # type: ignore[union-attr]
    return phone


def registered(farm: MemFarm, user: str, host: str, *, q: float | None = None, **behaviour: object) -> Phone:
    """A phone of ``user`` at ``host``, registered (with ``q``), then told how to answer."""
    phone = farm.phone(user, host)
    contact = None if q is None else f"<{phone.contact}>;q={q}"
    assert phone.register(contact=contact).status == 200  # type: ignore[union-attr]
    phone.inbox.clear()
    for name, value in behaviour.items():
        setattr(phone, name, value)
    return phone


def call(caller: Phone, uri: str = BOB, **kwargs: object) -> SipMessage | None:
    """An authenticated INVITE from ``caller``; the last thing it received."""
    return caller.authenticated(caller.request("INVITE", uri, **kwargs))  # type: ignore[arg-type]


def names_node(value: bytes, node: str = "127.0.1.1") -> bool:
    """A Route/Record-Route value is a loose-routing entry of the node (no user part)."""
    uri = parse_name_addr(value).uri
    assert isinstance(uri, SipURI)
    return (uri.host, uri.port, uri.user) == (node, 5060, None) and uri.param("lr") is not None


def last_invite(phone: Phone) -> SipMessage:
    return next(m for m in reversed(phone.sent) if m.method == b"INVITE")


def statuses(phone: Phone, method: bytes = b"INVITE") -> list[int]:
    return [m.status for m in phone.inbox if m.is_response and m.cseq[1] == method]


# -- A: a call, end to end ----------------------------------------------------------------------


def test_with_a_trying_delay_the_100_goes_only_when_the_callee_is_slow() -> None:
    # RFC 3261 17.2.1: no 100 is needed when an answer comes within 200 ms; the node waits
    # NodeConfig.trying_delay for one, or sends it at the caller's first retransmission
    users = {name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave")}
    farm = MemFarm(users=users, node_kwargs={"timers": TimerConfig(trying=0.05)})
    alice = farm.phone("alice", "10.0.0.1")
    assert alice.register().status == 200  # type: ignore[union-attr]
    for callee, host in (("bob", "10.0.0.2"), ("carol", "10.0.0.3")):
        phone = registered(farm, callee, host, ring=False)
        invite = alice.request("INVITE", f"sip:{callee}@{DOMAIN}")
        alice.send(invite)
        challenge = alice.last(407)
        assert challenge is not None
        again = alice.authorize(challenge, invite)
        alice.inbox.clear()
        alice.send(again)
        assert len(phone.requests(b"INVITE")) == 1
        farm.advance(0.04, step=0.01)
        assert statuses(alice) == []
        if callee == "bob":
            farm.advance(0.02, step=0.01)
            assert statuses(alice) == [100]
            phone.provisional(180)
            assert statuses(alice) == [100, 180]
        else:  # a caller that retransmits first gets its 100 at once, and once
            alice.send(again)
            assert statuses(alice) == [100]
            farm.advance(0.1, step=0.01)
            assert statuses(alice) == [100]
        alice.inbox.clear()
    # rung at once: no 100 at all
    registered(farm, "dave", "10.0.0.4", answer=200)
    assert call(alice, f"sip:dave@{DOMAIN}") is not None
    assert statuses(alice) == [180, 200]


def test_invite_is_challenged_with_407_then_connected(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    invite = alice.request("INVITE", BOB)
    alice.send(invite)
    challenge = alice.last()
    assert challenge is not None
    assert challenge.status == 407
    assert challenge.has("proxy-authenticate")
    assert bob.requests() == []
    # sent with no transaction: its To tag is a challenge tag, whose ACK a balancer ends
    tags = farm.nodes[0].element.challenge_tags
    assert tags.matches(challenge.to_tag, alice.address, invite.call_id, invite.cseq[0])
    # the same request's tag for another client is another tag
    assert not tags.matches(challenge.to_tag, bob.address, invite.call_id, invite.cseq[0])
    alice.send(alice.authorize(challenge, invite))
    assert statuses(alice)[-1] == 200
    assert len(bob.requests(b"INVITE")) == 1
    assert not bob.requests(b"INVITE")[0].has("proxy-authorization")  # consumed by the node


def test_a_connected_call_is_acked_and_hung_up_through_the_node(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    answer = call(alice)
    assert answer is not None
    assert answer.status == 200
    assert statuses(alice) == [100, 180, 200]
    alice.ack(answer)
    assert len(bob.requests(b"ACK")) == 1
    bye = alice.in_dialog("BYE", answer)
    alice.send(bye, alice.first_hop(bye))
    assert len(bob.requests(b"BYE")) == 1
    assert statuses(alice, b"BYE") == [200]
    assert farm.stray == []


def test_a_finished_call_holds_no_parsed_message_yet_forwards_a_2xx_retransmission(farm: MemFarm, alice: Phone) -> None:
    """Past their final responses the call's transactions wait out Timers L, M, J (32 s) with
    no parsed message, nor does the proxy's state for the call; a 2xx the callee sends again
    (its ACK lost) still reaches the caller through the Accepted transactions."""
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    answer = call(alice)
    assert answer is not None and answer.status == 200
    layer = farm.nodes[0].layer
    transactions = [*layer._server.values(), *layer._client.values()]
    assert any(isinstance(tx, ServerInviteTransaction) for tx in transactions)
    for tx in transactions:
        assert tx.released and tx.last_response is None, tx
        proxied = tx.context
        if isinstance(proxied, ProxyCall):
            assert proxied.request is RELEASED and proxied.best is None
            assert all(branch.request is RELEASED for branch in proxied.branches)
    ok = next(s for s in farm.log if s.source.host == "10.0.0.2" and s.data.startswith(b"SIP/2.0 200 "))
    farm.send(ok.data, ok.source, ok.dest)
    assert statuses(alice) == [100, 180, 200, 200]
    alice.ack(answer)
    bye = alice.in_dialog("BYE", answer)
    alice.send(bye, alice.first_hop(bye))
    assert statuses(alice, b"BYE") == [200] and len(bob.requests(b"BYE")) == 1
    farm.advance(40)
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert farm.stray == []


def test_wrong_password_on_invite_gets_407_again(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    invite = alice.request("INVITE", BOB)
    answer = alice.authenticated(invite, password="guess")
    assert answer is not None
    assert answer.status == 407
    assert answer.has("proxy-authenticate")
    assert bob.requests() == []
    # the second 407 is a transaction's, its ACK absorbed by it: no challenge tag (the ACK
    # must reach the node, or it retransmits the 407)
    tags = farm.nodes[0].element.challenge_tags
    assert not tags.matches(answer.to_tag, alice.address, invite.call_id, answer.cseq[0])


def test_invite_is_record_routed_by_the_node(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    answer = call(alice)
    record_route = bob.requests(b"INVITE")[0].values("record-route")
    assert [names_node(v) for v in record_route] == [True]
    assert answer is not None
    assert answer.values("record-route") == record_route


def test_in_dialog_bye_is_loose_routed_by_the_nodes_record_route(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    answer = call(alice)
    assert answer is not None
    alice.ack(answer)
    bye = alice.in_dialog("BYE", answer)
    assert [names_node(v) for v in bye.values("route")] == [True]
    alice.send(bye, farm.node_addresses[0])
    received = bob.requests(b"BYE")
    assert len(received) == 1
    assert received[0].uri == b"sip:bob@10.0.0.2:5060"
    assert not received[0].has("route")  # the node removed its own entry (RFC 3261 16.4)
    assert statuses(alice, b"BYE") == [200]


# -- A: forking ---------------------------------------------------------------------------------


def test_parallel_forking_rings_both_first_200_wins_the_other_is_cancelled(farm: MemFarm, alice: Phone) -> None:
    desk = registered(farm, "bob", "10.0.0.2")
    mobile = registered(farm, "bob", "10.0.0.3")
    call(alice)
    assert len(desk.requests(b"INVITE")) == 1
    assert len(mobile.requests(b"INVITE")) == 1
    desk.answer_call(200)
    assert statuses(alice)[-1] == 200
    (cancel,) = mobile.requests(b"CANCEL")
    # RFC 3326: the phone shows the call answered elsewhere, not missed
    assert cancel.get("reason") == b'SIP;cause=200;text="Call completed elsewhere"'
    assert desk.requests(b"CANCEL") == []
    farm.advance(40)
    assert [s for s in statuses(alice) if s >= 200] == [200]  # mobile's 487 stays at the node


def test_the_callers_cancel_reason_and_a_6xx_reach_the_other_branches_cancels(farm: MemFarm, alice: Phone) -> None:
    desk = registered(farm, "bob", "10.0.0.2")
    mobile = registered(farm, "bob", "10.0.0.3")
    call(alice)
    alice.cancel(last_invite(alice))
    assert statuses(alice, b"CANCEL") == [200]
    reasons = [m.get("reason") for m in desk.requests(b"CANCEL") + mobile.requests(b"CANCEL")]
    assert reasons == [None, None]  # the caller gave none: none is made up
    call(alice, call_id="second")
    mobile.answer_call(603, mobile.ringing[-1])  # declined: no other branch is tried (16.7 step 5)
    assert desk.requests(b"CANCEL")[-1].get("reason") == b'SIP;cause=603;text="Declined elsewhere"'


def test_serial_forking_tries_the_higher_q_contact_first(farm: MemFarm, alice: Phone) -> None:
    high = registered(farm, "bob", "10.0.0.2", q=1.0, answer=486)
    low = registered(farm, "bob", "10.0.0.3", q=0.5, answer=200)
    farm.log.clear()
    call(alice)
    invites = [s.dest.host for s in farm.log if s.data.startswith(b"INVITE ") and s.dest.host.startswith("10.0.0.")]
    assert invites == ["10.0.0.2", "10.0.0.3"]
    assert high.requests(b"ACK")  # the node ACKed the 486 itself
    assert len(low.requests(b"INVITE")) == 1
    assert statuses(alice)[-1] == 200


# -- A: CANCEL, busy, no answer -----------------------------------------------------------------


def test_cancel_while_ringing(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2")
    call(alice)
    assert statuses(alice)[-1] == 180
    alice.cancel(last_invite(alice))
    assert statuses(alice, b"CANCEL") == [200]
    assert len(bob.requests(b"CANCEL")) == 1
    assert statuses(alice)[-1] == 487


def test_busy_callee_486_is_forwarded_once(farm: MemFarm, alice: Phone) -> None:
    registered(farm, "bob", "10.0.0.2", answer=486)
    answer = call(alice)
    assert answer is not None
    assert answer.status == 486
    farm.advance(40)
    assert [s for s in statuses(alice) if s >= 200] == [486]  # alice's ACK stopped the retransmissions


def test_no_answer_cancels_the_ringing_branch_at_timer_c_and_caller_gets_408(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2")
    call(alice)
    farm.advance(179)
    assert bob.requests(b"CANCEL") == []
    assert [s for s in statuses(alice) if s >= 200] == []
    farm.advance(2)
    assert len(bob.requests(b"CANCEL")) == 1
    assert [s for s in statuses(alice) if s >= 200] == [408]


@pytest.mark.parametrize(
    "extra",
    ["?Route=%3Csip:10.9.9.9;lr%3E", "?P-Asserted-Identity=%3Csip:ceo@farm.test%3E&Subject=x", ";method=INVITE"],
)
def test_a_registered_contacts_uri_headers_and_method_do_not_reach_the_request_uri(
    farm: MemFarm, alice: Phone, extra: str
) -> None:
    """RFC 3261 19.1.1 Table 1: a REGISTER's Contact may carry URI headers and ``method``, a
    Request-URI neither; forwarded as they were, a strict phone answered 400 (red team,
    2026-12-03). Stripped, and the headers are not applied either."""
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register(contact=f"<sip:bob@10.0.0.2:5060{extra}>").status == 200  # type: ignore[union-attr]
    bob.answer = 200
    answer = call(alice)
    assert answer is not None and answer.status == 200
    (invite,) = bob.requests(b"INVITE")
    assert invite.uri == b"sip:bob@10.0.0.2:5060", invite.uri
    assert not invite.values("subject") and b"ceo" not in invite.to_bytes()
    assert [r for r in invite.values("route") if b"10.9.9.9" in r] == []


# -- A: requests that cannot be routed ----------------------------------------------------------


def test_unknown_user_gets_480_as_an_unregistered_one_does(farm: MemFarm, alice: Phone) -> None:
    answer = call(alice, f"sip:nobody@{DOMAIN}")
    assert answer is not None
    assert answer.status == 480


@pytest.mark.parametrize("method", ["INVITE", "MESSAGE", "OPTIONS", "SUBSCRIBE", "REFER", "INFO"])
def test_a_subscriber_cannot_tell_an_unknown_user_from_an_unregistered_one(
    farm: MemFarm, alice: Phone, method: str
) -> None:
    """By default (``[routing.unknown]`` unset): the same answer, header for header but the
    transaction's own (Via, Call-ID, CSeq) and the To tag."""

    def answer_to(user: str) -> tuple[int, bytes, list[tuple[str, bytes]]]:
        uri = f"sip:{user}@{DOMAIN}"
        extra = [("Event", "presence"), ("Expires", "60")] if method == "SUBSCRIBE" else []
        extra += [("Refer-To", f"<sip:bob@{DOMAIN}>")] if method == "REFER" else []
        msg = alice.request(method, uri, to=uri, headers=extra)
        answer = alice.authenticated(msg)
        assert answer is not None
        own = {"via", "call-id", "cseq", "to", "from"}
        headers = [(key, value) for key, _, value in answer if key not in own]
        return answer.status, answer.reason, headers

    nobody, carol = answer_to("nobody"), answer_to("carol")
    assert nobody[:2] == carol[:2] == (480, b"Temporarily Unavailable"), (nobody, carol)
    assert nobody[2] == carol[2]


def test_known_but_unregistered_user_gets_480(farm: MemFarm, alice: Phone) -> None:
    answer = call(alice, f"sip:carol@{DOMAIN}")
    assert answer is not None
    assert answer.status == 480


def test_max_forwards_0_gets_483(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    answer = call(alice, max_forwards=0)
    assert answer is not None
    assert answer.status == 483
    assert bob.requests() == []


def test_a_request_looping_back_to_the_node_gets_482(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2")
    call(alice)
    sent_by_alice = last_invite(alice)
    # bob's device forwards the INVITE back to bob's address-of-record, unchanged otherwise
    looped = bob.requests(b"INVITE")[0].copy()
    looped.set_uri(BOB.encode())
    looped.prepend("via", b"SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bKloop1;rport")
    looped.append("proxy-authorization", sent_by_alice.get("proxy-authorization") or b"")
    bob.inbox.clear()
    bob.send(looped)
    assert [m.status for m in bob.inbox if m.status >= 200] == [482]
    assert bob.requests(b"INVITE") == []


def test_options_to_the_node_itself_gets_200(farm: MemFarm) -> None:
    probe = farm.phone("monitor", "10.0.0.50")
    probe.send(probe.request("OPTIONS", "sip:127.0.1.1:5060"))
    answer = probe.last()
    assert answer is not None
    assert answer.status == 200
    assert b"INVITE" in (answer.get("allow") or b"")


def test_invite_while_redis_is_down_gets_503_with_retry_after(farm: MemFarm, alice: Phone) -> None:
    registered(farm, "bob", "10.0.0.2", answer=200)
    farm.state.fail_with = StoreUnavailable("connection refused")
    answer = call(alice)
    assert answer is not None
    assert answer.status == 503
    assert answer.get("retry-after") is not None


# -- B: issue 8 ---------------------------------------------------------------------------------


def test_max_forwards_above_70_is_capped_on_entry(farm: MemFarm, alice: Phone) -> None:
    bob = registered(farm, "bob", "10.0.0.2", answer=200)
    call(alice, max_forwards=255)
    forwarded = bob.requests(b"INVITE")[0]
    assert int(forwarded.get("max-forwards") or b"0") <= 69


def test_6xx_reaches_the_caller_without_waiting_for_a_silent_branch(farm: MemFarm, alice: Phone) -> None:
    registered(farm, "bob", "10.0.0.2", ring=False, answer=603)
    registered(farm, "bob", "10.0.0.3", ring=False)  # has not answered anything yet
    call(alice)
    farm.advance(1)
    assert 603 in statuses(alice)


def test_a_silent_branch_is_cancelled_as_soon_as_it_rings_after_a_6xx(farm: MemFarm, alice: Phone) -> None:
    registered(farm, "bob", "10.0.0.2", ring=False, answer=603)
    late = registered(farm, "bob", "10.0.0.3", ring=False)
    call(alice)
    farm.advance(1)
    assert late.requests(b"CANCEL") == []  # RFC 3261 9.1: no CANCEL before a provisional
    late.provisional(180)
    assert len(late.requests(b"CANCEL")) == 1
    assert 180 not in statuses(alice)  # the late ring is not passed on after the 6xx


def test_a_lower_q_contact_is_tried_within_30s_of_unanswered_ringing(farm: MemFarm, alice: Phone) -> None:
    high = registered(farm, "bob", "10.0.0.2", q=1.0)
    low = registered(farm, "bob", "10.0.0.3", q=0.5, answer=200)
    call(alice)
    assert len(high.requests(b"INVITE")) == 1
    assert low.requests(b"INVITE") == []
    farm.advance(30)
    assert len(low.requests(b"INVITE")) == 1
    assert len(high.requests(b"CANCEL")) == 1
    assert statuses(alice)[-1] == 200


@pytest.mark.parametrize(
    "callee",
    [
        pytest.param({"ring": False}, id="silent_timer_b"),
        pytest.param({}, id="ringing_timer_c"),
    ],
)
def test_a_locally_made_408_carries_a_to_tag(farm: MemFarm, alice: Phone, callee: dict[str, object]) -> None:
    registered(farm, "bob", "10.0.0.2", **callee)
    call(alice)
    farm.advance(200)
    timeout = alice.last(408)
    assert timeout is not None
    assert timeout.to_tag is not None


def test_no_408_for_a_non_invite_nobody_answers(farm: MemFarm, alice: Phone) -> None:
    registered(farm, "bob", "10.0.0.2", silent=True)
    alice.authenticated(alice.request("MESSAGE", BOB, body=b"hello"))
    farm.advance(64)
    assert 408 not in statuses(alice, b"MESSAGE")


def test_a_non_invite_nobody_answers_leaves_no_transaction_behind(farm: MemFarm, alice: Phone) -> None:
    registered(farm, "bob", "10.0.0.2", silent=True)
    alice.authenticated(alice.request("MESSAGE", BOB, body=b"hello"))
    assert farm.transactions() > 0
    farm.advance(64)
    assert farm.transactions() == 0


def test_options_to_the_node_with_an_unterminated_quote_in_to_gets_400(farm: MemFarm) -> None:
    probe = farm.phone("monitor", "10.0.0.50")
    raw = (
        b"OPTIONS sip:127.0.1.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.50:5060;branch=z9hG4bKquote1;rport\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:monitor@farm.test>;tag=q1\r\n"
        b'To: "Unterminated <sip:127.0.1.1:5060>\r\n'
        b"Call-ID: quote-1\r\n"
        b"CSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    probe.send(raw)
    assert [m.status for m in probe.inbox] == [400]


def test_ack_for_2xx_reaches_a_phone_connected_to_the_node_over_tcp(farm: MemFarm, alice: Phone) -> None:
    bob = farm.tcp_phone("bob", "10.0.0.3")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    answer = call(alice)
    assert answer is not None
    assert answer.status == 200
    assert any(b"@127.0.1.1" in rr for rr in answer.values("record-route"))  # the flow-token entry
    alice.ack(answer)
    assert len(bob.requests(b"ACK")) == 1
    assert farm.stray_to("10.0.0.3") == []  # nothing to the Contact's port (nobody listens there)
    acks = [s for s in farm.sent_to(bob.address) if s.data.startswith(b"ACK ")]
    assert [s.dest for s in acks] == [Address("tcp", "10.0.0.3", 40001)]
