"""rtpengine's ng control protocol (media/ng.py).

Messages are built as Kamailio's rtpengine module builds them (keys in insertion order, flags as
lists, ``received-from`` as ``[family, address]``).  Most tests drive NgController with an
in-memory relay and an injected clock; the last ones put it on a real UDP socket in front of a
RelayServer on 127.0.0.1 with two "phones" on 127.0.0.2 and 127.0.0.3.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from fixtures.relay import free_port_range
from hypothesis import given, settings
from hypothesis import strategies as st

from media.bencode import decode, encode
from media.ng import (
    DTLS_UNSUPPORTED,
    RECORDING_UNSUPPORTED,
    WEBRTC_UNSUPPORTED,
    CookieCache,
    NgController,
    NgServer,
)
from media.ports import PortAllocator
from media.relay import CallStats, MediaEndpoint, MediaPorts, RelayEngine, RelayServer
from media.sdp import SessionDescription

RELAY = "127.0.0.1"


def ng(cookie: str, *pairs: tuple[str, Any]) -> bytes:
    """An ng datagram with the dictionary's keys in the order given (as Kamailio writes them)."""
    body = b"d" + b"".join(encode(k) + encode(v) for k, v in pairs) + b"e"
    return cookie.encode() + b" " + body


def reply_of(cookie: str, data: bytes | None) -> dict[bytes, Any]:
    assert data is not None
    head, _, body = data.partition(b" ")
    assert head == cookie.encode()
    value = decode(body)
    assert isinstance(value, dict)
    return value


def phone_sdp(host: str, port: int, *, session: int = 1, version: int = 1, extra: str = "") -> bytes:
    return (
        "v=0\r\n"
        f"o=- {session} {version} IN IP4 {host}\r\n"
        "s=-\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=ice-ufrag:abcd\r\n"
        "a=ice-pwd:0123456789abcdef0123456789\r\n"
        f"a=candidate:1 1 UDP 2130706431 {host} {port} typ host\r\n"
        f"{extra}"
        "a=sendrecv\r\n"
    ).encode()


KAMAILIO_FLAGS: list[tuple[str, Any]] = [
    ("flags", ["trust-address"]),
    ("replace", ["origin", "session-connection"]),
    ("ICE", "remove"),
]


def offer(
    cookie: str, sdp: bytes, call_id: str = "call-1", from_tag: str = "ta", ice: str = "remove", **extra: Any
) -> bytes:
    return ng(
        cookie,
        ("sdp", sdp),
        *KAMAILIO_FLAGS[:2],
        ("ICE", ice),
        ("call-id", call_id),
        ("received-from", ["IP4", "127.0.0.2"]),
        ("from-tag", from_tag),
        *extra.items(),
        ("command", "offer"),
    )


