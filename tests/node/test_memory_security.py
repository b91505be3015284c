"""Attacks on a node, in memory (issue 8): what the attacker gets back, what its victim receives.

The attacker is a phone with no account (or a stolen one) on the in-memory network; the
"victim" of a relay attack is an address nobody listens on, so anything the node sends there
lands in :attr:`memfarm.MemFarm.stray`.  Tests marked ``xfail(strict=True)`` are protections
issue 8 asks for that the node does not have yet; the mark goes when the fix lands.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.metrics import NodeMetrics, sync_counters
from sipfarm.protect import GuardPolicy
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.headers import parse_name_addr
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.uri import SipURI
from sipfarm.store.location import Binding

BOB = f"sip:bob@{DOMAIN}"
VICTIM_HOST, VICTIM_PORT = "127.0.0.1", 6379  # say, a Redis without a password on loopback
IDENTITY_HEADERS = ("p-asserted-identity", "p-preferred-identity", "remote-party-id", "identity", "p-called-party-id")


@pytest.fixture
def farm() -> MemFarm:
    return MemFarm(nodes=2)


@pytest.fixture
def alice(farm: MemFarm) -> Phone:
    phone = farm.phone("alice", "10.0.0.1")
    assert phone.register().status == 200  # type: ignore[union-attr]
    return phone


@pytest.fixture
def bob(farm: MemFarm) -> Phone:
    phone = farm.phone("bob", "10.0.0.2")
    assert phone.register().status == 200  # type: ignore[union-attr]
    phone.inbox.clear()
    phone.answer = 200
    return phone


@pytest.fixture
def mallory(farm: MemFarm) -> Phone:
    """An outsider: no account, its own address."""
    return farm.phone("mallory", "10.6.6.6")


def finals(phone: Phone) -> list[int]:
    return [m.status for m in phone.inbox if m.status >= 200]


def last_sent(phone: Phone, method: bytes) -> SipMessage:
    return next(m for m in reversed(phone.sent) if m.method == method)


# -- 1: in-dialog requests as an open relay -----------------------------------------------------


@pytest.mark.parametrize("target", [f"{VICTIM_HOST}:{VICTIM_PORT}", "192.168.1.20:8080"], ids=["loopback", "internal"])
@pytest.mark.parametrize("route", [None, "<sip:10.9.9.9:5060;lr>"], ids=["no_route", "foreign_route"])
@pytest.mark.parametrize("method", ["BYE", "INFO", "INVITE", "OPTIONS"])
def test_in_dialog_request_not_routed_by_the_farm_gets_404_and_reaches_nobody(
    farm: MemFarm, mallory: Phone, method: str, route: str | None, target: str
) -> None:
    uri = f"sip:x@{target}"
    headers = [] if route is None else [("route", route)]
    mallory.send(mallory.request(method, uri, to=f"<{uri}>;tag=dlg1", headers=headers))
    assert finals(mallory) == [404]
    assert farm.stray_to(target.partition(":")[0]) == []
    assert farm.stray_to("10.9.9.9") == []


@pytest.mark.parametrize("route", [None, "<sip:10.9.9.9:5060;lr>"], ids=["no_route", "foreign_route"])
def test_an_ack_not_routed_by_the_farm_is_dropped(farm: MemFarm, mallory: Phone, route: str | None) -> None:
    uri = f"sip:x@{VICTIM_HOST}:{VICTIM_PORT}"
    headers = [] if route is None else [("route", route)]
    since = len(farm.log)
    mallory.send(mallory.request("ACK", uri, to=f"<{uri}>;tag=dlg1", headers=headers))
    farm.advance(1)
    assert farm.sent_by_node(0, since) == []
    assert mallory.inbox == []


@pytest.mark.parametrize("method", ["BYE", "INVITE", "OPTIONS"])
def test_in_dialog_request_to_the_node_itself_is_refused_at_once(farm: MemFarm, mallory: Phone, method: str) -> None:
    uri = "sip:x@127.0.1.1:5060"
    since = len(farm.log)
    mallory.send(mallory.request(method, uri, to=f"<{uri}>;tag=dlg1"))
    assert finals(mallory) in ([404], [482], [483])
    node = farm.node_addresses[0]
    to_itself = [s for s in farm.log[since:] if s.dest.host == node.host and s.source.host == node.host]
    assert to_itself == []
    farm.advance(40)
    assert farm.transactions(0) == 0


# -- 3: identity --------------------------------------------------------------------------------


def test_an_authenticated_caller_cannot_claim_another_users_from(farm: MemFarm, alice: Phone, bob: Phone) -> None:
    answer = alice.authenticated(alice.request("INVITE", BOB, from_=f'"CEO" <sip:ceo@{DOMAIN}>'))
    assert answer is not None
    assert answer.status == 403
    assert bob.requests() == []


def test_the_callee_sees_the_authenticated_identity_only(farm: MemFarm, alice: Phone, bob: Phone) -> None:
    forged = [
        ("p-asserted-identity", f'"CEO" <sip:ceo@{DOMAIN}>'),
        ("p-preferred-identity", f"<sip:ceo@{DOMAIN}>"),
        ("remote-party-id", f'"CEO" <sip:ceo@{DOMAIN}>;party=calling;screen=yes'),
        # a STIR PASSporT (copied from another call: it would verify downstream) and a called
        # party only the callee's proxy writes (red team, 2026-12-03)
        ("identity", "eyJhbGciOiJFUzI1NiJ9.eyJvcmlnIjp7InRuIjoiY2VvIn19.c2ln;info=<https://ceo.example/cert>"),
        ("y", "eyJhbGciOiJFUzI1NiJ9.eyJjZW8iOjF9.c2ln"),
        ("p-called-party-id", f"<sip:ceo@{DOMAIN}>"),
    ]
    answer = alice.authenticated(alice.request("INVITE", BOB, headers=forged))
    assert answer is not None
    assert answer.status == 200
    invite = bob.requests(b"INVITE")[0]
    asserted = invite.values("p-asserted-identity")
    assert len(asserted) == 1
    uri = parse_name_addr(asserted[0]).uri
    assert isinstance(uri, SipURI)
    assert uri.aor == f"alice@{DOMAIN}"
    assert not invite.has("p-preferred-identity")
    assert not invite.has("remote-party-id")
    assert not invite.has("identity") and not invite.has("p-called-party-id")
    assert all(b"ceo" not in v for name in IDENTITY_HEADERS for v in invite.get_all(name))


# -- 4: replayed credentials --------------------------------------------------------------------


@pytest.mark.parametrize("node", [0, 1], ids=["same_node", "other_node"])
def test_invite_credentials_replayed_for_another_callee_are_refused(
    farm: MemFarm, alice: Phone, bob: Phone, mallory: Phone, node: int
) -> None:
    carol = farm.phone("carol", "10.0.0.3")
    assert carol.register().status == 200  # type: ignore[union-attr]
    carol.inbox.clear()
    carol.answer = 200
    answer = alice.authenticated(alice.request("INVITE", BOB))
    assert answer is not None
    assert answer.status == 200
    captured = last_sent(alice, b"INVITE").get("proxy-authorization")
    assert captured is not None
    mallory.node = node
    replay = mallory.request(
        "INVITE", f"sip:carol@{DOMAIN}", from_user="alice", headers=[("proxy-authorization", captured)], cseq=2
    )
    mallory.send(replay)
    assert finals(mallory) == [400]  # the digest uri names bob, not carol
    assert carol.requests() == []


def test_invite_credentials_sent_first_by_an_on_path_attacker_reach_no_other_callee(
    farm: MemFarm, alice: Phone, bob: Phone, mallory: Phone
) -> None:
    # mallory holds back alice's authorised INVITE to bob and sends its credentials first,
    # for another Request-URI: the nonce use is new, the digest right, the uri names bob
    carol = farm.phone("carol", "10.0.0.3")
    assert carol.register().status == 200  # type: ignore[union-attr]
    carol.inbox.clear()
    carol.answer = 200
    invite = alice.request("INVITE", BOB)
    alice.send(invite)
    challenge = alice.last(407)
    assert challenge is not None
    captured = alice.authorize(challenge, invite).get("proxy-authorization")
    assert captured is not None
    spoofed = farm.phone("alice", "10.0.0.1", port=5098)  # alice's address: the nonce is bound to it
    spoofed.send(
        spoofed.request("INVITE", f"sip:carol@{DOMAIN}", from_user="alice", headers=[("proxy-authorization", captured)])
    )
    assert finals(spoofed) == [400]
    assert carol.requests() == []


@pytest.mark.parametrize("node", [0, 1], ids=["same_node", "other_node"])
def test_register_credentials_replayed_are_challenged(farm: MemFarm, alice: Phone, mallory: Phone, node: int) -> None:
    captured = last_sent(alice, b"REGISTER").get("authorization")
    assert captured is not None
    mallory.node = node
    replay = mallory.request(
        "REGISTER",
        f"sip:{DOMAIN}",
        to=f"<sip:alice@{DOMAIN}>",
        from_user="alice",
        headers=[("expires", "3600"), ("authorization", captured)],
        cseq=2,
    )
    mallory.send(replay)
    assert finals(mallory) == [401]
    assert [b.contact for b in farm.state.bindings[f"alice@{DOMAIN}"].values()] == ["sip:alice@10.0.0.1:5060"]


# -- 5: guessing passwords ----------------------------------------------------------------------


def test_ten_wrong_passwords_ban_the_source_even_for_the_right_one(farm: MemFarm) -> None:
    guesser = farm.phone("alice", "10.6.6.7")
    for i in range(10):
        assert guesser.register(password=f"guess-{i}").status == 401  # type: ignore[union-attr]
    assert guesser.register().status == 403  # type: ignore[union-attr]
    assert guesser.register().status == 403  # type: ignore[union-attr]
    real = farm.phone("alice", "10.0.0.1")
    assert real.register().status == 200  # type: ignore[union-attr]


def test_a_stale_password_on_one_phone_does_not_cut_off_its_office(farm: MemFarm) -> None:
    """An office behind one NAT address: bob's and alice's phones register (each account is
    marked working at that address), then alice's password is changed and her phone there keeps
    registering with the old one, every 30 s. Its failures do not ban the office at ten, as a
    stranger's would (below): bob keeps registering and calling. Past ``max_failures_working``
    (100) in the window, it is banned all the same (a guesser sharing the office's address gets
    no more than that against the accounts that work there)."""
    office = "10.0.0.5"
    bob = farm.phone("bob", office, port=5062)
    assert bob.register().status == 200  # type: ignore[union-attr]
    stale = farm.phone("alice", office, port=5064)
    assert stale.register().status == 200  # type: ignore[union-attr]
    for _ in range(30):
        assert stale.register(password="old-password").status == 401  # type: ignore[union-attr]
        farm.advance(5.0)
    assert bob.register().status == 200  # type: ignore[union-attr]
    stranger = farm.phone("alice", "10.6.6.8")
    for _ in range(10):
        assert stranger.register(password="guess").status == 401  # type: ignore[union-attr]
    assert stranger.register().status == 403  # type: ignore[union-attr]
    for _ in range(80):
        stale.register(password="old-password")
    assert bob.register().status == 403  # type: ignore[union-attr]


def test_logging_in_with_an_account_of_ones_own_earns_no_budget_against_others(farm: MemFarm) -> None:
    """A guesser holding one account (bob's: a customer, or stolen) logs in with it, then
    guesses alice's password from the same address: banned at ten failures, as any stranger
    (its success marks bob's account working there, not the address)."""
    attacker = "10.6.6.20"
    assert farm.phone("bob", attacker, port=5062).register().status == 200  # type: ignore[union-attr]
    guesser = farm.phone("alice", attacker, port=5064)
    for i in range(10):
        assert guesser.register(password=f"guess-{i}").status == 401  # type: ignore[union-attr]
    assert guesser.register().status == 403  # type: ignore[union-attr]


def test_guesses_for_an_unknown_user_count_like_wrong_passwords(farm: MemFarm) -> None:
    guesser = farm.phone("nobody", "10.6.6.8")
    for i in range(10):
        assert guesser.register(password=f"guess-{i}").status == 401  # type: ignore[union-attr]
    assert guesser.register(user="alice", password="alice-pw").status == 403  # type: ignore[union-attr]


def test_the_eleventh_answer_does_not_tell_unknown_users_from_known_ones(farm: MemFarm) -> None:
    answers = []
    for user, host in (("alice", "10.6.6.9"), ("nobody", "10.6.6.10")):
        guesser = farm.phone(user, host)
        for i in range(10):
            guesser.register(password=f"guess-{i}")
        eleventh = guesser.register(password="guess-10")
        assert eleventh is not None
        answers.append((eleventh.status, [h[0] for h in eleventh.headers if h[0] not in ("via", "contact")]))
    assert answers[0] == answers[1]


def test_guesses_for_an_unknown_user_mint_no_key_of_their_own(farm: MemFarm) -> None:
    # a counter per made-up user name would be keys an attacker mints at will: only the
    # source's counter (and its ban) for those; an account that exists gets its own
    for user, host in (("nobody", "10.6.6.11"), ("alice", "10.6.6.12")):
        guesser = farm.phone(user, host)
        assert guesser.register(password="guess").status == 401  # type: ignore[union-attr]
    keys = set(farm.keys._data)
    assert any("10.6.6.11" in k for k in keys) and any("10.6.6.12" in k for k in keys)
    assert any(f"alice@{DOMAIN}" in k for k in keys)
    assert not any("nobody" in k for k in keys), keys


LOCKING = GuardPolicy(max_failures=3, account_lock=6, window=300.0)


def _guess_from_many_sources(farm: MemFarm, user: str, sources: int, first: int = 1) -> None:
    """Two wrong passwords from each of ``sources`` addresses: none of them reaches the
    per-source ban (3), together past the account's lock (6)."""
    for n in range(first, first + sources):
        guesser = farm.phone(user, f"10.66.0.{n}")
        for i in range(2):
            assert guesser.register(password=f"guess-{n}-{i}").status == 401  # type: ignore[union-attr]


def test_guessing_spread_over_many_sources_locks_the_account_to_its_own_phones() -> None:
    farm = MemFarm(nodes=2, policy=LOCKING)
    alice = farm.phone("alice", "10.0.0.1")
    assert alice.register().status == 200  # type: ignore[union-attr]
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    _guess_from_many_sources(farm, "alice", 4)
    # a new address with the right password: as wrong a guess as any (no stale, no 200)
    lucky = farm.phone("alice", "10.66.1.1")
    answer = lucky.register()
    assert answer is not None and answer.status == 401
    assert not auth.parse_challenge(answer.get_all("www-authenticate")[0]).stale
    invite = lucky.authenticated(lucky.request("INVITE", BOB))
    assert invite is not None and invite.status == 407
    # alice's own phone still registers and calls, through either node
    for _ in range(2):
        assert alice.register().status == 200  # type: ignore[union-attr]
    call = alice.authenticated(alice.request("INVITE", BOB))
    assert call is not None and call.status == 200
    # bob is not locked by alice's attackers
    assert farm.phone("bob", "10.66.1.2").register().status == 200  # type: ignore[union-attr]
    # the lock ends with the failure window: the right password from a new address works again
    farm.advance(301, step=5.0)
    assert farm.phone("alice", "10.66.1.3").register().status == 200  # type: ignore[union-attr]


def test_a_locked_account_answers_a_stranger_as_an_unknown_user_does() -> None:
    farm = MemFarm(policy=LOCKING)
    assert farm.phone("alice", "10.0.0.1").register().status == 200  # type: ignore[union-attr]
    _guess_from_many_sources(farm, "alice", 4)
    answers = []
    for user, password, host in (("alice", "alice-pw", "10.66.1.4"), ("nobody", "x", "10.66.1.5")):
        answer = farm.phone(user, host).register(password=password)
        assert answer is not None
        answers.append((answer.status, [h[0] for h in answer.headers if h[0] not in ("via", "contact")]))
    assert answers[0] == answers[1]
    # made-up user names are never locked: they have no counter to lock
    _guess_from_many_sources(farm, "nobody", 4, first=20)
    assert not any("nobody" in k for k in farm.keys._data)


def test_a_locked_account_lets_in_a_phone_that_authenticated_from_its_address_lately() -> None:
    """Carol's phone registered from 10.0.0.3, then unregistered (rebooted, or its registration
    lapsed): no binding names its address any more. While guessers spread over many sources
    hold her account locked, the phone gets back in from the address it authenticated from
    within working_time; a new address does not, whatever the password."""
    farm = MemFarm(policy=LOCKING)
    phone = farm.phone("carol", "10.0.0.3")
    assert phone.register().status == 200  # type: ignore[union-attr]
    assert phone.register(expires=0).status == 200  # type: ignore[union-attr]
    _guess_from_many_sources(farm, "carol", 4)
    assert farm.phone("carol", "10.66.1.9").register().status == 401  # type: ignore[union-attr]
    assert phone.register().status == 200  # type: ignore[union-attr]
    call = phone.authenticated(phone.request("INVITE", BOB))
    assert call is not None and call.status != 407


def test_a_locked_account_with_no_binding_lets_nobody_in_until_the_window_ends() -> None:
    farm = MemFarm(policy=LOCKING)
    _guess_from_many_sources(farm, "carol", 4)
    assert farm.phone("carol", "10.0.0.3").register().status == 401  # type: ignore[union-attr]
    name, labels = "sipfarm_node_auth_failures_total", {"reason": "account_locked"}
    assert (farm.nodes[0].metrics.registry.get_sample_value(name, labels) or 0) >= 1
    farm.advance(301, step=5.0)
    assert farm.phone("carol", "10.0.0.3").register().status == 200  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("path", "received", "client"),
    [
        ("flow", "udp:127.0.2.1:5060", "10.0.0.9"),  # behind a balancer: its flow token names the phone
        ("<sip:10.9.9.9:5060;lr>", "udp:127.0.2.1:5060", None),  # someone else's Path: not known
        ("<sip:forged@127.0.1.1:5060;lr>", "udp:127.0.2.1:5060", None),  # a token the farm never made
        (None, "udp:10.0.0.1:5060", "10.0.0.1"),  # straight to the node
        (None, "tcp:[2001:db8::1]:5061", "2001:db8::1"),
        (None, "garbage", None),
    ],
    ids=["flow_token", "foreign_path", "forged_token", "received", "received_v6", "garbage"],
)
def test_the_known_client_of_a_binding(farm: MemFarm, path: str | None, received: str, client: str | None) -> None:
    if path == "flow":
        path = farm.flow_route(Address("udp", "10.0.0.9", 5062))
    binding = Binding(
        "sip:alice@10.0.0.9:5062", 0.0, 1.0, "c", 1, None, None, (path,) if path else (), received, "", "n", 0.0
    )
    assert farm.nodes[0].proxy.binding_client(binding) == client


def test_a_spoofed_source_cannot_get_its_victim_banned(farm: MemFarm) -> None:
    # mallory gets a real nonce at her own address, then sends wrong passwords with it from
    # alice's address (UDP sources are forged at will): the nonce was not issued there, so
    # no guess is counted for alice's address, and alice still registers
    mallory = farm.phone("alice", "10.6.6.13")
    invite = mallory.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:alice@{DOMAIN}>")
    mallory.send(invite)
    challenge = mallory.last(401)
    assert challenge is not None
    spoofed = farm.phone("alice", "10.0.0.1", port=5099)
    before = set(farm.keys._data)
    for i in range(12):
        spoofed.inbox.clear()
        spoofed.send(spoofed.authorize(challenge, invite, password=f"guess-{i}"))
        answer = spoofed.last()
        assert answer is not None and answer.status == 401
        assert auth.parse_challenge(answer.get_all("www-authenticate")[0]).stale
    assert set(farm.keys._data) == before
    alice = farm.phone("alice", "10.0.0.1")
    assert alice.register().status == 200  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["REGISTER", "INVITE"])
