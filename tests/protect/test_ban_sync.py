"""A balancer's copy of the farm's bans against a real redis-server (``sync_bans``): bans started
anywhere (``sipfarm ban add``, a node's guard) and lifted apply within a refresh, and a refresh
reads the changes since the last one, not every ban."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator

import pytest
from protect_support import failed, pipes, wait_until

from sipfarm.balancer.frontdoor import FrontDoor, FrontDoorPolicy
from sipfarm.balancer.main import sync_bans
from sipfarm.protect import GuardPolicy, RedisGuard
from sipfarm.protect.bans import BanStore
from sipfarm.protect.guard import BAN_LOG
from sipfarm.store import create_redis

REFRESH = 0.1


@contextlib.asynccontextmanager
async def syncing(redis_url: str) -> AsyncIterator[tuple[FrontDoor, BanStore]]:
    redis = create_redis(redis_url)
    front = FrontDoor(FrontDoorPolicy(exempt=()))
    task = asyncio.create_task(sync_bans(front, redis, REFRESH))
    try:
        yield front, BanStore(redis)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()


def _banned(front: FrontDoor, source: str) -> bool:
    return front.banned(source, time.monotonic())


async def test_bans_from_anywhere_and_lifts_reach_the_balancer(redis_url: str) -> None:
    async with syncing(redis_url) as (front, store):
        await asyncio.sleep(3 * REFRESH)  # past the first, full read: the rest come from the log
        await store.add("192.0.2.7", 60)
        await store.add("2001:db8:1:2::/64", None)
        await wait_until(lambda: _async(_banned(front, "192.0.2.7") and _banned(front, "2001:db8:1:2::9")))
        async with pipes(redis_url) as (pipe,):  # a node's guard bans a guesser
            guard = RedisGuard(pipe, GuardPolicy(max_failures=2))
            for _ in range(2):
                await failed(guard, "198.51.100.4", None)
        await wait_until(lambda: _async(_banned(front, "198.51.100.4")))
        assert await store.delete("192.0.2.7")
        await wait_until(lambda: _async(not _banned(front, "192.0.2.7")))
        assert _banned(front, "2001:db8:1:2::9") and _banned(front, "198.51.100.4")


async def test_a_refresh_reads_the_changes_not_every_ban(redis_url: str) -> None:
    redis = create_redis(redis_url)
    try:
        store = BanStore(redis)
        async with redis.pipeline(transaction=False) as pipe:  # 5,000 bans in force
            pipe.zadd("sipfarm:protect:bans", {f"10.1.{i // 250}.{i % 250}": math.inf for i in range(5000)})
            await pipe.execute()
        current, _ = await store.current()
        assert len(current) == 5000 and current["10.1.0.1"] == math.inf
        changes, wall = await store.changes(time.time() * 1000 - 1000)
        assert changes == {}
        await store.add("192.0.2.8", 30)
        changes, _ = await store.changes(wall - 1)
        assert list(changes) == ["192.0.2.8"] and 29 < (changes["192.0.2.8"] or 0) <= 30
        await store.delete("192.0.2.8")
        changes, _ = await store.changes(wall - 1)
        assert changes == {"192.0.2.8": None}
        # the log keeps a minute of changes: older ones are trimmed by its writers and readers
        await redis.zadd(BAN_LOG, {"192.0.2.99": time.time() * 1000 - 120_000})
        await store.changes(0)
        assert await redis.zscore(BAN_LOG, "192.0.2.99") is None
    finally:
        await redis.aclose()


async def test_the_balancer_reads_one_command_a_refresh_whatever_the_bans(redis_url: str) -> None:
    redis = create_redis(redis_url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zadd("sipfarm:protect:bans", {f"10.2.{i // 250}.{i % 250}": math.inf for i in range(2000)})
            await pipe.execute()
        async with syncing(redis_url) as (front, _store):
            await wait_until(lambda: _async(front.bans_known == 2000))
            await redis.config_resetstat()
            await asyncio.sleep(10 * REFRESH)
            stats = await redis.info("commandstats")
            sent = (await redis.info("stats"))["total_net_output_bytes"]
        calls = {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}
        # no key read per ban (GET/PTTL); ten refreshes, each one read of the (empty) log: less
        # than one full read's bytes (2,000 bans of ~25 bytes each) for all of them
        assert "get" not in calls and "pttl" not in calls and "zrange" not in calls, calls
        assert calls.get("zrangebyscore", 0) <= 12, calls
        assert sent < 2000 * 25, sent
    finally:
        await redis.aclose()


async def _async(value: bool) -> bool:
    return value


pytestmark = pytest.mark.timeout(60)
