"""The farm's brute-force and replay guard against a real redis-server, driven through RedisPipe
(one pipe per node, as nodes run it), and the in-memory guard held to the same answers."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protect_support import FakeClock, admit, failed, pipes, wait_until

from sipfarm.protect import Admission, FailureOutcome, GuardPolicy, MemoryGuard, RedisGuard
from sipfarm.protect.guard import BAN_INDEX, BAN_LOG, ban_key, source_failures_key, working_key
from sipfarm.protect.redis_guard import FAILURE_SCRIPT
from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.redis_server import RedisProcess, free_port
from sipfarm.store.resp import RedisPipe

ATTACKER = "192.0.2.66"
OTHER = "198.51.100.7"
ALICE = "alice@farm.test"
BOB = "bob@farm.test"


# -- replay ------------------------------------------------------------------------------------


async def test_a_nonce_count_is_accepted_once_across_the_farm(redis_url: str) -> None:
    async with pipes(redis_url, 2) as (pipe_a, pipe_b):
        node_a, node_b = RedisGuard(pipe_a), RedisGuard(pipe_b)
        assert await admit(node_a, OTHER, "abc:00000001") == Admission(banned=False, replay=False)
        # the captured Authorization replayed to another node
        assert await admit(node_b, ATTACKER, "abc:00000001") == Admission(banned=False, replay=True)
        assert await admit(node_a, OTHER, "abc:00000001") == Admission(banned=False, replay=True)
        # the real client's next request (nc + 1) and another nonce are new
        assert await admit(node_b, OTHER, "abc:00000002") == Admission(banned=False, replay=False)
        assert await admit(node_b, OTHER, "xyz:00000001") == Admission(banned=False, replay=False)


async def test_a_nonce_without_qop_is_one_time(redis_url: str) -> None:
    async with pipes(redis_url, 2) as (pipe_a, pipe_b):
        node_a, node_b = RedisGuard(pipe_a), RedisGuard(pipe_b)
        assert await admit(node_a, OTHER, "abc:") == Admission(banned=False, replay=False)
        assert await admit(node_b, OTHER, "abc:") == Admission(banned=False, replay=True)
        assert await admit(node_a, OTHER, "abc:") == Admission(banned=False, replay=True)


async def test_a_nonce_use_is_forgotten_when_the_nonce_expires(redis_url: str) -> None:
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe)
        assert await admit(guard, OTHER, "abc:00000001", ttl=0.2) == Admission(banned=False, replay=False)
        assert await admit(guard, OTHER, "abc:00000001", ttl=0.2) == Admission(banned=False, replay=True)
        await wait_until(lambda: _key_gone(pipe, "sipfarm:protect:nonce:abc:00000001"))


async def test_admit_is_one_round_trip(redis_url: str) -> None:
    """Ban lookup and nonce record go out together, in one pipeline with the request's lookups."""
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe)
        before = pipe.commands
        answers: list[Any] = []
        pipe.call(answers.append, "HMGET", "sipfarm:acct:{alice@farm.test}", "ha1_md5")
        guard.admit(OTHER, "abc:00000001", 60, answers.append)
        assert pipe.commands - before == 3  # queued, not yet sent: one write for all three
        await pipe.execute("PING")
        assert answers == [[None], Admission(banned=False, replay=False)]


# -- brute force -------------------------------------------------------------------------------


