"""A call whose media goes through a relay, with real processes: redis-server, ``sipfarm relay``,
``sipfarm node`` configured with that relay (``SIPFARM_RELAYS``), and two hand-made UDP phones.

The caller's INVITE carries SDP naming its own RTP socket; the callee must get an SDP naming the
relay, and the caller a 200 whose SDP names the relay; RTP each phone sends to the relay port
its SDP names reaches the other phone; after the BYE the relay no longer knows the call (ng
``query`` answers an error).  A second test: with the relay gone, a new call is answered 503
after the ng timeout, and nothing rings.
"""

from __future__ import annotations

import re
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.farm import DOMAIN, NodeProcess, SipClient
from fixtures.relay import RANGE, ng_request, start_relay
from fixtures.relay import RelayProcess as Relay

from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage, make_response

pytestmark = pytest.mark.timeout(90)

CALLER_HOST = "127.0.0.2"
CALLEE_HOST = "127.0.0.3"


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


def phone_sdp(host: str, port: int) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    ).encode()


def sdp_target(sdp: bytes) -> tuple[str, int]:
    hosts = re.findall(rb"^c=IN IP4 (\S+)", sdp, re.M)  # the last: the media-level one
    port = re.search(rb"^m=audio (\d+)", sdp, re.M)
    assert hosts and port, sdp
    return hosts[-1].decode(), int(port.group(1))


def rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + b"\xff" * 160


def rtp_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(0.2)
    return sock


def received_rtp(sock: socket.socket, within: float = 1.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(2048))
        except TimeoutError:
            if got:
                break
    return got


def recv_request(client: SipClient, method: bytes, timeout: float = 3.0) -> SipMessage:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = client.recv(left)
        if msg is not None and msg.method == method:
            return msg
    raise AssertionError(f"no {method!r} arrived")


def send_invite(alice: SipClient, node: tuple[str, int], sdp: bytes, call_id: str) -> None:
    """INVITE bob with ``sdp``, answering the node's 407 (the 2nd INVITE goes on to bob)."""
    uri = f"sip:bob@{DOMAIN}"
    headers = (("contact", f"<sip:alice@{alice.host}:{alice.port}>"), ("content-type", "application/sdp"))
    invite = alice.request("INVITE", uri, call_id=call_id, headers=headers, body=sdp)
    alice.send(invite, node)
    challenge = alice.recv_final()
    assert challenge is not None and challenge.status == 407, challenge
    chal = auth.parse_challenge(challenge.get_all("proxy-authenticate")[0])
    creds = auth.build_credentials(chal, "alice", "alice-secret", "INVITE", uri, secrets.token_hex(4))
    again = alice.request(
        "INVITE", uri, call_id=call_id, cseq=2, headers=(*headers, ("proxy-authorization", creds.decode())), body=sdp
    )
    alice.send(again, node)


def in_dialog(client: SipClient, method: str, ok: SipMessage, cseq: int) -> SipMessage:
    """A request in the dialog of the 2xx ``ok`` (this client's INVITE): route set reversed."""
    remote = ok.name_addrs("contact")[0].uri
    headers = [
        ("via", f"SIP/2.0/UDP {client.host}:{client.port};branch=z9hG4bK{secrets.token_hex(8)};rport"),
        ("max-forwards", "70"),
        ("from", ok.get("from") or b""),
        ("to", ok.get("to") or b""),
        ("call-id", ok.call_id),
        ("cseq", f"{cseq} {method}"),
        *(("route", r) for r in reversed(ok.values("record-route"))),
    ]
    msg = SipMessage.request(method, str(remote), headers)
    msg.cseq = (cseq, method.encode())
    return msg


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
        answered = alice.recv_final(5.0)
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
        done = alice.recv_final()
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
        send_invite(alice, node.address, phone_sdp(CALLER_HOST, 40000), secrets.token_hex(10))
        final = alice.recv_final(5.0)
        assert final is not None and final.status == 503, final
        assert time.monotonic() - started < 3.0
        assert bob.recv(0.3) is None  # nothing rang
        assert "event=relay_offer_failed" in node.log()
    finally:
        alice.close()
        bob.close()
