"""The REGISTER's two paths, in memory: one round trip (credentials verified without I/O, then
the guard's checks and the write in one script) and two (guard + account, then the write).

Whatever a phone or an attacker does, both paths must give the same answers, the same log
lines, the same bindings and the same guard state (failure counters, bans, nonce uses): each
scenario below runs on a farm whose store ``admits`` (one Redis) and on one that does not
(a Redis Cluster's FarmState), and the two records are compared. The security properties
(no binding from a replay or a banned source, bans and counters as before) are asserted on
the one-round-trip path itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from memfarm import DOMAIN, MemFarm, Phone

from sipfarm.protect import GuardPolicy, MemoryGuard
from sipfarm.protect.guard import KEY_PREFIX
from sipfarm.sip import auth
from sipfarm.sip.message import SipMessage
from sipfarm.store.errors import StoreError, StoreUnavailable

ALICE = f"alice@{DOMAIN}"
Record = list[object]


def _farm(admits: bool) -> MemFarm:
    farm = MemFarm(nodes=2)
    farm.state.admits = admits
    return farm


def _seen(answer: SipMessage | None) -> tuple[object, ...]:
    """What a phone can tell from an answer (nonces, tags and branches always differ)."""
    if answer is None:
        return ("no answer",)
    challenges = tuple(
        (c.realm, c.algorithm, c.qop, c.stale)
        for c in (auth.parse_challenge(v) for v in answer.get_all("www-authenticate"))
    )
    names = tuple(h[0] for h in answer.headers if h[0] not in ("via", "contact"))
    return (answer.status, answer.reason, challenges, tuple(sorted(answer.values("contact"))), names)


def _state(farm: MemFarm) -> tuple[object, ...]:
    bindings = {aor: sorted((b.contact, b.expires_at) for b in bs.values()) for aor, bs in farm.state.bindings.items()}
    # the guard's keys, nonce uses included (their names carry nonces: counted, not named)
    guard = sorted((k, farm.keys.get(k)) for k in farm.keys.keys(KEY_PREFIX) if ":nonce:" not in k)
    nonce_uses = len(farm.keys.keys(KEY_PREFIX + "nonce:"))
    return (bindings, guard, nonce_uses)


def _replay(farm: MemFarm, victim: Phone, attacker: Phone, contact: str) -> SipMessage | None:
    """``attacker`` re-sends ``victim``'s last REGISTER credentials with its own Contact."""
    captured = next(m for m in reversed(victim.sent) if m.method == b"REGISTER").get("authorization")
    assert captured is not None
    msg = attacker.request(
        "REGISTER",
        f"sip:{DOMAIN}",
        to=f"<sip:{victim.user}@{DOMAIN}>",
        from_user=victim.user,
        headers=[("expires", "3600"), ("authorization", captured)],
        cseq=99,
    )
    msg.set("contact", f"<{contact}>")
    attacker.inbox.clear()
    attacker.send(msg)
    return attacker.last()


# -- scenarios: each returns what the phones saw ------------------------------------------------


def good_credentials(farm: MemFarm) -> Record:
    alice = farm.phone("alice", "10.0.0.1")
    return [_seen(alice.register()), _seen(alice.register(expires=600))]


def wrong_password_and_unknown_user(farm: MemFarm) -> Record:
    alice = farm.phone("alice", "10.0.0.1")
    mallory = farm.phone("mallory", "10.0.0.66")
    return [_seen(alice.register(password="guess")), _seen(mallory.register(password="guess"))]


def replayed_credentials(farm: MemFarm) -> Record:
    alice = farm.phone("alice", "10.0.0.1")
    record: Record = [_seen(alice.register())]
    for node in (0, 1):  # to the node that accepted them, and to another
        mallory = farm.phone("mallory", f"10.6.6.{node + 1}")
        mallory.node = node
        record.append(_seen(_replay(farm, alice, mallory, "sip:alice@10.6.6.6:5060")))
    record.append(_seen(_replay(farm, alice, alice, "sip:alice@10.0.0.1:5060")))  # the client itself
    return record