async def test_ten_failures_ban_the_source_farm_wide_and_not_nine(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with pipes(redis_url, 2) as (pipe_a, pipe_b):
        node_a, node_b = RedisGuard(pipe_a), RedisGuard(pipe_b)  # default policy: 10 in 5 minutes
        for n in range(1, 10):
            outcome = await failed(node_a if n % 2 else node_b, ATTACKER, f"user{n}@farm.test")
            assert outcome == FailureOutcome(n, 1, banned=False, account_alert=False)
        assert await admit(node_b, ATTACKER, "n:1") == Admission(banned=False, replay=False)
        assert not node_a.banned_locally(ATTACKER, time.monotonic())
        with caplog.at_level(logging.WARNING, logger="sipfarm.protect"):
            outcome = await failed(node_a, ATTACKER, ALICE)
        assert outcome == FailureOutcome(10, 1, banned=True, account_alert=False)
        assert f"event=source_banned source={ATTACKER} failures=10 ban_seconds=900" in caplog.messages
        assert node_a.banned_locally(ATTACKER, time.monotonic())
        # the other node learns it from its next admit, then drops the source without asking
        assert not node_b.banned_locally(ATTACKER, time.monotonic())
        assert await admit(node_b, ATTACKER, "n:2") == Admission(banned=True, replay=False)
        assert node_b.banned_locally(ATTACKER, time.monotonic())
        # the account's real user, from elsewhere, is not affected
        assert await admit(node_b, OTHER, "n:3") == Admission(banned=False, replay=False)
        assert not node_b.banned_locally(OTHER, time.monotonic())
        assert await pipe_a.execute("PTTL", ban_key(ATTACKER)) > 899_000
        # a failure counted while banned (a request already in flight) starts no second ban
        outcome = await failed(node_b, ATTACKER, ALICE)
        assert isinstance(outcome, FailureOutcome)
        assert not outcome.banned
        assert node_a.rules.bans_started + node_b.rules.bans_started == 1


async def test_a_source_whose_phones_work_is_banned_at_max_failures_working(redis_url: str) -> None:
    """An office behind one NAT address: alice's phone authenticates there (the pair is marked
    working for working_time, farm-wide), then, its password changed, retries every 30 s and
    fails over and over: ten failures against alice do not ban the office, a hundred do. A
    source that never authenticated is banned at ten, as before. The mark is written once per
    quarter of working_time per process, not per request."""
    async with pipes(redis_url, 2) as (pipe_a, pipe_b):
        node_a, node_b = RedisGuard(pipe_a), RedisGuard(pipe_b)
        for _ in range(50):
            node_a.succeeded(OTHER, ALICE)  # the office's phone, over and over
        assert await pipe_a.execute("PTTL", working_key(OTHER, ALICE)) > 3_599_000
        for n in range(1, 100):
            outcome = await failed(node_a if n % 2 else node_b, OTHER, ALICE)
            assert isinstance(outcome, FailureOutcome) and not outcome.banned, n
        outcome = await failed(node_b, OTHER, ALICE)
        assert isinstance(outcome, FailureOutcome) and outcome.banned and outcome.source_failures == 100
        for n in range(1, 11):  # a stranger
            outcome = await failed(node_a, ATTACKER, BOB)
            assert isinstance(outcome, FailureOutcome) and outcome.banned is (n == 10)
    async with pipes(redis_url) as (pipe,):
        # one SET per source and account per quarter of working_time: 50 successes wrote one
        await pipe.execute("DEL", working_key(OTHER, ALICE))
        guard = RedisGuard(pipe)
        guard.succeeded(OTHER, ALICE)
        await pipe.execute("PING")
        await pipe.execute("DEL", working_key(OTHER, ALICE))
        guard.succeeded(OTHER, ALICE)
        await pipe.execute("PING")
        assert await pipe.execute("EXISTS", working_key(OTHER, ALICE)) == 0
        guard._working_written(OTHER, ALICE, StoreUnavailable("lost"))  # a failed write is not remembered
        guard.succeeded(OTHER, ALICE)
        await pipe.execute("PING")
        assert await pipe.execute("EXISTS", working_key(OTHER, ALICE)) == 1


async def test_an_attacker_logged_in_with_its_own_account_earns_no_budget_against_others(redis_url: str) -> None:
    """The working mark is the account's: a guesser that authenticates as an account of its own
    (a customer, a stolen account) and then guesses bob's password, or made-up users', is banned
    at max_failures, as any stranger."""
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe)
        guard.succeeded(ATTACKER, ALICE)
        for n in range(1, 11):
            outcome = await failed(guard, ATTACKER, BOB if n % 2 else None)
            assert isinstance(outcome, FailureOutcome) and outcome.banned is (n == 10), n


