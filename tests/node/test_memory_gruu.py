"""GRUUs (RFC 5627) and Flow-Timer (RFC 5626 5.4) in memory: what phones and callers see.

A phone that registers with an instance ID and ``Supported: gruu`` learns a public and a
temporary GRUU; a request to either reaches that one device (never the account's other
devices), from any node of the farm; a made-up or altered temporary GRUU is answered like a
user that does not exist.  An outbound registration learns how often to send keepalives.
"""

from __future__ import annotations

from urllib.parse import quote

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.sip.headers import unquote_string
from sipfarm.sip.message import SipMessage

DESK = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
MOBILE = "urn:uuid:0e4c1a4e-0a7b-4c5e-9d36-3d2b5e0c9a11"
GRUU = (("supported", "gruu, path, outbound"),)


def register(phone: Phone, instance: str, *, reg_id: int | None = None, gruu: bool = True, **kw: object) -> SipMessage:
    contact = f'<{phone.contact}>;+sip.instance="<{instance}>"'
    if reg_id is not None:
        contact += f";reg-id={reg_id}"
    answer = phone.register(contact=contact, headers=GRUU if gruu else (), **kw)  # type: ignore[arg-type]
    assert answer is not None
    assert answer.status == 200
    phone.inbox.clear()
    return answer


def gruus(answer: SipMessage, instance: str) -> tuple[str | None, str | None]:
    """(pub-gruu, temp-gruu) of the 200's Contact of ``instance``."""
    for na in answer.name_addrs("contact"):
        if unquote_string(na.param("+sip.instance") or "") == f"<{instance}>":
            pub, temp = na.param("pub-gruu"), na.param("temp-gruu")
            return (None if pub is None else unquote_string(pub), None if temp is None else unquote_string(temp))
    raise AssertionError(f"no Contact of {instance} in the 200")


def call(caller: Phone, uri: str, **kwargs: object) -> SipMessage | None:
    return caller.authenticated(caller.request("INVITE", uri, to=f"<sip:bob@{DOMAIN}>", **kwargs))  # type: ignore[arg-type]


@pytest.fixture
def farm() -> MemFarm:
    return MemFarm(nodes=2)


@pytest.fixture
def alice(farm: MemFarm) -> Phone:
    phone = farm.phone("alice", "10.0.0.1")
    assert phone.register().status == 200  # type: ignore[union-attr]
    phone.inbox.clear()
    return phone


@pytest.fixture
def desk(farm: MemFarm) -> Phone:
    return farm.phone("bob", "10.0.0.2")


@pytest.fixture
def mobile(farm: MemFarm) -> Phone:
    return farm.phone("bob", "10.0.0.3")


# -- the 200 OK of a REGISTER -------------------------------------------------------------------


def test_register_with_an_instance_and_gruu_support_gets_public_and_temporary_gruus(desk: Phone) -> None:
    pub, temp = gruus(register(desk, DESK), DESK)
    assert pub == f"sip:bob@{DOMAIN};gr={DESK}"  # RFC 5627 3.1.1: the instance without <>
    assert temp is not None
    assert temp.startswith("sip:tgruu.")
    assert temp.endswith(f"@{DOMAIN};gr")
    assert "bob" not in temp  # a temporary GRUU does not tell who it is (RFC 5627 3.1.2)


def test_an_instance_too_long_for_a_temporary_gruu_is_refused_when_registered(desk: Phone) -> None:
    """A +sip.instance over 255 bytes (in UTF-8, as stored: 70 "é" sent as UTF-8 are read as
    140 latin-1 characters, 280 bytes) is a 400 at REGISTER, with or without gruu support: it
    crashed the 200's temporary GRUU after the binding was written, leaving the REGISTER
    unanswered, and every later gruu REGISTER of the account with it (red team, 2026-12-03).
    A long instance that fits still gets both GRUUs."""
    for instance, gruu in (("urn:x-long:" + "a" * 250, True), ("urn:x-long:" + "é" * 70, False)):
        contact = f'<{desk.contact}>;+sip.instance="<{instance}>"'
        answer = desk.register(contact=contact, headers=GRUU if gruu else ())
        assert answer is not None and answer.status == 400, answer
    pub, temp = gruus(register(desk, "urn:x-long:" + "b" * 200), "urn:x-long:" + "b" * 200)
    assert pub is not None and temp is not None


