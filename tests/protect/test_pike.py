"""Sans-IO tests of the per-source rate limiter (:mod:`sipfarm.protect.pike`): a fake clock."""

from __future__ import annotations

import pytest

from sipfarm.protect.pike import Rate, RateBudgets, RequestClass, SourceRates, request_class

BUDGETS = RateBudgets(register=5, invite=3, other=10, suspect=2, window=1.0)


def hits(rates: SourceRates, source: str, cls: RequestClass, count: int, now: float) -> list[Rate]:
    return [rates.hit(source, cls, now) for _ in range(count)]


def test_budget_per_class_and_per_source():
    rates = SourceRates(BUDGETS)
    assert hits(rates, "192.0.2.1", RequestClass.REGISTER, 5, 0.0) == [Rate.OK] * 5
    assert rates.hit("192.0.2.1", RequestClass.REGISTER, 0.1) is Rate.EXCEEDED
    # the other classes and the other sources have budgets of their own
    assert hits(rates, "192.0.2.1", RequestClass.INVITE, 3, 0.1) == [Rate.OK] * 3
    assert rates.hit("192.0.2.1", RequestClass.INVITE, 0.1) is Rate.EXCEEDED
    assert hits(rates, "192.0.2.2", RequestClass.REGISTER, 5, 0.1) == [Rate.OK] * 5


def test_window_slides():
    rates = SourceRates(BUDGETS)
    assert hits(rates, "a", RequestClass.OTHER, 10, 0.0) == [Rate.OK] * 10
    assert rates.hit("a", RequestClass.OTHER, 0.9) is Rate.EXCEEDED
    # half way through the next window, half the previous count still weighs: 5 more fit
    assert hits(rates, "a", RequestClass.OTHER, 6, 1.5) == [Rate.OK] * 5 + [Rate.EXCEEDED]
    # a whole window of silence: the budget is whole again
    assert hits(rates, "a", RequestClass.OTHER, 10, 3.6) == [Rate.OK] * 10


def test_no_double_burst_at_the_window_edge():
    rates = SourceRates(BUDGETS)
    assert hits(rates, "a", RequestClass.REGISTER, 5, 0.99) == [Rate.OK] * 5
    # a fixed window would allow 5 more at 1.01; the sliding one nearly none
    assert hits(rates, "a", RequestClass.REGISTER, 5, 1.01).count(Rate.OK) <= 1


def test_steady_rate_within_budget_never_exceeds():
    rates = SourceRates(BUDGETS)
    now = 0.0
    for _ in range(1000):  # 4 REGISTERs a second for 250 s (budget 5)
        assert rates.hit("a", RequestClass.REGISTER, now) is Rate.OK
        now += 0.25


def test_weight_and_unlimited_class():
    rates = SourceRates(RateBudgets(register=0, invite=3, other=10, suspect=2))
    assert hits(rates, "a", RequestClass.REGISTER, 10_000, 0.0) == [Rate.OK] * 10_000
    assert rates.hit("a", RequestClass.INVITE, 0.0, weight=3) is Rate.OK
    assert rates.hit("a", RequestClass.INVITE, 0.0) is Rate.EXCEEDED


def test_memory_bounded_lru():
    rates = SourceRates(BUDGETS, max_sources=3)
    for source in ("a", "b", "c"):
        hits(rates, source, RequestClass.INVITE, 3, 0.0)
    rates.hit("a", RequestClass.OTHER, 0.0)  # a is recent again: b is the oldest
    rates.hit("d", RequestClass.OTHER, 0.0)
    assert len(rates) == 3
    assert rates.hit("a", RequestClass.INVITE, 0.0) is Rate.EXCEEDED  # still tracked
    assert rates.hit("b", RequestClass.INVITE, 0.0) is Rate.OK  # forgotten: starts again


def test_forget():
    rates = SourceRates(BUDGETS)
    hits(rates, "a", RequestClass.SUSPECT, 2, 0.0)
    assert rates.hit("a", RequestClass.SUSPECT, 0.0) is Rate.EXCEEDED
    rates.forget("a")
    assert rates.hit("a", RequestClass.SUSPECT, 0.0) is Rate.OK


def test_request_class_and_bad_budgets():
    assert request_class(b"REGISTER") is RequestClass.REGISTER
    assert request_class(b"INVITE") is RequestClass.INVITE
    assert request_class(b"OPTIONS") is RequestClass.OTHER
    with pytest.raises(ValueError, match="window"):
        RateBudgets(window=0)
    with pytest.raises(ValueError, match="budgets"):
        RateBudgets(register=-1)