async def test_failures_outside_the_window_do_not_add_up(redis_url: str) -> None:
    policy = GuardPolicy(max_failures=3, window=0.3)
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe, policy)
        for n in (1, 2):
            assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(n, n, banned=False, account_alert=False)
        await wait_until(lambda: _key_gone(pipe, source_failures_key(ATTACKER)))
        for n in (1, 2):
            assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(n, n, banned=False, account_alert=False)
        assert await admit(guard, ATTACKER, "n:1") == Admission(banned=False, replay=False)


async def test_a_ban_ends_and_the_source_starts_from_zero(redis_url: str) -> None:
    policy = GuardPolicy(max_failures=2, ban_time=0.3)
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe, policy)
        await failed(guard, ATTACKER, ALICE)
        assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(2, 2, banned=True, account_alert=False)
        assert guard.banned_locally(ATTACKER, time.monotonic())

        async def admitted() -> bool:
            answer = await admit(guard, ATTACKER, f"n:{time.monotonic()}")
            assert isinstance(answer, Admission)
            return not answer.banned

        await wait_until(admitted)
        assert not guard.banned_locally(ATTACKER, time.monotonic())
        # the ban consumed the failures that caused it
        assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(1, 3, banned=False, account_alert=False)


async def test_failures_against_an_account_add_up_across_sources_and_nodes(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    policy = GuardPolicy(account_alert=5)
    async with pipes(redis_url, 2) as (pipe_a, pipe_b):
        node_a, node_b = RedisGuard(pipe_a, policy), RedisGuard(pipe_b, policy)
        for n in (1, 2, 3):
            assert await failed(node_a, ATTACKER, ALICE) == FailureOutcome(n, n, banned=False, account_alert=False)
        assert await failed(node_b, OTHER, ALICE) == FailureOutcome(1, 4, banned=False, account_alert=False)
        with caplog.at_level(logging.WARNING, logger="sipfarm.protect"):
            assert await failed(node_b, OTHER, ALICE) == FailureOutcome(2, 5, banned=False, account_alert=True)
        assert (
            f"event=account_under_attack account={ALICE} failures=5 window_seconds=300 source={OTHER}"
            in caplog.messages
        )
        # reported once, when crossed; no lockout: nobody is banned
        assert await failed(node_a, ATTACKER, ALICE) == FailureOutcome(4, 6, banned=False, account_alert=False)
        assert await failed(node_a, ATTACKER, BOB) == FailureOutcome(5, 1, banned=False, account_alert=False)
        for source in (ATTACKER, OTHER):
            assert await admit(node_b, source, f"n:{source}") == Admission(banned=False, replay=False)


async def test_a_user_name_no_account_has_gets_no_counter(redis_url: str) -> None:
    # the authenticator passes None for a made-up name: the source counts (and is banned),
    # and nothing is keyed by the name, which would be keys an attacker mints at will
    policy = GuardPolicy(max_failures=3)
    async with pipes(redis_url) as (pipe,):
        await pipe.execute("FLUSHDB")
        guard = RedisGuard(pipe, policy)
        for n in (1, 2):
            assert await failed(guard, ATTACKER, None) == FailureOutcome(n, 0, banned=False, account_alert=False)
        assert await failed(guard, ATTACKER, None) == FailureOutcome(3, 0, banned=True, account_alert=False)
        keys = await pipe.execute("KEYS", "*")
        assert sorted(keys) == sorted([ban_key(ATTACKER).encode(), BAN_INDEX.encode(), BAN_LOG.encode()]), keys


async def test_the_local_ban_cache_is_bounded_and_expires(redis_url: str) -> None:
    clock = FakeClock()
    policy = GuardPolicy(max_failures=1, ban_time=900, local_cache_size=3, local_ban_recheck=10)
    sources = [f"203.0.113.{n}" for n in range(1, 6)]
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe, policy, clock=clock)
        for source in sources:
            outcome = await failed(guard, source, ALICE)
            assert isinstance(outcome, FailureOutcome)
            assert outcome.banned
            guard.banned_locally(sources[2], clock.now)  # recently used: kept
        assert [guard.banned_locally(s, clock.now) for s in sources] == [False, False, True, True, True]
        assert len(guard.rules.local) == 3
        # trusted for local_ban_recheck, then Redis is asked again (an operator may have lifted it)
        clock.now += 9.9
        assert guard.banned_locally(sources[4], clock.now)
        clock.now += 0.2
        assert not guard.banned_locally(sources[4], clock.now)
        assert len(guard.rules.local) == 2
        assert await admit(guard, sources[4], "n:1") == Admission(banned=True, replay=False)
        assert guard.banned_locally(sources[4], clock.now)
        # never trusted past the ban's end
        await pipe.execute("PEXPIRE", ban_key(sources[3]), 2000)
        assert await admit(guard, sources[3], "n:2") == Admission(banned=True, replay=False)
        clock.now += 2.0
        assert not guard.banned_locally(sources[3], clock.now)
        # a lifted ban is forgotten at the next admit
        await pipe.execute("DEL", ban_key(sources[4]))
        assert await admit(guard, sources[4], "n:3") == Admission(banned=False, replay=False)
        assert not guard.banned_locally(sources[4], clock.now)


