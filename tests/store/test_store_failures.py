"""Redis down, slow, restarted: the store raises StoreUnavailable (503) and recovers."""

from __future__ import annotations

import asyncio
import time

import pytest
from store_support import OpenStores

from sipfarm.store import ContactUpdate, StoreError, StoreUnavailable, create_redis
from sipfarm.store.location import LocationStore
from sipfarm.store.redis_client import redis_errors
from sipfarm.store.redis_server import RedisProcess, free_port
from sipfarm.store.resp import RedisPipe

AOR = "alice@example.com"
T0 = 1_700_000_000.0


async def test_redis_restart_gives_store_unavailable_then_recovers(
    redis_server: RedisProcess, open_single_stores: OpenStores
) -> None:
    async with open_single_stores() as s:
        await s.accounts.add("alice", "example.com", "pw")
        await s.location.apply_register(
            AOR, [ContactUpdate("sip:a@h", 60)], call_id="c", cseq=1, now=T0, max_contacts=5
        )
        redis_server.stop()
        try:
            started = time.monotonic()
            calls = [
                s.accounts.get("alice", "example.com"),
                s.accounts.add("bob", "example.com", "pw"),
                s.accounts.list(),
                s.location.lookup(AOR, T0),
                s.location.lookup_many([AOR, "b@x"], T0),
                s.location.apply_register(AOR, [], call_id="c", cseq=2, now=T0, max_contacts=5),
                s.location.count_all(T0),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable) as info:
                    await call
                assert info.value.sip_status == 503
                assert info.value.retry_after > 0
            assert time.monotonic() - started < 5  # fails fast, no long retry loop
        finally:
            redis_server.start()
        # Same clients, no reconnect call: the pool replaces its dead connections. The data is
        # gone (no persistence) and the scripts must be loaded again (NOSCRIPT handled).
        assert await s.accounts.get("alice", "example.com") is None
        r = await s.location.apply_register(
            AOR, [ContactUpdate("sip:a@h", 60)], call_id="c", cseq=2, now=T0, max_contacts=5
        )
        assert r.ok
        assert [b.contact for b in await s.location.lookup(AOR, T0)] == ["sip:a@h"]
        await s.accounts.add("alice", "example.com", "pw")


async def test_nothing_listening_is_unavailable() -> None:
    redis = create_redis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StoreUnavailable):
            await LocationStore(redis).lookup(AOR, T0)
    finally:
        await redis.aclose()


async def test_timeout_mid_reply_drops_the_connection(redis_url: str) -> None:
    # One connection only, so a half-read connection would be the one the next command gets.
    slow = create_redis(redis_url, socket_timeout=0.1, max_connections=1)
    other = create_redis(redis_url)
    try:
        location = LocationStore(slow)
        await location.apply_register(AOR, [ContactUpdate("sip:a@h", 60)], call_id="c", cseq=1, now=T0, max_contacts=5)
        # BLPOP blocks server-side longer than the socket timeout: the client gives up while
        # the reply is still owed.
        with pytest.raises(StoreUnavailable), redis_errors:
            await slow.blpop(["queue"], timeout=1)
        # Had the connection been kept, Redis would deliver this push to it as the BLPOP reply
        # and the next command would read that instead of its own answer.
        await other.rpush("queue", "late")
        await asyncio.sleep(0.05)
        assert [b.contact for b in await location.lookup(AOR, T0)] == ["sip:a@h"]
        assert await other.llen("queue") == 1  # nobody consumed it: the blocked client was closed
    finally:
        await slow.aclose()
        await other.aclose()


async def test_cancelled_command_drops_the_connection(redis_url: str) -> None:
    client = create_redis(redis_url, max_connections=1)
    other = create_redis(redis_url)
    try:
        location = LocationStore(client)
        await location.apply_register(AOR, [ContactUpdate("sip:a@h", 60)], call_id="c", cseq=1, now=T0, max_contacts=5)
        task = asyncio.create_task(client.blpop(["queue"], timeout=2))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await other.rpush("queue", "late")
        await asyncio.sleep(0.05)
        assert [b.contact for b in await location.lookup(AOR, T0)] == ["sip:a@h"]
        assert await other.llen("queue") == 1
        # and a store call under asyncio.timeout is a StoreUnavailable, not a bare TimeoutError
        with pytest.raises(StoreUnavailable), redis_errors:
            async with asyncio.timeout(0.05):
                await client.blpop(["empty"], timeout=1)
        assert [b.contact for b in await location.lookup(AOR, T0)] == ["sip:a@h"]
    finally:
        await client.aclose()
        await other.aclose()


async def test_corrupt_binding_is_a_store_error_not_a_crash(redis_url: str) -> None:
    redis = create_redis(redis_url)
    try:
        await redis.hset("sipfarm:loc:{alice@example.com}", "c:x", "not json")
        with pytest.raises(StoreError) as info:
            await LocationStore(redis).lookup(AOR, T0)
        assert not isinstance(info.value, StoreUnavailable)
        assert info.value.sip_status == 500
        with pytest.raises(StoreError):  # the script's cjson.decode fails: a ResponseError
            await LocationStore(redis).apply_register(AOR, [], call_id="c", cseq=1, now=T0, max_contacts=1)
    finally:
        await redis.aclose()


async def test_a_reply_handler_that_raises_is_counted_and_the_connection_goes_on(redis_url: str) -> None:
    """A bug in one reply's handler is logged (``redis_callback_failed``) and counted (the
    node's ``sipfarm_node_internal_errors_total``), and the replies behind it still arrive."""

    pipe = RedisPipe(redis_url)
    await pipe.connect()
    try:
        got: list[object] = []

        def broken(_reply: object) -> None:
            raise ValueError("a handler's bug")

        pipe.call(broken, "PING")
        pipe.call(got.append, "PING")
        assert await pipe.execute("PING") == b"PONG"
        assert pipe.callback_failures == 1
        assert got == [b"PONG"]
    finally:
        await pipe.close()
