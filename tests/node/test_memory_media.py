"""Media anchoring in memory: the proxy's RelayMedia hook driving real ng relays without sockets.

Each relay is a :class:`media.ng.NgController` over a socket-free :class:`media.relay.RelayEngine`
(the pattern of tests/media/test_media_ng.py) sitting at an address of the in-memory network;
the node's :class:`~sipfarm.proxy.ng_client.NgClient` sends its ng datagrams over that network,
so a relay that is "down" is simply an address nobody listens on.  What is checked is what the
phones see: the SDP each receives names the relay, a hang-up frees the relay's session, a dead
relay costs a new call one ng timeout and then the next relay, and when no relay answers the
operator's choice (503, or a call with media end to end) happens.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest
from memfarm import DOMAIN, MemFarm, Phone, Ringing

from media.bencode import decode, encode
from media.ng import NgController
from media.ports import PortAllocator
from media.relay import RelayEngine
from media.sdp import SessionDescription
from sipfarm.proxy.ng_client import NgClient, NgRefused, NgTimeout
from sipfarm.proxy.relay_choice import RelayLoad, RelayTable
from sipfarm.proxy.relay_media import RelayMedia, relay_index
from sipfarm.routing.router import Router
from sipfarm.routing.table import RoutingTable
from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.multipart import sdp_part

BOB = f"sip:bob@{DOMAIN}"
RELAYS = [("127.0.5.1", 2223), ("127.0.5.2", 2223)]
NG_SOURCE = Address("udp", "127.0.1.1", 40000)  # the node's ng socket


def phone_sdp(host: str, port: int, direction: str = "sendrecv", version: int = 1) -> bytes:
    return (
        "v=0\r\n"
        f"o=- 7 {version} IN IP4 {host}\r\n"
        "s=-\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        f"a={direction}\r\n"
    ).encode()


def run(coro: Coroutine[Any, Any, bytes | None]) -> bytes | None:
    """An NgController.handle over an in-memory relay never suspends: run it without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the in-memory relay suspended")


class MemoryRelay:
    """RelayServer's control surface over a bare engine (tests/media/test_media_ng.py)."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine

    async def offer(
        self, call_id: str, from_tag: str, media: Any, to_tag: str | None = None, owner: str | None = None
    ) -> Any:
        return self.engine.offer(call_id, from_tag, media, to_tag, owner)

    async def answer(self, call_id: str, from_tag: str, to_tag: str, media: Any) -> Any:
        return self.engine.answer(call_id, from_tag, to_tag, media)

    def delete(self, call_id: str, from_tag: str | None = None, to_tag: str | None = None) -> Any:
        return self.engine.delete(call_id, from_tag, to_tag)

    def query(self, call_id: str) -> Any:
        return self.engine.query(call_id)

    def list_calls(self) -> list[str]:
        return self.engine.list_calls()


class MediaFarm:
    """A MemFarm whose node anchors media at the relays of RELAYS that are ``up``."""

    def __init__(
        self, up: tuple[int, ...] = (0, 1), failure: str = "503", *, by_load: bool = False, refuse: str = ""
    ) -> None:
        """``by_load``: the relays come from the membership (a RelayTable filled with their
        figures) and the node records each call's relay in the shared state, as ``relays =
        ["cluster"]`` runs; ``refuse``: every relay answers offers with this ng error."""
        self.client = NgClient(prefix=b"node1")
        self.farm = MemFarm()
        self.refuse = refuse
        if by_load:
            self.table = RelayTable()
            self.table.update(RelayLoad(r) for r in RELAYS)
            self.media = RelayMedia(self.client, self.table, self._now, on_failure=failure, calls=self.farm.state)
        else:
            self.table = RelayTable(RELAYS)
            self.media = RelayMedia(self.client, self.table, self._now, on_failure=failure)
        self.use(self.media)
        self.engines: dict[int, RelayEngine] = {}
        self.ng_log: list[dict[bytes, Any]] = []
        for index in up:
            host, port = RELAYS[index]
            engine = RelayEngine(
                PortAllocator(30000 + 100 * index, 30099 + 100 * index),
                clock=self.farm.clock.now,
                sdp_allowed=lambda h, p: True,
            )
            controller = NgController(MemoryRelay(engine), host, self.farm.clock.now)  # type: ignore[arg-type]
            self.engines[index] = engine
            self.farm.endpoints[(host, port)] = self._relay_input(controller, Address("udp", host, port))
        self.farm.endpoints[(NG_SOURCE.host, NG_SOURCE.port)] = self._ng_input
        self.client.wake = self._flush

    def _now(self) -> float:
        return self.farm.clock.now()

    def use(self, media: RelayMedia) -> None:
        """The node's media hook is ``media`` (a fresh one: a node that did not see the call)."""
        proxy = self.farm.nodes[0].proxy
        proxy.media = media
        proxy.anchoring = True

    def _relay_input(self, controller: NgController, addr: Address) -> Any:
        def deliver(data: bytes, source: Address) -> None:
            message = decode(data.partition(b" ")[2])
            assert isinstance(message, dict)
            self.ng_log.append(message)
            if self.refuse and message.get(b"command") == b"offer":
                cookie = data.partition(b" ")[0]
                self.farm.send(cookie + b" " + encode({"result": "error", "error-reason": self.refuse}), addr, source)
                return
            reply = run(controller.handle(data))
            if reply is not None:
                self.farm.send(reply, addr, source)

        return deliver

    def _ng_input(self, data: bytes, source: Address) -> None:
        self.client.receive_datagram(data, (source.host, source.port))
        self._flush()
        self.farm._drain(self.farm.nodes[0], self.farm.node_addresses[0])

    def _flush(self) -> None:
        for data, (host, port) in self.client.datagrams_to_send():
            self.farm.send(data, NG_SOURCE, Address("udp", host, port))

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.farm.clock.mono + seconds
        while self.farm.clock.mono < end - 1e-9:
            self.farm.advance(step, step)
            deadline = self.client.next_deadline()
            if deadline is not None and deadline <= self.farm.clock.mono:
                self.client.handle_timer(self.farm.clock.mono)
                self._flush()
                self.farm._drain(self.farm.nodes[0], self.farm.node_addresses[0])

    def calls(self, index: int) -> list[str]:
        return self.engines[index].list_calls()

    def commands(self) -> list[bytes]:
        return [m[b"command"] for m in self.ng_log]