# -- Redis failures ----------------------------------------------------------------------------


async def test_redis_not_reachable_answers_store_unavailable() -> None:
    pipe = RedisPipe(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2)
    await pipe.start()  # never raises; keeps trying in the background
    try:
        guard = RedisGuard(pipe)
        answers: list[Any] = []
        guard.admit(ATTACKER, "n:1", 60, answers.append)
        guard.failed(ATTACKER, ALICE, answers.append)
        assert len(answers) == 2  # at once, without waiting for anything
        assert all(isinstance(a, StoreUnavailable) and a.sip_status == 503 for a in answers)
    finally:
        await pipe.close()


async def test_redis_dying_under_pending_calls_answers_store_unavailable_then_recovers(
    redis_server: RedisProcess, redis_url: str
) -> None:
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe)
        assert await admit(guard, OTHER, "n:1") == Admission(banned=False, replay=False)
        redis_server.stop()
        try:
            started = time.monotonic()
            admitted, counted = await asyncio.gather(admit(guard, OTHER, "n:2"), failed(guard, ATTACKER, ALICE))
            assert isinstance(admitted, StoreUnavailable)
            assert isinstance(counted, StoreUnavailable)
            assert time.monotonic() - started < 3
        finally:
            redis_server.start()

        # the pipe reconnects by itself; the script is gone with the restart (NOSCRIPT, then EVAL)
        async def answered() -> bool:
            return isinstance(await failed(guard, ATTACKER, ALICE), FailureOutcome)

        await wait_until(answered, timeout=5)


async def test_an_error_reply_is_a_store_error_not_an_exception(redis_url: str) -> None:
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe)
        await pipe.execute("SET", source_failures_key(ATTACKER), "not a number")
        outcome = await failed(guard, ATTACKER, ALICE)
        assert isinstance(outcome, StoreError)
        assert not isinstance(outcome, StoreUnavailable)
        # the callback got it; the pipe carries on
        assert await admit(guard, OTHER, "n:1") == Admission(banned=False, replay=False)


async def test_the_failure_script_is_loaded_again_after_script_flush(redis_url: str) -> None:
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe)
        assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(1, 1, banned=False, account_alert=False)
        await pipe.execute("SCRIPT", "FLUSH")
        assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(2, 2, banned=False, account_alert=False)
        assert await failed(guard, ATTACKER, ALICE) == FailureOutcome(3, 3, banned=False, account_alert=False)


# -- the in-memory guard -----------------------------------------------------------------------


