"""The registrar in memory (RFC 3261 10.3): what a phone registering at a node sees.

No sockets, no Redis: :mod:`memfarm` runs the node's sans-IO core with a fake clock.
"""

from __future__ import annotations

import memfarm
import pytest
from memfarm import DOMAIN, MemFarm

from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage
from sipfarm.store.errors import StoreUnavailable


@pytest.fixture
def farm() -> MemFarm:
    return MemFarm()


def _contacts(response: SipMessage | None) -> list[bytes]:
    assert response is not None
    return response.values("contact")


def _challenges(response: SipMessage) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """The challenges of a 401/407 without their nonces (which always differ)."""
    parsed = [auth.parse_challenge(v) for v in response.get_all("www-authenticate")]
    return [(c.realm, c.algorithm, c.qop, c.stale) for c in parsed]


def test_register_is_challenged_with_401_then_accepted(farm: MemFarm) -> None:
    alice = farm.phone("alice", "10.0.0.1")
    request = alice.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:alice@{DOMAIN}>", headers=(("expires", "600"),))
    alice.send(request)
    challenge = alice.last()
    assert challenge is not None
    assert challenge.status == 401
    assert (challenge.get("www-authenticate") or b"").startswith(b"Digest ")
    alice.send(alice.authorize(challenge, request))
    answer = alice.last()
    assert answer is not None
    assert answer.status == 200
    assert answer.to_tag is not None
    assert _contacts(answer) == [b"<sip:alice@10.0.0.1:5060>;expires=600"]


def test_a_register_with_max_forwards_0_is_the_registrars_to_answer(farm: MemFarm) -> None:
    """The registrar is the REGISTER's UAS, not a proxy (RFC 3261 16.3 step 3 is a proxy's
    check): a phone sending Max-Forwards 1 reached the node at 0 behind the balancer, and got
    483 (red team, 2026-12-03)."""
    alice = farm.phone("alice", "10.0.0.1")
    request = alice.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:alice@{DOMAIN}>", max_forwards=0)
    answer = alice.authenticated(request)
    assert answer is not None and answer.status == 200


@pytest.mark.parametrize(
    ("entries", "size", "status"),
    [(2, 100, 200), (8, 200, 200), (9, 20, 403), (3, 900, 403)],
)
def test_a_binding_keeps_a_bounded_path(farm: MemFarm, entries: int, size: int, status: int) -> None:
    """A binding's Path comes back as the Route of every request to it, per branch: at most 8
    entries and 2 KB (red team, 2026-12-03: 64 entries of 900 bytes from a client sent
    straight to a node, ~3,800 times the bytes it sent came back); over it, 403."""
    alice = farm.phone("alice", "10.0.0.1")
    path = [("path", f"<sip:10.0.0.9:{5060 + i};lr;x={'y' * size}>") for i in range(entries)]
    answer = alice.register(headers=path)
    assert answer is not None and answer.status == status, answer and answer.reason


def test_200_lists_every_contact_of_the_address_of_record(farm: MemFarm) -> None:
    desk = farm.phone("bob", "10.0.0.2")
    mobile = farm.phone("bob", "10.0.0.3")
    assert desk.register().status == 200  # type: ignore[union-attr]
    answer = mobile.register(expires=1800)
    assert answer is not None
    assert answer.status == 200
    assert sorted(_contacts(answer)) == [
        b"<sip:bob@10.0.0.2:5060>;expires=3600",
        b"<sip:bob@10.0.0.3:5060>;expires=1800",
    ]


def test_a_binding_expires_and_the_user_becomes_unreachable(farm: MemFarm) -> None:
    bob = farm.phone("bob", "10.0.0.2", port=5070)
    alice = farm.phone("alice", "10.0.0.1")
    assert _contacts(bob.register(expires=60)) == [b"<sip:bob@10.0.0.2:5070>;expires=60"]
    farm.advance(30)
    query = bob.register(expires=60, contact="<sip:bob@10.0.0.9:5060>;expires=0")  # remove another: none
    assert _contacts(query) == [b"<sip:bob@10.0.0.2:5070>;expires=30"]
    farm.advance(31)
    answer = alice.authenticated(alice.request("INVITE", f"sip:bob@{DOMAIN}"))
    assert answer is not None
    assert answer.status == 480
    assert bob.requests(b"INVITE") == []


def test_contact_star_with_expires_0_removes_every_binding(farm: MemFarm) -> None:
    desk = farm.phone("bob", "10.0.0.2")
    mobile = farm.phone("bob", "10.0.0.3")
    desk.register()
    mobile.register()
    answer = desk.register(expires=0, contact="*")
    assert answer is not None
    assert answer.status == 200
    assert _contacts(answer) == []
    assert farm.state.bindings.get(f"bob@{DOMAIN}") == {}


def test_contact_star_without_expires_0_is_a_bad_request(farm: MemFarm) -> None:
    bob = farm.phone("bob", "10.0.0.2")
    answer = bob.register(expires=60, contact="*")
    assert answer is not None
    assert answer.status == 400


