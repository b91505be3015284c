"""MemberWatcher: the balancer's in-memory view of the farm, and what it does when Redis fails."""

from __future__ import annotations

import asyncio
import time
from functools import partial

from cluster_support import OpenMembership, count_calls, eventually, node, relay

from sipfarm.cluster import (
    ChangeKind,
    Heartbeater,
    MembershipChange,
    MemberState,
    MemberWatcher,
    Role,
)
from sipfarm.store import RedisProcess


async def test_watcher_reports_join_state_change_and_leave(open_membership: OpenMembership) -> None:
    changes: list[tuple[ChangeKind, str, MemberState]] = []

    def record(c: MembershipChange) -> None:
        changes.append((c.kind, c.member.id, c.member.state))

    async with open_membership() as store:
        watcher = MemberWatcher(store, Role.NODE, interval=0.05)
        watcher.add_listener(record)
        assert (watcher.stale, watcher.snapshot()) == (True, ())  # nothing read yet
        async with watcher:
            await store.heartbeat(node("node-1"))
            await store.heartbeat(node("node-2", 5072))
            await store.heartbeat(relay())  # another role: not watched

            async def two() -> bool:
                return [m.id for m in watcher.snapshot()] == ["node-1", "node-2"]

            await eventually(two, within=5.0)
            assert not watcher.stale
            generation = watcher.generation

            await store.drain("node-2")
            await store.heartbeat(node("node-2", 5072))

            async def drained() -> bool:
                m = watcher.get("node-2")
                return m is not None and m.state is MemberState.DRAINING

            await eventually(drained, within=5.0)
            assert watcher.generation > generation
            assert [m.id for m in watcher.active()] == ["node-1"]  # what a balancer sends new work to

            await store.heartbeat(node("node-2", 5072, state=MemberState.DRAINING, load=9.0))
            await store.heartbeat(node("node-2", 5099, state=MemberState.DRAINING))  # restarted elsewhere

            async def moved() -> bool:
                m = watcher.get("node-2")
                return m is not None and m.addresses == ("udp:127.0.0.1:5099",)

            await eventually(moved, within=5.0)
            await store.leave("node-1")

            async def one() -> bool:
                return [m.id for m in watcher.snapshot()] == ["node-2"]

            await eventually(one, within=5.0)
    assert changes == [
        (ChangeKind.JOINED, "node-1", MemberState.ACTIVE),
        (ChangeKind.JOINED, "node-2", MemberState.ACTIVE),
        (ChangeKind.STATE_CHANGED, "node-2", MemberState.DRAINING),
        (ChangeKind.UPDATED, "node-2", MemberState.DRAINING),  # not for the load figure
        (ChangeKind.LEFT, "node-1", MemberState.ACTIVE),
    ]


async def test_watcher_drops_member_that_stops_heartbeating(open_membership: OpenMembership) -> None:
    # Counted in polls, not seconds (a loaded machine stretches those): Redis expires the record
    # on its own clock, and the watcher's first poll after that drops the member.
    async with open_membership(ttl=0.3) as store, MemberWatcher(store, interval=0.05) as watcher:
        polls = count_calls(store)
        left_at: list[int] = []
        watcher.add_listener(lambda c: left_at.append(len(polls)) if c.kind is ChangeKind.LEFT else None)
        beat_at = time.monotonic()
        await store.heartbeat(node("node-1"))

        async def seen() -> bool:
            return len(watcher.snapshot()) == 1

        async def expired() -> bool:  # Redis's view, not the watcher's
            return await store.get("node-1") is None

        async def gone() -> bool:
            return watcher.snapshot() == ()

        await eventually(seen, within=5.0)
        await eventually(expired, within=5.0)
        assert time.monotonic() - beat_at >= 0.3 - 0.05  # its TTL, not earlier
        polls_at_expiry = len(polls)
        await eventually(gone, within=5.0)
        # dropped by the first poll started after the record expired
        assert left_at and left_at[0] <= polls_at_expiry + 1, (polls_at_expiry, left_at)