def test_memory_guard_runs_windows_and_bans_on_its_clock() -> None:
    clock = FakeClock()
    guard = MemoryGuard(GuardPolicy(max_failures=3, window=60, ban_time=600), clock=clock)
    answers: list[Any] = []
    for _ in range(2):
        guard.failed(ATTACKER, ALICE, answers.append)
    clock.now += 60  # the window closes
    guard.failed(ATTACKER, ALICE, answers.append)
    assert answers[-1] == FailureOutcome(1, 1, banned=False, account_alert=False)
    guard.failed(ATTACKER, ALICE, answers.append)
    guard.failed(ATTACKER, ALICE, answers.append)
    assert answers[-1] == FailureOutcome(3, 3, banned=True, account_alert=False)
    guard.admit(ATTACKER, "n:", 30, answers.append)
    guard.admit(ATTACKER, "n:", 30, answers.append)
    assert answers[-2:] == [Admission(banned=True, replay=False), Admission(banned=True, replay=True)]
    clock.now += 599.9
    guard.admit(ATTACKER, "m:", 30, answers.append)
    assert answers[-1] == Admission(banned=True, replay=False)
    clock.now += 0.1
    guard.admit(ATTACKER, "n:", 30, answers.append)  # the ban and the nonce use are both over
    assert answers[-1] == Admission(banned=False, replay=False)
    assert not guard.banned_locally(ATTACKER, clock.now)
    guard.ban(OTHER, None)
    guard.admit(OTHER, "o:1", 30, answers.append)
    assert answers[-1] == Admission(banned=True, replay=False)
    assert guard.unban(OTHER)
    assert not guard.unban(OTHER)


def test_an_ipv6_source_is_counted_and_banned_as_its_64() -> None:
    """A host given a /64 picks any address in it: nine guesses from each of a thousand
    addresses would be unlimited guessing, and a Redis counter each."""
    clock = FakeClock()
    guard = MemoryGuard(GuardPolicy(max_failures=10), clock=clock)
    answers: list[Any] = []
    for n in range(1, 10):
        guard.failed(f"2001:db8:aa:bb::{n:x}", None, answers.append)
        assert answers[-1].source_failures == n and not answers[-1].banned
    guard.failed("2001:db8:aa:bb:ffff:1:2:3", None, answers.append)
    assert answers[-1].banned
    assert guard.keys.keys("sipfarm:protect:fail:src:") == []  # the ban consumed the one counter
    assert guard.keys.keys("sipfarm:protect:ban:") == ["sipfarm:protect:ban:{2001:db8:aa:bb::/64}"]
    # any address of the /64 is banned, here and farm-wide; the next /64 and IPv4 are not
    assert guard.banned_locally("2001:db8:aa:bb:1234::5", clock.now)
    guard.admit("2001:db8:aa:bb::9999", "n:1", 30, answers.append)
    assert answers[-1].banned
    guard.admit("2001:db8:aa:bc::1", "n:2", 30, answers.append)
    assert not answers[-1].banned
    guard.admit("::ffff:192.0.2.1", "n:3", 30, answers.append)  # a dual-stack socket's IPv4
    assert not answers[-1].banned
    for _ in range(10):
        guard.failed("192.0.2.1", None, answers.append)
    assert guard.banned_locally("::ffff:192.0.2.1", clock.now)  # the IPv4 address it carries


async def test_a_ban_of_an_ipv6_64_is_indexed_once(redis_url: str) -> None:
    async with pipes(redis_url) as (pipe,):
        guard = RedisGuard(pipe, GuardPolicy(max_failures=3))
        for n in range(3):
            outcome = await failed(guard, f"2001:db8:1:2::{n + 1}", None)
            assert isinstance(outcome, FailureOutcome)
        assert outcome.banned
        await wait_until(lambda: _index_has(pipe, "2001:db8:1:2::/64"))
        assert await admit(guard, "2001:db8:1:2:9::9", "q:1") == Admission(banned=True, replay=False)


async def _index_has(pipe: RedisPipe, member: str) -> bool:
    return await pipe.execute("ZSCORE", BAN_INDEX, member) is not None


def test_policy_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_failures"):
        GuardPolicy(max_failures=0)
    with pytest.raises(ValueError, match="window"):
        GuardPolicy(window=float("nan"))
    # the compiled build refuses the float itself (TypeError) before the check runs
    with pytest.raises((ValueError, TypeError), match=r"local_cache_size|int object expected"):
        GuardPolicy(local_cache_size=1.5)  # type: ignore[arg-type]


