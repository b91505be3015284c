"""Heartbeater: keeps a process listed, reports drain, survives Redis going away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from cluster_support import OpenMembership, eventually, node

from sipfarm.cluster import Heartbeater, Member, MembershipStore, MemberState
from sipfarm.cluster.heartbeat import LEAVE_TIMEOUT
from sipfarm.store import RedisProcess, StoreUnavailable


def _listed(store: MembershipStore, member_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return any(m.id == member_id for m in await store.members())
        except StoreUnavailable:
            return False  # Redis still starting

    return check


async def test_heartbeater_joins_updates_and_leaves_on_stop(open_membership: OpenMembership) -> None:
    figures = {"load": 0.0}

    def provider() -> Member:
        return node("node-1", load=figures["load"])

    async with open_membership(ttl=60) as store:  # long TTL: only `leave` can remove it fast
        hb = Heartbeater(store, provider, interval=0.05)
        hb.start()
        await eventually(_listed(store, "node-1"), within=5.0)
        assert hb.state is MemberState.ACTIVE and hb.connected
        figures["load"] = 42.0

        async def load_seen() -> bool:
            return [m.load for m in await store.members()] == [42.0]

        await eventually(load_seen, within=5.0)
        await hb.stop()
        assert await store.members() == []
        assert not hb.running


async def test_heartbeater_stopped_at_any_point_of_its_first_beat_stops(open_membership: OpenMembership) -> None:
    # a node SIGTERMed right after it started: stop() while the first beat (a fresh client's
    # connect, then the script) is in flight at each await point; a cancellation there used to be
    # swallowed by redis-py and stop() never returned
    for yields in range(40):
        async with open_membership(ttl=60) as store:
            hb = Heartbeater(store, lambda: node("node-1"), interval=1.0)
            hb.start()
            for _ in range(yields):
                await asyncio.sleep(0)
            async with asyncio.timeout(3):
                await hb.stop()
            assert not hb.running
            assert await store.members() == [], yields  # left, whether or not the beat landed


async def test_heartbeater_reports_drain_and_undrain(open_membership: OpenMembership) -> None:
    states: list[MemberState] = []
    async with (
        open_membership() as store,
        Heartbeater(store, lambda: node("node-1"), interval=0.05, on_state=states.append) as hb,
    ):
        await eventually(_listed(store, "node-1"), within=5.0)
        beats = hb.beats
        await store.drain("node-1")

        async def draining() -> bool:
            return hb.state is MemberState.DRAINING

        await eventually(draining, within=5.0)
        # the next beat (or the one after, if one was in flight as the flag was set): counted in
        # beats, not seconds, which a loaded machine stretches
        assert hb.beats <= beats + 2, (beats, hb.beats)
        [m] = await store.members()
        assert m.state is MemberState.DRAINING
        await store.undrain("node-1")
        hb.beat_now()

        async def active() -> bool:
            return hb.state is MemberState.ACTIVE

        await eventually(active, within=5.0)
        assert states == [MemberState.ACTIVE, MemberState.DRAINING, MemberState.ACTIVE]


async def test_heartbeater_survives_redis_restart(
    open_membership: OpenMembership, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sipfarm.cluster")
    async with open_membership(ttl=0.5) as store:
        hb = Heartbeater(store, lambda: node("node-1"), interval=0.05)
        hb.start()
        try:
            await eventually(_listed(store, "node-1"), within=5.0)
            await asyncio.to_thread(redis_server.stop)

            async def retried() -> bool:  # it keeps beating, at its pace, through the outage
                return hb.failures >= 3

            await eventually(retried, within=5.0)
            assert (hb.running, hb.connected) == (True, False)
            # Redis comes back empty (no persistence): the next beat puts the member back (counted
            # in beats, not seconds: no backoff grows while Redis is away).
            await asyncio.to_thread(redis_server.start)
            attempts = hb.beats + hb.failures
            await eventually(_listed(store, "node-1"), within=5.0)
            assert hb.beats + hb.failures <= attempts + 3, (attempts, hb.beats, hb.failures)
            assert (hb.running, hb.connected) == (True, True)
        finally:
            await hb.stop()
            redis_server.start()
    failed = [r for r in caplog.records if "cluster_heartbeat_failed" in r.getMessage()]
    recovered = [r for r in caplog.records if "cluster_heartbeat_recovered" in r.getMessage()]
    assert len(failed) == 1, "one line per outage, not one per beat"
    assert len(recovered) == 1


async def test_heartbeater_stop_while_redis_down_is_bounded(
    open_membership: OpenMembership, redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sipfarm.cluster")
    async with open_membership() as store:
        hb = Heartbeater(store, lambda: node("node-1"), interval=0.05)
        hb.start()
        try:
            await eventually(_listed(store, "node-1"), within=5.0)
            await asyncio.to_thread(redis_server.stop)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await hb.stop()  # leave fails: logged, not raised
            # bounded: by its own timeouts (beat + 0.5 s, then the leave's), with room for a loaded
            # machine; a hang (a swallowed cancellation) is what this catches
            assert loop.time() - t0 < hb.timeout + 0.5 + LEAVE_TIMEOUT + 2.0
            # and quick: the refused connection failed both, no timeout was waited out
            assert not [r for r in caplog.records if "stop_timeout" in r.getMessage()]
            [left] = [r.getMessage() for r in caplog.records if "cluster_leave_failed" in r.getMessage()]
            assert "TimeoutError" not in left, left
        finally:
            redis_server.start()


async def test_provider_failure_does_not_kill_heartbeater(
    open_membership: OpenMembership, caplog: pytest.LogCaptureFixture
) -> None:
    calls = {"n": 0}

    def flaky() -> Member:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise RuntimeError("figures not ready")
        return node("node-1")

    async with open_membership() as store, Heartbeater(store, flaky, interval=0.02) as hb:
        await eventually(_listed(store, "node-1"), within=5.0)
        assert hb.running
    assert sum("provider_failed" in r.getMessage() for r in caplog.records) == 1