def answer(cookie: str, sdp: bytes, call_id: str = "call-1", from_tag: str = "ta", to_tag: str = "tb") -> bytes:
    return ng(
        cookie,
        ("sdp", sdp),
        *KAMAILIO_FLAGS,
        ("call-id", call_id),
        ("received-from", ["IP4", "127.0.0.3"]),
        ("from-tag", from_tag),
        ("to-tag", to_tag),
        ("command", "answer"),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryRelay:
    """RelayServer's control surface over a bare engine: no sockets."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine

    async def offer(
        self,
        call_id: str,
        from_tag: str,
        media: Sequence[MediaEndpoint],
        to_tag: str | None = None,
        owner: str | None = None,
    ) -> list[MediaPorts]:
        return self.engine.offer(call_id, from_tag, media, to_tag, owner)

    async def answer(
        self, call_id: str, from_tag: str, to_tag: str, media: Sequence[MediaEndpoint]
    ) -> list[MediaPorts]:
        return self.engine.answer(call_id, from_tag, to_tag, media)

    def delete(self, call_id: str, from_tag: str | None = None, to_tag: str | None = None) -> CallStats:
        return self.engine.delete(call_id, from_tag, to_tag)

    def query(self, call_id: str) -> CallStats:
        return self.engine.query(call_id)

    def list_calls(self) -> list[str]:
        return self.engine.list_calls()


class Fixture:
    def __init__(self, min_port: int = 30000, max_port: int = 30099) -> None:
        self.clock = Clock()
        self.engine = RelayEngine(
            PortAllocator(min_port, max_port), clock=self.clock, sdp_allowed=lambda host, port: True
        )
        self.controller = NgController(MemoryRelay(self.engine), RELAY, self.clock, wall_clock=lambda: 1.7e9)

    def send(self, datagram: bytes) -> bytes | None:
        return asyncio.run(self.controller.handle(datagram))

    def call(self, cookie: str, datagram: bytes) -> dict[bytes, Any]:
        return reply_of(cookie, self.send(datagram))


def sdp_of(reply: dict[bytes, Any]) -> SessionDescription:
    assert reply[b"result"] == b"ok", reply
    return SessionDescription.parse(reply[b"sdp"])


# -- sans-IO -----------------------------------------------------------------------------------


def test_ping_pong() -> None:
    f = Fixture()
    assert f.send(b"5323_1 d7:command4:pinge") == b"5323_1 d6:result4:ponge"


def test_offer_and_answer_anchor_both_sdps_at_the_relay() -> None:
    f = Fixture()
    out = sdp_of(f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000))))
    body = out.to_bytes().decode()
    [b_ports] = f.engine.query("call-1").monologues[1].media
    assert f"m=audio {b_ports.ports.rtp} RTP/AVP 0 101\r\n" in body
    assert "c=IN IP4 127.0.0.1\r\n" in body and "192.168.1.10" not in body  # replace origin + session c=
    assert "o=- 1 1 IN IP4 127.0.0.1\r\n" in body
    assert "ice-" not in body and "candidate" not in body  # ICE=remove
    assert "a=rtpmap:101 telephone-event/8000\r\n" in body  # the rest verbatim

    out = sdp_of(f.call("c2", answer("c2", phone_sdp("10.0.0.20", 5000, session=7))))
    [a_ports] = f.engine.query("call-1").monologues[0].media
    assert out.media[0].port == a_ports.ports.rtp != b_ports.ports.rtp
    assert out.connection is not None and out.connection.address == RELAY
    # the engine got the phones' SDP addresses as pre-latch destinations
    a, b = f.engine.query("call-1").monologues
    assert a.media[0].rtp.destination == ("192.168.1.10", 4000)
    assert b.media[0].rtp.destination == ("10.0.0.20", 5000)


def test_without_replace_flags_the_phones_origin_and_session_c_stay() -> None:
    f = Fixture()
    datagram = ng(
        "c1", ("sdp", phone_sdp("192.168.1.10", 4000)), ("call-id", "x"), ("from-tag", "a"), ("command", "offer")
    )
    out = sdp_of(f.call("c1", datagram))
    assert out.origin.address == "192.168.1.10"
    assert out.connection is not None and out.connection.address == "192.168.1.10"
    assert out.media[0].connection is not None and out.media[0].connection.address == RELAY


def test_reinvite_reuses_the_ports_and_continues_the_origin_version() -> None:
    f = Fixture()
    first = sdp_of(f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000))))
    sdp_of(f.call("c2", answer("c2", phone_sdp("10.0.0.20", 5000))))
    free = f.engine.ports.free_ports
    # a session refresh: same SDP again -> same body, same version
    again = sdp_of(f.call("c3", offer("c3", phone_sdp("192.168.1.10", 4000), to_tag="tb")))
    assert again.to_bytes() == first.to_bytes()
    # hold: the phone changed its SDP (and its own version) -> the relay's version goes up by one
    held = phone_sdp("192.168.1.10", 4000, version=2).replace(b"a=sendrecv", b"a=sendonly")
    hold = sdp_of(f.call("c4", offer("c4", held, to_tag="tb")))
    assert hold.media[0].port == first.media[0].port
    assert hold.origin.session_version == first.origin.session_version + 1
    assert b"a=sendonly" in hold.to_bytes()
    assert f.engine.ports.free_ports == free


def test_repeated_cookie_gets_the_cached_reply_without_allocating_again() -> None:
    f = Fixture()
    datagram = offer("dup", phone_sdp("192.168.1.10", 4000))
    first = f.send(datagram)
    free = f.engine.ports.free_ports
    assert f.send(datagram) == first
    assert f.engine.ports.free_ports == free
    # a new cookie is a new message: a re-offer, the same ports again
    assert sdp_of(f.call("new", offer("new", phone_sdp("192.168.1.10", 4000)))).media[0].port == (
        sdp_of(reply_of("dup", first)).media[0].port
    )
    # the cache forgets after its TTL: the same cookie executes again
    f.clock.now += 31
    f.send(datagram)
    assert len(f.controller.cookies) == 1


def test_cookie_cache_is_bounded_least_recent_out() -> None:
    cache = CookieCache(ttl=30, size=3)
    for i in range(5):
        cache.put(b"%d" % i, b"r%d" % i, 0.0)
    assert len(cache) == 3
    assert cache.get(b"0", 1.0) is None and cache.get(b"4", 1.0) == b"r4"
    assert cache.get(b"4", 30.0) is None and len(cache) == 0


def test_a_duplicate_while_the_first_is_in_execution_is_dropped() -> None:
    f = Fixture()
    gate = asyncio.Event()
    relay = f.controller.relay
    assert isinstance(relay, MemoryRelay)
    plain_offer = relay.offer

    async def slow_offer(*args: Any, **kwargs: Any) -> list[MediaPorts]:
        await gate.wait()
        return await plain_offer(*args, **kwargs)

    relay.offer = slow_offer  # type: ignore[method-assign]
    datagram = offer("slow", phone_sdp("192.168.1.10", 4000))

    async def scenario() -> tuple[bytes | None, bytes | None]:
        first = asyncio.create_task(f.controller.handle(datagram))
        await asyncio.sleep(0)
        second = await f.controller.handle(datagram)
        gate.set()
        return await first, second

    first, second = asyncio.run(scenario())
    assert reply_of("slow", first)[b"result"] == b"ok"
    assert second is None and f.controller.dropped == 1
    assert len(f.engine.list_calls()) == 1


def test_delete_frees_the_ports_and_answers_the_totals() -> None:
    f = Fixture()
    free = f.engine.ports.free_ports
    f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000)))
    f.call("c2", answer("c2", phone_sdp("10.0.0.20", 5000)))
    reply = f.call("c3", ng("c3", ("call-id", "call-1"), ("from-tag", "ta"), ("to-tag", "tb"), ("command", "delete")))
    assert reply[b"result"] == b"ok"
    assert reply[b"totals"] == {
        b"RTP": {b"packets": 0, b"bytes": 0, b"errors": 0},
        b"RTCP": {b"packets": 0, b"bytes": 0, b"errors": 0},
    }
    assert set(reply[b"tags"]) == {b"ta", b"tb"}
    assert f.engine.ports.free_ports == free and f.engine.list_calls() == []
    again = f.call("c4", ng("c4", ("call-id", "call-1"), ("command", "delete")))
    assert again == {b"result": b"error", b"error-reason": b"Unknown call-id"}


def test_query_and_list() -> None:
    f = Fixture()
    for i in range(3):
        f.call(f"o{i}", offer(f"o{i}", phone_sdp("192.168.1.10", 4000), call_id=f"call-{i}", label="caller"))
    f.clock.now += 5
    f.call("a", answer("a", phone_sdp("10.0.0.20", 5000), call_id="call-0"))
    reply = f.call("q", ng("q", ("call-id", "call-0"), ("command", "query")))
    assert reply[b"result"] == b"ok"
    assert reply[b"created"] == 1_700_000_000 - 5 and reply[b"last signal"] == 1_700_000_000
    ta = reply[b"tags"][b"ta"]
    assert ta[b"label"] == b"caller" and ta[b"in dialogue with"] == b"tb"
    [media] = ta[b"medias"]
    rtp, rtcp = media[b"streams"]
    assert rtp[b"endpoint"] == {b"family": b"IPv4", b"address": b"192.168.1.10", b"port": 4000}
    assert rtp[b"flags"] == [b"RTP"] and rtcp[b"flags"] == [b"RTCP"] and rtcp[b"local port"] == rtp[b"local port"] + 1
    assert f.call("l", ng("l", ("command", "list")))[b"calls"] == [b"call-0", b"call-1", b"call-2"]
    assert f.call("l2", ng("l2", ("command", "list"), ("limit", 2)))[b"calls"] == [b"call-0", b"call-1"]


def test_disabled_streams_stay_disabled_and_get_no_port() -> None:
    f = Fixture()
    sdp = phone_sdp("192.168.1.10", 4000) + b"m=video 0 RTP/AVP 31\r\n"
    out = sdp_of(f.call("c1", offer("c1", sdp)))
    assert out.media[1].lines == ("m=video 0 RTP/AVP 31",)
    assert len(f.engine.query("call-1").monologues[0].media) == 1


def test_rtcp_mux_offered_is_confirmed_towards_the_offerer_on_a_single_port() -> None:
    f = Fixture()
    out = sdp_of(f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000, extra="a=rtcp-mux\r\n"))))
    assert out.media[0].rtcp_mux  # kept in the offer, with a fallback RTCP port (RFC 5761 5.1.1)
    back = sdp_of(f.call("c2", answer("c2", phone_sdp("10.0.0.20", 5000))))  # B does not mux
    assert back.media[0].rtcp_mux and back.media[0].rtcp is None  # A muxes on one relay port
    a, b = f.engine.query("call-1").monologues
    assert a.media[0].ports.rtcp_mux and not b.media[0].ports.rtcp_mux


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"c1 d7:command5:hello7:call-id1:xe", b"Unrecognized command 'hello'"),
        (b"c1 d7:call-id1:xe", b"No command in message"),
        (b"c1 le", b"Message is not a bencoded dictionary"),
        (b"c1 d7:command5:offer7:call-id1:x8:from-tag1:ae", b"No SDP body in message"),
        (b"c1 d7:command5:offer8:from-tag1:a3:sdp3:v=0e", b"No call-id in message"),
        (b"c1 d7:command5:offer7:call-id1:x3:sdp3:v=0e", b"No from-tag in message"),
        (b"c1 d7:command6:answer7:call-id1:x8:from-tag1:a3:sdp3:v=0e", b"No to-tag in message"),
        (b"c1 d7:command5:query7:call-id1:xe", b"Unknown call-id"),
        (b"c1 d7:command5:offer7:call-idi1ee", b"call id must be a string"),
        (b"c1 d7:command4:list5:limiti-1ee", b"limit must be a non-negative number"),
    ],
)
def test_bad_messages_get_an_error_reply(datagram: bytes, reason: bytes) -> None:
    reply = Fixture().call("c1", datagram)
    assert reply == {b"result": b"error", b"error-reason": reason}


def test_malformed_bencode_is_answered_when_the_cookie_is_readable() -> None:
    f = Fixture()
    reply = f.call("c1", b"c1 d7:command4:ping")
    assert reply[b"result"] == b"error"
    assert reply[b"error-reason"].startswith(b"Invalid bencoded data: truncated")
    for unaddressable in (b"", b"nocookie", b" d7:command4:pinge", b"x" * 200 + b" de"):
        assert f.send(unaddressable) is None
    assert f.controller.dropped == 4


def test_bad_sdp_answers_the_sdp_error() -> None:
    reply = Fixture().call("c1", offer("c1", b"v=0\r\ns=-\r\n"))
    assert reply == {b"result": b"error", b"error-reason": b"Failed to parse SDP: SDP has no o= line"}


def test_answer_for_an_unknown_tag_is_an_error() -> None:
    f = Fixture()
    f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000)))
    reply = f.call("c2", answer("c2", phone_sdp("10.0.0.20", 5000), from_tag="nobody"))
    assert reply == {b"result": b"error", b"error-reason": b"Unknown from-tag or to-tag"}


def test_dtls_and_srtp_offers_get_a_clear_error_and_allocate_nothing() -> None:
    f = Fixture()
    free = f.engine.ports.free_ports
    webrtc = (
        phone_sdp("192.168.1.10", 4000)
        .replace(b"RTP/AVP", b"UDP/TLS/RTP/SAVPF")
        .replace(b"a=sendrecv", b"a=fingerprint:sha-256 AB:CD\r\na=setup:actpass\r\na=sendrecv")
    )
    expected = {b"result": b"error", b"error-reason": DTLS_UNSUPPORTED.encode()}
    assert f.call("c1", offer("c1", webrtc)) == expected
    asked = offer("c2", phone_sdp("192.168.1.10", 4000), **{"transport-protocol": "UDP/TLS/RTP/SAVPF"})
    assert f.call("c2", asked) == expected
    assert f.call("c3", offer("c3", phone_sdp("192.168.1.10", 4000), **{"transport-protocol": "RTP/SAVP"})) == expected
    plain = offer("c4", phone_sdp("192.168.1.10", 4000), **{"transport-protocol": "RTP/AVP"})
    assert f.call("c4", plain)[b"result"] == b"ok"
    f.call("c5", ng("c5", ("call-id", "call-1"), ("command", "delete")))
    assert f.engine.ports.free_ports == free


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"ICE": "force"}, WEBRTC_UNSUPPORTED.encode()),
        ({"ICE": "lite-please"}, b"ICE=lite please not supported by this relay (it does not speak ICE)"),
        ({"flags": ["asymmetric"]}, b"asymmetric not supported: this relay always latches (symmetric RTP)"),
        ({"received-from": "127.0.0.2"}, b"received-from must be a list [family, address]"),
        ({"direction": "internal"}, b"direction must be a list of interface names"),
        ({"media timeout": "soon"}, b"media timeout must be a number"),
    ],
)
def test_unsupported_options_are_refused(extra: dict[str, Any], reason: bytes) -> None:
    f = Fixture()
    datagram = ng(
        "c1", ("sdp", phone_sdp("192.168.1.10", 4000)), ("call-id", "x"), ("from-tag", "a"), ("command", "offer")
    )
    datagram = datagram[:-1] + b"".join(encode(k) + encode(v) for k, v in extra.items()) + b"e"
    assert f.call("c1", datagram) == {b"result": b"error", b"error-reason": reason}
    assert f.engine.list_calls() == []


def test_accepted_options_as_kamailio_and_rtpengine_spell_them() -> None:
    f = Fixture()
    datagram = offer(
        "c1",
        phone_sdp("192.168.1.10", 4000, extra="a=rtcp-mux\r\n"),
        ice="default",
        **{
            "direction": ["internal", "external"],
            "rtcp-mux": ["demux"],
            "via-branch": "z9hG4bK1",
            "label": "caller",
            "media timeout": 30,
            "transport-protocol": "RTP/AVP",
        },
    ).replace(b"4:sdp", b"3:SDP", 1)
    out = sdp_of(f.call("c1", datagram))
    assert not out.media[0].rtcp_mux and "ice-ufrag" not in out.to_bytes().decode()
    kept = offer("c2", phone_sdp("192.168.1.10", 4000), call_id="call-2", ice="pass")
    assert b"a=ice-ufrag:abcd" in sdp_of(f.call("c2", kept)).to_bytes()


def test_ports_exhausted_is_the_relays_reason() -> None:
    f = Fixture(30000, 30003)  # two pairs: one call
    f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000)))
    reply = f.call("c2", offer("c2", phone_sdp("192.168.1.10", 4000), call_id="call-2"))
    assert reply == {b"result": b"error", b"error-reason": b"Ran out of ports"}


def test_an_unexpected_exception_is_logged_with_the_call_id_and_answered(caplog: pytest.LogCaptureFixture) -> None:
    f = Fixture()

    def broken(call_id: str) -> CallStats:
        raise RuntimeError("boom")

    f.controller.relay.query = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="sipfarm.media.ng"):
        reply = f.call("c1", ng("c1", ("command", "query"), ("call-id", "the-call")))
    assert reply == {b"result": b"error", b"error-reason": b"internal error"}
    assert "call_id=the-call" in caplog.text and f.controller.internal_errors == 1


def test_sdp_memory_is_freed_when_the_relay_times_a_call_out() -> None:
    f = Fixture()
    f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000)))
    assert "call-1" in f.controller._calls
    f.clock.now += 120
    f.engine.handle_timer(f.clock.now)
    f.call("p", b"p d7:command4:pinge")
    assert f.controller._calls == {}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_datagram_gets_a_bencoded_reply_or_none(data: bytes) -> None:
    f = Fixture()
    for datagram in (data, b"cookie " + data, b"cookie d7:command5:offer" + data):
        out = f.send(datagram)
        if out is None:
            continue
        reply = decode(out.partition(b" ")[2])
        assert isinstance(reply, dict) and reply[b"result"] in (b"ok", b"pong", b"error")
    assert f.controller.internal_errors == 0


# -- WebRTC: refused with one clear reason, nothing allocated -----------------------------------

BROWSER_FLAGS: dict[str, Any] = {  # what sipfarm's proxy sends towards a browser (rtpengine's gateway flags)
    "ICE": "force",
    "DTLS": "passive",
    "transport-protocol": "UDP/TLS/RTP/SAVPF",
    "rtcp-mux": ["offer", "require"],
    "SDES": ["off"],
    "flags": ["generate-mid"],
}
CRYPTO = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32\r\n"
FINGERPRINT = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"


def secure_sdp(proto: str, media_extra: str = "", session_extra: str = "") -> bytes:
    plain = phone_sdp("192.168.1.10", 4000, extra=media_extra).replace(b"RTP/AVP", proto.encode())
    return plain.replace(b"t=0 0\r\n", b"t=0 0\r\n" + session_extra.encode())


@pytest.mark.parametrize(
    ("sdp", "extra"),
    [
        (secure_sdp("UDP/TLS/RTP/SAVPF", FINGERPRINT + "a=setup:actpass\r\n"), {}),
        (secure_sdp("UDP/TLS/RTP/SAVP"), {}),
        (secure_sdp("RTP/SAVPF"), {}),
        (secure_sdp("RTP/SAVP", CRYPTO), {}),  # SDES-SRTP
        (phone_sdp("192.168.1.10", 4000), {"ICE": "force"}),
        (phone_sdp("192.168.1.10", 4000), {"ICE": "force-relay"}),
        (phone_sdp("192.168.1.10", 4000), {"DTLS": "passive"}),
        (phone_sdp("192.168.1.10", 4000), {"DTLS": "active"}),
        (phone_sdp("192.168.1.10", 4000), {"transport-protocol": "RTP/SAVP"}),
        (phone_sdp("192.168.1.10", 4000), {"transport-protocol": "RTP/SAVPF"}),
        (phone_sdp("192.168.1.10", 4000), {"transport-protocol": "UDP/TLS/RTP/SAVPF"}),
        (phone_sdp("192.168.1.10", 4000), BROWSER_FLAGS),
    ],
    ids=[
        "sdp-dtls-savpf", "sdp-dtls-savp", "sdp-savpf", "sdp-sdes",
        "ice-force", "ice-force-relay", "dtls-passive", "dtls-active", "tp-savp", "tp-savpf", "tp-dtls", "browser",
    ],
)  # fmt: skip
def test_webrtc_offers_get_the_webrtc_error_and_allocate_nothing(sdp: bytes, extra: dict[str, Any]) -> None:
    f = Fixture()
    free = f.engine.ports.free_ports
    datagram = ng("c1", ("sdp", sdp), ("call-id", "w"), ("from-tag", "a"), *extra.items(), ("command", "offer"))
    reply = f.call("c1", datagram)
    assert reply == {b"result": b"error", b"error-reason": WEBRTC_UNSUPPORTED.encode()}
    assert b"not supported" in reply[b"error-reason"]  # what proxies look for
    assert DTLS_UNSUPPORTED == WEBRTC_UNSUPPORTED
    assert f.engine.ports.free_ports == free and f.engine.list_calls() == [] and f.controller._calls == {}


@pytest.mark.parametrize(
    "sdp",
    [
        secure_sdp("RTP/AVP", CRYPTO),
        secure_sdp("RTP/AVP", session_extra=FINGERPRINT),
        secure_sdp("RTP/AVP", FINGERPRINT),
    ],
    ids=["crypto-on-avp", "session-fingerprint", "media-fingerprint"],
)
def test_keys_on_a_plain_profile_are_anchored_without_them(sdp: bytes) -> None:
    """The profile decides (red team, 2026-12-03: a made-up fingerprint kept a plain call off the
    relay, both parties' addresses end to end): anchored, keys and fingerprints dropped."""
    f = Fixture()
    reply = f.call("c1", ng("c1", ("sdp", sdp), ("call-id", "k"), ("from-tag", "a"), ("command", "offer")))
    assert reply[b"result"] == b"ok"
    assert b"crypto" not in reply[b"sdp"] and b"fingerprint" not in reply[b"sdp"]
    assert b"RTP/AVP" in reply[b"sdp"] and b"c=IN IP4 127.0.0.1" in reply[b"sdp"]  # the relay's


def test_a_browsers_answer_to_a_plain_offer_is_refused_and_the_call_kept() -> None:
    f = Fixture()
    f.call("c1", offer("c1", phone_sdp("192.168.1.10", 4000)))
    browser = secure_sdp("UDP/TLS/RTP/SAVPF", FINGERPRINT + "a=setup:active\r\n")
    reply = f.call("c2", answer("c2", browser))
    assert reply == {b"result": b"error", b"error-reason": WEBRTC_UNSUPPORTED.encode()}
    assert f.engine.list_calls() == ["call-1"]  # the proxy still deletes it (or a plain answer comes)


def test_webrtc_flags_that_ask_for_nothing_are_accepted() -> None:
    f = Fixture()
    datagram = ng(
        "c1",
        ("supports", ["load limit"]),
        ("sdp", phone_sdp("192.168.1.10", 4000)),
        ("flags", ["trust-address", "generate-mid", "strict-source"]),
        ("ICE", "remove"),
        ("DTLS", "off"),
        ("SDES", ["off"]),
        ("record call", "no"),
        ("delete delay", 0),
        ("call-id", "call-1"),
        ("from-tag", "ta"),
        ("command", "offer"),
    )
    assert sdp_of(f.call("c1", datagram)).media[0].line.proto == "RTP/AVP"


@pytest.mark.parametrize("extra", [{"record call": "yes"}, {"record-call": "on"}, {"flags": ["record-call"]}])
def test_recording_is_refused_not_silently_skipped(extra: dict[str, Any]) -> None:
    f = Fixture()
    datagram = ng("c1", ("sdp", phone_sdp("192.168.1.10", 4000)), ("call-id", "r"), ("from-tag", "a"),
                  *extra.items(), ("command", "offer"))  # fmt: skip
    assert f.call("c1", datagram) == {b"result": b"error", b"error-reason": RECORDING_UNSUPPORTED.encode()}
    assert f.engine.list_calls() == []


# -- fuzz: mutated ng messages -----------------------------------------------------------------

NG_KEYS = [
    "command", "call-id", "from-tag", "to-tag", "sdp", "flags", "replace", "ICE", "DTLS", "SDES", "rtcp-mux",
    "transport-protocol", "direction", "received-from", "label", "via-branch", "record call", "supports",
    "delete delay", "media timeout", "limit", "x-unknown",
]  # fmt: skip
NG_WORDS = [
    b"offer", b"answer", b"delete", b"query", b"list", b"ping", b"remove", b"force", b"passive", b"off", b"demux",
    b"offer", b"require", b"RTP/AVP", b"RTP/SAVP", b"UDP/TLS/RTP/SAVPF", b"origin", b"session-connection", b"IP4",
    b"127.0.0.2", b"call-1", b"ta", b"tb", b"yes", b"no", b"trust-address", b"",
]  # fmt: skip
bencode_values = st.recursive(
    st.one_of(st.sampled_from(NG_WORDS), st.binary(max_size=20), st.integers(-5, 70000)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from([k.encode() for k in NG_KEYS]), inner, max_size=4)
    ),
    max_leaves=12,
)
SDPS = [phone_sdp("192.168.1.10", 4000), secure_sdp("RTP/SAVP", CRYPTO), b"v=0\r\n", b""]


@st.composite
def ng_messages(draw: st.DrawFn) -> bytes:
    """A dictionary of ng keys (valid command and tags mostly) with values of any bencode type."""
    pairs: list[tuple[str, Any]] = [
        ("command", draw(st.sampled_from(["offer", "answer", "delete", "query", "list", "ping", "nope"]))),
        ("call-id", draw(st.sampled_from(["call-1", "call-2"]))),
        ("from-tag", "ta"),
        ("sdp", draw(st.sampled_from(SDPS))),
    ]
    if draw(st.booleans()):
        pairs.append(("to-tag", "tb"))
    pairs.extend((key, draw(bencode_values)) for key in draw(st.lists(st.sampled_from(NG_KEYS), max_size=6)))
    order = draw(st.permutations(range(len(pairs))))
    return b"d" + b"".join(encode(pairs[i][0]) + encode(pairs[i][1]) for i in order) + b"e"


def assert_answered(f: Fixture, datagram: bytes) -> None:
    out = f.send(datagram)
    if out is None:
        return
    reply = decode(out.partition(b" ")[2])
    assert isinstance(reply, dict) and reply[b"result"] in (b"ok", b"pong", b"error"), reply
    if reply[b"result"] == b"error":
        assert isinstance(reply[b"error-reason"], bytes) and reply[b"error-reason"]


@settings(max_examples=400, deadline=None)
@given(st.lists(ng_messages(), min_size=1, max_size=5))
def test_fuzz_random_ng_dictionaries_get_a_reply_never_an_exception(bodies: list[bytes]) -> None:
    f = Fixture()
    for n, body in enumerate(bodies):  # a sequence: offers, answers, deletes on the same calls
        assert_answered(f, b"k%d " % n + body)
    assert f.controller.internal_errors == 0


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_kamailio_messages_get_a_reply_never_an_exception(data: st.DataObject) -> None:
    valid = offer("k", phone_sdp("192.168.1.10", 4000), **{"rtcp-mux": ["demux"], "label": "x"})
    body = bytearray(valid.partition(b" ")[2])
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(body)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "digit"]))
        if action == "flip" and at < len(body):
            body[at] = data.draw(st.integers(0, 255))
        elif action == "insert":
            body[at:at] = data.draw(st.sampled_from([b"e", b"d", b"l", b"i", b"0:", b"9999:", b"-", b"i-1e", b"x"]))
        elif action == "delete":
            del body[at : at + data.draw(st.integers(1, 8))]
        elif action == "digit" and at < len(body):
            body[at] = ord(data.draw(st.sampled_from("0123456789")))
    f = Fixture()
    assert_answered(f, b"k " + bytes(body))
    assert_answered(f, b"k2 " + valid.partition(b" ")[2])  # still serving afterwards
    assert f.controller.internal_errors == 0