SOURCES = [ATTACKER, OTHER, "2001:db8::1"]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(SOURCES), st.sampled_from(["a:1", "a:2", "b:", "c:00000001"])),
        st.tuples(st.just("failed"), st.sampled_from(SOURCES), st.sampled_from([ALICE, BOB, "x@y", None])),
        st.tuples(st.just("succeeded"), st.sampled_from(SOURCES), st.sampled_from([ALICE, BOB])),
        st.tuples(st.just("works"), st.sampled_from(SOURCES), st.sampled_from([ALICE, BOB])),
    ),
    max_size=30,
)


def test_memory_and_redis_guards_give_the_same_answers(redis_server: RedisProcess, redis_url: str) -> None:
    """Any sequence of calls, sent to Redis as one pipeline (as a node's burst is), gets the answers
    the in-memory guard gives one by one, and leaves the same local bans."""
    policy = GuardPolicy(max_failures=3, account_alert=4, local_cache_size=2, max_failures_working=5)
    loop = asyncio.new_event_loop()
    pipe = RedisPipe(redis_url)
    try:
        loop.run_until_complete(pipe.connect())
        loop.run_until_complete(pipe.execute("SCRIPT", "LOAD", FAILURE_SCRIPT))

        @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(operations)
        def agree(ops: list[tuple[str, str, Any]]) -> None:
            clock = FakeClock()
            memory, redis = MemoryGuard(policy, clock=clock), RedisGuard(pipe, policy, clock=clock)
            expected: list[Any] = []
            for op, source, arg in ops:
                if op == "admit":
                    memory.admit(source, arg, 60, expected.append)
                elif op == "succeeded":
                    memory.succeeded(source, arg)
                    expected.append(None)
                elif op == "works":
                    memory.works(source, arg, expected.append)
                else:
                    memory.failed(source, arg, expected.append)
            got: list[Any] = [None] * len(ops)

            async def run() -> None:
                await pipe.execute("FLUSHDB")
                for i, (op, source, arg) in enumerate(ops):
                    if op == "admit":
                        redis.admit(source, arg, 60, partial(got.__setitem__, i))
                    elif op == "succeeded":
                        redis.succeeded(source, arg)
                    elif op == "works":
                        redis.works(source, arg, partial(got.__setitem__, i))
                    else:
                        redis.failed(source, arg, partial(got.__setitem__, i))
                await pipe.execute("PING")  # replies come in order: every answer is in

            loop.run_until_complete(run())
            assert got == expected
            for source in SOURCES:
                assert redis.banned_locally(source, clock.now) == memory.banned_locally(source, clock.now)

        agree()
    finally:
        loop.run_until_complete(pipe.close())
        loop.close()


async def _key_gone(pipe: RedisPipe, key: str) -> bool:
    return bool(await pipe.execute("EXISTS", key) == 0)


def test_memory_guard_keeps_long_nonces_and_user_names_in_bounded_keys() -> None:
    """A nonce is recorded, and a user name's failures counted, before anything is verified:
    off the wire, as long as a message. Their keys stay bounded, with the same answers."""
    clock = FakeClock()
    guard = MemoryGuard(GuardPolicy(max_failures=1000, window=60, ban_time=600, account_alert=1000), clock=clock)
    answers: list[Any] = []
    long_nonce = "n" * 8192 + ":00000001"
    guard.admit(ATTACKER, long_nonce, 30, answers.append)
    guard.admit(ATTACKER, long_nonce, 30, answers.append)
    assert answers == [Admission(banned=False, replay=False), Admission(banned=False, replay=True)]
    for i in range(100):
        guard.admit(ATTACKER, f"{i}" + "n" * 8192 + ":1", 30, answers.append)
        guard.failed(ATTACKER, f"u{i}" + "x" * 8192 + "@farm.test", answers.append)
    guard.failed(ATTACKER, "u0" + "x" * 8192 + "@farm.test", answers.append)
    assert answers[-1] == FailureOutcome(101, 2, banned=False, account_alert=False)  # counted as before
    assert all(len(key) <= 600 for key in guard.keys._data)