def test_no_gruus_without_supported_gruu(desk: Phone) -> None:
    assert gruus(register(desk, DESK, gruu=False), DESK) == (None, None)


def test_no_gruus_for_a_contact_without_an_instance(desk: Phone) -> None:
    answer = desk.register(headers=GRUU)
    assert answer is not None
    assert answer.status == 200
    assert [na.param("pub-gruu") for na in answer.name_addrs("contact")] == [None]


def test_each_refresh_gets_a_new_temporary_gruu_and_the_old_one_still_works(
    farm: MemFarm, alice: Phone, desk: Phone
) -> None:
    _, first = gruus(register(desk, DESK, call_id="desk-reg", cseq=1), DESK)
    _, second = gruus(register(desk, DESK, call_id="desk-reg", cseq=5), DESK)
    assert first is not None
    assert second is not None
    assert first != second
    desk.answer = 200
    answer = call(alice, first)
    assert answer is not None
    assert answer.status == 200
    assert len(desk.requests(b"INVITE")) == 1


# -- requests to a GRUU -------------------------------------------------------------------------


def test_a_call_to_the_public_gruu_rings_that_device_only(alice: Phone, desk: Phone, mobile: Phone) -> None:
    pub, _ = gruus(register(desk, DESK), DESK)
    register(mobile, MOBILE)
    assert pub is not None
    desk.answer = 200
    answer = call(alice, pub)
    assert answer is not None
    assert answer.status == 200
    assert len(desk.requests(b"INVITE")) == 1
    assert desk.requests(b"INVITE")[0].uri == desk.contact.encode()  # retargeted to the binding
    assert mobile.requests() == []


def test_a_call_to_the_aor_still_rings_every_device(alice: Phone, desk: Phone, mobile: Phone) -> None:
    register(desk, DESK)
    register(mobile, MOBILE)
    call(alice, f"sip:bob@{DOMAIN}")
    assert len(desk.requests(b"INVITE")) == 1
    assert len(mobile.requests(b"INVITE")) == 1


def test_a_temporary_gruu_learnt_on_one_node_is_routed_by_another(
    farm: MemFarm, alice: Phone, desk: Phone, mobile: Phone
) -> None:
    _, temp = gruus(register(desk, DESK), DESK)  # desk registers through node 1
    register(mobile, MOBILE)
    assert temp is not None
    alice.node = 1  # the caller reaches the farm through node 2
    desk.answer = 200
    answer = call(alice, temp)
    assert answer is not None
    assert answer.status == 200
    assert len(desk.requests(b"INVITE")) == 1
    assert mobile.requests() == []


def test_attended_transfer_invite_with_replaces_reaches_the_gruus_device(
    alice: Phone, desk: Phone, mobile: Phone
) -> None:
    """The transferee's INVITE to the Refer-To GRUU, with Replaces (RFC 3891), reaches the
    target device (not the account's other devices), Replaces untouched."""
    pub, _ = gruus(register(desk, DESK), DESK)
    register(mobile, MOBILE)
    assert pub is not None
    replaces = "abc123@10.0.0.2;to-tag=uas1;from-tag=xyz"
    desk.answer = 200
    answer = call(alice, pub, headers=(("replaces", replaces), ("require", "replaces")))
    assert answer is not None
    assert answer.status == 200
    assert desk.requests(b"INVITE")[0].get("replaces") == replaces.encode()
    assert mobile.requests() == []