def call_id_on(index: int, count: int = len(RELAYS)) -> str:
    """A Call-ID whose hash picks relay ``index``."""
    return next(f"call-{n}" for n in range(1000) if relay_index(f"call-{n}".encode(), count) == index)


def media_of(msg: SipMessage) -> tuple[str, int]:
    sdp = SessionDescription.parse(msg.body)
    section = sdp.media[0]
    connection = section.connection or sdp.connection
    assert connection is not None
    return connection.address, section.line.port


def answer_with_sdp(phone: Phone, sdp: bytes, call: Ringing | None = None) -> None:
    call = call or phone.ringing[-1]
    phone.ringing.remove(call)
    response = make_response(
        call.request,
        200,
        to_tag=call.tag,
        headers=(("contact", f"<{phone.contact}>"),),
        body=sdp,
        content_type=b"application/sdp",
        record_route=True,
    )
    phone.send(response, call.source)


def setup(mf: MediaFarm) -> tuple[Phone, Phone]:
    alice = mf.farm.phone("alice", "10.0.0.1")
    bob = mf.farm.phone("bob", "10.0.0.2")
    for phone in (alice, bob):
        assert phone.register().status == 200  # type: ignore[union-attr]
        phone.inbox.clear()
    return alice, bob


def invite(alice: Phone, call_id: str) -> SipMessage:
    msg = alice.request("INVITE", BOB, call_id=call_id, body=phone_sdp("10.0.0.1", 4000))
    msg.set("content-type", b"application/sdp")
    return msg


def establish(mf: MediaFarm, call_id: str) -> tuple[Phone, Phone, SipMessage]:
    alice, bob = setup(mf)
    alice.authenticated(invite(alice, call_id))
    assert bob.ringing, alice.inbox
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000))
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    alice.ack(ok)
    return alice, bob, ok


# -- a call through a relay ------------------------------------------------------------------------


def test_both_sdps_name_the_relay_and_bye_deletes_the_session() -> None:
    mf = MediaFarm()
    call_id = call_id_on(1)
    alice, bob, ok = establish(mf, call_id)
    offered = bob.requests(b"INVITE")[-1]
    assert offered.body != phone_sdp("10.0.0.1", 4000)
    host, port = media_of(offered)
    assert (host, 30100 <= port <= 30199) == ("127.0.5.2", True)
    assert int(offered.get("content-length") or b"0") == len(offered.body)
    host, port = media_of(ok)
    assert (host, 30100 <= port <= 30199) == ("127.0.5.2", True)
    assert mf.calls(1) == [call_id]
    assert mf.calls(0) == []
    alice.send(alice.in_dialog("BYE", ok))
    assert bob.requests(b"BYE")
    assert mf.calls(1) == []
    assert mf.commands() == [b"offer", b"answer", b"delete"]


def test_ng_messages_carry_kamailio_flags() -> None:
    mf = MediaFarm()
    establish(mf, call_id_on(0))
    offer, answer = mf.ng_log[0], mf.ng_log[1]
    assert offer[b"replace"] == [b"origin", b"session-connection"]
    assert offer[b"ICE"] == b"remove"
    assert b"trust-address" not in offer.get(b"flags", [])
    assert offer[b"via-branch"].startswith(b"z9hG4bK")
    assert b"to-tag" not in offer
    assert answer[b"from-tag"] == offer[b"from-tag"]
    assert answer[b"to-tag"]


def test_re_invite_for_hold_goes_through_the_relay_of_the_call() -> None:
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, bob, ok = establish(mf, call_id)
    hold = alice.in_dialog("INVITE", ok)
    hold.set_body(phone_sdp("10.0.0.1", 4000, "sendonly", version=2), b"application/sdp")
    alice.send(hold, alice.first_hop(hold))
    offered = bob.requests(b"INVITE")[-1]
    assert offered.to_tag is not None
    assert media_of(offered)[0] == "127.0.5.1"
    assert b"a=sendonly" in offered.body
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000, "recvonly", version=2))
    reok = [m for m in alice.inbox if m.status == 200 and m.cseq == hold.cseq]
    assert reok
    assert media_of(reok[-1])[0] == "127.0.5.1"
    assert mf.commands() == [b"offer", b"answer", b"offer", b"answer"]
    assert mf.ng_log[2][b"to-tag"] == ok.to_tag
    assert mf.calls(0) == [call_id]


