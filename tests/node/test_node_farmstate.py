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
