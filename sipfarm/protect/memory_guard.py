"""The guard of the in-memory test tier: the same answers as :class:`RedisGuard`, no I/O.

Callbacks are called synchronously. State lives in :class:`ExpiringKeys`, a model of the few
Redis commands the guard uses (INCR, PEXPIRE, SET NX PX, PTTL, DEL) with expiry on the
injected clock, so a test runs a 15-minute ban in microseconds. :meth:`MemoryGuard.failed`
states ``failure.lua`` step for step over it; everything decided from the results is
:class:`~sipfarm.protect.guard.GuardRules`, shared with the Redis guard, and a Hypothesis test
(``tests/protect``) holds the two to the same answers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from sipfarm.store.errors import StoreError

from .guard import (
    DEFAULT_POLICY,
    Admission,
    FailureOutcome,
    GuardPolicy,
    GuardRules,
    WorkingMarks,
    account_failures_key,
    ban_key,
    milliseconds,
    nonce_key,
    source_failures_key,
    working_key,
)

__all__ = ["ExpiringKeys", "MemoryGuard", "record_admission"]


class ExpiringKeys:
    """Keys with optional expiry on an injected clock: Redis semantics for the commands modelled.

    Expired keys are dropped when touched, and all at once whenever the table has doubled since
    the last sweep, so one-time keys nobody reads again (nonce uses) do not pile up.
    """

    __slots__ = ("_clock", "_data", "_sweep_at")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._data: dict[str, tuple[int | str, float]] = {}  # key -> (value, expires at; inf: never)
        self._sweep_at = 1024

    def __len__(self) -> int:
        return len(self._data)

    def _live(self, key: str) -> tuple[int | str, float] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] <= self._clock():
            del self._data[key]
            return None
        return entry

    def _store(self, key: str, value: int | str, expires_at: float) -> None:
        self._data[key] = (value, expires_at)
        if len(self._data) >= self._sweep_at:
            now = self._clock()
            self._data = {k: e for k, e in self._data.items() if e[1] > now}
            self._sweep_at = max(1024, 2 * len(self._data))

    def get(self, key: str) -> int | str | None:
        entry = self._live(key)
        return None if entry is None else entry[0]

    def incr(self, key: str) -> int:
        """INCR: a missing key counts from 0; the expiry is kept."""
        entry = self._live(key)
        value, expires_at = (0, math.inf) if entry is None else entry
        if not isinstance(value, int):
            raise StoreError(f"{key} holds {value!r}, not a counter")
        self._store(key, value + 1, expires_at)
        return value + 1

    def expire(self, key: str, seconds: float) -> None:
        """PEXPIRE."""
        entry = self._live(key)
        if entry is not None:
            self._data[key] = (entry[0], self._clock() + seconds)

    def set(self, key: str, value: int | str, seconds: float | None = None, *, only_new: bool = False) -> bool:
        """SET [NX] [PX]: False (nothing written) when ``only_new`` and the key exists."""
        if only_new and self._live(key) is not None:
            return False
        self._store(key, value, math.inf if seconds is None else self._clock() + seconds)
        return True

    def left(self, key: str) -> float | None:
        """PTTL in seconds: None when the key is missing, ``math.inf`` when it never expires."""
        entry = self._live(key)
        if entry is None:
            return None
        return entry[1] - self._clock() if math.isfinite(entry[1]) else math.inf

    def delete(self, key: str) -> bool:
        return self._live(key) is not None and self._data.pop(key, None) is not None

    def keys(self, prefix: str) -> list[str]:
        return [k for k in list(self._data) if k.startswith(prefix) and self._live(k) is not None]


class MemoryGuard:
    """:class:`~sipfarm.protect.guard.Guard` in memory. ``keys`` stands for the farm's Redis: nodes
    of an in-memory farm each hold their own guard (their own local ban cache) over one shared
    :class:`ExpiringKeys`."""

    def __init__(
        self,
        policy: GuardPolicy = DEFAULT_POLICY,
        *,
        clock: Callable[[], float] = time.monotonic,
        keys: ExpiringKeys | None = None,
    ) -> None:
        self.policy = policy
        self.rules = GuardRules(policy)
        self._clock = clock
        self.keys = ExpiringKeys(clock) if keys is None else keys
        self._working = WorkingMarks(policy.working_time)

    def succeeded(self, source_ip: str, account: str) -> None:
        if self._working.due(source_ip, account, self._clock()):
            self.keys.set(working_key(source_ip, account), 1, _whole_ms(self.policy.working_time))

    def works(self, source_ip: str, account: str, done: Callable[[bool | StoreError], None]) -> None:
        done(self.keys.get(working_key(source_ip, account)) is not None)

    def banned_locally(self, source_ip: str, now: float) -> bool:
        return self.rules.local.banned(source_ip, now)

    def admit(self, source_ip: str, nonce_use: str, ttl: float, done: Callable[[Admission | StoreError], None]) -> None:
        ban, first_use = record_admission(self.keys, source_ip, nonce_use, ttl)
        done(self.rules.admission(source_ip, ban, first_use, self._clock()))

    def admission(self, source_ip: str, ban_left: float | None, first_use: bool) -> Admission:
        return self.rules.admission(source_ip, ban_left, first_use, self._clock())

    def failed(self, source_ip: str, account: str | None, done: Callable[[FailureOutcome | StoreError], None]) -> None:
        # failure.lua, step for step
        policy = self.policy
        keys = self.keys
        source_key = source_failures_key(source_ip)
        account_count = 0
        try:
            source = keys.incr(source_key)
            if source == 1:
                keys.expire(source_key, _whole_ms(policy.window))
            if account is not None:
                account_key = account_failures_key(account)
                account_count = keys.incr(account_key)
                if account_count == 1:
                    keys.expire(account_key, _whole_ms(policy.window))
        except StoreError as exc:
            done(exc)
            return
        started = False
        working = account is not None and keys.get(working_key(source_ip, account)) is not None
        limit = policy.max_failures_working if working else policy.max_failures
        if source >= limit and keys.set(ban_key(source_ip), source, _whole_ms(policy.ban_time), only_new=True):
            started = True
            keys.delete(source_key)
        ban = keys.left(ban_key(source_ip))
        done(self.rules.failure(source_ip, account, source, account_count, started, ban, self._clock()))

    # -- what an operator does with `sipfarm ban add|del` ----------------------------------------

    def ban(self, source_ip: str, seconds: float | None) -> None:
        """Ban by hand (``None``: until lifted)."""
        self.keys.set(ban_key(source_ip), "manual", None if seconds is None else _whole_ms(seconds))

    def unban(self, source_ip: str) -> bool:
        """Lift a ban and forget the source's failures; whether there was a ban."""
        self.keys.delete(source_failures_key(source_ip))
        return self.keys.delete(ban_key(source_ip))


def record_admission(keys: ExpiringKeys, source_ip: str, nonce_use: str, ttl: float) -> tuple[float | None, bool]:
    """What admit asks the store (and ``admit.lua`` before a REGISTER's write), over ``keys``:
    the seconds left of the source's ban (None: none), and whether the nonce use was new (it is
    recorded for ``ttl`` seconds either way)."""
    ban = keys.left(ban_key(source_ip))
    first_use = keys.set(nonce_key(nonce_use), "1", _whole_ms(ttl), only_new=True)
    return ban, first_use


def _whole_ms(seconds: float) -> float:
    """An expiry rounded as Redis keeps it (see :func:`milliseconds`), in seconds."""
    return milliseconds(seconds) / 1000
