"""Store tests: ``async def`` tests run in a fresh event loop each (no asyncio plugin needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from store_support import OpenStores, Stores

from sipfarm.store import AccountStore, LocationStore, create_redis


@pytest.fixture
def open_single_stores(redis_url: str) -> OpenStores:
    """``open_stores`` on one Redis only (tests that stop and restart it)."""
    return _opener(redis_url)


@pytest.fixture(params=["redis", "cluster"])
def open_stores(request: pytest.FixtureRequest) -> OpenStores:
    """``async with open_stores() as s:`` an AccountStore and a LocationStore on a fresh client
    (one node's view of the farm); keyword arguments go to ``create_redis``. Every test using it
    runs twice: on one Redis, and on a 3-master Redis Cluster (its key layout)."""
    redis_url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
    return _opener(redis_url)


def _opener(redis_url: str) -> OpenStores:

    @asynccontextmanager
    async def open_(**kwargs: Any) -> AsyncIterator[Stores]:
        redis = create_redis(redis_url, **kwargs)
        try:
            yield Stores(AccountStore(redis), LocationStore(redis))
        finally:
            await redis.aclose()

    return open_