def test_credentials_with_a_nonce_the_farm_never_issued_write_nothing(
    farm: MemFarm, mallory: Phone, method: str
) -> None:
    # no response can match a made-up nonce: no guess to count, no nonce use to record, so a
    # flood of them (spoofed sources included) leaves no key; a fresh nonce with stale=true
    before = set(farm.keys._data)
    statuses = []
    for i in range(12):  # past max_failures: no ban either
        uri = f"sip:{DOMAIN}" if method == "REGISTER" else BOB
        header = "authorization" if method == "REGISTER" else "proxy-authorization"
        creds = (
            f'Digest username="nobody{i}", realm="{DOMAIN}", nonce="{"A" * 43}", uri="{uri}", '
            f'response="{"0" * 32}", algorithm=MD5'
        )
        mallory.inbox.clear()
        to = f"<sip:nobody{i}@{DOMAIN}>" if method == "REGISTER" else None
        mallory.send(mallory.request(method, uri, to=to, headers=[(header, creds)]))
        answer = mallory.last()
        assert answer is not None
        statuses.append(answer.status)
        challenge = answer.get("www-authenticate" if method == "REGISTER" else "proxy-authenticate") or b""
        assert b"stale=true" in challenge.lower(), answer
    assert statuses == [401 if method == "REGISTER" else 407] * 12
    assert set(farm.keys._data) == before