def test_re_invite_without_route_to_a_gruu_goes_through_the_relay_of_the_call() -> None:
    """A caller that ignored the Record-Route (Twinkle) holds a call whose remote target is the
    callee's GRUU: the re-INVITE, with no Route, is anchored like one along the route set."""
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, bob = setup(mf)
    instance = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
    answer = bob.register(contact=f'<{bob.contact}>;+sip.instance="<{instance}>"', headers=(("supported", "gruu"),))
    assert answer is not None
    assert answer.status == 200
    bob.contact_uri = f"{BOB};gr={instance}"
    alice.authenticated(invite(alice, call_id))
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000))
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    ack = alice.in_dialog("ACK", ok)
    ack.remove("route")
    alice.send(ack)
    assert bob.requests(b"ACK")
    hold = alice.in_dialog("INVITE", ok)
    hold.remove("route")
    hold.set_body(phone_sdp("10.0.0.1", 4000, "sendonly", version=2), b"application/sdp")
    alice.authenticated(hold)
    offered = bob.requests(b"INVITE")[-1]
    assert offered.to_tag == ok.to_tag
    assert media_of(offered)[0] == "127.0.5.1"
    assert b"a=sendonly" in offered.body
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000, "recvonly", version=2))
    reok = [m for m in alice.inbox if m.status == 200 and m.cseq[1] == b"INVITE"]
    assert reok
    assert media_of(reok[-1])[0] == "127.0.5.1"
    assert mf.commands() == [b"offer", b"answer", b"offer", b"answer"]
    assert mf.calls(0) == [call_id]


def test_a_failed_re_invite_keeps_the_session() -> None:
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, bob, ok = establish(mf, call_id)
    again = alice.in_dialog("INVITE", ok)
    again.set_body(phone_sdp("10.0.0.1", 4000, version=2), b"application/sdp")
    alice.send(again, alice.first_hop(again))
    bob.answer_call(488)
    assert 488 in alice.finals()
    assert mf.calls(0) == [call_id]
    assert b"delete" not in mf.commands()


def test_cancel_deletes_the_session() -> None:
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, _bob = setup(mf)
    alice.authenticated(invite(alice, call_id))
    assert mf.calls(0) == [call_id]
    alice.cancel(next(m for m in reversed(alice.sent) if m.method == b"INVITE"))
    assert 487 in alice.finals()
    assert mf.calls(0) == []


def test_final_failure_deletes_the_session() -> None:
    mf = MediaFarm()
    call_id = call_id_on(1)
    alice, bob = setup(mf)
    alice.authenticated(invite(alice, call_id))
    bob.answer_call(486)
    assert 486 in alice.finals()
    assert mf.calls(1) == []


# -- relays that do not answer ---------------------------------------------------------------------


def test_a_dead_relay_sends_a_new_call_to_the_next_one() -> None:
    mf = MediaFarm(up=(1,))
    call_id = call_id_on(0)
    alice, bob = setup(mf)
    alice.authenticated(invite(alice, call_id))
    assert not bob.requests(b"INVITE")  # waiting for relay 0, which never answers
    mf.advance(0.9)
    assert not bob.requests(b"INVITE")
    mf.advance(0.2)
    assert bob.requests(b"INVITE")
    assert media_of(bob.requests(b"INVITE")[-1])[0] == "127.0.5.2"
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000))
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    assert media_of(ok)[0] == "127.0.5.2"
    # the BYE's delete goes to the relay that holds the call on this node
    alice.ack(ok)
    alice.send(alice.in_dialog("BYE", ok))
    assert mf.calls(1) == []


def test_no_relay_answers_503_by_default() -> None:
    mf = MediaFarm(up=())
    alice, bob = setup(mf)
    alice.authenticated(invite(alice, call_id_on(0)))
    mf.advance(2.5)
    assert 503 in alice.finals()
    assert not bob.requests(b"INVITE")
    assert mf.media.failures == 1
    assert mf.client.timeouts == 2
    assert len(mf.farm.stray_to("127.0.5.1")) == 3  # three tries per relay within the timeout
    assert len(mf.farm.stray_to("127.0.5.2")) == 3


def test_no_relay_forwards_with_media_end_to_end_when_configured() -> None:
    mf = MediaFarm(up=(), failure="forward")
    alice, bob = setup(mf)
    alice.authenticated(invite(alice, call_id_on(1)))
    mf.advance(2.5)
    offered = bob.requests(b"INVITE")
    assert offered
    assert offered[-1].body == phone_sdp("10.0.0.1", 4000)
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000))
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    assert ok.body == phone_sdp("10.0.0.2", 5000)  # no offer anchored: the answer is not either


