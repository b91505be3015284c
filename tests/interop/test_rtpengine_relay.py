"""Debian's rtpengine (userspace) as the relay of a sipfarm node, with no change in the proxy.

The same call as tests/e2e/test_media_relay_call.py (redis, a node with ``SIPFARM_RELAYS``, two
hand-made UDP phones on 127.0.0.2 and 127.0.0.3), with ``rtpengine`` started by the test in
place of ``sipfarm relay``: both SDPs name rtpengine's address and ports, RTP flows both ways
through it, re-INVITEs (the caller's hold and resume, the callee's hold) pass, and after the BYE
rtpengine no longer knows the call; a 486 and a CANCEL after early media leave nothing there.

The second half checks, against rtpengine directly over ng, the flags a proxy must send when
one side of a call is a WebRTC browser (over SIP WebSocket) and the other a desk phone, so that
the lead can put them in the proxy.  Verified with rtpengine 10.5.3.5 (Debian bookworm):

Towards the browser (the SDP it will receive is DTLS-SRTP with ICE; the proxy sends these with
the offer when the callee is a WebSocket contact, and with the answer when the caller is)::

    "ICE": "force", "DTLS": "passive", "transport-protocol": "UDP/TLS/RTP/SAVPF",
    "rtcp-mux": ["offer", "require"], "SDES": ["off"], "flags": ["generate-mid"],
    "replace": ["origin", "session-connection"]

  ``"rtcp-mux": ["offer"]`` in an offer and ``["require"]`` in an answer (what
  sipfarm/proxy/relay_media.py sends today) work too: in an offer, ``["offer"]`` alone keeps
  a separate ``a=rtcp:<port+1>`` beside ``a=rtcp-mux``, ``"require"`` makes it the RTP port
  (``a=rtcp:<port>``), the form a browser with ``rtcpMuxPolicy: "require"`` expects; both pass.

  rtpengine's SDP then has ``UDP/TLS/RTP/SAVPF``, ``a=fingerprint:sha-256``, ``a=setup``
  (``actpass`` in an offer, ``passive`` in an answer), ``a=ice-ufrag``/``a=ice-pwd``, a host
  ``a=candidate``, ``a=rtcp-mux``, ``a=mid`` and no ``a=crypto`` (``SDES: off``; without it
  rtpengine adds twelve SDES crypto lines a browser does not need).

Towards the desk phone (plain RTP; with the offer when the caller is a browser, with the answer
when the callee is)::

    "ICE": "remove", "DTLS": "off", "transport-protocol": "RTP/AVP",
    "rtcp-mux": ["demux"], "SDES": ["off"], "replace": ["origin", "session-connection"]

  rtpengine's SDP then has ``RTP/AVP``, a media-level ``c=`` at rtpengine, ``a=rtcp:<port+1>``
  and none of ``a=fingerprint``, ``a=setup``, ``a=ice-*``, ``a=candidate``, ``a=crypto``,
  ``a=rtcp-mux``.

sipfarm's own relay answers every flag set of the first kind (and any offer whose SDP is
SRTP/DTLS) with ``DTLS-SRTP/ICE (WebRTC) media not supported by sipfarm relay; use
rtpengine`` and allocates nothing (tests/media/test_media_ng.py), so a WebRTC call needs
rtpengine as its relay.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.farm import NodeProcess, SipClient
from fixtures.media_phones import (
    CALLEE_HOST,
    CALLER_HOST,
    callee_in_dialog,
    cancel_of,
    drain,
    exchange_rtp,
    in_dialog,
    phone_sdp,
    recv_request,
    rtp_socket,
    sdp_direction,
    sdp_target,
    send_invite,
    ssrc_of,
)
from fixtures.relay import ng_request, start_relay
from fixtures.rtpengine import RtpengineProcess, rtpengine
from fixtures.startup import START_TIMEOUT_S

from media.ng import WEBRTC_UNSUPPORTED
from sipfarm.sip.message import make_response

__all__ = ["rtpengine"]  # the fixture, imported for pytest

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 30)

TO_BROWSER: dict[str, Any] = {
    "ICE": "force",
    "DTLS": "passive",
    "transport-protocol": "UDP/TLS/RTP/SAVPF",
    "rtcp-mux": ["offer", "require"],
    "SDES": ["off"],
    "flags": ["generate-mid"],
    "replace": ["origin", "session-connection"],
}
TO_DESK_PHONE: dict[str, Any] = {
    "ICE": "remove",
    "DTLS": "off",
    "transport-protocol": "RTP/AVP",
    "rtcp-mux": ["demux"],
    "SDES": ["off"],
    "replace": ["origin", "session-connection"],
}
WEBRTC_LINES = ("a=fingerprint:", "a=setup:", "a=ice-ufrag:", "a=ice-pwd:", "a=candidate:", "a=crypto:")


@pytest.fixture
def node(
    rtpengine: RtpengineProcess,
    redis_url: str,
    accounts: dict[str, str],
    start_node: Callable[..., NodeProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> NodeProcess:
    monkeypatch.setenv("SIPFARM_RELAYS", f"{rtpengine.ng[0]}:{rtpengine.ng[1]}")
    monkeypatch.setenv("SIPFARM_RELAY_TIMEOUT", "0.5")
    return start_node(redis_url)


def test_rtpengine_relays_a_call_through_hold_and_resume_and_bye_deletes_it(
    node: NodeProcess, rtpengine: RtpengineProcess
) -> None:
    alice, bob = SipClient(CALLER_HOST), SipClient(CALLEE_HOST)
    alice_rtp, bob_rtp = rtp_socket(CALLER_HOST), rtp_socket(CALLEE_HOST)
    alice_port, bob_port = alice_rtp.getsockname()[1], bob_rtp.getsockname()[1]
    try:
        reply = bob.register(node.address, "bob", "bob-secret")
        assert reply is not None and reply.status == 200, reply
        call_id = secrets.token_hex(10)
        send_invite(alice, node.address, phone_sdp(CALLER_HOST, alice_port), call_id)
        offered = recv_request(bob, b"INVITE")
        to_bob_side = sdp_target(offered.body)  # where bob sends: rtpengine
        assert to_bob_side[0] == "127.0.0.1" and rtpengine.owns(to_bob_side[1]), offered.body
        bob_tag = secrets.token_hex(4).encode()
        ok = make_response(
            offered,
            200,
            to_tag=bob_tag,
            headers=(("contact", f"<sip:bob@{bob.host}:{bob.port}>"),),
            body=phone_sdp(CALLEE_HOST, bob_port),
            content_type=b"application/sdp",
            record_route=True,
        )
        bob.send(ok, node.address)
        answered = alice.recv_final(5.0, call_id=call_id, cseq=2)
        assert answered is not None and answered.status == 200, answered
        to_alice_side = sdp_target(answered.body)
        assert to_alice_side[0] == "127.0.0.1" and rtpengine.owns(to_alice_side[1]), answered.body
        assert to_alice_side != to_bob_side
        alice.send(in_dialog(alice, "ACK", answered, 2), node.address)
        recv_request(bob, b"ACK")

        at_bob, at_alice = exchange_rtp(alice_rtp, to_alice_side, bob_rtp, to_bob_side)
        assert at_bob and {ssrc_of(p) for p in at_bob} == {0xA1}
        assert at_alice and {ssrc_of(p) for p in at_alice} == {0xB0B}
        status = ng_request(rtpengine.ng, {"command": "query", "call-id": call_id})
        assert status[b"result"] == b"ok" and status[b"totals"][b"RTP"][b"packets"] >= 2 * len(at_bob)

        # hold (sendonly -> recvonly), then resume; each re-INVITE goes through rtpengine again
        cseq = 3
        for version, (mine, theirs) in enumerate((("sendonly", "recvonly"), ("sendrecv", "sendrecv")), start=2):
            request = in_dialog(
                alice,
                "INVITE",
                answered,
                cseq,
                body=phone_sdp(CALLER_HOST, alice_port, version=version, direction=mine),
            )
            alice.send(request, node.address)
            got = recv_request(bob, b"INVITE")
            assert sdp_target(got.body) == to_bob_side, got.body  # the same rtpengine port
            assert sdp_direction(got.body) == mine
            reply_sdp = phone_sdp(CALLEE_HOST, bob_port, version=version, direction=theirs)
            bob.send(
                make_response(got, 200, body=reply_sdp, content_type=b"application/sdp", record_route=True),
                node.address,
            )
            final = alice.recv_final(5.0, call_id=call_id, cseq=cseq)
            assert final is not None and final.status == 200, final
            assert sdp_target(final.body) == to_alice_side, final.body
            assert sdp_direction(final.body) == theirs
            alice.send(in_dialog(alice, "ACK", answered, cseq), node.address)
            recv_request(bob, b"ACK")
            cseq += 1
        # the callee re-INVITEs too (its From tag is the offer's from-tag now)
        bob_invite = callee_in_dialog(
            bob, "INVITE", offered, ok, 1, body=phone_sdp(CALLEE_HOST, bob_port, version=4, direction="sendonly")
        )
        bob.send(bob_invite, node.address)
        got = recv_request(alice, b"INVITE")
        assert sdp_target(got.body) == to_alice_side and sdp_direction(got.body) == "sendonly", got.body
        alice_answer = phone_sdp(CALLER_HOST, alice_port, version=4, direction="recvonly")
        alice.send(
            make_response(got, 200, body=alice_answer, content_type=b"application/sdp", record_route=True),
            node.address,
        )
        final = bob.recv_final(5.0, call_id=call_id, method="INVITE")
        assert final is not None and final.status == 200, final
        assert sdp_target(final.body) == to_bob_side and sdp_direction(final.body) == "recvonly", final.body
        bob.send(callee_in_dialog(bob, "ACK", offered, ok, 1), node.address)
        recv_request(alice, b"ACK")

        drain(alice_rtp)
        drain(bob_rtp)
        at_bob, at_alice = exchange_rtp(alice_rtp, to_alice_side, bob_rtp, to_bob_side)
        assert at_bob and at_alice, "no media after the re-INVITEs"

        # hang up: the node's ng delete removes the call from rtpengine
        alice.send(in_dialog(alice, "BYE", answered, cseq), node.address)
        bye = recv_request(bob, b"BYE")
        bob.send(make_response(bye, 200), node.address)
        done = alice.recv_final(call_id=call_id, method="BYE")
        assert done is not None and done.status == 200, done
        deadline = time.monotonic() + 3
        while ng_request(rtpengine.ng, {"command": "query", "call-id": call_id})[b"result"] != b"error":
            assert time.monotonic() < deadline, "rtpengine still holds the call after BYE"
            time.sleep(0.1)
    finally:
        for closable in (alice, bob, alice_rtp, bob_rtp):
            closable.close()


# -- the ng flags for WebRTC, checked against rtpengine ------------------------------------------

FINGERPRINT = ":".join(["5A"] * 32)


def browser_sdp(setup: str = "actpass", mid: str = "0") -> bytes:
    """What a browser's RTCPeerConnection offers (or answers): DTLS-SRTP, ICE, rtcp-mux, BUNDLE."""
    return (
        "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
        f"a=group:BUNDLE {mid}\r\na=msid-semantic: WMS\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
        "a=candidate:1 1 udp 2122260223 127.0.0.4 50000 typ host generation 0\r\n"
        "a=ice-ufrag:Wbr1\r\na=ice-pwd:browserpassword0123456789\r\na=ice-options:trickle\r\n"
        f"a=fingerprint:sha-256 {FINGERPRINT}\r\na=setup:{setup}\r\na=mid:{mid}\r\n"
        "a=sendrecv\r\na=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


def ng_sdp(rtpengine: RtpengineProcess, message: dict[str, Any]) -> str:
    reply = ng_request(rtpengine.ng, message)
    assert reply[b"result"] == b"ok", reply
    sdp = reply[b"sdp"].decode()
    assert re.search(r"^c=IN IP4 127\.0\.0\.1\r$", sdp, re.M), sdp
    port = re.search(r"^m=audio (\d+) ", sdp, re.M)
    assert port and rtpengine.owns(int(port.group(1))), sdp
    return sdp


def assert_webrtc(sdp: str, setup: str) -> None:
    """An SDP a browser accepts: DTLS-SRTP (no SDES), ICE with a candidate at rtpengine, rtcp-mux."""
    assert re.search(r"^m=audio \d+ UDP/TLS/RTP/SAVPF ", sdp, re.M), sdp
    assert re.search(r"^a=fingerprint:sha-256 [0-9A-F:]{95}\r$", sdp, re.M), sdp
    assert f"a=setup:{setup}\r\n" in sdp
    assert "a=ice-ufrag:" in sdp and "a=ice-pwd:" in sdp
    assert re.search(r"^a=candidate:\S+ 1 UDP \d+ 127\.0\.0\.1 \d+ typ host", sdp, re.M), sdp
    assert "a=rtcp-mux\r\n" in sdp and "a=mid:" in sdp
    assert "a=crypto:" not in sdp


def assert_plain(sdp: str) -> None:
    """An SDP a desk phone accepts: RTP/AVP, nothing of WebRTC."""
    assert re.search(r"^m=audio \d+ RTP/AVP ", sdp, re.M), sdp
    assert not any(line in sdp for line in WEBRTC_LINES), sdp
    assert "a=rtcp-mux" not in sdp


MUX_VARIANTS = pytest.mark.parametrize(
    ("offer_mux", "answer_mux"), [(["offer", "require"], ["offer", "require"]), (["offer"], ["require"])]
)


@MUX_VARIANTS
def test_rtpengine_turns_a_desk_phones_offer_into_webrtc_for_a_browser_and_back(
    rtpengine: RtpengineProcess, offer_mux: list[str], answer_mux: list[str]
) -> None:
    call = {"call-id": secrets.token_hex(8), "from-tag": "desk"}
    flags = {**TO_BROWSER, "rtcp-mux": offer_mux}
    offer = ng_sdp(
        rtpengine, {"command": "offer", **call, "sdp": phone_sdp(CALLER_HOST, 4000), "via-branch": "z9hG4bK1", **flags}
    )
    assert_webrtc(offer, "actpass")
    mid = re.search(r"^a=mid:(\S+)\r$", offer, re.M)
    assert mid is not None
    answer = ng_sdp(
        rtpengine,
        {"command": "answer", **call, "to-tag": "browser", "sdp": browser_sdp("active", mid.group(1)), **TO_DESK_PHONE},
    )
    assert_plain(answer)
    assert re.search(r"^m=audio \d+ RTP/AVP 0\r$", answer, re.M), answer  # only what the desk offered
    assert ng_request(rtpengine.ng, {"command": "delete", **call})[b"result"] == b"ok"


@MUX_VARIANTS
def test_rtpengine_turns_a_browsers_offer_into_plain_rtp_for_a_desk_phone_and_back(
    rtpengine: RtpengineProcess, offer_mux: list[str], answer_mux: list[str]
) -> None:
    call = {"call-id": secrets.token_hex(8), "from-tag": "browser"}
    offer = ng_sdp(rtpengine, {"command": "offer", **call, "sdp": browser_sdp(), **TO_DESK_PHONE})
    assert_plain(offer)
    flags = {**TO_BROWSER, "rtcp-mux": answer_mux}
    answer = ng_sdp(
        rtpengine, {"command": "answer", **call, "to-tag": "desk", "sdp": phone_sdp(CALLEE_HOST, 5000), **flags}
    )
    assert_webrtc(answer, "passive")  # the browser offered actpass: rtpengine takes the passive role
    port = re.search(r"^m=audio (\d+) ", answer, re.M)
    assert port and f"a=rtcp:{port.group(1)}\r\n" in answer  # muxed: RTCP on the RTP port
    assert ng_request(rtpengine.ng, {"command": "delete", **call})[b"result"] == b"ok"


def wait_gone(rtpengine: RtpengineProcess, call_id: str, what: str) -> None:
    deadline = time.monotonic() + 3
    while ng_request(rtpengine.ng, {"command": "query", "call-id": call_id})[b"result"] != b"error":
        assert time.monotonic() < deadline, f"rtpengine still holds the call after {what}"
        time.sleep(0.1)


def test_busy_and_cancelled_calls_leave_nothing_in_rtpengine(node: NodeProcess, rtpengine: RtpengineProcess) -> None:
    alice, bob = SipClient(CALLER_HOST), SipClient(CALLEE_HOST)
    try:
        reply = bob.register(node.address, "bob", "bob-secret")
        assert reply is not None and reply.status == 200, reply
        # busy: bob answers 486, the caller gets it, the offer's session goes
        busy_id = secrets.token_hex(10)
        send_invite(alice, node.address, phone_sdp(CALLER_HOST, 40000), busy_id)
        offered = recv_request(bob, b"INVITE")
        assert rtpengine.owns(sdp_target(offered.body)[1])
        bob.send(make_response(offered, 486, to_tag=b"busy1"), node.address)
        final = alice.recv_final(5.0, call_id=busy_id, cseq=2)
        assert final is not None and final.status == 486, final
        wait_gone(rtpengine, busy_id, "a 486")

        # cancelled while ringing (183 with SDP: early media through rtpengine first)
        cancel_id = secrets.token_hex(10)
        invite = send_invite(alice, node.address, phone_sdp(CALLER_HOST, 40002), cancel_id)
        offered = recv_request(bob, b"INVITE")
        early = make_response(
            offered,
            183,
            to_tag=b"ring1",
            headers=(("contact", f"<sip:bob@{bob.host}:{bob.port}>"),),
            body=phone_sdp(CALLEE_HOST, 40004),
            content_type=b"application/sdp",
            record_route=True,
        )
        bob.send(early, node.address)
        # (the unACKed 486 of the busy call may come again meanwhile: only this call's answers)
        progress = alice.recv_response(5.0, call_id=cancel_id, cseq=2)
        while progress is not None and progress.status == 100:
            progress = alice.recv_response(5.0, call_id=cancel_id, cseq=2)
        assert progress is not None and progress.status == 183, progress
        assert rtpengine.owns(sdp_target(progress.body)[1]), progress.body
        alice.send(cancel_of(invite), node.address)
        cancelled = recv_request(bob, b"CANCEL")
        bob.send(make_response(cancelled, 200), node.address)
        bob.send(make_response(offered, 487, to_tag=b"ring1"), node.address)
        final = alice.recv_final(5.0, call_id=cancel_id, method="INVITE")
        assert final is not None and final.status == 487, final
        wait_gone(rtpengine, cancel_id, "a CANCEL")
    finally:
        alice.close()
        bob.close()


def test_the_browser_flag_set_rtpengine_bridges_is_refused_clearly_by_sipfarms_relay(
    rtpengine: RtpengineProcess, redis_url: str, tmp_path: Path
) -> None:
    relay = start_relay(redis_url, tmp_path)
    try:
        for sdp, flags in ((phone_sdp(CALLER_HOST, 4000), TO_BROWSER), (browser_sdp(), TO_DESK_PHONE)):
            message = {"command": "offer", "call-id": secrets.token_hex(8), "from-tag": "a", "sdp": sdp, **flags}
            assert ng_request(rtpengine.ng, message)[b"result"] == b"ok"
            refused = ng_request(relay.ng, message)
            assert refused == {b"result": b"error", b"error-reason": WEBRTC_UNSUPPORTED.encode()}
            assert b"not supported" in refused[b"error-reason"]
        assert ng_request(relay.ng, {"command": "list"})[b"calls"] == []  # nothing allocated
    finally:
        relay.stop()
