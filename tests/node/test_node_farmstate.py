"""FarmState over a real redis-server: each callback is answered exactly once, also when the
callback itself fails with a StoreError (it used to be called a second time with that error)."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from fixtures.startup import START_TIMEOUT_S

from sipfarm.node.farmstate import FarmState
from sipfarm.protect import Admission, RedisGuard
from sipfarm.protect.guard import ban_key, nonce_key
from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.location import AdmittedRegister, ContactUpdate, RegisterOutcome, location_key
from sipfarm.store.media import PREFIX, call_relay_key
from sipfarm.store.resp import RedisPipe

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 30)


async def test_lookup_answers_once_even_when_the_callback_raises(redis_url):
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state = FarmState(pipe)
        calls: list[object] = []
        done = asyncio.Event()

        def callback(result: object) -> None:
            calls.append(result)
            done.set()
            raise StoreError("the caller's own failure")

        state.lookup("nobody@farm.test", 0.0, callback)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.1)  # a second answer would have come right after the first
        assert calls == [[]]
    finally:
        await pipe.close()


async def test_lookup_of_a_corrupt_binding_is_a_store_error(redis_url):
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        await pipe.execute("HSET", "sipfarm:loc:{bob@farm.test}", "k", "not json")
        state = FarmState(pipe)
        got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        state.lookup("bob@farm.test", 0.0, got.set_result)
        result = await asyncio.wait_for(got, 5)
        assert isinstance(result, StoreError)
    finally:
        await pipe.close()


async def test_the_relay_of_a_call_is_recorded_found_and_forgotten(redis_url):
    """What lets any node continue a call on its relay: one hash per Call-ID with a TTL."""
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state = FarmState(pipe)
        loop = asyncio.get_running_loop()

        async def find(call_id: bytes) -> object:
            got: asyncio.Future[object] = loop.create_future()
            state.find_relay(call_id, got.set_result)
            return await asyncio.wait_for(got, 5)

        assert await find(b"c1@phone") is None
        state.record_relay(b"c1@phone", b"tag-a", "127.0.5.2:2223", 60)
        assert await find(b"c1@phone") == "127.0.5.2:2223"
        ttl = await pipe.execute("TTL", b"sipfarm:media:{c1@phone}")
        assert 0 < int(ttl) <= 60  # type: ignore[arg-type]
        state.forget_relay(b"c1@phone")
        assert await find(b"c1@phone") is None
        # a Call-ID and tag off the wire of 40 kB: a record of bounded size, found by any node
        long_id, long_tag = b"x" * 40_000, b"t" * 20_000
        state.record_relay(long_id, long_tag, "127.0.5.2:2223", 60)
        assert await find(long_id) == "127.0.5.2:2223"
        assert await pipe.execute("EXISTS", PREFIX + long_id + b"}") == 0
        used = await pipe.execute("MEMORY", "USAGE", call_relay_key(long_id))
        assert isinstance(used, int) and used < 400
        state.forget_relay(long_id)
        assert await find(long_id) is None
        await pipe.close()
        assert await find(b"c1@phone") is None  # Redis gone: no relay known, never an exception
    finally:
        await pipe.close()


# -- a REGISTER's write behind the guard's admission: one script (admit.lua + register.lua) ------

ALICE = "alice@farm.test"
CLIENT = "192.0.2.10"


async def _admitted_register(
    state: FarmState, nonce_use: str, contacts: list[ContactUpdate], *, cseq: int = 1, **kwargs: object
) -> object:
    got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    state.register_admitted(
        ALICE,
        contacts,
        kwargs.pop("source_ip", CLIENT),  # type: ignore[arg-type]
        nonce_use,
        60.0,
        got.set_result,
        call_id="c1",
        cseq=cseq,
        now=time.time(),
        max_contacts=10,
        **kwargs,
    )
    return await asyncio.wait_for(got, 5)


async def admit(guard: RedisGuard, source: str, nonce_use: str) -> object:
    got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    guard.admit(source, nonce_use, 60.0, got.set_result)
    return await asyncio.wait_for(got, 5)


async def _contacts(pipe: RedisPipe) -> list[str]:
    values = await pipe.execute("HVALS", location_key(ALICE))
    return sorted(json.loads(v)[0] for v in values)  # type: ignore[union-attr]


async def test_an_admitted_register_writes_in_one_command_and_its_replay_writes_nothing(redis_url):
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state = FarmState(pipe)
        assert state.admits
        await pipe.execute("SCRIPT", "FLUSH")  # the first use answers NOSCRIPT: the body is sent once
        two = [ContactUpdate("sip:alice@192.0.2.10:5060", 600), ContactUpdate("sip:alice@192.0.2.11:5060", 60)]
        first = await _admitted_register(state, "n1:00000001", two)
        assert isinstance(first, AdmittedRegister) and first.result is not None
        assert (first.ban_left, first.first_use, first.result.outcome) == (None, True, RegisterOutcome.OK)
        assert len(first.result.bindings) == 2
        before = pipe.commands
        second = await _admitted_register(state, "n1:00000002", [ContactUpdate("sip:alice@192.0.2.11:5060", 0)], cseq=2)
        assert pipe.commands - before == 1  # ban, nonce use and write: one EVALSHA, one round trip
        assert isinstance(second, AdmittedRegister) and second.result is not None and second.result.ok
        assert await _contacts(pipe) == ["sip:alice@192.0.2.10:5060"]
        # the same (nonce, nc) again, from anywhere, with anything: refused, nothing written
        replay = await _admitted_register(
            state, "n1:00000002", [ContactUpdate("sip:alice@203.0.113.6:5060", 3600)], cseq=9, source_ip="203.0.113.6"
        )
        assert replay == AdmittedRegister(None, False, None)
        assert await _contacts(pipe) == ["sip:alice@192.0.2.10:5060"]
    finally:
        await pipe.close()


async def test_a_banned_source_writes_nothing_and_spends_its_nonce_use_as_admit_does(redis_url):
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state = FarmState(pipe)
        await pipe.execute("SET", ban_key(CLIENT), "10", "PX", 60_000)
        refused = await _admitted_register(state, "n2:00000001", [ContactUpdate("sip:alice@192.0.2.10:5060", 600)])
        assert isinstance(refused, AdmittedRegister) and refused.result is None and refused.first_use
        assert refused.ban_left is not None and 0 < refused.ban_left <= 60
        assert await _contacts(pipe) == []
        assert await pipe.execute("EXISTS", nonce_key("n2:00000001")) == 1
        await pipe.execute("PERSIST", ban_key(CLIENT))  # a ban without end: math.inf, as admit says
        forever = await _admitted_register(state, "n2:00000002", [ContactUpdate("sip:alice@192.0.2.10:5060", 600)])
        assert forever == AdmittedRegister(math.inf, True, None)
        assert await _contacts(pipe) == []
    finally:
        await pipe.close()


async def test_the_one_script_and_the_guard_share_their_nonce_uses(redis_url):
    """The two paths of a REGISTER (and the proxy's admit) see each other's nonce uses."""
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state, guard = FarmState(pipe), RedisGuard(pipe)
        assert (await _admitted_register(state, "n3:00000001", [])).first_use  # type: ignore[attr-defined]
        assert await admit(guard, CLIENT, "n3:00000001") == Admission(banned=False, replay=True)
        assert await admit(guard, CLIENT, "n3:00000002") == Admission(banned=False, replay=False)
        assert await _admitted_register(state, "n3:00000002", []) == AdmittedRegister(None, False, None)
    finally:
        await pipe.close()


async def test_a_script_error_is_a_store_error_and_redis_down_is_unavailable(redis_url):
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state = FarmState(pipe)
        await pipe.execute("HSET", location_key(ALICE), "k", "not json")
        failed = await _admitted_register(state, "n4:00000001", [ContactUpdate("sip:alice@192.0.2.10:5060", 600)])
        assert isinstance(failed, StoreError) and not isinstance(failed, StoreUnavailable)
        await pipe.close()
        down = await _admitted_register(state, "n4:00000002", [ContactUpdate("sip:alice@192.0.2.10:5060", 600)])
        assert isinstance(down, StoreUnavailable)
    finally:
        await pipe.close()


def test_on_a_redis_cluster_or_with_replicas_ack_the_write_is_not_merged_with_the_admission():
    """A source's ban key lives in its own slot, the AOR's hash in its shard's; a WAIT for
    replicas would delay (or fail) the refusals too: two round trips there."""
    assert FarmState(RedisPipe("redis://127.0.0.1:1")).admits
    assert not FarmState(RedisPipe("redis://127.0.0.1:1"), cluster=True).admits
    acked = RedisPipe("redis://127.0.0.1:1")
    acked.require_replicas(1, 100)
    assert not FarmState(acked).admits


async def test_account_answers_for_long_user_names_are_right_and_not_cached(redis_url):
    """A user name off the wire may be as long as a message: the cache (bounded in entries)
    remembers short ones only, so distinct long names cost a read each, not memory."""
    pipe = RedisPipe(redis_url)
    await pipe.start()
    try:
        state = FarmState(pipe)
        for i in range(50):
            got: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            state.get_account(f"u{i}" + "x" * 8192, "farm.test", got.set_result)
            assert await asyncio.wait_for(got, 5) is None  # no such account
        assert len(state._cache) == 0
        got = asyncio.get_running_loop().create_future()
        state.get_account("nobody", "farm.test", got.set_result)
        assert await asyncio.wait_for(got, 5) is None
        assert len(state._cache) == 1  # a real name still is
    finally:
        await pipe.close()
