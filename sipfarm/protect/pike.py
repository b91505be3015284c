"""Per-source request rates, pike-like: how many requests a source sent lately, no I/O.

Theory of operation
-------------------
Each source address has one counter per :class:`RequestClass` (REGISTER, INVITE, the other
methods, and SUSPECT: requests that look like probing, such as ones for a domain the farm does
not serve), each with its own budget of requests per ``window`` seconds.

The window slides by interpolation (the "sliding window counter"): a source keeps the counts of
the current fixed window and of the one before it, and its rate now is
``previous * (1 - elapsed / window) + current``.  Two integers per class instead of a timestamp
per request, and no burst of twice the budget across a window edge as with fixed windows.

:meth:`SourceRates.hit` counts one request and says whether the source is within its budget
(``Rate.OK``) or over it (``Rate.EXCEEDED``; a request over the budget is not counted, so a
source that slows down is within budget again as the window slides).  What to do about an
excess (ban the source) is the caller's business.

Memory is bounded: at most ``max_sources`` sources are tracked, the least recently seen one is
forgotten first (a forgotten source starts again from nothing: lossy, never wrong the other way).
The clock is the caller's (``now`` in seconds, any monotonic origin).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Rate", "RateBudgets", "RequestClass", "SourceRates", "request_class"]


class RequestClass(enum.IntEnum):
    REGISTER = 0
    INVITE = 1
    OTHER = 2
    SUSPECT = 3


class Rate(enum.Enum):
    OK = "ok"
    EXCEEDED = "exceeded"


_CLASSES = len(RequestClass)


def request_class(method: bytes) -> RequestClass:
    if method == b"REGISTER":
        return RequestClass.REGISTER
    if method == b"INVITE":
        return RequestClass.INVITE
    return RequestClass.OTHER


@dataclass(frozen=True, slots=True)
class RateBudgets:
    """Requests allowed per ``window`` seconds per source, by class; 0: that class is not limited."""

    register: int = 20
    invite: int = 50
    other: int = 100
    suspect: int = 5
    window: float = 1.0

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("window must be positive")
        if min(self.register, self.invite, self.other, self.suspect) < 0:
            raise ValueError("budgets must be 0 (no limit) or more")

    def as_list(self) -> list[int]:
        return [self.register, self.invite, self.other, self.suspect]  # RequestClass order


class _Counts:
    __slots__ = ("current", "previous", "start")

    def __init__(self, start: float) -> None:
        self.start = start  # when the current fixed window began
        self.current = [0] * _CLASSES
        self.previous = [0] * _CLASSES


class SourceRates:
    """Sliding-window request counts per source address, bounded to ``max_sources``."""

    __slots__ = ("_budgets", "_max_sources", "_sources", "_window", "budgets")

    def __init__(self, budgets: RateBudgets, *, max_sources: int = 100_000) -> None:
        if max_sources < 1:
            raise ValueError("max_sources must be at least 1")
        self.budgets = budgets
        self._budgets = budgets.as_list()
        self._window = budgets.window
        self._max_sources = max_sources
        self._sources: OrderedDict[str, _Counts] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def hit(self, source: str, cls: RequestClass, now: float, weight: int = 1) -> Rate:
        """Count ``weight`` requests of ``cls`` from ``source`` at ``now``, if within its budget."""
        budget = self._budgets[cls]
        if budget == 0:
            return Rate.OK
        counts = self._sources.get(source)
        window = self._window
        if counts is None:
            counts = _Counts(now)
            self._sources[source] = counts
            if len(self._sources) > self._max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
            elapsed = now - counts.start
            if elapsed >= window:
                if elapsed >= 2 * window:  # silent for a whole window: nothing carries over
                    counts.previous = [0] * _CLASSES
                    counts.start = now
                else:
                    counts.previous = counts.current
                    counts.start += window
                counts.current = [0] * _CLASSES
        elapsed = max(0.0, now - counts.start)
        rate = counts.previous[cls] * (1.0 - elapsed / window) + counts.current[cls]
        if rate + weight > budget:
            return Rate.EXCEEDED
        counts.current[cls] += weight
        return Rate.OK

    def forget(self, source: str) -> None:
        """Drop what is known of ``source`` (its ban starts; counting starts again after it)."""
        self._sources.pop(source, None)