def test_attended_transfer_refer_to_a_gruu_then_invite_with_replaces(farm: MemFarm, alice: Phone) -> None:
    """alice talks to carol's desk and to bob; she REFERs bob to carol's desk by its GRUU with
    Replaces (RFC 3515, RFC 3891); bob's INVITE to that GRUU rings the desk, not carol's mobile."""
    carol_desk, carol_mobile = farm.phone("carol", "10.0.0.7"), farm.phone("carol", "10.0.0.8")
    carol_pub, _ = gruus(register(carol_desk, DESK), DESK)
    register(carol_mobile, MOBILE)
    bob = farm.phone("bob", "10.0.0.9")
    assert bob.register().status == 200  # type: ignore[union-attr]
    assert carol_pub is not None
    carol_desk.answer = bob.answer = 200
    consult = alice.authenticated(alice.request("INVITE", carol_pub, to=f"<sip:carol@{DOMAIN}>"))
    assert consult is not None
    assert consult.status == 200
    alice.ack(consult)
    talk = alice.authenticated(alice.request("INVITE", f"sip:bob@{DOMAIN}"))
    assert talk is not None
    assert talk.status == 200
    alice.ack(talk)
    carol_mobile.inbox.clear()
    carol_desk.inbox.clear()

    replaces = f"{consult.call_id.decode()};to-tag={consult.to_tag.decode()};from-tag={consult.from_tag.decode()}"  # type: ignore[union-attr]
    refer_to = f"<{carol_pub}?Replaces={quote(replaces, safe='')}>"
    refer = alice.in_dialog("REFER", talk)
    refer.append("refer-to", refer_to)
    alice.send(refer, alice.first_hop(refer))
    assert [r.get("refer-to") for r in bob.requests(b"REFER")] == [refer_to.encode()]

    # bob, the transferee, calls the Refer-To URI with its Replaces header
    answer = bob.authenticated(
        bob.request("INVITE", carol_pub, to=f"<sip:carol@{DOMAIN}>", headers=(("replaces", replaces),))
    )
    assert answer is not None
    assert answer.status == 200
    assert [r.get("replaces") for r in carol_desk.requests(b"INVITE")] == [replaces.encode()]
    assert carol_mobile.requests() == []


def test_a_dialog_whose_remote_target_is_a_gruu_is_acked_and_hung_up(alice: Phone, desk: Phone) -> None:
    pub, _ = gruus(register(desk, DESK), DESK)
    assert pub is not None
    desk.contact_uri = pub  # the device answers with its GRUU as Contact (RFC 5627 4.4)
    desk.answer = 200
    answer = call(alice, pub)
    assert answer is not None
    assert answer.status == 200
    alice.ack(answer)
    assert len(desk.requests(b"ACK")) == 1
    bye = alice.in_dialog("BYE", answer)
    alice.send(bye, alice.first_hop(bye))
    assert len(desk.requests(b"BYE")) == 1
    assert [m.status for m in alice.inbox if m.cseq[1] == b"BYE"] == [200]


def routeless(phone: Phone, method: str, answer: SipMessage) -> SipMessage:
    """``method`` in the dialog of ``answer`` as a UA that ignored its Record-Route sends it
    (Twinkle reads no ``Record-route:`` spelling): no Route, to the remote target alone."""
    msg = phone.in_dialog(method, answer)
    msg.remove("route")
    return msg


def gruu_dialog(alice: Phone, desk: Phone) -> SipMessage:
    """alice calls desk, whose Contact is its public GRUU (linphonec's shape); the 2xx."""
    pub, _ = gruus(register(desk, DESK), DESK)
    assert pub is not None
    desk.contact_uri = pub
    desk.answer = 200
    answer = call(alice, pub)
    assert answer is not None
    assert answer.status == 200
    assert answer.values("record-route")  # there, and ignored by the caller
    desk.inbox.clear()
    return answer


def test_ack_and_re_invite_without_route_to_the_callees_gruu_reach_it(alice: Phone, desk: Phone) -> None:
    """Twinkle calling linphonec: ACK and re-INVITE (hold) go to the GRUU with no Route (RFC
    5627 6.1, RFC 3261 16.5); the re-INVITE's 200 comes back, the call is not cut."""
    answer = gruu_dialog(alice, desk)
    alice.send(routeless(alice, "ACK", answer))
    assert len(desk.requests(b"ACK")) == 1
    assert desk.requests(b"ACK")[0].uri == f"sip:bob@{desk.hostport}".encode()  # to the binding
    hold = alice.authenticated(routeless(alice, "INVITE", answer))
    assert hold is not None
    assert hold.status == 200
    assert hold.cseq[1] == b"INVITE"
    reinvites = desk.requests(b"INVITE")
    assert len(reinvites) == 1
    assert reinvites[0].to_tag == answer.to_tag
    assert reinvites[0].get("proxy-authorization") is None  # the farm's, consumed
    alice.send(routeless(alice, "ACK", hold))
    bye = alice.authenticated(routeless(alice, "BYE", answer))
    assert bye is not None
    assert bye.status == 200
    assert len(desk.requests(b"ACK")) == 2
    assert len(desk.requests(b"BYE")) == 1