@pytest.mark.parametrize("expires", [60, 3600])
def test_the_200_gives_back_the_expiry_granted_when_the_clock_moves_on(
    monkeypatch: pytest.MonkeyPatch, expires: int
) -> None:
    """The 200 is built with a later clock reading than the binding's write: it still says
    what was granted (a phone copying 59 after asking for min_expires would get 423)."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(memfarm.Clock, "wall", lambda self: self.mono + self.wall_offset + next(ticks) * 0.003)
    bob = MemFarm().phone("bob", "10.0.0.2")
    assert _contacts(bob.register(expires=expires)) == [f"<sip:bob@10.0.0.2:5060>;expires={expires}".encode()]


def _register_at(farm: MemFarm, domain: str) -> tuple[SipMessage | None, SipMessage | None]:
    """alice's REGISTER with ``domain`` as her phone's domain (registrar and AOR): the first
    answer, and the final one after answering a challenge."""
    alice = farm.phone("alice", "10.0.0.1")
    request = alice.request(
        "REGISTER", f"sip:{domain}", to=f"<sip:alice@{domain}>", from_=f"<sip:alice@{domain}>"
    )  # fmt: skip
    alice.send(request)
    first = alice.last()
    assert first is not None
    if first.status != 401:
        return first, first
    return first, alice.authenticated(request)


def test_a_phone_with_the_farms_ip_as_its_domain_needs_that_ip_served_as_a_domain() -> None:
    """The README's recipe: ``[node] domains`` lists the IP, the accounts exist in that domain
    (the realm is the IP, like the domain's own accounts a separate name space)."""
    assert _register_at(MemFarm(), "192.0.2.10")[0].status == 403  # type: ignore[union-attr]
    farm = MemFarm(domains=(DOMAIN, "192.0.2.10"))
    farm.state.add_account("alice", "alice-pw", domain="192.0.2.10")
    challenge, answer = _register_at(farm, "192.0.2.10")
    assert challenge is not None
    assert _challenges(challenge)[0][0] == "192.0.2.10"
    assert _contacts(answer) == [b"<sip:alice@10.0.0.1:5060>;expires=3600"]
    assert "alice@192.0.2.10" in farm.state.bindings


def test_expiry_below_the_minimum_gets_423_with_min_expires(farm: MemFarm) -> None:
    bob = farm.phone("bob", "10.0.0.2")
    answer = bob.register(expires=30)
    assert answer is not None
    assert answer.status == 423
    assert answer.get("min-expires") == b"60"
    assert f"bob@{DOMAIN}" not in farm.state.bindings


def test_out_of_order_cseq_for_the_same_call_id_is_refused(farm: MemFarm) -> None:
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register(call_id="reg-1", cseq=10).status == 200  # type: ignore[union-attr]
    answer = bob.register(call_id="reg-1", cseq=3)
    assert answer is not None
    assert answer.status == 500  # RFC 3261 10.3 step 7
    assert bob.register(call_id="reg-1", cseq=20).status == 200  # type: ignore[union-attr]


def test_wrong_password_gets_401_again(farm: MemFarm) -> None:
    alice = farm.phone("alice", "10.0.0.1")
    answer = alice.register(password="not-her-password")
    assert answer is not None
    assert answer.status == 401
    assert answer.has("www-authenticate")
    assert f"alice@{DOMAIN}" not in farm.state.bindings


def test_unknown_user_gets_the_same_401_as_a_wrong_password(farm: MemFarm) -> None:
    alice = farm.phone("alice", "10.0.0.1")
    mallory = farm.phone("mallory", "10.0.0.66")
    wrong = alice.register(password="guess")
    unknown = mallory.register(password="guess")
    assert wrong is not None
    assert unknown is not None
    assert (unknown.status, unknown.reason) == (wrong.status, wrong.reason)
    assert [h[0] for h in unknown.headers] == [h[0] for h in wrong.headers]
    assert _challenges(unknown) == _challenges(wrong)


def test_register_while_redis_is_down_gets_503_with_retry_after(farm: MemFarm) -> None:
    alice = farm.phone("alice", "10.0.0.1")
    farm.state.fail_with = StoreUnavailable("connection refused")
    answer = alice.register()
    assert answer is not None
    assert answer.status == 503
    assert answer.get("retry-after") is not None
    farm.state.fail_with = None
    assert alice.register().status == 200  # type: ignore[union-attr]


def test_the_log_line_of_an_accepted_register_names_method_user_and_call(
    farm: MemFarm, caplog: pytest.LogCaptureFixture
) -> None:
    # a completed non-INVITE transaction releases its request on sending: the outcome line
    # must be written from the request as it was, not from the released placeholder
    alice = farm.phone("alice", "10.0.0.1")
    with caplog.at_level("INFO", logger="sipfarm"):
        answer = alice.register()
    assert answer is not None and answer.status == 200
    lines = [r.getMessage() for r in caplog.records if "status=200" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "method=REGISTER" in lines[0] and f"user=alice@{DOMAIN}" in lines[0], lines
    assert "source=udp:10.0.0.1:5060" in lines[0] and f"call_id={answer.call_id.decode()}" in lines[0], lines