def stale_nonce(farm: MemFarm) -> Record:
    alice = farm.phone("alice", "10.0.0.1")
    msg = alice.request("REGISTER", f"sip:{DOMAIN}", to=f"<sip:alice@{DOMAIN}>", headers=(("expires", "600"),))
    alice.send(msg)
    challenge = alice.last()
    assert challenge is not None
    farm.advance(400)  # past the nonce's 300 s
    alice.inbox.clear()
    alice.send(alice.authorize(challenge, msg))
    return [_seen(alice.last())]


def banned_by_guesses_on_another_node(farm: MemFarm) -> Record:
    guesser = farm.phone("alice", "10.6.6.7")
    record: Record = [_seen(guesser.register(password=f"guess-{i}")) for i in range(10)]
    guesser.node = 1  # knows nothing of the ban locally: only Redis (here: the keys) does
    record += [_seen(guesser.register()), _seen(guesser.register())]
    guesser.node = 0
    record.append(_seen(guesser.register()))
    record.append(_seen(farm.phone("alice", "10.0.0.1").register()))  # the real user elsewhere
    return record


def banned_by_an_operator(farm: MemFarm) -> Record:
    alice = farm.phone("alice", "10.0.0.1")
    record: Record = [_seen(alice.register())]
    MemoryGuard(GuardPolicy(), clock=farm.clock.now, keys=farm.keys).ban("10.0.0.1", 60)
    record += [_seen(alice.register()), _seen(alice.register())]
    farm.advance(70)
    record.append(_seen(alice.register()))
    return record


def several_contacts_removal_and_limits(farm: MemFarm) -> Record:
    farm.state.add_account("dave", "dave-pw", max_contacts=2)
    desk = farm.phone("dave", "10.0.0.4")
    record: Record = [
        _seen(desk.register(contact="<sip:dave@10.0.0.4:5060>, <sip:dave@10.0.0.5:5060>;expires=120")),
        _seen(desk.register(contact="<sip:dave@10.0.0.6:5060>")),  # a third: over the limit
        _seen(desk.register(contact="<sip:dave@10.0.0.5:5060>;expires=0")),
        _seen(desk.register(call_id="same", cseq=10)),
        _seen(desk.register(call_id="same", cseq=3)),  # out of order
        _seen(desk.register(contact="*", expires=0, call_id="same", cseq=20)),
    ]
    farm.advance(200)
    record.append(_seen(desk.register(expires=60)))
    return record


def redis_failing(farm: MemFarm) -> Record:
    alice = farm.phone("alice", "10.0.0.1")
    record: Record = [_seen(alice.register())]
    farm.state.fail_with = StoreUnavailable("connection refused")
    record.append(_seen(alice.register()))
    farm.state.fail_with = StoreError("script failed")
    record.append(_seen(alice.register()))
    farm.state.fail_with = None
    record.append(_seen(alice.register()))
    return record