def test_a_routeless_in_dialog_request_to_a_gruu_is_authenticated_like_a_call(farm: MemFarm, desk: Phone) -> None:
    """Without the farm's sealed Route nothing vouches for the dialog: a stranger's made-up To
    tag gets the challenge an initial request gets, and reaches nobody."""
    pub, _ = gruus(register(desk, DESK), DESK)
    assert pub is not None
    mallory = farm.phone("mallory", "10.0.0.66")
    msg = mallory.request("MESSAGE", pub, to=f"<{pub}>;tag=madeup")
    mallory.send(msg)
    assert [m.status for m in mallory.inbox] == [407]
    ack = mallory.request("ACK", pub, to=f"<{pub}>;tag=madeup")
    mallory.send(ack)  # an ACK cannot be challenged: it reaches the device, which drops it
    assert desk.requests(b"MESSAGE") == []
    assert len(desk.requests(b"ACK")) == 1


def test_a_routeless_in_dialog_request_to_a_non_gruu_uri_still_gets_404(alice: Phone, desk: Phone) -> None:
    answer = gruu_dialog(alice, desk)
    for uri in (f"sip:bob@{DOMAIN}", f"sip:bob@{desk.hostport}", f"sip:bob@other.test;gr={DESK}"):
        msg = routeless(alice, "INVITE", answer)
        msg.set_uri(uri.encode())
        reply = alice.authenticated(msg)
        assert reply is not None
        assert reply.status == 404, uri
        ack = routeless(alice, "ACK", answer)
        ack.set_uri(uri.encode())
        alice.send(ack)
    assert desk.requests() == []


def test_a_routeless_in_dialog_request_to_an_unknown_or_unregistered_gruu(alice: Phone, desk: Phone) -> None:
    answer = gruu_dialog(alice, desk)
    pub = desk.contact
    desk.contact_uri = None
    _, temp = gruus(register(desk, DESK), DESK)
    assert temp is not None
    forged = temp.replace("tgruu.", "tgruu.a", 1)
    cases = [(forged, 404), (f"sip:nobody@{DOMAIN};gr={DESK}", 480), (f"sip:bob@{DOMAIN};gr={MOBILE}", 480)]
    register(desk, DESK, expires=0)
    cases += [(pub, 480), (temp, 480)]  # the device's own GRUUs, no longer registered
    for uri, status in cases:
        msg = routeless(alice, "INVITE", answer)
        msg.set_uri(uri.encode())
        reply = alice.authenticated(msg)
        assert reply is not None
        assert reply.status == status, uri
        ack = routeless(alice, "ACK", answer)
        ack.set_uri(uri.encode())
        alice.send(ack)
    assert desk.requests() == []


def test_a_gruu_whose_device_is_not_registered_gets_480(alice: Phone, desk: Phone) -> None:
    pub, temp = gruus(register(desk, DESK), DESK)
    register(desk, DESK, expires=0)
    for uri in (pub, temp):
        assert uri is not None
        answer = call(alice, uri)
        assert answer is not None
        assert answer.status == 480
    assert desk.requests() == []


def test_a_public_gruu_of_another_instance_gets_480(alice: Phone, desk: Phone) -> None:
    register(desk, DESK)
    answer = call(alice, f"sip:bob@{DOMAIN};gr={MOBILE}")
    assert answer is not None
    assert answer.status == 480
    assert desk.requests() == []


def _answer_line(answer: SipMessage | None) -> tuple[int, bytes]:
    assert answer is not None
    return answer.status, answer.reason