# -- 6: telling registered users apart without credentials --------------------------------------


@pytest.mark.parametrize("method", ["OPTIONS", "UPDATE", "BYE", "MESSAGE", "INFO", "SUBSCRIBE"])
def test_unauthenticated_requests_get_407_whoever_they_are_for(
    farm: MemFarm, mallory: Phone, bob: Phone, method: str
) -> None:
    seen = []
    for user in ("bob", "carol", "nobody"):  # registered, unregistered, missing
        mallory.inbox.clear()
        mallory.send(mallory.request(method, f"sip:{user}@{DOMAIN}"))
        seen.append(finals(mallory))
    assert seen == [[407], [407], [407]]
    assert bob.requests() == []


# -- 11: forged responses -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_a_forged_stray_2xx_is_not_relayed_to_its_second_via(farm: MemFarm, mallory: Phone, transport: str) -> None:
    body = b"FLUSHALL\r\nSET sipfarm:owned 1\r\n"
    forged = (
        b"SIP/2.0 200 OK\r\n"
        b"Via: SIP/2.0/UDP 127.0.1.1:5060;branch=z9hG4bKforged1\r\n"
        b"Via: SIP/2.0/" + transport.encode() + b" 127.0.0.1:6379;branch=z9hG4bKvictim1\r\n"
        b"From: <sip:alice@farm.test>;tag=f1\r\n"
        b"To: <sip:bob@farm.test>;tag=t1\r\n"
        b"Call-ID: forged-1\r\n"
        b"CSeq: 1 INVITE\r\n"
        b"Contact: <sip:bob@10.6.6.6:5060>\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    mallory.send(forged)
    assert [s for s in farm.log if s.dest.host == VICTIM_HOST] == []


# -- 12: flow tokens as a way in ----------------------------------------------------------------


@pytest.mark.parametrize("seen_in", ["path", "record_route"])
@pytest.mark.parametrize("method", ["INVITE", "MESSAGE", "OPTIONS"])
def test_an_out_of_dialog_request_routed_by_a_flow_token_is_refused(
    farm: MemFarm, alice: Phone, mallory: Phone, method: str, seen_in: str
) -> None:
    bob = farm.tcp_phone("bob", "10.0.0.4")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    (binding,) = farm.state.bindings[f"bob@{DOMAIN}"].values()
    if seen_in == "path":
        (route,) = binding.path  # the node's own entry naming bob's connection, token and all
    else:
        answer = alice.authenticated(alice.request("INVITE", BOB))
        assert answer is not None
        assert answer.status == 200
        # the entry naming bob's connection: the one with a user part (the token)
        (token_entry,) = [v for v in answer.values("record-route") if b"@" in v]
        route = token_entry.decode()
    bob.inbox.clear()
    mallory.send(mallory.request(method, binding.contact, headers=[("route", route)]))
    # a Record-Route's token is a dialog token: invalid in another Call-ID's request (400)
    assert finals(mallory) in ([403], [404]) if seen_in == "path" else [[400]]
    assert bob.inbox == []


@pytest.mark.parametrize("method", ["MESSAGE", "INVITE", "BYE"])
def test_a_flow_token_seen_in_one_dialog_opens_no_other(farm: MemFarm, alice: Phone, method: str) -> None:
    """Red team (2026-12-03): the token naming bob's connection in one call's Record-Route,
    put after the node's sealed entries of another dialog of the caller's own (to carol), made
    the node deliver that dialog's requests on bob's connection, From anyone. A Record-Route
    token is valid in its own dialog's requests only (400 in any other)."""
    bob = farm.tcp_phone("bob", "10.0.0.4")
    carol = farm.tcp_phone("carol", "10.0.0.5")
    for phone in (bob, carol):
        assert phone.register().status == 200  # type: ignore[union-attr]
        phone.answer = 200
    first = alice.authenticated(alice.request("INVITE", BOB))
    assert first is not None and first.status == 200
    (bob_entry,) = [v for v in first.values("record-route") if b"@" in v]
    second = alice.authenticated(alice.request("INVITE", f"sip:carol@{DOMAIN}"))
    assert second is not None and second.status == 200
    route_set = [v for v in reversed(second.values("record-route")) if b"@" not in v] + [bob_entry]
    request = alice.in_dialog(method, second)
    request.set("route", b", ".join(route_set))
    request.set("from", f"<sip:erin@{DOMAIN}>;tag={second.from_tag.decode()}")  # type: ignore[union-attr]
    bob.inbox.clear()
    alice.inbox.clear()
    alice.send(request, farm.node_addresses[0])
    assert finals(alice) == [400]
    assert bob.inbox == []


@pytest.mark.parametrize("method", ["INFO", "OPTIONS", "INVITE", "ACK"])
@pytest.mark.parametrize(
    "next_hop",
    ["token_moved", "token_moved_tcp", "legacy_token", "token_maddr", "element_seal_maddr", "dialog_seal_maddr"],
)
def test_a_dialogs_own_route_set_cannot_send_the_node_elsewhere(
    farm: MemFarm, alice: Phone, method: str, next_hop: str
) -> None:
    """A caller holds its dialog's Record-Route: the node's entries sealed for its Call-ID and
    a flow token. After them, a next hop that looks like the farm's, but points elsewhere: a
    token copied into a URI naming another host (a token is valid only where the farm wrote
    it), or a sealed entry with a ``maddr`` (the seal vouches for its host, not for where
    ``maddr`` sends). Answered 403 and sent nowhere (the red team's F1: any account holder
    made a node send UDP and TCP to any address, the farm's own Redis included)."""
    bob = farm.tcp_phone("bob", "10.0.0.4")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    answer = alice.authenticated(alice.request("INVITE", BOB))
    assert answer is not None and answer.status == 200
    record_route = answer.values("record-route")
    (token_entry,) = [v for v in record_route if b"@" in v]
    token = token_entry[5 : token_entry.index(b"@")].decode()
    node_entries = [v.decode() for v in reversed(record_route) if b"@" not in v]
    victim = f"{VICTIM_HOST}:{VICTIM_PORT}"
    other_node = farm.node_addresses[1]
    element_seal = farm.tokens.seal(other_node.host, other_node.port)
    dialog_seal = farm.tokens.seal(other_node.host, other_node.port, answer.call_id)
    # a token of the earlier format: its MAC over the flow alone (the Record-Route's is a dialog token)
    packed = bytes.fromhex(token.removeprefix("r"))[8:]
    legacy = (hmac.digest(farm.tokens._secret, packed, hashlib.sha256)[:8] + packed).hex()
    hop = {
        "token_moved": f"<sip:{token}@{victim};lr>",
        "legacy_token": f"<sip:{legacy}@{victim};lr>",
        "token_moved_tcp": f"<sip:{token}@{victim};lr;transport=tcp>",
        "token_maddr": f"<sip:{token}@{other_node.host}:{other_node.port};lr;maddr={VICTIM_HOST}>",
        "element_seal_maddr": f"<sip:{other_node.host}:{other_node.port};lr;sf={element_seal};maddr={VICTIM_HOST}>",
        "dialog_seal_maddr": f"<sip:{other_node.host}:{other_node.port};lr;sf={dialog_seal};maddr={VICTIM_HOST}>",
    }[next_hop]
    request = alice.in_dialog(method, answer)
    request.set("route", ", ".join([*node_entries, hop]).encode())
    since = len(farm.log)
    alice.inbox.clear()
    alice.send(request, farm.node_addresses[0])
    farm.advance(40)
    assert [s for s in farm.log[since:] if s.dest.host == VICTIM_HOST] == []
    if method != "ACK":
        assert finals(alice) in ([403], [404])


def test_challenges_hold_nothing_whatever_the_request_size(farm: MemFarm) -> None:
    """Unauthenticated requests are challenged statelessly: 60 KB ones from many sources leave
    no transaction (and no bytes) behind."""
    layer = farm.nodes[0].layer
    for i, method in enumerate(["REGISTER", "OPTIONS", "INVITE"] * 50):
        source = farm.phone(f"flood{i}", host=f"127.0.9.{i + 1}")
        source.send(source.request(method, f"sip:bob@{DOMAIN}", headers=[("X-Filler", "x" * 60_000)]))
        assert source.finals() in ([401], [407])
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_an_authenticated_flood_of_64_kb_invites_holds_at_most_the_byte_budget() -> None:
    """A user with an account calls a callee that rings for ever, with 60 KB INVITEs: each call
    holds its INVITE twice (server and client transaction) until Timer C.  The node answers
    503 once the held bytes reach ``max_transaction_bytes``, long before ``max_transactions``,
    and the bytes go back to zero when the transactions end."""
    budget = 2 << 20
    # the account's own share of the budget (below) off: the node's bound is what is tested
    farm = MemFarm(node_kwargs={"max_transaction_bytes": budget, "max_pending_invite_bytes": 0})
    layer = farm.nodes[0].layer
    alice = farm.phone("alice", "127.0.0.10")
    bob = farm.phone("bob", "127.0.0.11")
    assert bob.register() is not None and bob.finals()[-1] == 200
    finals: list[int] = []
    for i in range(40):
        invite = alice.request(
            "INVITE", f"sip:bob@{DOMAIN}", call_id=f"flood-{i}", headers=[("X-Filler", "x" * 60_000)]
        )
        answer = alice.authenticated(invite)
        finals.append(answer.status if answer is not None else 0)
        assert layer.retained_bytes <= budget + 4 * 61_000
    assert finals.count(503) >= 20 and len(layer) < 100
    assert len(bob.requests(b"INVITE")) < 20
    # the operator sees why: the node's once-a-second sync exports the layer's counters
    metrics = NodeMetrics()
    sync_counters(layer.stats.as_dict, metrics.transaction_events)()
    name = "sipfarm_node_transaction_events_total"
    assert metrics.registry.get_sample_value(name, {"event": "rejected_memory"}) == layer.stats.rejected_memory >= 20
    assert metrics.registry.get_sample_value(name, {"event": "rejected_full"}) is None
    farm.advance(300.0)  # Timer C cancels the rung calls, then Timer D ends them
    assert len(layer) == 0 and layer.retained_bytes == 0


def _call(phone: Phone, n: int, filler: int = 0) -> tuple[int, bytes]:
    headers = [("X-Filler", "x" * filler)] if filler else []
    invite = phone.request("INVITE", BOB, call_id=f"{phone.user}-{n}", headers=headers)
    answer = phone.authenticated(invite)
    assert answer is not None
    return answer.status, answer.reason


def test_one_accounts_unanswered_calls_cannot_take_the_node_from_everyone() -> None:
    """The byte budget above is the node's, shared by all callers: one account calling a phone
    that rings for ever with 60 KB INVITEs would fill it and every caller would get 503. Once
    its calls in progress hold ``max_pending_invite_bytes``, that account's next call gets 403
    Too Many Calls (counted) and holds nothing; another account still calls, with the node far
    from full; once one of the account's calls is answered or cancelled, it may call again."""
    share = 1 << 20
    farm = MemFarm(node_kwargs={"max_transaction_bytes": 16 * share, "max_pending_invite_bytes": share})
    node = farm.nodes[0]
    alice = farm.phone("alice", "10.0.0.1")
    carol = farm.phone("carol", "10.0.0.3")
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register() is not None and bob.finals()[-1] == 200  # rings, never answers
    statuses = [_call(alice, n, 60_000)[0] for n in range(12)]
    # each call holds its INVITE twice (the server and the client transaction): 8 fit in 1 MiB
    assert statuses == [180] * 8 + [403] * 4, statuses
    assert node.layer.retained_bytes <= share
    assert _call(alice, 12) == (180, b"Ringing")  # the share is in bytes: a small call still fits
    assert _call(alice, 13, 60_000) == (403, b"Too Many Calls")
    assert node.metrics.registry.get_sample_value("sipfarm_node_errors_total", {"kind": "too_many_calls"}) == 5
    assert len(bob.requests(b"INVITE")) == 9
    assert _call(carol, 0, 60_000)[0] == 180  # another account is not affected
    bob.answer_call(200, bob.ringing[0])  # one of alice's calls is answered
    assert _call(alice, 14, 60_000)[0] == 180
    ringing = next(m for m in reversed(alice.sent) if m.method == b"INVITE")
    alice.cancel(ringing)  # and one she gives up
    assert _call(alice, 15, 60_000)[0] == 180
    assert _call(alice, 16, 60_000)[0] == 403
    farm.advance(300.0)  # Timer C ends the rung calls: alice may call again
    assert node.layer.retained_bytes == 0
    assert _call(alice, 17, 60_000)[0] == 180


def test_an_accounts_calls_at_once_are_bounded_in_count_too() -> None:
    """``max_pending_invites``: however small its INVITEs, an account has at most that many
    calls in progress on a node (a stolen account's calls at once); the ended ones do not
    count, and many ordinary calls at once (a trunk, a load test) fit the default byte share."""
    farm = MemFarm(node_kwargs={"max_pending_invites": 3})
    alice = farm.phone("alice", "10.0.0.1")
    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register() is not None and bob.finals()[-1] == 200
    assert [_call(alice, n)[0] for n in range(4)] == [180, 180, 180, 403]
    bob.answer_call(200, bob.ringing[0])
    assert [_call(alice, n)[0] for n in range(4, 6)] == [180, 403]
    unbounded = MemFarm(node_kwargs={"max_pending_invites": 0})
    alice = unbounded.phone("alice", "10.0.0.1")
    bob = unbounded.phone("bob", "10.0.0.2")
    assert bob.register() is not None and bob.finals()[-1] == 200
    assert {_call(alice, n)[0] for n in range(300)} == {180}  # 300 x ~1 KB x 2 < 16 MiB
    pending = unbounded.nodes[0].proxy.pending_invites
    assert len(pending) == 1
    for n in range(300, 400):  # answered calls leave the account's list: it stays short
        assert _call(alice, n)[0] == 180
        bob.answer_call(200, bob.ringing[-1])
    (entry,) = pending._by_account.values()
    assert sum(1 for c in entry.calls if c.answered) <= 300 + 8  # ended ones: below live ones + 8


def test_only_the_configured_digest_algorithms_are_accepted(farm: MemFarm) -> None:
    """The farm offers MD5 (the default): credentials computed with MD5-sess are refused like a
    wrong password, though the account's MD5 HA1 would verify them (RFC 7616 3.7: the server
    names the algorithm; the README says only configured ones are taken)."""
    phone = farm.phone("alice", "10.0.0.1")
    register = phone.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:alice@{DOMAIN}>", from_user="alice")
    phone.send(register)
    (challenge,) = [m for m in phone.inbox if m.status == 401]
    offered = challenge.get("www-authenticate")
    assert offered is not None and b"algorithm=MD5" in offered
    challenge.set("www-authenticate", offered.replace(b"algorithm=MD5", b"algorithm=MD5-sess"))
    phone.inbox.clear()
    phone.send(phone.authorize(challenge, register))
    assert finals(phone) == [401]
    assert phone.register().status == 200  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("uri", "headers", "status"),
    [
        ("sip:someone@elsewhere.example", [], 403),  # a domain the farm does not serve
        ("tel:+15551234567", [], 403),  # not a SIP URI (the table has no rule for it)
        (f"sip:{DOMAIN}", [], 404),  # no user
        (BOB, [("max-forwards", "0")], 483),
    ],
    ids=["foreign_domain", "tel", "no_user", "max_forwards_0"],
)
def test_an_invite_refused_before_routing_is_answered_once_not_reflected(
    farm: MemFarm, mallory: Phone, uri: str, headers: list[tuple[str, str]], status: int
) -> None:
    """A spoofed INVITE must not make the node a reflector: refused at once, it gets one
    answer and no transaction (an INVITE server transaction over UDP sends its final answer
    ~11 times in 32 s until the ACK: red team, 2026-12-02, 12x in datagrams); a retransmitted
    INVITE gets one more, no more."""
    invite = mallory.request("INVITE", uri)
    for name, value in headers:
        invite.set(name, value.encode())
    mallory.send(invite)
    mallory.send(invite)  # a retransmission
    farm.advance(40)
    answers = [m.status for m in mallory.inbox]
    assert answers == [status, status], answers
    assert farm.transactions(0) == 0 and farm.transactions(1) == 0