def test_without_relays_the_sdp_goes_through_untouched() -> None:
    farm = MemFarm()
    alice = farm.phone("alice", "10.0.0.1")
    bob = farm.phone("bob", "10.0.0.2")
    for phone in (alice, bob):
        assert phone.register().status == 200  # type: ignore[union-attr]
    alice.authenticated(invite(alice, "plain-call"))
    assert bob.requests(b"INVITE")[-1].body == phone_sdp("10.0.0.1", 4000)
    assert not farm.nodes[0].proxy.anchoring


# -- the ng client alone ---------------------------------------------------------------------------


def test_ng_client_retransmits_with_the_same_cookie_then_times_out() -> None:
    client = NgClient(timeout=1.0, tries=3, prefix=b"p")
    results: list[object] = []
    client.request(("127.0.0.1", 2223), {"command": b"ping"}, 10.0, results.append)
    client.request(("127.0.0.1", 2223), {"command": b"ping"}, 10.0, results.append)
    first = client.datagrams_to_send()
    assert [d.partition(b" ")[0] for d, _ in first] == [b"p_1", b"p_2"]
    sent = list(first)
    now = 10.0
    while (deadline := client.next_deadline()) is not None:
        now = deadline
        client.handle_timer(now)
        sent += client.datagrams_to_send()
    assert [d.partition(b" ")[0] for d, _ in sent].count(b"p_1") == 3
    assert now == pytest.approx(11.0)
    assert all(isinstance(r, NgTimeout) for r in results) and len(results) == 2
    assert client.timeouts == 2 and len(client) == 0


def test_ng_client_matches_replies_by_cookie_and_types_errors() -> None:
    client = NgClient(prefix=b"q")
    results: list[object] = []
    client.request(("127.0.0.1", 2223), {"command": b"ping"}, 0.0, results.append)
    client.request(("127.0.0.1", 2223), {"command": b"delete", "call-id": b"x"}, 0.0, results.append)
    client.receive_datagram(b"q_2 d12:error-reason12:Unknown call6:result5:errore")
    client.receive_datagram(b"q_1 d6:result4:ponge")
    client.receive_datagram(b"q_1 d6:result4:ponge")  # a late duplicate: nobody waits for it
    assert isinstance(results[0], NgRefused) and results[0].reason == "Unknown call"
    assert results[1] == {b"result": b"pong"}
    assert client.stray_replies == 1
    assert client.next_deadline() is None


def test_ng_client_takes_a_reply_only_from_the_relay_it_asked() -> None:
    # a reply rewrites SDP: one with the right cookie from elsewhere must not steer the media
    client = NgClient(prefix=b"q")
    results: list[object] = []
    client.request(("127.0.0.1", 2223), {"command": b"ping"}, 0.0, results.append)
    client.receive_datagram(b"q_1 d6:result4:ponge", ("127.0.0.9", 2223))
    assert results == [] and client.stray_replies == 1 and len(client) == 1
    client.receive_datagram(b"q_1 d6:result4:ponge", ("127.0.0.1", 2223))
    assert results == [{b"result": b"pong"}] and len(client) == 0


# -- offers in other places: late offer, PRACK ------------------------------------------------------


def late_offer_call(mf: MediaFarm, call_id: str) -> tuple[Phone, Phone, SipMessage]:
    """alice INVITEs with no SDP; bob's 200 carries the offer."""
    alice, bob = setup(mf)
    alice.authenticated(alice.request("INVITE", BOB, call_id=call_id))
    assert bob.ringing
    assert not bob.requests(b"INVITE")[-1].body
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000))
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    return alice, bob, ok


def test_late_offer_in_the_2xx_is_anchored_and_answered_in_the_ack() -> None:
    mf = MediaFarm()
    call_id = call_id_on(1)
    alice, bob, ok = late_offer_call(mf, call_id)
    assert media_of(ok)[0] == "127.0.5.2"  # the offer alice got names the relay
    offer = mf.ng_log[0]
    assert offer[b"command"] == b"offer"
    assert offer[b"from-tag"] == ok.to_tag  # the offerer is bob
    assert offer[b"to-tag"] == ok.from_tag
    ack = alice.in_dialog("ACK", ok)
    ack.set_body(phone_sdp("10.0.0.1", 4000), b"application/sdp")
    alice.send(ack, alice.first_hop(ack))
    acked = bob.requests(b"ACK")
    assert acked, "the ACK waits for the relay, then goes on"
    assert media_of(acked[-1])[0] == "127.0.5.2"  # the answer bob got names the relay too
    answer = mf.ng_log[1]
    assert answer[b"command"] == b"answer"
    assert (answer[b"from-tag"], answer[b"to-tag"]) == (ok.to_tag, ok.from_tag)
    assert mf.calls(1) == [call_id]
    alice.send(alice.in_dialog("BYE", ok))
    assert mf.calls(1) == []


