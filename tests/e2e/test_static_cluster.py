"""The static cluster through a real farm: Redis, nodes a1 and a2 in group A, b1 in group B, and
a balancer whose rules pin a.test to A and b.test to B.

Phones of both domains register and call each other through the balancer; each node's own
``sipfarm_node_requests_total`` shows that a.test's REGISTERs and INVITEs reached only a1 and
a2 (both of them: the group is hashed over) and b.test's only b1.  Then both A nodes are
killed: a.test gets 503 with Retry-After from the balancer itself (counted in
``sipfarm_balancer_group_unavailable_total{group="A"}``) while b.test still registers and calls.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.farm import BalancerProcess, NodeProcess, SipClient, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S

from sipfarm.cluster.ring import HashRing
from sipfarm.ports import free_port
from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.store import AccountStore, create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

PASSWORD = "static-secret"
SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)
RULES = '[balancer]\ngroups = [\n  {domain = "a.test", group = "A"},\n  {domain = "b.test", group = "B"},\n]\n'


class Phone:
    """A UDP phone of ``user@domain``: registers and places or answers one call at a time."""

    def __init__(self, user: str, domain: str, proxy: tuple[str, int]) -> None:
        self.client = SipClient()
        self.user, self.domain, self.proxy = user, domain, proxy
        self.contact = f"<sip:{user}@127.0.0.1:{self.client.port}>"

    def close(self) -> None:
        self.client.close()

    def _request(
        self, method: str, uri: str, to: str, call_id: str, cseq: int, *headers: tuple[str, str]
    ) -> SipMessage:
        c = self.client
        msg = SipMessage.request(method, uri, [
            ("via", f"SIP/2.0/UDP 127.0.0.1:{c.port};branch=z9hG4bK{secrets.token_hex(8)};rport"),
            ("max-forwards", "70"), ("from", f"<sip:{self.user}@{self.domain}>;tag=t{call_id[:6]}"),
            ("to", to), ("call-id", call_id), ("cseq", f"{cseq} {method}"), *headers,
        ])  # fmt: skip
        msg.cseq = (cseq, method.encode())
        return msg

    def _with_digest(
        self, method: str, uri: str, to: str, *headers: tuple[str, str], body: bytes = b""
    ) -> SipMessage | None:
        """Send, answer one digest challenge (RFC 3261 22.2/22.3); the final response."""
        call_id = secrets.token_hex(8)
        req = self._request(method, uri, to, call_id, 1, *headers)
        if body:
            req.set_body(body, b"application/sdp")
        self.client.send(req, self.proxy)
        final = self.client.recv_final(call_id=call_id, cseq=1)
        if final is None or final.status not in (401, 407):
            return final
        if method == "INVITE":  # ACK of the non-2xx: the INVITE's branch (RFC 3261 17.1.1.3)
            ack = self._request("ACK", uri, (final.get("to") or b"").decode() or to, call_id, 1)
            ack.set("via", req.top_via_value)
            self.client.send(ack, self.proxy)
        header = "www-authenticate" if final.status == 401 else "proxy-authenticate"
        challenge = auth.parse_challenge(final.get_all(header)[0])
        creds = auth.build_credentials(challenge, self.user, PASSWORD, method, uri, secrets.token_hex(4))
        name = "authorization" if final.status == 401 else "proxy-authorization"
        req = self._request(method, uri, to, call_id, 2, *headers, (name, creds.decode()))
        if body:
            req.set_body(body, b"application/sdp")
        self.client.send(req, self.proxy)
        return self.client.recv_final(call_id=call_id, cseq=2)

    def register(self) -> int:
        reply = self._with_digest(
            "REGISTER", f"sip:{self.domain}", f"<sip:{self.user}@{self.domain}>",
            ("contact", self.contact), ("expires", "300"),
        )  # fmt: skip
        return reply.status if reply is not None else 0

    def invite_once(self, callee: Phone) -> SipMessage | None:
        """An INVITE without credentials; its final response."""
        uri = f"sip:{callee.user}@{callee.domain}"
        call_id = secrets.token_hex(8)
        self.client.send(self._request("INVITE", uri, f"<{uri}>", call_id, 1), self.proxy)
        return self.client.recv_final(call_id=call_id)

    def call(self, callee: Phone) -> int:
        """INVITE ``callee``; it answers 200; ACK and BYE follow. The INVITE's final status."""
        uri = f"sip:{callee.user}@{callee.domain}"
        done: list[int] = []

        def answer() -> None:
            invite = callee.wait_for(b"INVITE")
            if invite is not None:
                ok = make_response(invite, 200, to_tag=b"cal" + secrets.token_hex(3).encode(),
                                   headers=(("contact", callee.contact),), body=SDP,
                                   content_type=b"application/sdp", record_route=True)  # fmt: skip
                callee.client.send(ok, self.proxy)
                done.append(1)

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        final = self._with_digest("INVITE", uri, f"<{uri}>", ("contact", self.contact), body=SDP)
        answering.join(6)
        if final is None:
            return 0
        if final.status == 200:
            route = [("route", v.decode()) for v in reversed(final.values("record-route"))]
            target = final.values("contact")[0].decode().strip("<>")
            to = (final.get("to") or b"").decode()
            self.client.send(
                self._request("ACK", target, to, final.call_id.decode(), final.cseq[0], *route), self.proxy
            )
            bye = self._request("BYE", target, to, final.call_id.decode(), final.cseq[0] + 1, *route)
            self.client.send(bye, self.proxy)
            got = callee.wait_for(b"BYE")
            assert got is not None, "the BYE did not reach the callee"
            callee.client.send(make_response(got, 200), self.proxy)
            bye_final = self.client.recv_final(call_id=final.call_id, method="BYE")
            assert bye_final is not None and bye_final.status == 200
        return final.status

    def wait_for(self, method: bytes, timeout: float = 5.0) -> SipMessage | None:
        return self.client.recv_request(method, timeout)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        return str(reply.read().decode())