@pytest.mark.parametrize(
    ("to_tag", "route", "status"),
    [
        ("a1b2", None, 404),  # a dialog that did not go through the farm
        ("a1b2", "<sip:10.9.9.9;lr>", 404),  # a dialog's Route set that is not ours
        (None, "<sip:10.9.9.9;lr>", 404),  # an initial INVITE through a proxy it names
    ],
    ids=["dialog_not_ours", "foreign_route_in_dialog", "foreign_route"],
)
def test_an_invite_the_node_refuses_at_once_gets_one_answer_per_datagram(
    farm: MemFarm, mallory: Phone, to_tag: str | None, route: str | None, status: int
) -> None:
    """Every INVITE the node refuses as soon as it reads it (in a transaction: its
    retransmissions are absorbed) gets its final answer alone, once: no 100 Trying before it
    and no Timer G copies after it, since a sender that got no provisional still resends its
    INVITE, and each copy is answered (tests/sip). A spoofed in-dialog INVITE got a 100 and
    eleven 404s at its victim (red team, 2026-12-03)."""
    invite = mallory.request("INVITE", BOB)
    if to_tag is not None:
        invite.set("to", invite.get("to") + b";tag=" + to_tag.encode())  # type: ignore[operator]
    if route is not None:
        invite.set("route", route.encode())
    mallory.send(invite)
    farm.advance(40)
    answers = [m.status for m in mallory.inbox]
    assert answers == [status], answers