# -- real sockets: NgServer in front of a RelayServer --------------------------------------------


def rtp(seq: int, ssrc: int = 0xA) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"\xff" * 160


class Endpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))


async def endpoint(host: str) -> tuple[asyncio.DatagramTransport, Endpoint]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(Endpoint, local_addr=(host, 0))


async def receive(e: Endpoint, count: int) -> list[tuple[bytes, Any]]:
    return [await asyncio.wait_for(e.received.get(), 2.0) for _ in range(count)]


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((RELAY, port))
        except OSError:
            return False
        return True


async def test_offer_answer_media_query_delete_over_udp() -> None:
    engine = RelayEngine(PortAllocator(*free_port_range(100)), sdp_allowed=lambda host, port: host.startswith("127."))
    relay = RelayServer(engine, RELAY)
    server = await NgServer.listen(NgController(relay, RELAY), RELAY, 0)
    proxy, proxy_rx = await endpoint(RELAY)
    ta, pa = await endpoint("127.0.0.2")
    tb, pb = await endpoint("127.0.0.3")

    async def control(cookie: str, datagram: bytes) -> dict[bytes, Any]:
        proxy.sendto(datagram, server.address)
        [(data, _)] = await receive(proxy_rx, 1)
        return reply_of(cookie, data)

    try:
        a_host, a_port = ta.get_extra_info("sockname")
        b_port = tb.get_extra_info("sockname")[1]
        assert await control("1", b"1 d7:command4:pinge") == {b"result": b"pong"}
        to_b = sdp_of(await control("2", offer("2", phone_sdp(a_host, a_port))))
        # B is behind NAT: its SDP names 127.0.0.4, it sends from 127.0.0.3
        to_a = sdp_of(await control("3", answer("3", phone_sdp("127.0.0.4", b_port))))
        assert to_b.connection is not None and to_b.connection.address == RELAY
        assert to_a.connection is not None and to_a.connection.address == RELAY
        relay_for_b, relay_for_a = to_b.media[0].port, to_a.media[0].port  # where each phone sends
        assert relay.open_ports == 4
        free = engine.ports.free_ports

        # a retransmitted offer: the same reply, nothing allocated
        again = sdp_of(await control("2", offer("2", phone_sdp(a_host, a_port))))
        assert again.to_bytes() == to_b.to_bytes() and engine.ports.free_ports == free

        n = 20
        for seq in range(n):
            tb.sendto(rtp(seq, ssrc=0xB), (RELAY, relay_for_b))
        got = await receive(pa, n)
        assert {addr for _, addr in got} == {(RELAY, relay_for_a)}  # A hears the relay's port
        assert [d for d, _ in got] == [rtp(seq, ssrc=0xB) for seq in range(n)]
        for seq in range(n):
            ta.sendto(rtp(seq), (RELAY, relay_for_a))
        got = await receive(pb, n)  # B's real source, not its SDP address
        assert {addr for _, addr in got} == {(RELAY, relay_for_b)}

        status = await control("4", ng("4", ("call-id", "call-1"), ("command", "query")))
        assert status[b"totals"][b"RTP"] == {b"packets": 2 * n, b"bytes": 2 * n * 172, b"errors": 0}
        [a_media] = status[b"tags"][b"ta"][b"medias"]
        assert a_media[b"streams"][0][b"stats"][b"packets"] == n
        assert a_media[b"streams"][0][b"endpoint"][b"address"] == a_host.encode()

        gone = await control("5", ng("5", ("call-id", "call-1"), ("from-tag", "ta"), ("command", "delete")))
        assert gone[b"result"] == b"ok" and gone[b"totals"][b"RTP"][b"packets"] == 2 * n
        assert relay.open_ports == 0 and engine.ports.free_ports == 100
        await asyncio.sleep(0.05)  # transports close their sockets on the next loop iteration
        assert bindable(relay_for_a) and bindable(relay_for_b)

        # DTLS, garbage: error replies, and the server keeps serving
        webrtc = phone_sdp(a_host, a_port).replace(b"RTP/AVP", b"UDP/TLS/RTP/SAVPF")
        refused = await control("6", offer("6", webrtc, call_id="call-2"))
        assert refused == {b"result": b"error", b"error-reason": DTLS_UNSUPPORTED.encode()}
        assert (await control("7", b"7 d7:command"))[b"result"] == b"error"
        proxy.sendto(b"no-cookie-at-all", server.address)
        assert await control("8", b"8 d7:command4:pinge") == {b"result": b"pong"}
    finally:
        server.close()
        relay.close()
        for t in (proxy, ta, tb):
            t.close()


