"""FarmState over a real redis-server: each callback is answered exactly once, also when the
callback itself fails with a StoreError (it used to be called a second time with that error)."""

from __future__ import annotations

import asyncio

import pytest

from sipfarm.node.farmstate import FarmState
from sipfarm.store.errors import StoreError
from sipfarm.store.resp import RedisPipe

pytestmark = pytest.mark.timeout(30)


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
        await pipe.close()
        assert await find(b"c1@phone") is None  # Redis gone: no relay known, never an exception
    finally:
        await pipe.close()
