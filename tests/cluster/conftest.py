"""Cluster tests: ``async def`` tests run in a fresh event loop each (as in ``tests/store``).

Redis comes from the suite's ``redis_server``/``redis_url`` fixtures (``tests/fixtures``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from cluster_support import OpenMembership

from sipfarm.cluster import MembershipStore
from sipfarm.store import create_redis


@pytest.fixture
def open_membership(redis_url: str) -> OpenMembership:
    """``async with open_membership(ttl=0.3) as store:`` a MembershipStore on its own client
    (one process's view of the farm); keyword arguments go to ``MembershipStore``."""

    @asynccontextmanager
    async def open_(**kwargs: Any) -> AsyncIterator[MembershipStore]:
        redis = create_redis(redis_url)
        try:
            yield MembershipStore(redis, **kwargs)
        finally:
            await redis.aclose()

    return open_
