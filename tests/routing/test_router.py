"""The routing step: local domains are looked up, everything else refused (until rules exist)."""

from __future__ import annotations

from sipfarm.routing.router import Action, Router
from sipfarm.sip.parser import parse_message
from sipfarm.sip.uri import parse_uri

ROUTER = Router(frozenset({"farm.test"}))


def test_local_user_is_a_location_lookup():
    decision = ROUTER.decide(parse_uri("sip:B%6Fb@farm.test;user=phone"))
    assert decision.action is Action.LOCAL
    assert (decision.aor, decision.user, decision.domain) == ("Bob@farm.test", "Bob", "farm.test")


def test_foreign_domain_and_tel_are_refused():
    assert ROUTER.decide(parse_uri("sip:bob@elsewhere.test")).status == 403
    assert ROUTER.decide(parse_uri("tel:+15551234")).status == 403


def test_domain_without_user_is_404():
    assert ROUTER.decide(parse_uri("sip:farm.test")).status == 404


def test_route_calls_back():
    seen = []
    request = parse_message(
        b"INVITE sip:alice@farm.test SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1\r\n"
        b"From: <sip:bob@farm.test>;tag=1\r\nTo: <sip:alice@farm.test>\r\nCall-ID: c1\r\n"
        b"CSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    ROUTER.route(request, parse_uri("sip:alice@farm.test"), seen.append)
    assert seen and seen[0].action is Action.LOCAL
