"""A bounded memo for pure parsers of immutable values (URIs, name-addrs, stored bindings).

SIP traffic repeats the same values (Request-URIs, Route and Contact values, a callee's
bindings), so parsing each distinct text once pays. The memo is bounded: when full it is
cleared, so hostile input that never repeats costs one dict insert per value, not memory.
Only results are kept: a parser that raises is simply called again next time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    __slots__ = ("_data", "_limit", "_make")

    def __init__(self, make: Callable[[K], V], limit: int = 4096) -> None:
        self._make = make
        self._limit = limit
        self._data: dict[K, V] = {}

    def __call__(self, key: K) -> V:
        hit = self._data.get(key)
        if hit is not None:
            return hit
        value = self._make(key)
        if len(self._data) >= self._limit:
            self._data.clear()
        self._data[key] = value
        return value

    def seed(self, key: K, value: V) -> None:
        """Record ``value`` as what the parser makes of ``key`` (the caller just encoded it from
        that value), so its first read costs a look-up, not a parse."""
        if len(self._data) >= self._limit:
            self._data.clear()
        self._data[key] = value