def test_sdp_in_an_ack_with_no_offer_outstanding_is_no_answer_and_goes_no_further() -> None:
    """Red team (2026-12-03): after INVITE (offer) and 200 (answer), the caller's ACK with SDP
    naming 127.0.0.77 moved the relay's media for it there and reached the callee.  RFC 3264 4:
    no offer outstanding, so no answer: nothing asks the relay, and the SDP is not passed on."""
    mf = MediaFarm()
    call_id = call_id_on(1)
    alice, bob, ok = establish(mf, call_id)
    commands = mf.commands()
    ack = alice.in_dialog("ACK", ok)
    ack.set_body(phone_sdp("127.0.0.77", 5004), b"application/sdp")
    alice.send(ack, alice.first_hop(ack))
    acks = bob.requests(b"ACK")
    assert acks and not acks[-1].body and acks[-1].get("content-type") is None
    assert mf.commands() == commands  # no answer sent to the relay


def test_a_body_that_is_not_sdp_is_neither_offer_nor_answer() -> None:
    """Red team (2026-12-03): a text/plain body was anchored as SDP and went on as
    application/sdp.  Only SDP (or a body without a type, or a multipart the relay refuses)
    goes to the relay; another type goes on untouched."""
    mf = MediaFarm()
    alice, bob = setup(mf)
    msg = alice.request("INVITE", BOB, call_id=call_id_on(1), body=phone_sdp("10.0.0.1", 4000))
    msg.set("content-type", b"text/plain")
    alice.authenticated(msg)
    assert bob.ringing, alice.inbox
    offered = bob.requests(b"INVITE")[-1]
    assert offered.body == phone_sdp("10.0.0.1", 4000) and offered.get("content-type") == b"text/plain"
    assert b"offer" not in mf.commands()


def _multipart(sdp: bytes, boundary: bytes = b"unique-boundary-1") -> tuple[bytes, bytes]:
    """A SIP-T style body (RFC 3204): the SDP, then an ISUP part; and its Content-Type."""
    body = (
        b"--" + boundary + b"\r\nContent-Type: application/sdp\r\n\r\n" + sdp
        + b"\r\n--" + boundary + b"\r\nContent-Type: application/ISUP;version=itu-t92+\r\n"
        + b"Content-Disposition: signal;handling=optional\r\n\r\n\x01\x00\x49\x00\x00\x03\x02\x00\x07"
        + b"\r\n--" + boundary + b"--\r\n"
    )  # fmt: skip
    return body, b'multipart/mixed;boundary="' + boundary + b'"'


def test_the_sdp_part_of_a_multipart_offer_and_answer_is_anchored_the_rest_kept() -> None:
    """RFC 5621: a SIP-T gateway's offer is a multipart body with an SDP part; it got 488 (the
    whole body went to the relay as SDP, red team 2026-12-03). The relay reads and rewrites
    that part; every other byte of the body goes on as it was; the answer likewise."""
    mf = MediaFarm()
    alice, bob = setup(mf)
    body, kind = _multipart(phone_sdp("10.0.0.1", 4000))
    msg = alice.request("INVITE", BOB, call_id=call_id_on(1), body=body)
    msg.set("content-type", kind)
    alice.authenticated(msg)
    assert bob.ringing, alice.inbox
    offered = bob.requests(b"INVITE")[-1]
    assert offered.get("content-type") == kind
    part = sdp_part(kind, offered.body)
    assert part is not None and b"10.0.0.1" not in part.sdp
    host, _ = media_of(SipMessage.request("INVITE", BOB, [], body=part.sdp))
    assert host == "127.0.5.2"
    assert offered.body.endswith(body[body.index(b"\r\n--unique-boundary-1\r\n") :])
    assert int(offered.get("content-length") or b"0") == len(offered.body)
    answer, _ = _multipart(phone_sdp("10.0.0.2", 5000))
    call = bob.ringing[-1]
    bob.ringing.remove(call)
    response = make_response(
        call.request, 200, to_tag=call.tag, headers=(("contact", f"<{bob.contact}>"),), body=answer,
        content_type=kind, record_route=True,
    )  # fmt: skip
    bob.send(response, call.source)
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    answered = sdp_part(kind, ok.body)
    assert answered is not None and b"10.0.0.2" not in answered.sdp and b"127.0.5.2" in answered.sdp
    assert mf.commands() == [b"offer", b"answer"]


def test_a_multipart_body_without_sdp_goes_on_untouched() -> None:
    mf = MediaFarm()
    alice, bob = setup(mf)
    body = b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n"
    msg = alice.request("MESSAGE", BOB, call_id=call_id_on(1), body=body)
    msg.set("content-type", b"multipart/mixed;boundary=b1")
    alice.authenticated(msg)
    assert bob.requests(b"MESSAGE")[-1].body == body
    assert b"offer" not in mf.commands()


def test_a_re_invite_without_sdp_gets_its_offer_from_the_2xx() -> None:
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, bob, ok = establish(mf, call_id)
    again = alice.in_dialog("INVITE", ok)
    alice.send(again, alice.first_hop(again))
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000, version=2))
    reok = [m for m in alice.inbox if m.status == 200 and m.cseq == again.cseq]
    assert reok and media_of(reok[-1])[0] == "127.0.5.1"
    assert mf.commands() == [b"offer", b"answer", b"offer"]  # the 2xx's SDP is an offer now
    assert mf.ng_log[2][b"from-tag"] == ok.to_tag