def test_long_call_ids_and_tags_are_kept_under_bounded_names_and_still_work() -> None:
    """Call-IDs and tags come from SIP, off the wire: each of the relay's calls keeps a long one
    as a fixed-size name, and offer, answer, query and delete all find the call by it."""
    f = Fixture(30000, 30999)
    long_id, long_from, long_to = "c" * 8192, "f" * 8192, "t" * 8192
    out = sdp_of(f.call("o", offer("o", phone_sdp("192.168.1.10", 4000), call_id=long_id, from_tag=long_from)))
    assert out.connection is not None and out.connection.address == RELAY
    sdp_of(f.call("a", answer("a", phone_sdp("10.0.0.20", 5000), call_id=long_id, from_tag=long_from, to_tag=long_to)))
    [kept] = f.engine.list_calls()
    assert kept.startswith("~") and len(kept) <= 40
    assert all(len(tag) <= 40 for tag in f.call("q", ng("q", ("call-id", long_id), ("command", "query")))[b"tags"])
    assert (
        f.call("d", ng("d", ("call-id", long_id), ("from-tag", long_from), ("command", "delete")))[b"result"] == b"ok"
    )
    assert f.engine.list_calls() == []


def test_other_scripts_digits_in_an_rtpmap_are_no_internal_error() -> None:
    """str.isdigit() takes "¹" (latin-1 0xB9), which int() refuses: found by the fuzz test once keys
    on a plain stream were anchored (2026-12-03)."""
    f = Fixture()
    for rate in ("\u00b9000", "8\u00b2", "\u0663"):
        sdp = phone_sdp("192.168.1.10", 4000).replace(b"PCMU/8000", f"PCMU/{rate}".encode())
        assert f.call(f"c{rate}", offer(f"c{rate}", sdp))[b"result"] == b"ok"
    assert f.controller.internal_errors == 0


def test_an_offer_of_too_many_media_sections_is_refused() -> None:
    from media import ng as ng_module  # noqa: PLC0415

    sections = "".join(f"m=audio {4000 + 2 * i} RTP/AVP 0\r\n" for i in range(ng_module.MAX_RELAYED_SECTIONS + 1))
    sdp = f"v=0\r\no=- 1 1 IN IP4 203.0.113.10\r\ns=-\r\nc=IN IP4 203.0.113.10\r\nt=0 0\r\n{sections}".encode()
    with pytest.raises(ng_module.sdp.SdpError, match="media sections"):
        ng_module._relay_media(ng_module.sdp.SessionDescription.parse(sdp))
    f = Fixture()  # the reply a proxy reads as the offer's defect (488 there, no other relay tried)
    reply = f.call("c1", offer("c1", sdp))
    assert reply == {b"result": b"error", b"error-reason": b"Failed to parse SDP: more than 16 media sections"}
