"""Plain counters for the metrics the node bumps on every message (compiled with mypyc).

prometheus-client's ``Counter.labels(x).inc()`` and ``Histogram.observe()`` run interpreted and
take a lock on each call: ~3% of a node's CPU at full load.  The hot paths (a request received,
a response sent, a REGISTER or INVITE handled, a Redis round trip) count here instead, in plain
integers and floats, and :mod:`sipfarm.metrics` turns them into the very same Prometheus
samples at scrape time (or, in a worker of a multi-process node, copies the increments into
prometheus-client's multiprocess files once a second).

No lock: the event loop's thread is the only writer, and the scrape thread reads whole values
(one ``dict``/``list`` copy, atomic under the GIL); a scrape may see a histogram's sum one
observation ahead of its buckets, as prometheus-client's own histogram allows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final


class LabelledCounter:
    """Counts by one label value, keyed as the call site has it (the method's bytes, the
    status's int): no conversion per message, the exporter makes the label strings.

    Bounded: label values come off the wire (a request's method is any token), so past
    ``limit`` distinct values the rest count under ``overflow``."""

    def __init__(self, limit: int, overflow: object) -> None:
        self.counts: Final[dict[object, int]] = {}
        self.created: Final[dict[object, float]] = {}  # wall clock of each value's first count
        self.limit: Final = limit
        self.overflow: Final = overflow

    def inc(self, key: object) -> None:
        counts = self.counts
        value = counts.get(key)
        if value is not None:
            counts[key] = value + 1
        else:
            self._first(key)

    def _first(self, key: object) -> None:
        counts = self.counts
        if len(counts) >= self.limit:
            key = self.overflow
            value = counts.get(key)
            if value is not None:
                counts[key] = value + 1
                return
        self.created[key] = time.time()
        counts[key] = 1

    def snapshot(self) -> list[tuple[object, int, float]]:
        """(key, count, created) of each value, in the order first counted."""
        created = self.created
        return [(key, count, created.get(key, 0.0)) for key, count in list(self.counts.items())]


class FixedHistogram:
    """A histogram with fixed upper bounds (the last one +Inf): one integer per bucket and the
    sum, observed as prometheus-client's ``Histogram.observe`` does (the first bucket whose
    bound is >= the value)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        upper = [float(b) for b in bounds]
        if not upper or upper[-1] != float("inf"):
            upper.append(float("inf"))
        self.bounds: Final[list[float]] = upper
        self.counts: Final[list[int]] = [0] * len(upper)
        self.sum: float = 0.0
        self.created: Final = time.time()

    def observe(self, value: float) -> None:
        self.sum += value
        bounds = self.bounds
        for i in range(len(bounds)):
            if value <= bounds[i]:
                self.counts[i] += 1
                return

    def snapshot(self) -> tuple[list[int], float]:
        """The per-bucket counts (not cumulative) and the sum."""
        return list(self.counts), self.sum