def requests_of(port: int, method: str) -> int:
    found = re.search(rf'^sipfarm_node_requests_total{{method="{method}"}} (\S+)$', scrape(port), re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def users_spread_over(ids: list[str], domain: str, count: int) -> list[str]:
    """``count`` users of ``domain`` whose AORs the balancer hashes onto every node of ``ids``
    (its REGISTER key is the To URI, see BalancerCore._aor_key)."""
    ring = HashRing(ids)
    users = [f"u{i}" for i in range(count)]
    i = count
    while {ring.lookup(f"sip:{u}@{domain}".encode()) for u in users} != set(ids):
        users[i % count] = f"u{i}"
        i += 1
    return users


async def add_accounts(redis_url: str, aors: list[tuple[str, str]]) -> None:
    redis = create_redis(redis_url)
    try:
        store = AccountStore(redis)
        for user, domain in aors:
            await store.add(user, domain, PASSWORD)
    finally:
        await redis.aclose()


def test_domains_reach_only_their_groups_nodes_and_a_dead_group_gets_503(
    redis_url: str,
    start_node: Callable[..., NodeProcess],
    start_balancer: Callable[..., BalancerProcess],
    tmp_path: Path,
) -> None:
    a_users = users_spread_over(["a1", "a2"], "a.test", 4)
    b_users = ["carol", "dave"]
    asyncio.run(add_accounts(redis_url, [(u, "a.test") for u in a_users] + [(u, "b.test") for u in b_users]))
    metrics: dict[str, int] = {}
    nodes: dict[str, NodeProcess] = {}
    for node_id, group in (("a1", "A"), ("a2", "A"), ("b1", "B")):
        metrics[node_id] = free_port(udp=False)
        nodes[node_id] = start_node(redis_url, node_id, extra=[
            "--domain", "a.test", "--domain", "b.test", "--group", group,
            "--metrics", f"127.0.0.1:{metrics[node_id]}",
        ])  # fmt: skip
    config = tmp_path / "balancer-groups.toml"
    config.write_text(RULES)
    lb_metrics = free_port(udp=False)
    lb = start_balancer(redis_url, extra=["--config", str(config), "--metrics", f"127.0.0.1:{lb_metrics}"])
    wait_nodes_usable(lb, 3)

    phones = {(u, "a.test"): Phone(u, "a.test", lb.address) for u in a_users}
    phones |= {(u, "b.test"): Phone(u, "b.test", lb.address) for u in b_users}
    try:
        for (user, domain), phone in phones.items():
            assert phone.register() == 200, f"{user}@{domain}: {lb.log()[-1500:]}"
        # each REGISTER is two requests (the challenge's and the authenticated one)
        registers = {node_id: requests_of(port, "REGISTER") for node_id, port in metrics.items()}
        assert registers["a1"] + registers["a2"] == 2 * len(a_users), registers
        assert registers["a1"] > 0 and registers["a2"] > 0, registers  # the group is hashed over
        assert registers["b1"] == 2 * len(b_users), registers

        alice, bob = (phones[(u, "a.test")] for u in a_users[:2])
        carol, dave = phones[("carol", "b.test")], phones[("dave", "b.test")]
        assert alice.call(bob) == 200
        assert carol.call(dave) == 200
        invites = {node_id: requests_of(port, "INVITE") for node_id, port in metrics.items()}
        assert invites["a1"] + invites["a2"] == 2 and invites["b1"] == 2, invites  # 407 round trip each

        # group A loses its last node: a.test gets 503 from the balancer, b.test goes on
        nodes["a1"].kill()
        nodes["a2"].kill()
        deadline = time.monotonic() + 10
        while (status := alice.register()) != 503 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert status == 503, status
        reply = alice.invite_once(bob)
        assert reply is not None and reply.status == 503 and reply.get("retry-after"), reply
        assert carol.register() == 200
        assert carol.call(dave) == 200
        assert requests_of(metrics["b1"], "INVITE") == 4
        deadline = time.monotonic() + 5
        pattern = re.compile(r'^sipfarm_balancer_group_unavailable_total\{group="A"\} (\S+)$', re.MULTILINE)
        while time.monotonic() < deadline:
            found = pattern.search(scrape(lb_metrics))
            if found and float(found.group(1)) >= 2:
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"no group_unavailable count for A: {scrape(lb_metrics)[-1500:]}")
    finally:
        for phone in phones.values():
            phone.close()