# -- relay choice, records, WebRTC ------------------------------------------------------------------


def test_a_new_call_goes_to_the_least_loaded_relay() -> None:
    mf = MediaFarm(by_load=True)
    mf.table.update([RelayLoad(RELAYS[0], sessions=40), RelayLoad(RELAYS[1], sessions=3)])
    alice, _bob = setup(mf)
    for n in range(3):
        alice.authenticated(invite(alice, f"load-{n}"))
    assert len(mf.calls(1)) == 3  # 3 + up to 2 more calls of this node: still below 40
    mf.table.update([RelayLoad(RELAYS[0], sessions=0), RelayLoad(RELAYS[1], sessions=3)])
    alice.authenticated(invite(alice, "load-3"))
    assert mf.calls(0) == ["load-3"]


def test_a_full_or_dead_relay_is_tried_last() -> None:
    mf = MediaFarm(up=(1,), by_load=True)
    mf.table.update([RelayLoad(RELAYS[0], sessions=0), RelayLoad(RELAYS[1], sessions=10)])
    alice, _bob = setup(mf)
    alice.authenticated(invite(alice, "first"))
    mf.advance(1.1)  # relay 0 (least loaded) is dead: one ng timeout, then relay 1
    assert mf.calls(1) == ["first"]
    strays = len(mf.farm.stray_to("127.0.5.1"))
    alice.authenticated(invite(alice, "second"))
    assert mf.calls(1) == ["first", "second"]  # at once: relay 0 is suspect now
    assert len(mf.farm.stray_to("127.0.5.1")) == strays
    mf.table.update([RelayLoad(RELAYS[0], sessions=0, free_ports=2), RelayLoad(RELAYS[1], sessions=10)])
    mf.advance(6.0)  # the suspect mark is over, but relay 0 has no free port pair
    alice.authenticated(invite(alice, "third"))
    assert "third" in mf.calls(1)


def test_any_node_ends_the_call_on_the_relay_recorded_for_it() -> None:
    mf = MediaFarm(by_load=True)
    mf.table.update([RelayLoad(RELAYS[0], sessions=9), RelayLoad(RELAYS[1], sessions=0)])
    call_id = "recorded-call"
    alice, bob, ok = establish(mf, call_id)
    assert mf.calls(1) == [call_id]
    assert mf.farm.state.call_relays[call_id.encode()] == {ok.from_tag: "127.0.5.2:2223"}
    # another node (no memory of the call; its table would now pick relay 0) takes a re-INVITE
    other = RelayMedia(mf.client, RelayTable(), mf._now, calls=mf.farm.state)
    other.table.update([RelayLoad(RELAYS[0], sessions=0), RelayLoad(RELAYS[1], sessions=50)])
    mf.use(other)
    hold = alice.in_dialog("INVITE", ok)
    hold.set_body(phone_sdp("10.0.0.1", 4000, "sendonly", version=2), b"application/sdp")
    alice.send(hold, alice.first_hop(hold))
    assert media_of(bob.requests(b"INVITE")[-1])[0] == "127.0.5.2"
    mf.use(RelayMedia(mf.client, RelayTable(), mf._now, calls=mf.farm.state))  # and a third the BYE
    alice.send(alice.in_dialog("BYE", ok))
    assert mf.calls(1) == []
    assert mf.calls(0) == []
    assert call_id.encode() not in mf.farm.state.call_relays


WEBRTC_SDP = (
    b"v=0\r\no=- 7 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\na=ice-ufrag:abcd\r\n"
    b"a=ice-pwd:0123456789abcdefghijkl\r\na=fingerprint:sha-256 AB:CD\r\na=setup:actpass\r\na=rtcp-mux\r\n"
)


def test_a_browser_offer_asks_the_relay_for_plain_rtp_towards_the_desk_phone() -> None:
    mf = MediaFarm(refuse="DTLS-SRTP/ICE (WebRTC) media not supported by sipfarm relay")
    alice, bob = setup(mf)
    msg = alice.request("INVITE", BOB, call_id="webrtc-1", body=WEBRTC_SDP)
    msg.set("content-type", b"application/sdp")
    alice.authenticated(msg)
    offer = mf.ng_log[0]
    assert offer[b"transport-protocol"] == b"RTP/AVP"
    assert offer[b"DTLS"] == b"off"
    assert offer[b"ICE"] == b"remove"
    assert offer[b"rtcp-mux"] == [b"demux"]
    # sipfarm's relay cannot bridge it: the call goes on with its SDP untouched (even with
    # media_failure 503), on the first refusal, no other relay asked
    offered = bob.requests(b"INVITE")
    assert offered and offered[-1].body == WEBRTC_SDP
    assert mf.commands() == [b"offer"]
    answer_with_sdp(bob, WEBRTC_SDP.replace(b"10.0.0.1", b"10.0.0.2"))
    ok = alice.last(200, b"INVITE")
    assert ok is not None and b"10.0.0.2" in ok.body
    assert mf.commands() == [b"offer"]  # the answer too goes end to end
    alice.ack(ok)
    hold = alice.in_dialog("INVITE", ok)
    hold.set_body(WEBRTC_SDP.replace(b"a=rtcp-mux", b"a=sendonly"), b"application/sdp")
    alice.send(hold, alice.first_hop(hold))
    assert b"a=sendonly" in bob.requests(b"INVITE")[-1].body
    assert mf.commands() == [b"offer"]  # no relay asked again for a call none can carry


