"""Helpers for the guard tests: await a guard's callback, a settable clock, short bounded waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sipfarm.protect import Admission, FailureOutcome, Guard
from sipfarm.store.errors import StoreError
from sipfarm.store.resp import RedisPipe


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def admit(guard: Guard, source: str, nonce_use: str, ttl: float = 60.0) -> Admission | StoreError:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    guard.admit(source, nonce_use, ttl, fut.set_result)
    return await asyncio.wait_for(fut, 5)


async def failed(guard: Guard, source: str, account: str | None) -> FailureOutcome | StoreError:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    guard.failed(source, account, fut.set_result)
    return await asyncio.wait_for(fut, 5)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 3.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(step)


@asynccontextmanager
async def pipes(url: str, count: int = 1) -> AsyncIterator[list[RedisPipe]]:
    """``count`` connected RedisPipes (each stands for one node), always closed."""
    opened: list[RedisPipe] = []
    try:
        for _ in range(count):
            pipe = RedisPipe(url)
            await pipe.connect()
            opened.append(pipe)
        yield opened
    finally:
        for pipe in opened:
            await pipe.close()
