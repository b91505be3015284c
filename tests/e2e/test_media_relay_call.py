"""A call whose media goes through a relay, with real processes: redis-server, ``sipfarm relay``,
``sipfarm node`` configured with that relay (``SIPFARM_RELAYS``), and two hand-made UDP phones.

The caller's INVITE carries SDP naming its own RTP socket; the callee must get an SDP naming the
relay, and the caller a 200 whose SDP names the relay; RTP each phone sends to the relay port
its SDP names reaches the other phone; after the BYE the relay no longer knows the call (ng
``query`` answers an error).  A second test: with the relay gone, a new call is answered 503
after the ng timeout, and nothing rings.
"""

from __future__ import annotations

import secrets
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.farm import NodeProcess, SipClient
from fixtures.media_phones import (
    CALLEE_HOST,
    CALLER_HOST,
    in_dialog,
    phone_sdp,
    received_rtp,
    recv_request,
    rtp,
    rtp_socket,
    sdp_target,
    send_invite,
)
from fixtures.relay import RANGE, ng_request, start_relay
from fixtures.relay import RelayProcess as Relay
from fixtures.startup import START_TIMEOUT_S

from sipfarm.sip.message import make_response

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)


@pytest.fixture
def relay(redis_url: str, tmp_path: Path) -> Iterator[Relay]:
    proc = start_relay(redis_url, tmp_path)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def node(
    relay: Relay,
    redis_url: str,
    accounts: dict[str, str],
    start_node: Callable[..., NodeProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> NodeProcess:
    monkeypatch.setenv("SIPFARM_RELAYS", f"{relay.ng[0]}:{relay.ng[1]}")
    monkeypatch.setenv("SIPFARM_RELAY_TIMEOUT", "0.5")
    return start_node(redis_url)


def test_call_media_goes_through_the_relay_and_bye_frees_it(node: NodeProcess, relay: Relay) -> None:
    alice, bob = SipClient(CALLER_HOST), SipClient(CALLEE_HOST)
    alice_rtp, bob_rtp = rtp_socket(CALLER_HOST), rtp_socket(CALLEE_HOST)
    try:
        reply = bob.register(node.address, "bob", "bob-secret")
        assert reply is not None and reply.status == 200, reply
        call_id = secrets.token_hex(10)
        send_invite(alice, node.address, phone_sdp(CALLER_HOST, alice_rtp.getsockname()[1]), call_id)
        offered = recv_request(bob, b"INVITE")
        relay_for_bob = sdp_target(offered.body)
        assert relay_for_bob[0] == "127.0.0.1"
        assert relay.port_min <= relay_for_bob[1] < relay.port_min + RANGE
        bob_sdp = phone_sdp(CALLEE_HOST, bob_rtp.getsockname()[1])
        ok = make_response(
            offered,
            200,
            to_tag=secrets.token_hex(4).encode(),
            headers=(("contact", f"<sip:bob@{bob.host}:{bob.port}>"),),
            body=bob_sdp,
            content_type=b"application/sdp",
            record_route=True,
        )
        bob.send(ok, node.address)
        answered = alice.recv_final(5.0, call_id=call_id, cseq=2)
        assert answered is not None and answered.status == 200, answered
        relay_for_alice = sdp_target(answered.body)
        assert relay_for_alice[0] == "127.0.0.1"
        assert relay.port_min <= relay_for_alice[1] < relay.port_min + RANGE
        assert relay_for_alice != relay_for_bob
        ack = in_dialog(alice, "ACK", answered, 2)
        alice.send(ack, node.address)
        assert recv_request(bob, b"ACK").call_id == call_id.encode()

        # RTP both ways through the relay (the first packets latch each side)
        for seq in range(10):
            alice_rtp.sendto(rtp(seq, 0xA1), relay_for_alice)
            bob_rtp.sendto(rtp(seq, 0xB0B), relay_for_bob)
            time.sleep(0.01)
        for seq in range(10, 20):
            alice_rtp.sendto(rtp(seq, 0xA1), relay_for_alice)
            bob_rtp.sendto(rtp(seq, 0xB0B), relay_for_bob)
        at_bob, at_alice = received_rtp(bob_rtp), received_rtp(alice_rtp)
        assert at_bob and all(struct.unpack("!I", p[8:12])[0] == 0xA1 for p in at_bob)
        assert at_alice and all(struct.unpack("!I", p[8:12])[0] == 0xB0B for p in at_alice)
        assert ng_request(relay.ng, {"command": "query", "call-id": call_id})[b"result"] == b"ok"

        # hang up: the relay forgets the call
        bye = in_dialog(alice, "BYE", answered, 3)
        alice.send(bye, node.address)
        got = recv_request(bob, b"BYE")
        bob.send(make_response(got, 200), node.address)
        done = alice.recv_final(call_id=call_id, method="BYE")
        assert done is not None and done.status == 200
        deadline = time.monotonic() + 3
        while ng_request(relay.ng, {"command": "query", "call-id": call_id})[b"result"] != b"error":
            assert time.monotonic() < deadline, "the relay still holds the call after BYE"
            time.sleep(0.1)
    finally:
        for closable in (alice, bob, alice_rtp, bob_rtp):
            closable.close()


def test_a_new_call_gets_503_when_the_relay_is_gone(node: NodeProcess, relay: Relay) -> None:
    alice, bob = SipClient(CALLER_HOST), SipClient(CALLEE_HOST)
    try:
        reply = bob.register(node.address, "bob", "bob-secret")
        assert reply is not None and reply.status == 200, reply
        relay.stop()
        started = time.monotonic()
        call_id = secrets.token_hex(10)
        send_invite(alice, node.address, phone_sdp(CALLER_HOST, 40000), call_id)
        final = alice.recv_final(8.0, call_id=call_id, cseq=2)
        assert final is not None and final.status == 503, final
        # a relay timeout (0.5 s here), not Timer B's 32 s; room for a loaded CI machine
        assert time.monotonic() - started < 5.0
        assert bob.recv(0.3) is None  # nothing rang
        assert "event=relay_offer_failed" in node.log()
    finally:
        alice.close()
        bob.close()