SHARE = 1 << 20  # an account's share of the node's transaction memory in the tests below


def _small_share_farm() -> tuple[MemFarm, Phone, Phone, Phone]:
    """A node with 16 MiB of transaction memory, 1 MiB an account's; alice, bob (registered),
    carol."""
    farm = MemFarm(node_kwargs={"max_transaction_bytes": 16 * SHARE, "max_pending_invite_bytes": SHARE})
    alice, bob, carol = (farm.phone(user, f"10.0.0.{i}") for i, user in enumerate(("alice", "bob", "carol"), 1))
    assert bob.register() is not None and bob.finals()[-1] == 200
    return farm, alice, bob, carol


def _answered_call(alice: Phone, bob: Phone, call_id: str) -> SipMessage:
    """alice calls bob, bob answers, alice ACKs: the 200."""
    ok = alice.authenticated(alice.request("INVITE", BOB, call_id=call_id))
    assert ok is not None and ok.status == 180
    bob.answer_call(200, bob.ringing[-1])
    answered = alice.last(200, b"INVITE")
    assert answered is not None
    alice.ack(answered)
    return answered


def test_one_subscribers_unanswered_re_invites_cannot_take_the_node_from_everyone() -> None:
    """A re-INVITE waits for its answer as long as a call does (Timer C), and was charged to no
    share: one subscriber sending 60 KB re-INVITEs in its own dialog to a phone of its own that
    only rings filled the node's transaction memory, and every caller got 503 (red team,
    2026-12-03). They are charged to their sender's share: past it, 403 Too Many Calls; other
    callers are not affected."""
    farm, alice, bob, carol = _small_share_farm()
    answered = _answered_call(alice, bob, "dialog-1")
    statuses = []
    for n in range(12):  # bob's phone rings on each re-INVITE and never answers
        reinvite = alice.in_dialog("INVITE", answered, cseq=10 + n)
        reinvite.set("x-filler", b"x" * 60_000)
        alice.inbox.clear()
        alice.send(reinvite)
        statuses.append(alice.inbox[-1].status if alice.inbox else 0)
    assert statuses.count(403) >= 4 and statuses[:8] == [180] * 8, statuses
    assert farm.nodes[0].layer.retained_bytes <= 2 * SHARE
    assert _call(carol, 0, 60_000)[0] == 180  # another caller is not affected