def test_the_answer_to_a_browser_caller_asks_for_webrtc_media() -> None:
    mf = MediaFarm()
    alice, bob = setup(mf)
    msg = alice.request("INVITE", BOB, call_id="webrtc-2", body=phone_sdp("10.0.0.1", 4000))
    msg.set("content-type", b"application/sdp")
    # alice's own Via as a WebSocket phone's, under the balancer's (RFC 7118)
    msg.set("via", msg.get("via").replace(b"SIP/2.0/UDP", b"SIP/2.0/WSS"))  # type: ignore[union-attr]
    alice.authenticated(msg)
    if not bob.ringing:
        pytest.skip("the in-memory phone's WSS Via is not routable here")
    answer_with_sdp(bob, phone_sdp("10.0.0.2", 5000))
    answer = next(m for m in mf.ng_log if m[b"command"] == b"answer")
    assert answer[b"ICE"] == b"force"
    assert answer[b"DTLS"] == b"passive"
    assert answer[b"transport-protocol"] == b"UDP/TLS/RTP/SAVPF"
    assert answer[b"rtcp-mux"] == [b"require"]


def test_a_desk_phone_calling_a_browser_offers_it_webrtc_media() -> None:
    mf = MediaFarm()
    alice = mf.farm.phone("alice", "10.0.0.1")
    bob = mf.farm.phone("bob", "10.0.0.2", contact="sip:bob@10.0.0.2:5060;transport=ws")
    for phone in (alice, bob):
        assert phone.register().status == 200  # type: ignore[union-attr]
    alice.authenticated(invite(alice, "desk-to-browser"))
    offer = mf.ng_log[0]
    assert offer[b"ICE"] == b"force"
    assert offer[b"transport-protocol"] == b"UDP/TLS/RTP/SAVPF"
    assert offer[b"DTLS"] == b"passive"
    assert offer[b"rtcp-mux"] == [b"offer"]


def test_a_long_call_id_is_remembered_in_bounded_bytes_and_the_call_still_works() -> None:
    """A Call-ID off the wire may be as long as a message: the node remembers its anchored
    calls under a bounded key, and offer, answer and BYE still find the call."""
    for late in (False, True):
        mf = MediaFarm()
        call_id = "long-" + "c" * 4096
        alice, bob, ok = late_offer_call(mf, call_id) if late else establish(mf, call_id)
        assert all(len(key) <= 17 for key in mf.media._calls)
        assert all(call.offerer is None or len(call.offerer) <= 512 for call in mf.media._calls.values())
        if late:
            ack = alice.in_dialog("ACK", ok)
            ack.set_body(phone_sdp("10.0.0.1", 4000), b"application/sdp")
            alice.send(ack, alice.first_hop(ack))
            assert media_of(bob.requests(b"ACK")[-1])[0].startswith("127.0.5.")
        else:
            assert media_of(ok)[0].startswith("127.0.5.")
        assert [len(c) for r in range(len(RELAYS)) for c in mf.calls(r)] != []
        alice.send(alice.in_dialog("BYE", ok))
        assert [c for r in range(len(RELAYS)) for c in mf.calls(r)] == []
        assert mf.commands()[-1] == b"delete"


def test_each_sdp_goes_to_the_relay_with_its_partys_own_address() -> None:
    """ng ``received-from`` is the IP each party's SIP came from (not its SDP's private
    address, not the node's peer): the only IPs, with the SDP's, that the relay lets latch
    that party's ports (RTP bleed, red team 2026-12-02).  Offer, answer, and the answer an
    ACK carries after a late offer."""
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, bob = setup(mf)
    msg = alice.request("INVITE", BOB, call_id=call_id, body=phone_sdp("192.168.1.10", 4000))
    msg.set("content-type", b"application/sdp")
    alice.authenticated(msg)
    answer_with_sdp(bob, phone_sdp("192.168.2.20", 5000))
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    offer, answer = mf.ng_log[0], mf.ng_log[1]
    assert offer[b"received-from"] == [b"IP4", b"10.0.0.1"]
    assert answer[b"received-from"] == [b"IP4", b"10.0.0.2"]
    caller, callee = mf.engines[0].call_ports(call_id)[0], mf.engines[0].call_ports(call_id)[2]
    assert caller.sources is not None and {"10.0.0.1", "192.168.1.10"} <= caller.sources
    assert callee.sources is not None and {"10.0.0.2", "192.168.2.20"} <= callee.sources
    assert "10.0.0.2" not in caller.sources


def test_the_answer_in_an_ack_goes_to_the_relay_with_the_callers_address() -> None:
    mf = MediaFarm()
    alice, _, ok = late_offer_call(mf, call_id_on(1))
    assert mf.ng_log[0][b"received-from"] == [b"IP4", b"10.0.0.2"]  # bob offered in the 2xx
    ack = alice.in_dialog("ACK", ok)
    ack.set_body(phone_sdp("192.168.1.10", 4000), b"application/sdp")
    alice.send(ack, alice.first_hop(ack))
    assert mf.ng_log[1][b"command"] == b"answer"
    assert mf.ng_log[1][b"received-from"] == [b"IP4", b"10.0.0.1"]