SCENARIOS: list[Callable[[MemFarm], Record]] = [
    good_credentials,
    wrong_password_and_unknown_user,
    replayed_credentials,
    stale_nonce,
    banned_by_guesses_on_another_node,
    banned_by_an_operator,
    several_contacts_removal_and_limits,
    redis_failing,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_both_paths_give_the_same_answers_state_and_log(
    scenario: Callable[[MemFarm], Record], caplog: pytest.LogCaptureFixture
) -> None:
    outcomes = []
    for admits in (True, False):
        caplog.clear()
        farm = _farm(admits)
        with caplog.at_level(logging.INFO, logger="sipfarm"):
            record = scenario(farm)
        lines = [
            " ".join(w for w in r.getMessage().split() if not w.startswith("call_id="))
            for r in caplog.records
            if r.name in ("sipfarm.auth", "sipfarm.protect")
        ]
        outcomes.append((record, _state(farm), lines, farm.state.writes))
    (one, one_state, one_log, one_writes), (two, two_state, two_log, two_writes) = outcomes
    assert one == two
    assert one_state == two_state
    assert one_log == two_log
    assert one_writes[0] == 0, "with a store that admits, every write takes the one-round-trip path"
    assert two_writes[1] == 0


# -- the security boundary on the one-round-trip path -------------------------------------------


@pytest.fixture
def farm() -> MemFarm:
    return _farm(True)


def test_a_replay_through_one_round_trip_writes_nothing_and_gets_a_stale_challenge(farm: MemFarm) -> None:
    alice = farm.phone("alice", "10.0.0.1")
    assert alice.register().status == 200  # type: ignore[union-attr]
    assert farm.state.writes == [0, 1]
    # from another address the nonce is not alice's (it was issued to 10.0.0.1): refused
    # before any I/O, nothing written, a fresh nonce for that address
    mallory = farm.phone("mallory", "10.6.6.6")
    answer = _replay(farm, alice, mallory, "sip:alice@10.6.6.6:5060")
    assert answer is not None and answer.status == 401
    assert auth.parse_challenge(answer.get_all("www-authenticate")[0]).stale
    assert farm.state.writes == [0, 1]
    # from alice's own address (her network, or a spoofed source): the nonce checks out, the
    # nonce-count was used: refused in the write's script, which writes nothing
    neighbour = farm.phone("mallory", "10.0.0.1", port=5070)
    answer = _replay(farm, alice, neighbour, "sip:alice@10.6.6.6:5060")
    assert answer is not None and answer.status == 401
    assert auth.parse_challenge(answer.get_all("www-authenticate")[0]).stale
    assert farm.state.writes == [0, 2]  # it went the one-round-trip way, and was refused there
    assert [b.contact for b in farm.state.bindings[ALICE].values()] == ["sip:alice@10.0.0.1:5060"]


def test_a_source_banned_farm_wide_gets_403_and_no_binding_with_the_right_password(farm: MemFarm) -> None:
    guesser = farm.phone("alice", "10.6.6.7")
    for i in range(10):
        assert guesser.register(password=f"guess-{i}").status == 401  # type: ignore[union-attr]
    guesser.node = 1  # the other node has not heard of the ban
    assert not farm.nodes[1].auth.banned(guesser.address)
    assert guesser.register().status == 403  # type: ignore[union-attr]
    assert farm.state.writes[1] == 1  # asked in the write's script, which wrote nothing
    assert ALICE not in farm.state.bindings
    assert farm.nodes[1].auth.banned(guesser.address)  # learnt: the next one costs no I/O
    assert guesser.register().status == 403  # type: ignore[union-attr]
    assert farm.state.writes[1] == 1


def test_wrong_passwords_never_take_the_one_round_trip_path_and_still_ban(farm: MemFarm) -> None:
    guesser = farm.phone("alice", "10.6.6.8")
    for i in range(10):
        assert guesser.register(password=f"guess-{i}").status == 401  # type: ignore[union-attr]
    assert farm.state.writes == [0, 0]
    assert farm.keys.get(f"{KEY_PREFIX}ban:{{10.6.6.8}}") == 10
    assert farm.keys.get(f"{KEY_PREFIX}fail:acct:{ALICE}") == 10


def test_without_a_cached_account_the_two_round_trip_path_is_taken(farm: MemFarm) -> None:
    farm.state.cache_accounts = False
    alice = farm.phone("alice", "10.0.0.1")
    assert alice.register().status == 200  # type: ignore[union-attr]
    assert farm.state.writes == [1, 0]
    mallory = farm.phone("mallory", "10.6.6.6")
    answer = _replay(farm, alice, mallory, "sip:alice@10.6.6.6:5060")
    assert answer is not None and answer.status == 401
    assert [b.contact for b in farm.state.bindings[ALICE].values()] == ["sip:alice@10.0.0.1:5060"]