@pytest.mark.parametrize("in_dialog", [False, True])
def test_one_subscribers_unanswered_messages_cannot_take_the_node_from_everyone(in_dialog: bool) -> None:
    """Not only INVITEs wait: a MESSAGE (or any request) to a phone that never answers holds
    its server and client transactions until Timer F (32 s). 60 KB MESSAGEs, to a silent phone
    of one's own or inside one's own dialog, filled a node's 256 MiB and every caller got 503
    (red team, 2026-12-03). Every request the node holds is charged to its account (in a
    dialog: its sender's) share: past it, 403; other callers are not affected."""
    farm, alice, bob, carol = _small_share_farm()
    answered = _answered_call(alice, bob, "dialog-m") if in_dialog else None
    bob.silent = True  # gone: answers nothing from now on
    statuses = []
    for n in range(12):
        if answered is not None:
            message = alice.in_dialog("MESSAGE", answered, cseq=10 + n)
            message.set_body(b"x" * 60_000, "text/plain")
            alice.inbox.clear()
            alice.send(message)
            statuses.append(alice.inbox[-1].status if alice.inbox else 0)
        else:
            message = alice.request("MESSAGE", BOB, call_id=f"m-{n}", body=b"x" * 60_000)
            answer = alice.authenticated(message)
            statuses.append(answer.status if answer is not None and answer.status >= 200 else 0)
    assert statuses.count(403) >= 4 and statuses[:6] == [0] * 6, statuses
    assert farm.nodes[0].layer.retained_bytes <= 2 * SHARE
    assert _call(carol, 0, 60_000)[0] == 100  # another caller is not affected (silent bob: Trying)
    farm.advance(40.0)  # Timer F ends them: alice may send again
    assert farm.nodes[0].layer.retained_bytes < SHARE