@pytest.mark.parametrize(
    "forge",
    [
        lambda temp: temp.replace("tgruu.", "tgruu.a", 1),  # altered (one character more)
        lambda temp: temp[:20] + ("a" if temp[20] != "a" else "b") + temp[21:],  # one flipped
        lambda temp: temp.replace("@", "x@", 1),  # truncated tail replaced
        lambda _temp: f"sip:tgruu.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@{DOMAIN};gr",
        lambda _temp: f"sip:tgruu.!!!@{DOMAIN};gr",
        lambda _temp: f"sip:nobody@{DOMAIN};gr={DESK}",  # public GRUU of an unknown user
    ],
)
def test_a_forged_gruu_gets_the_answer_of_an_unknown_user(alice: Phone, desk: Phone, forge: object) -> None:
    _, temp = gruus(register(desk, DESK), DESK)
    assert temp is not None
    unknown = _answer_line(call(alice, f"sip:nobody@{DOMAIN}"))
    assert unknown[0] == 480
    assert _answer_line(call(alice, forge(temp))) == unknown  # type: ignore[operator]
    assert desk.requests() == []


def test_a_temporary_gruu_for_another_domain_is_refused(farm: MemFarm, alice: Phone, desk: Phone) -> None:
    """The domain is under the tag: a temporary GRUU moved to another host is not ours."""
    _, temp = gruus(register(desk, DESK), DESK)
    assert temp is not None
    answer = call(alice, temp.replace(f"@{DOMAIN}", "@other.test"))
    assert answer is not None
    assert answer.status in (403, 404)
    assert desk.requests() == []


def test_an_unauthenticated_request_to_a_gruu_is_challenged_like_any(farm: MemFarm, desk: Phone) -> None:
    pub, _ = gruus(register(desk, DESK), DESK)
    assert pub is not None
    mallory = farm.phone("mallory", "10.0.0.66")
    mallory.send(mallory.request("INVITE", pub))
    assert [m.status for m in mallory.inbox] == [407]
    assert desk.requests() == []


# -- Flow-Timer ---------------------------------------------------------------------------------


def test_an_outbound_udp_registration_gets_a_flow_timer_below_nat_and_probe_timeouts(desk: Phone) -> None:
    answer = register(desk, DESK, reg_id=1)
    assert answer.get("require") == b"outbound"
    assert answer.get("flow-timer") == b"25"


def test_an_outbound_tcp_registration_gets_the_stream_flow_timer(farm: MemFarm) -> None:
    phone = farm.tcp_phone("bob", "10.0.0.4")
    answer = register(phone, DESK, reg_id=1)
    assert answer.get("flow-timer") == b"110"


def test_a_registration_through_an_edge_proxy_takes_the_flow_timer_of_its_client_side(farm: MemFarm) -> None:
    """The bottom Path entry faces the UA (RFC 3327): its transport decides."""
    phone = farm.phone("bob", "10.0.0.5")
    edge = "<sip:tok@192.0.2.9:5060;lr;transport=tls;ob>"
    msg = phone.request(
        "REGISTER",
        f"sip:{DOMAIN}",
        to=f"<sip:bob@{DOMAIN}>",
        headers=(("path", "<sip:192.0.2.9:5090;lr>"), ("path", edge), *GRUU),
    )
    msg.set("contact", f'<{phone.contact}>;+sip.instance="<{DESK}>";reg-id=1')
    answer = phone.authenticated(msg)
    assert answer is not None
    assert answer.status == 200
    assert answer.get("flow-timer") == b"110"


def test_no_flow_timer_without_outbound(desk: Phone) -> None:
    answer = register(desk, DESK)
    assert answer.get("flow-timer") is None
    assert answer.get("require") is None


def test_flow_timer_values_are_node_options() -> None:
    farm = MemFarm(node_kwargs={"flow_timer_udp": 20, "flow_timer_stream": 90})
    answer = register(farm.phone("bob", "10.0.0.2"), DESK, reg_id=1)
    assert answer.get("flow-timer") == b"20"


def test_a_gruu_of_the_farm_cannot_be_registered_as_a_contact(desk: Phone) -> None:
    answer = desk.register(contact=f"<sip:bob@{DOMAIN};gr={DESK}>", headers=GRUU)
    assert answer is not None
    assert answer.status == 403


def test_options_to_the_farm_lists_gruu_as_supported(farm: MemFarm) -> None:
    phone = farm.phone("alice", "10.0.0.1")
    phone.send(phone.request("OPTIONS", f"sip:{DOMAIN}"))
    answer = phone.last(200)
    assert answer is not None
    assert b"gruu" in [t.strip() for t in (answer.get("supported") or b"").split(b",")]
