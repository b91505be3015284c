"""MembershipStore against a real redis-server: join, list, expiry, leave, drain."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
from cluster_support import OpenMembership, eventually, node, relay

from sipfarm.cluster import Member, MembershipStore, MemberState, Role, parse_address
from sipfarm.store import StoreUnavailable, create_redis
from sipfarm.store.redis_server import free_port


async def test_heartbeat_lists_live_members_by_role(open_membership: OpenMembership) -> None:
    async with open_membership() as store:
        n2, n1, r1 = node("node-2", 5072), node("node-1", 5071), relay()
        for m in (n2, n1, r1):
            assert await store.heartbeat(m) is MemberState.ACTIVE
        assert await store.members() == [n1, n2, r1]
        assert await store.members(Role.NODE) == [n1, n2]
        assert await store.members(Role.RELAY) == [r1]
        assert await store.members(Role.BALANCER) == []
        assert await store.get("relay-1") == r1
        assert await store.get("nobody") is None


async def test_heartbeat_refreshes_figures(open_membership: OpenMembership) -> None:
    async with open_membership() as store:
        await store.heartbeat(node(load=1.0, registrations=10))
        await store.heartbeat(node(load=7.5, registrations=11, transactions=3))
        [m] = await store.members()
        assert (m.load, m.registrations, m.transactions) == (7.5, 11, 3)


async def _pttl_ms(redis_url: str, key: str) -> int:
    redis = create_redis(redis_url)
    try:
        return int(await redis.pttl(key))
    finally:
        await redis.aclose()


async def test_member_that_stops_heartbeating_is_gone_within_2s(
    open_membership: OpenMembership, redis_url: str
) -> None:
    # The default TTL, as deployed: gone within 2 s of the last beat. "Within" is Redis's own
    # clock (the record's PTTL, set by the beat): this process's view of the moment it went can
    # only be late, and on a loaded machine by a second or more.
    async with open_membership() as store:
        before_beat = time.monotonic()
        await store.heartbeat(node("silent"))
        assert -1 != await _pttl_ms(redis_url, store.member_key("silent")) <= 2000  # -1: no expiry
        await store.heartbeat(node("alive"))

        async def silent_gone() -> bool:
            await store.heartbeat(node("alive"))  # the other one keeps beating
            return [m.id for m in await store.members()] == ["alive"]

        await eventually(silent_gone, within=5.0, interval=0.05)
        assert time.monotonic() - before_beat >= store.ttl - 0.1  # not before its TTL


async def test_short_ttl_expiry(open_membership: OpenMembership, redis_url: str) -> None:
    async with open_membership(ttl=0.2) as store:
        before_beat = time.monotonic()
        await store.heartbeat(node())
        # gone within its TTL of the beat, on Redis's clock (-2: gone already, on a stalled machine)
        assert -1 != await _pttl_ms(redis_url, store.member_key("node-1")) <= 200  # -1: no expiry
        await asyncio.sleep(0.1)
        listed = len(await store.members())
        if time.monotonic() - before_beat < store.ttl - 0.02:  # not stalled past the TTL meanwhile
            assert listed == 1  # still within its TTL
        await eventually(lambda: _empty(store), within=5.0)
        assert time.monotonic() - before_beat >= store.ttl - 0.02  # not before its TTL


async def _empty(store: MembershipStore) -> bool:
    return await store.members() == []


async def test_index_entries_are_pruned_after_grace(open_membership: OpenMembership, redis_url: str) -> None:
    async with open_membership(ttl=0.2, prune_grace=5.0) as store:
        now = time.time()
        await store.heartbeat(node(), now=now)
        redis = create_redis(redis_url)
        try:
            await asyncio.sleep(0.3)
            assert await store.members(now=now + 1) == []
            assert await redis.zcard(store.index_key) == 1  # within grace: kept (clock skew)
            assert await store.members(now=now + 10) == []
            assert await redis.zcard(store.index_key) == 0
        finally:
            await redis.aclose()


async def test_missing_and_corrupt_records_are_skipped(open_membership: OpenMembership, redis_url: str) -> None:
    async with open_membership() as store:
        await store.heartbeat(node("good"))
        redis = create_redis(redis_url)
        try:
            await redis.zadd(store.index_key, {"ghost": time.time() + 10, "bad": time.time() + 10})
            await redis.set(store.member_key("bad"), b"{not json", px=5000)
            assert [m.id for m in await store.members()] == ["good"]
        finally:
            await redis.aclose()


async def test_leave_removes_immediately(open_membership: OpenMembership) -> None:
    async with open_membership(ttl=60) as store:
        await store.heartbeat(node("a"))
        await store.heartbeat(node("b"))
        await store.leave("a")
        assert [m.id for m in await store.members()] == ["b"]
        await store.leave("a")  # idempotent


async def test_drain_flag_is_picked_up_by_the_next_heartbeat(open_membership: OpenMembership) -> None:
    async with open_membership() as member_view, open_membership() as operator:
        me = node("node-1")
        assert await member_view.heartbeat(me) is MemberState.ACTIVE
        # `sipfarm drain node-1`, from another client/host
        assert await operator.drain("node-1") is True
        [listed] = await operator.members()
        assert listed.state is MemberState.ACTIVE  # not yet: the member has not beaten since
        assert await operator.drain_flags(["node-1", "node-2"]) == {"node-1": True, "node-2": False}

        assert await member_view.heartbeat(me) is MemberState.DRAINING
        [listed] = await operator.members()
        assert listed.state is MemberState.DRAINING
        assert listed.load == me.load  # the rest of the record is the member's

        # The flag survives restarts (a new process with the same id) until undrain.
        await member_view.leave("node-1")
        assert await member_view.heartbeat(me) is MemberState.DRAINING

        assert await operator.undrain("node-1") is True
        assert await operator.undrain("node-1") is False
        assert await member_view.heartbeat(me) is MemberState.ACTIVE
        [listed] = await operator.members()
        assert listed.state is MemberState.ACTIVE


async def test_set_state_and_self_reported_draining(open_membership: OpenMembership) -> None:
    async with open_membership() as store:
        assert await store.set_state("node-1", MemberState.DRAINING) is False  # not live (yet)
        assert await store.heartbeat(node("node-1")) is MemberState.DRAINING
        assert await store.set_state("node-1", MemberState.ACTIVE) is True
        assert await store.heartbeat(node("node-1")) is MemberState.ACTIVE
        # A member draining on its own (e.g. on SIGTERM) is draining whatever the flag says.
        assert await store.heartbeat(node("node-1", state=MemberState.DRAINING)) is MemberState.DRAINING


async def test_drain_with_ttl_expires(open_membership: OpenMembership) -> None:
    async with open_membership() as store:
        before = time.monotonic()
        await store.drain("node-1", ttl=0.1)
        state = await store.heartbeat(node("node-1"))
        if time.monotonic() - before < 0.1 - 0.02:  # not stalled past the flag's TTL meanwhile
            assert state is MemberState.DRAINING
        await asyncio.sleep(0.15)
        assert await store.heartbeat(node("node-1")) is MemberState.ACTIVE


async def test_keys_share_one_cluster_slot(open_membership: OpenMembership) -> None:
    async with open_membership() as store:
        keys = [store.member_key("a"), store.index_key, store.drain_key("b")]
        assert {k[k.index("{") : k.index("}") + 1] for k in keys} == {"{cluster}"}
        assert store.member_key("node-1") == "sipfarm:{cluster}:member:node-1"


async def test_redis_down_raises_store_unavailable() -> None:
    # A port nothing listens on: refused at once.
    redis = create_redis(f"redis://127.0.0.1:{free_port()}/0")
    try:
        store = MembershipStore(redis)
        with pytest.raises(StoreUnavailable):
            await store.heartbeat(node())
        with pytest.raises(StoreUnavailable):
            await store.members()
    finally:
        await redis.aclose()


def test_member_json_round_trip_and_tolerance() -> None:
    m = relay()
    assert Member.from_json(m.to_json()) == m
    d = json.loads(m.to_json())
    d["future_field"] = {"x": 1}
    del d["version"]
    assert Member.from_json(json.dumps(d)) == m  # unknown ignored, missing defaulted
    for bad in ("[]", "{}", '{"id": "x", "role": "router"}', "nope", '{"id": "", "role": "node"}'):
        with pytest.raises(ValueError):
            Member.from_json(bad)


def test_a_relay_record_carries_its_port_range_and_an_old_one_reads_without() -> None:
    ranged = replace(relay(), port_max=30999)
    assert json.loads(ranged.to_json())["port_max"] == 30999
    assert Member.from_json(ranged.to_json()) == ranged
    assert "port_max" not in json.loads(relay().to_json())  # unset: the record as before
    assert Member.from_json(relay().to_json()).port_max is None  # a relay of an earlier version


def test_member_id_validation() -> None:
    for bad in ("", "a b", "a\nb", "\x00"):
        with pytest.raises(ValueError):
            node(bad)


def test_parse_address() -> None:
    assert parse_address("udp:127.0.0.1:5071") == ("udp", "127.0.0.1", 5071)
    assert parse_address("TCP:[::1]:5060") == ("tcp", "::1", 5060)
    for bad in ("127.0.0.1:5060", "udp:127.0.0.1", "udp::5060", "udp:h:0", "udp:h:70000", "udp:h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)
