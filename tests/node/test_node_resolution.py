"""Next hops named by host name are resolved without blocking the node (RFC 3263, A/AAAA).

Only names in /etc/hosts (localhost) are resolved for real here: no DNS query leaves the machine."""

from __future__ import annotations

import asyncio
import socket

import pytest
from fixtures.farm import DOMAIN, SipClient, sealed_record_route
from fixtures.startup import START_TIMEOUT_S

from sipfarm.transport.resolver import Resolver

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 30)


def _bye(client: SipClient, route: str, node: tuple[str, int], redis_url: str) -> bytes:
    """An in-dialog BYE whose route set is the node's own (sealed) Record-Route, then ``route``."""
    call_id = "resolve-" + route.rsplit(":", maxsplit=1)[-1].split(";", maxsplit=1)[0]
    own = sealed_record_route(redis_url, node, call_id)
    req = client.request("BYE", "sip:bob@127.0.0.1:5999", to=f"<sip:bob@{DOMAIN}>;tag=callee1",
                         headers=(("route", own), ("route", route)), call_id=call_id)
    return req.to_bytes()


def test_route_by_host_name_is_resolved(redis_url, start_node):
    node = start_node(redis_url)
    caller = SipClient()
    callee = SipClient()
    try:
        caller.send(_bye(caller, f"<sip:localhost:{callee.port};lr>", node.address, redis_url), node.address)
        forwarded = callee.recv(5.0)
        assert forwarded is not None and forwarded.method == b"BYE"
        assert forwarded.get("max-forwards") == b"69"
    finally:
        caller.close()
        callee.close()


def test_resolver_caches_answers_and_failures_and_coalesces_lookups():
    calls: list[str] = []

    async def fake(host: str):
        calls.append(host)
        await asyncio.sleep(0.01)
        if host == "gw.example":
            return [(socket.AF_INET6, 2, 17, "", ("2001:db8::5", 0, 0, 0)),
                    (socket.AF_INET, 2, 17, "", ("192.0.2.5", 0))]
        raise socket.gaierror("no such host")

    async def scenario() -> list[str | None]:
        resolver = Resolver(lookup=fake)
        answers: list[str | None] = []
        for _ in range(3):  # three requests waiting on one lookup
            resolver.resolve("gw.example", answers.append)
        resolver.resolve("nowhere.example", answers.append)
        await asyncio.sleep(0.05)
        resolver.resolve("gw.example", answers.append)  # cached: answered at once
        assert resolver.cached("nowhere.example") == ""  # negative answers are cached too
        return answers

    answers = asyncio.run(scenario())
    assert answers == ["192.0.2.5", "192.0.2.5", "192.0.2.5", None, "192.0.2.5"]  # IPv4 preferred
    assert calls == ["gw.example", "nowhere.example"]