def test_a_callee_cannot_assert_an_identity_in_its_responses() -> None:
    """RFC 3325 5: P-Asserted-Identity, P-Preferred-Identity and Remote-Party-ID are the farm's
    (or a trusted peer's) to write. They were stripped from requests only: a callee's 180 and
    200 reached the caller with P-Asserted-Identity: Bob, which phones show as the connected
    party (red team, 2026-12-03)."""
    farm = MemFarm()
    alice = farm.phone("alice", "10.0.0.1")
    carol = farm.phone("carol", "10.0.0.3")
    assert carol.register() is not None and carol.finals()[-1] == 200
    carol.answer = None
    ringing = alice.authenticated(alice.request("INVITE", f"sip:carol@{DOMAIN}", call_id="pai-1"))
    assert ringing is not None and ringing.status == 180
    call = carol.ringing[-1]
    forged = (
        ("contact", f"<{carol.contact}>"),
        ("p-asserted-identity", f"<sip:bob@{DOMAIN}>"),
        ("remote-party-id", f'"Bob" <sip:bob@{DOMAIN}>;party=called'),
        ("p-preferred-identity", f"<sip:bob@{DOMAIN}>"),
    )
    carol.send(make_response(call.request, 200, to_tag=call.tag, headers=forged, record_route=True), call.source)
    ok = alice.last(200, b"INVITE")
    assert ok is not None
    assert [ok.get(h) for h in ("p-asserted-identity", "remote-party-id", "p-preferred-identity")] == [None] * 3
