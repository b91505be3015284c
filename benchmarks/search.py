"""Find the highest sustained rate a target handles with fewer than 1% failures.

Theory of operation: a *step* offers load at one rate for a bounded time and reports the
failure percentage and the rate actually achieved; how it does that (SIPp against Kamailio,
against sipfarm, anything else) is the caller's `run_step` callable. The search first grows the
rate geometrically from `start_rate` until a step fails (or shrinks it until one passes), then
bisects between the highest passing and the lowest failing rate until they are within
`precision` of each other, or the step or time budget runs out. A step passes when its failure
percentage is below `max_failure_pct` *and* it achieved at least `min_achieved_ratio` of the
offered rate: a load generator that cannot keep up must not be mistaken for a server that does
(and, optionally, its p99 response time is at most `max_p99_ms`: a server that completes every
call only after seconds of retransmissions is not sustaining that rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of offering `rate` (per second) for one bounded step."""

    rate: float
    failure_pct: float
    achieved_rate: float
    p99_ms: float | None = None
    detail: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SearchResult:
    max_rate: float | None
    """Highest offered rate that passed; None when even the lowest tried rate failed."""
    best: Step | None
    steps: tuple[Step, ...]
    stopped_by: str
    """Why the search ended: precision, max_rate, min_rate, max_steps or time_budget."""
    elapsed_s: float


StepRunner = Callable[[float], Step]


def step_passes(
    step: Step,
    max_failure_pct: float = 1.0,
    min_achieved_ratio: float = 0.9,
    max_p99_ms: float | None = None,
) -> bool:
    if max_p99_ms is not None and (step.p99_ms is None or step.p99_ms > max_p99_ms):
        return False
    return step.failure_pct < max_failure_pct and step.achieved_rate >= min_achieved_ratio * step.rate


def _round_rate(rate: float) -> float:
    """Rates above 10/s in whole calls per second, below in tenths (SIPp takes either)."""
    return float(round(rate)) if rate >= 10 else round(rate, 1)


def find_max_rate(
    run_step: StepRunner,
    *,
    start_rate: float,
    max_rate: float = 100_000.0,
    min_rate: float = 1.0,
    growth: float = 2.0,
    precision: float = 0.05,
    max_failure_pct: float = 1.0,
    min_achieved_ratio: float = 0.9,
    max_p99_ms: float | None = None,
    max_steps: int = 16,
    time_budget_s: float | None = None,
    on_step: Callable[[Step, bool], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Step then bisect the offered rate; see the module docstring.

    `precision` is relative: bisection stops when (lowest failing - highest passing) is at most
    `precision` times the highest passing rate. The time budget is checked before each step, so
    the search may overrun it by one step's duration.
    """
    if start_rate <= 0 or growth <= 1 or not 0 < precision < 1:
        raise ValueError("need start_rate > 0, growth > 1 and 0 < precision < 1")
    started = clock()
    steps: list[Step] = []
    good: Step | None = None
    bad: Step | None = None

    def out_of_budget() -> str | None:
        if len(steps) >= max_steps:
            return "max_steps"
        if time_budget_s is not None and clock() - started >= time_budget_s:
            return "time_budget"
        return None

    def run(rate: float) -> bool:
        step = run_step(rate)
        steps.append(step)
        ok = step_passes(step, max_failure_pct, min_achieved_ratio, max_p99_ms)
        if on_step is not None:
            on_step(step, ok)
        return ok

    def result(stopped_by: str) -> SearchResult:
        return SearchResult(
            max_rate=good.rate if good else None,
            best=good,
            steps=tuple(steps),
            stopped_by=stopped_by,
            elapsed_s=clock() - started,
        )

    # Phase 1: bracket the limit geometrically.
    rate = _round_rate(min(start_rate, max_rate))
    while True:
        if (reason := out_of_budget()) is not None:
            return result(reason)
        passed = run(rate)
        if passed:
            good = steps[-1]
            if bad is not None:
                break
            if rate >= max_rate:
                return result("max_rate")
            rate = _round_rate(min(rate * growth, max_rate))
        else:
            bad = steps[-1]
            if good is not None:
                break
            if rate <= min_rate:
                return result("min_rate")
            rate = _round_rate(max(rate / growth, min_rate))

    # Phase 2: bisect between the highest pass and the lowest failure.
    assert good is not None and bad is not None
    while bad.rate - good.rate > precision * good.rate:
        if (reason := out_of_budget()) is not None:
            return result(reason)
        mid = _round_rate((good.rate + bad.rate) / 2)
        if mid in (good.rate, bad.rate):
            break
        if run(mid):
            good = steps[-1]
        else:
            bad = steps[-1]
    return result("precision")
