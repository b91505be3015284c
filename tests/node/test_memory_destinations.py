"""Where the node sends requests whose destination came from a message (a Contact, a Path the
phone wrote itself, an in-dialog Request-URI): never to loopback, internal networks or the
farm itself unless the operator allows it; always to farm elements that prove it with a seal
(the balancer's own Path entry) or a flow token."""

from __future__ import annotations

from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.sip.address import Address

BOB = f"sip:bob@{DOMAIN}"
REDIS = Address("udp", "127.0.0.200", 6379)  # an internal service on the node's machine


def _register_with(farm: MemFarm, phone: Phone, *, path: str | None = None, contact: str | None = None) -> None:
    msg = phone.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:{phone.user}@{DOMAIN}>", headers=(("expires", "600"),))
    if path is not None:
        msg.append("path", path)
    if contact is not None:
        msg.set("contact", contact)
    answer = phone.authenticated(msg)
    assert answer is not None and answer.status == 200


def _call(farm: MemFarm) -> list[int]:
    alice = farm.phone("alice", "10.0.0.1")
    assert alice.register().status == 200  # type: ignore[union-attr]
    alice.authenticated(alice.request("INVITE", BOB))
    return [m.status for m in alice.inbox if m.status >= 200 and m.cseq[1] == b"INVITE"]


def test_a_contact_naming_an_internal_service_is_never_called() -> None:
    farm = MemFarm()
    bob = farm.phone("bob", "10.0.0.2")
    _register_with(farm, bob, contact=f"<sip:bob@{REDIS.host}:{REDIS.port}>")
    assert _call(farm) == [480]
    assert farm.stray_to(REDIS.host, REDIS.port) == []


def test_a_path_the_phone_wrote_itself_is_checked_like_a_contact() -> None:
    farm = MemFarm()
    bob = farm.phone("bob", "10.0.0.2")
    _register_with(farm, bob, path=f"<sip:{REDIS.host}:{REDIS.port};lr>")
    assert _call(farm) == [480]
    assert farm.stray_to(REDIS.host, REDIS.port) == []


def test_a_balancer_path_entry_sealed_by_the_farm_is_reached_on_any_network() -> None:
    farm = MemFarm()
    bob = farm.phone("bob", "10.0.0.2")
    seal = farm.tokens.seal("127.0.0.250", 5060)  # a balancer's internal address, loopback here
    _register_with(farm, bob, path=f"<sip:127.0.0.250:5060;lr;sf={seal}>")
    _call(farm)
    assert [s.msg.method for s in farm.stray_to("127.0.0.250", 5060)] == [b"INVITE"]


def test_an_operator_allowed_network_is_reached() -> None:
    farm = MemFarm()
    farm.destinations.allow(["127.0.0.0/8"])
    bob = farm.phone("bob", "10.0.0.2")
    _register_with(farm, bob, contact="<sip:bob@127.0.0.201:5070>")
    _call(farm)
    assert [s.msg.method for s in farm.stray_to("127.0.0.201", 5070)] == [b"INVITE"]


def test_an_initial_request_preloaded_with_a_foreign_route_gets_404_and_goes_nowhere() -> None:
    farm = MemFarm()
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register().status == 200  # type: ignore[union-attr]
    alice = farm.phone("alice", "10.0.0.1")
    invite = alice.request("INVITE", BOB, headers=(("route", f"<sip:{REDIS.host}:{REDIS.port};lr>"),))
    alice.send(invite)
    assert [m.status for m in alice.inbox if m.status >= 200] == [404]
    assert farm.stray_to(REDIS.host, REDIS.port) == []
    assert [m for m in bob.inbox if m.method == b"INVITE"] == []


def test_a_route_naming_the_farm_domain_is_the_farms_own() -> None:
    """A phone whose outbound proxy is set to the domain preloads Route: <sip:farm.test;lr>."""
    farm = MemFarm()
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    alice = farm.phone("alice", "10.0.0.1")
    answer = alice.authenticated(alice.request("INVITE", BOB, headers=(("route", f"<sip:{DOMAIN};lr>"),)))
    assert answer is not None and answer.status == 200
