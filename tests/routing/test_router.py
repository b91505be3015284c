"""The routing step: local domains are looked up, everything else refused (until rules exist)."""

from __future__ import annotations

from sipfarm.routing.router import Action, Router
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
    ROUTER.route(None, parse_uri("sip:alice@farm.test"), seen.append)  # type: ignore[arg-type]
    assert seen and seen[0].action is Action.LOCAL