async def test_watcher_keeps_snapshot_while_redis_is_down(
    open_membership: OpenMembership, redis_server: RedisProcess
) -> None:
    left: list[str] = []
    # TTL well above a loaded machine's stalls: the heartbeaters share this process, and a record
    # expiring while they are stalled would be a real (and correct) LEFT
    async with open_membership(ttl=3.0) as store:
        beaters = [Heartbeater(store, partial(node, f"node-{i}", 5070 + i), interval=0.1) for i in (1, 2)]
        # bounds wide enough for a loaded CI machine (a Redis restart or a heartbeat can stall a second)
        watcher = MemberWatcher(store, Role.NODE, interval=0.05, stale_after=1.0, timeout=0.3, recovery_grace=2.0)
        watcher.add_listener(lambda c: left.append(c.member.id) if c.kind is ChangeKind.LEFT else None)
        for hb in beaters:
            hb.start()
        watcher.start()
        try:

            async def both() -> bool:
                return len(watcher.snapshot()) == 2

            await eventually(both, within=5.0)
            before = watcher.snapshot()

            await asyncio.to_thread(redis_server.stop)
            assert watcher.snapshot() == before  # the balancer keeps forwarding to them

            async def stale() -> bool:
                return watcher.stale

            await eventually(stale, within=5.0)
            assert watcher.snapshot() == before  # stale, but still served
            assert watcher.running

            # Redis returns empty; the heartbeaters refill it within one interval. Meanwhile
            # the watcher must not report the nodes as gone.
            await asyncio.to_thread(redis_server.start)

            async def fresh() -> bool:
                return not watcher.stale

            await eventually(fresh, within=10.0)
            await asyncio.sleep(2.1)  # past the recovery grace
            assert [m.id for m in watcher.snapshot()] == ["node-1", "node-2"]
            assert left == []
        finally:
            await watcher.stop()
            for hb in beaters:
                await hb.stop()
            redis_server.start()


async def test_listener_errors_do_not_stop_the_watcher(open_membership: OpenMembership) -> None:
    def broken(c: MembershipChange) -> None:
        raise RuntimeError("listener bug")

    async with open_membership() as store, MemberWatcher(store, interval=0.05) as watcher:
        remove = watcher.add_listener(broken)
        await store.heartbeat(node("node-1"))

        async def seen() -> bool:
            return len(watcher.snapshot()) == 1

        await eventually(seen, within=5.0)
        remove()
        await store.heartbeat(node("node-2", 5072))

        async def two() -> bool:
            return len(watcher.snapshot()) == 2

        await eventually(two, within=5.0)
        assert watcher.running


async def test_poll_once_before_serving(open_membership: OpenMembership) -> None:
    async with open_membership() as store:
        await store.heartbeat(node("node-1"))
        watcher = MemberWatcher(store)
        assert await watcher.poll() is True
        assert [m.id for m in watcher.snapshot()] == ["node-1"]
        assert watcher.age is not None and not watcher.stale


async def test_recovery_grace_after_redis_came_back_empty(
    open_membership: OpenMembership, redis_server: RedisProcess
) -> None:
    # Nobody re-beats here, so the grace is what keeps the nodes, and only for its length. The
    # watcher's clock is the test's: polls run in real time, the grace is judged on this clock, so
    # a loaded machine cannot move a poll to the other side of the grace's end.
    changes: list[tuple[ChangeKind, str, int]] = []
    now = [1000.0]
    async with open_membership(ttl=30) as store:
        await store.heartbeat(node("node-1"))
        polls = count_calls(store)
        watcher = MemberWatcher(store, interval=0.05, timeout=0.3, recovery_grace=0.4, clock=lambda: now[0])
        watcher.add_listener(lambda c: changes.append((c.kind, c.member.id, len(polls))))
        assert await watcher.poll()
        try:
            await asyncio.to_thread(redis_server.stop)
            assert await watcher.poll() is False
            await asyncio.to_thread(redis_server.start)  # empty dataset
            now[0] += 10.0  # the last good poll is 10 s old
            watcher.start()

            async def polled() -> bool:  # Redis answered again: the grace starts now
                return watcher.age == 0.0

            async def polls_from_now(n: int) -> None:
                want = len(polls) + n

                async def done() -> bool:
                    return len(polls) >= want

                await eventually(done, within=5.0)

            await eventually(polled, within=5.0)
            await polls_from_now(3)
            now[0] += 0.39
            await polls_from_now(3)
            assert [m.id for m in watcher.snapshot()] == ["node-1"]  # kept during the grace
            assert len(changes) == 1

            async def gone() -> bool:
                return watcher.snapshot() == ()

            now[0] += 0.02  # past the grace
            polls_past_grace = len(polls)
            await eventually(gone, within=5.0)
            assert [c[:2] for c in changes] == [(ChangeKind.JOINED, "node-1"), (ChangeKind.LEFT, "node-1")]
            assert changes[1][2] <= polls_past_grace + 1  # by the first poll after it
        finally:
            await watcher.stop()
            redis_server.start()
