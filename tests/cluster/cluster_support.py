"""Helpers shared by the cluster tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from sipfarm.cluster import Member, MembershipStore, MemberState, Role

OpenMembership = Callable[..., AbstractAsyncContextManager[MembershipStore]]


#: one start time for every test member: a process's start time does not change between beats
STARTED_AT = time.time() - 5


def node(member_id: str = "node-1", port: int = 5071, **kw: Any) -> Member:
    fields: dict[str, Any] = {
        "role": Role.NODE,
        "addresses": (f"udp:127.0.0.1:{port}",),
        "pid": 1234,
        "host": "test",
        "started_at": STARTED_AT,
        "version": "0.1.0",
    }
    fields.update(kw)
    return Member(member_id, **fields)


def relay(member_id: str = "relay-1", port: int = 30000) -> Member:
    return Member(
        member_id,
        Role.RELAY,
        (f"udp:127.0.0.1:{port}",),
        control_address="udp:127.0.0.1:2223",
        state=MemberState.ACTIVE,
    )


def count_calls(store: MembershipStore, method: str = "members") -> list[float]:
    """Count the calls of ``store.<method>`` from now on (e.g. a watcher's polls): the returned
    list gets one monotonic timestamp per call, taken when the call starts. For tests that
    reason in polls or beats rather than in wall-clock time, which a loaded machine stretches."""
    calls: list[float] = []
    original = getattr(store, method)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        return await original(*args, **kwargs)

    setattr(store, method, counted)
    return calls


async def eventually(check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.02) -> float:
    """Poll ``check`` until true; return the seconds it took; fail after ``within`` seconds."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)