def test_a_new_calls_offer_names_its_owner_and_the_relay_bounds_it() -> None:
    """The node tells the relay whose call it is (the authenticated account): one account's
    calls hold at most max_ports_per_owner ports, so its ringing calls cannot take the whole
    range (red teams C and D, 2026-12-02); its next call is answered 503."""
    mf = MediaFarm()
    for engine in mf.engines.values():
        engine.max_ports_per_owner = 8  # two ringing calls of one stream per relay
    alice, bob = setup(mf)
    for n in range(5):  # a relay that refuses sends the call to the next: 2 + 2, then none
        alice.authenticated(invite(alice, f"own-{n}"))
    offers = [m for m in mf.ng_log if m[b"command"] == b"offer"]
    assert {m[b"owner"] for m in offers} == {b"<sip:alice@" + DOMAIN.encode() + b">"}
    assert len(bob.ringing) == 4
    assert alice.last(503, b"INVITE") is not None
    assert sorted(len(mf.calls(i)) for i in (0, 1)) == [2, 2]


def test_a_trusted_gateways_calls_are_not_bounded_as_one_owner() -> None:
    """A trusted gateway or trunk (the routing table's ``trusted``) brings many callers' calls
    from one address: the node names no owner for them, so the relays' per-owner bound (which
    would make it one caller: 503 past its hundredth call at once) does not apply. An untrusted
    caller's calls are its address's, bounded."""
    mf = MediaFarm()
    for engine in mf.engines.values():
        engine.max_ports_per_owner = 8
    table = RoutingTable.from_dict({"trusted": ["10.9.0.1/32"]})
    mf.farm.nodes[0].proxy.router = Router(frozenset({DOMAIN}), table)
    _, bob = setup(mf)
    gateway = mf.farm.phone("gw", "10.9.0.1")
    for n in range(6):
        msg = gateway.request("INVITE", BOB, call_id=f"gw-{n}", body=phone_sdp("10.9.0.1", 4000 + 2 * n))
        msg.set("content-type", b"application/sdp")
        msg.set("p-asserted-identity", b"<sip:alice@" + DOMAIN.encode() + b">")  # stripped on entry
        gateway.send(msg)
    assert len(bob.ringing) == 6 and gateway.last(503, b"INVITE") is None
    offers = [m for m in mf.ng_log if m[b"command"] == b"offer"]
    assert len(offers) == 6 and not any(b"owner" in m for m in offers)


@pytest.mark.parametrize(
    "body",
    [
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 phone.example.com\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n",
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\nm=audio 99999 RTP/AVP 0\r\n",
        b"this is not SDP at all",
    ],
    ids=["hostname", "bad_port", "garbage"],
)
def test_an_offer_the_relay_cannot_read_gets_488_not_503_and_fails_no_relay(body: bytes) -> None:
    """RFC 3261 21.4.26: an SDP offer the relay cannot read is the caller's to fix: 488 Not
    Acceptable Here, at once (the next relay would refuse it too), and no relay is marked
    failed for it. It got 503 with Retry-After: 5, so the caller came back with the same offer,
    and each one counted as a relay failure (red team, 2026-12-03)."""
    mf = MediaFarm()
    alice, bob = setup(mf)
    msg = alice.request("INVITE", BOB, call_id=call_id_on(0), body=body)
    msg.set("content-type", b"application/sdp")
    alice.authenticated(msg)
    mf.advance(1.0)
    assert alice.finals() == [488], alice.inbox
    assert not bob.requests(b"INVITE")
    ok = alice.authenticated(invite(alice, call_id_on(0) + "-2"))  # the relays still serve
    assert ok is not None
    assert bob.requests(b"INVITE")


def test_a_re_invite_after_the_bye_makes_a_relay_call_owned_by_its_sender() -> None:
    """The relay forgets a call at its BYE, but the dialog's sealed route still carries
    requests: each later re-INVITE made the call again with no owner, so one subscriber's
    re-INVITEs held ports past max_ports_per_owner (red team, 2026-12-03: 496 of 400). An
    in-dialog offer names its sender as the owner of a call it makes."""
    mf = MediaFarm()
    call_id = call_id_on(0)
    alice, _bob, ok = establish(mf, call_id)
    bye = alice.in_dialog("BYE", ok)
    alice.send(bye, alice.first_hop(bye))
    assert mf.calls(0) == []
    again = alice.in_dialog("INVITE", ok, cseq=ok.cseq[0] + 2)
    again.set_body(phone_sdp("10.0.0.1", 4002, version=3), b"application/sdp")
    alice.send(again, alice.first_hop(again))
    offers = [m for m in mf.ng_log if m.get(b"command") == b"offer"]
    assert offers[-1].get(b"owner") == b"10.0.0.1", offers[-1]
    assert offers[0].get(b"owner"), offers[0]  # the caller's account
