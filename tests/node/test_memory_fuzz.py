"""Property: nothing an outsider sends makes a node send anywhere but back to the outsider.

Hypothesis builds requests and responses as an attacker would (Request-URIs and Routes naming
victims, the node itself, the callee's flow; To tags, Max-Forwards 0..255, forged From,
garbage or copied credentials, forged Vias) and throws them at a node of an in-memory farm
where alice and bob are registered and reachable.  Whatever comes in, every datagram the node
sends goes to the attacker's own address: never to a victim, never to a phone.  And nothing
but a SipError (answered by the transport) escapes the node.  Classes of bugs, not cases: an
open relay, a reflected response, a stray forwarded, an unauthenticated request reaching a
phone all break the property."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memfarm import DOMAIN, MemFarm

from sipfarm.edge import flow_uri
from sipfarm.sip.address import Address

ATTACKER = Address("udp", "10.0.0.66", 5060)
VICTIMS = ["127.0.0.1:6379", "10.0.0.200:5060", "127.0.1.1:5060", "[::1]:5060", "10.0.0.2:5060"]


def _farm() -> MemFarm:
    farm = MemFarm()
    alice = farm.phone("alice", "10.0.0.1")
    bob = farm.phone("bob", "10.0.0.2")
    assert alice.register().status == 200  # type: ignore[union-attr]
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    farm.phone("mallory", ATTACKER.host)  # an endpoint that records what comes back
    return farm


def _uris(farm: MemFarm) -> list[str]:
    flow = flow_uri(farm.tokens, Address("udp", "10.0.0.2", 5060), "127.0.1.1", 5060).decode()[1:-1]
    return [
        f"sip:bob@{DOMAIN}",
        f"sip:{DOMAIN}",
        *(f"sip:x@{v}" for v in VICTIMS),
        "sip:x@127.0.0.1:6379;transport=tcp",
        "sip:x@127.0.0.1;maddr=10.0.0.200",
        flow,
        "tel:+15551234",
    ]


def _routes(farm: MemFarm) -> list[list[str]]:
    flow = flow_uri(farm.tokens, Address("udp", "10.0.0.2", 5060), "127.0.1.1", 5060).decode()
    wrong_seal = farm.tokens.seal("127.0.1.1", 5060, b"another-call")
    return [
        [],
        ["<sip:127.0.0.1:6379;lr>"],
        ["<sip:127.0.1.1:5060;lr>"],
        ["<sip:127.0.1.1:5060;lr>", "<sip:10.0.0.200;lr>"],
        [f"<sip:127.0.1.1:5060;lr;sf={wrong_seal}>", "<sip:127.0.0.1:6379;lr>"],
        [flow],
        [f"<sip:127.0.1.1:5060;lr;sf={farm.tokens.seal('127.0.1.1', 5060)}>"],  # an element seal
    ]


WRONG_CREDENTIALS = (
    'Digest username="alice", realm="farm.test", nonce="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", '
    'uri="sip:bob@farm.test", response="00000000000000000000000000000000", qop=auth, nc=00000001, cnonce="c"'
)
METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "INFO", "MESSAGE", "UPDATE", "REFER", "NOTIFY",
           "SUBSCRIBE", "PRACK", "REGISTER", "PUBLISH", "FOO"]  # fmt: skip

request_parts = st.fixed_dictionaries(
    {
        "method": st.sampled_from(METHODS),
        "uri": st.integers(0, 9),
        "route": st.integers(0, 6),
        "to_tag": st.booleans(),
        "max_forwards": st.sampled_from([0, 1, 2, 70, 255]),
        "from_user": st.sampled_from(["alice", "bob", "ceo", "mallory"]),
        "credentials": st.sampled_from(["none", "garbage", "alice-wrong"]),
        "via_host": st.sampled_from([ATTACKER.host, "127.0.0.1", "10.0.0.2"]),
        "via_port": st.sampled_from([5060, 6379]),
        "rport": st.booleans(),
        "identity": st.booleans(),
    }
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(request_parts, min_size=1, max_size=4))
def test_outsiders_get_answers_and_nothing_else(parts: list[dict[str, object]]) -> None:
    farm = _farm()
    before = len(farm.log)
    uris, routes = _uris(farm), _routes(farm)
    for p in parts:
        method = str(p["method"])
        to = f"<sip:bob@{DOMAIN}>" + (";tag=made-up" if p["to_tag"] else "")
        headers: list[tuple[str, str]] = [("route", r) for r in routes[int(p["route"])]]  # type: ignore[call-overload]
        if p["credentials"] == "garbage":
            headers.append(("proxy-authorization", 'Digest username="alice", realm="farm.test", nonce="x", uri="y"'))
        elif p["credentials"] == "alice-wrong":
            headers.append(("proxy-authorization", WRONG_CREDENTIALS))
        if p["identity"]:
            headers.append(("p-asserted-identity", f"<sip:ceo@{DOMAIN}>"))
        rport = ";rport" if p["rport"] else ""
        via = f"SIP/2.0/UDP {p['via_host']}:{p['via_port']};branch=z9hG4bKfuzz{len(farm.log)}{rport}"
        lines = [
            f"{method} {uris[int(p['uri'])]} SIP/2.0",  # type: ignore[call-overload]
            f"Via: {via}",
            f"Max-Forwards: {p['max_forwards']}",
            f"From: <sip:{p['from_user']}@{DOMAIN}>;tag=evil",
            f"To: {to}",
            f"Call-ID: fuzz-{len(farm.log)}",
            f"CSeq: 7 {method}",
            f"Contact: <sip:mallory@{ATTACKER.host}:{ATTACKER.port}>",
            *(f"{k}: {v}" for k, v in headers),
            "Content-Length: 0",
        ]
        farm.send(("\r\n".join(lines) + "\r\n\r\n").encode(), ATTACKER, farm.node_addresses[0])
        # and a forged response naming a victim below a Via of the node
        victim = VICTIMS[int(p["uri"]) % len(VICTIMS)]  # type: ignore[call-overload]
        forged = (
            f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.1.1:5060;branch=z9hG4bKabc\r\n"
            f"Via: SIP/2.0/TCP {victim};branch=z9hG4bKv\r\nFrom: <sip:a@{DOMAIN}>;tag=1\r\n"
            f"To: <sip:b@{DOMAIN}>;tag=2\r\nCall-ID: forged-{len(farm.log)}\r\nCSeq: 1 {method}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        farm.send(forged, ATTACKER, farm.node_addresses[0])
        farm.advance(1.0)
    sent = [s for s in farm.log[before:] if s.source.host == farm.node_addresses[0].host]
    elsewhere = [(s.dest, s.data[:60]) for s in sent if (s.dest.host, s.dest.port) != (ATTACKER.host, ATTACKER.port)]
    assert elsewhere == []
