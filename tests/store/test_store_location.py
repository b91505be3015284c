"""LocationStore (register.lua) against a real redis-server: RFC 3261 10.3 steps 6-8."""

from __future__ import annotations

import asyncio

import pytest
from store_support import OpenStores

from sipfarm.store import ContactUpdate, LocationStore, RegisterOutcome, create_redis
from sipfarm.store.location import location_key

AOR = "alice@example.com"
T0 = 1_700_000_000.0


def cu(contact: str, expires: int = 3600, **kw: object) -> ContactUpdate:
    return ContactUpdate(contact, expires, **kw)  # type: ignore[arg-type]


async def test_register_then_lookup_returns_the_binding_with_everything_stored(
    open_stores: OpenStores,
) -> None:
    async with open_stores() as s:
        result = await s.location.apply_register(
            AOR,
            [cu("sip:alice@10.0.0.1:5060", 3600, q=0.7)],
            call_id="c1",
            cseq=1,
            now=T0,
            max_contacts=10,
            path=["<sip:edge1.example.com;lr>", "<sip:lb.example.com;lr>"],
            received="udp:198.51.100.7:40000",
            user_agent="Softphone/1.0",
            node="node-a",
        )
        assert result.ok
        assert result.outcome.sip_status == 200
        [b] = result.bindings
        assert (b.contact, b.expires_at, b.q, b.call_id, b.cseq) == (
            "sip:alice@10.0.0.1:5060",
            T0 + 3600,
            0.7,
            "c1",
            1,
        )
        assert b.path == ("<sip:edge1.example.com;lr>", "<sip:lb.example.com;lr>")
        assert (b.received, b.user_agent, b.node, b.updated) == (
            "udp:198.51.100.7:40000",
            "Softphone/1.0",
            "node-a",
            T0,
        )
        assert b.expires_in(T0 + 100) == 3500
        assert await s.location.lookup(AOR, T0 + 1) == [b]
        assert await s.location.lookup("nobody@example.com", T0) == []


async def test_refresh_updates_expiry_and_keeps_one_binding(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(AOR, [cu("sip:a@h", 60)], call_id="c", cseq=1, now=T0, max_contacts=1)
        r = await s.location.apply_register(
            AOR, [cu("sip:a@h", 120)], call_id="c", cseq=2, now=T0 + 50, max_contacts=1
        )
        assert r.ok
        assert [(b.expires_at, b.cseq) for b in r.bindings] == [(T0 + 170, 2)]
        # a refresh from another Call-ID (the UA rebooted) is accepted whatever its CSeq
        r = await s.location.apply_register(
            AOR, [cu("sip:a@h", 120)], call_id="other", cseq=1, now=T0 + 60, max_contacts=1
        )
        assert r.ok
        assert [b.call_id for b in r.bindings] == ["other"]


async def test_expires_zero_removes_and_the_200_lists_the_rest(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(
            AOR, [cu("sip:a@h1"), cu("sip:a@h2")], call_id="c", cseq=1, now=T0, max_contacts=10
        )
        r = await s.location.apply_register(
            AOR, [cu("sip:a@h1", 0)], call_id="c", cseq=2, now=T0 + 1, max_contacts=10
        )
        assert [b.contact for b in r.bindings] == ["sip:a@h2"]
        r = await s.location.apply_register(
            AOR, [cu("sip:a@h2", 0)], call_id="c", cseq=3, now=T0 + 2, max_contacts=10
        )
        assert r.ok
        assert r.bindings == ()
        assert not await s.location._redis.exists(location_key("alice@example.com", s.location._cluster))


async def test_query_without_contacts_lists_bindings(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(AOR, [cu("sip:a@h1")], call_id="c", cseq=1, now=T0, max_contacts=10)
        r = await s.location.apply_register(AOR, [], call_id="q", cseq=1, now=T0 + 1, max_contacts=10)
        assert r.ok
        assert [b.contact for b in r.bindings] == ["sip:a@h1"]


async def test_contact_star_removes_every_binding(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(AOR, [cu("sip:a@h1")], call_id="c1", cseq=1, now=T0, max_contacts=10)
        await s.location.apply_register(AOR, [cu("sip:a@h2")], call_id="c2", cseq=7, now=T0, max_contacts=10)
        r = await s.location.apply_register(
            AOR, [], remove_all=True, call_id="c1", cseq=2, now=T0 + 1, max_contacts=10
        )
        assert r.ok
        assert r.bindings == ()
        assert await s.location.lookup(AOR, T0 + 1) == []
        with pytest.raises(ValueError, match="alone"):
            await s.location.apply_register(
                AOR, [cu("x")], remove_all=True, call_id="c", cseq=1, now=T0, max_contacts=1
            )


async def test_contact_star_fails_when_a_binding_is_newer(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(AOR, [cu("sip:a@h1")], call_id="c1", cseq=5, now=T0, max_contacts=10)
        await s.location.apply_register(AOR, [cu("sip:a@h2")], call_id="c2", cseq=1, now=T0, max_contacts=10)
        r = await s.location.apply_register(
            AOR, [], remove_all=True, call_id="c1", cseq=5, now=T0 + 1, max_contacts=10
        )
        assert r.outcome is RegisterOutcome.OUT_OF_ORDER
        assert len(await s.location.lookup(AOR, T0 + 1)) == 2  # nothing removed


async def test_expired_bindings_are_never_returned_and_get_purged(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(
            AOR, [cu("sip:a@short", 30)], call_id="c1", cseq=1, now=T0, max_contacts=10
        )
        await s.location.apply_register(
            AOR, [cu("sip:a@long", 300)], call_id="c2", cseq=1, now=T0, max_contacts=10
        )
        assert len(await s.location.lookup(AOR, T0 + 29.9)) == 2
        assert [b.contact for b in await s.location.lookup(AOR, T0 + 30)] == ["sip:a@long"]
        assert (await s.location.lookup_many([AOR], T0 + 30))[AOR][0].contact == "sip:a@long"
        r = await s.location.apply_register(AOR, [], call_id="q", cseq=1, now=T0 + 31, max_contacts=10)
        assert [b.contact for b in r.bindings] == ["sip:a@long"]
        assert await s.location._redis.hlen(location_key("alice@example.com", s.location._cluster)) == 1  # purged
        assert await s.location.lookup(AOR, T0 + 300) == []


async def test_key_ttl_follows_latest_expiry(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(
            AOR, [cu("sip:a@h1", 60)], call_id="c", cseq=1, now=T0, max_contacts=10
        )
        await s.location.apply_register(
            AOR, [cu("sip:a@h2", 600)], call_id="c", cseq=2, now=T0, max_contacts=10
        )
        ttl = await s.location._redis.pttl(location_key("alice@example.com", s.location._cluster))
        assert 599_000 < ttl <= 600_000
        await s.location.apply_register(
            AOR, [cu("sip:a@h2", 0)], call_id="c", cseq=3, now=T0, max_contacts=10
        )
        ttl = await s.location._redis.pttl(location_key("alice@example.com", s.location._cluster))
        assert 59_000 < ttl <= 60_000


async def test_redis_drops_an_aor_when_its_last_binding_expires(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        now = T0
        await s.location.apply_register(
            AOR, [cu("sip:a@h", 1)], call_id="c", cseq=1, now=now, max_contacts=10
        )
        await asyncio.sleep(1.1)
        assert not await s.location._redis.exists(location_key("alice@example.com", s.location._cluster))


async def test_out_of_order_cseq_fails_the_whole_request(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.location.apply_register(
            AOR, [cu("sip:a@h1", 60)], call_id="c", cseq=10, now=T0, max_contacts=10
        )
        for cseq in (10, 9):
            r = await s.location.apply_register(
                AOR,
                [cu("sip:a@h2", 60), cu("sip:a@h1", 999)],
                call_id="c",
                cseq=cseq,
                now=T0 + 1,
                max_contacts=10,
            )
            assert r.outcome is RegisterOutcome.OUT_OF_ORDER
            assert r.outcome.sip_status == 500
            assert [(b.contact, b.expires_at) for b in r.bindings] == [("sip:a@h1", T0 + 60)]
        # nothing of the failed requests was applied, not even the new contact listed first
        assert [b.contact for b in await s.location.lookup(AOR, T0 + 1)] == ["sip:a@h1"]
        r = await s.location.apply_register(
            AOR, [cu("sip:a@h1", 0)], call_id="c", cseq=9, now=T0 + 1, max_contacts=10
        )
        assert r.outcome is RegisterOutcome.OUT_OF_ORDER  # a stale removal too


async def test_max_contacts_refuses_additions_only(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        loc = s.location
        r = await loc.apply_register(
            AOR, [cu("sip:a@1"), cu("sip:a@2")], call_id="c", cseq=1, now=T0, max_contacts=2
        )
        assert r.ok
        r = await loc.apply_register(AOR, [cu("sip:a@3")], call_id="c", cseq=2, now=T0, max_contacts=2)
        assert r.outcome is RegisterOutcome.TOO_MANY_CONTACTS
        assert r.outcome.sip_status == 403
        assert {b.contact for b in r.bindings} == {"sip:a@1", "sip:a@2"}
        # swapping one for another within the limit is fine
        r = await loc.apply_register(
            AOR, [cu("sip:a@1", 0), cu("sip:a@3")], call_id="c", cseq=3, now=T0, max_contacts=2
        )
        assert r.ok
        assert {b.contact for b in r.bindings} == {"sip:a@2", "sip:a@3"}
        # the limit lowered below what the AOR has: refreshes still pass, additions do not
        r = await loc.apply_register(AOR, [cu("sip:a@2")], call_id="c", cseq=4, now=T0, max_contacts=1)
        assert r.ok
        r = await loc.apply_register(AOR, [cu("sip:a@4")], call_id="c", cseq=5, now=T0, max_contacts=1)
        assert r.outcome is RegisterOutcome.TOO_MANY_CONTACTS
        # expired bindings do not count
        r = await loc.apply_register(AOR, [cu("sip:a@4")], call_id="c", cseq=6, now=T0 + 3600, max_contacts=1)
        assert r.ok
        assert [b.contact for b in r.bindings] == ["sip:a@4"]


async def test_instance_and_reg_id_replace_the_old_flow(open_stores: OpenStores) -> None:
    inst = '"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    async with open_stores() as s:
        loc = s.location
        await loc.apply_register(
            AOR,
            [cu("sip:a@192.0.2.1:5060;ob", instance=inst, reg_id=1)],
            call_id="c1",
            cseq=1,
            now=T0,
            max_contacts=10,
            received="udp:192.0.2.1:5060",
        )
        await loc.apply_register(
            AOR,
            [cu("sip:a@192.0.2.1:5070;ob", instance=inst, reg_id=2)],
            call_id="c2",
            cseq=1,
            now=T0,
            max_contacts=10,
        )
        # the UA rebooted, new Call-ID, new address: flow 1 is replaced, flow 2 stays
        r = await loc.apply_register(
            AOR,
            [cu("sip:a@203.0.113.9:6000;ob", instance=inst, reg_id=1)],
            call_id="c3",
            cseq=1,
            now=T0 + 5,
            max_contacts=10,
            received="tcp:203.0.113.9:6000",
        )
        assert r.ok
        by_reg = {b.reg_id: b for b in r.bindings}
        assert set(by_reg) == {1, 2}
        assert by_reg[1].contact == "sip:a@203.0.113.9:6000;ob"
        assert by_reg[1].received == "tcp:203.0.113.9:6000"
        assert by_reg[1].instance == inst
        assert by_reg[2].contact == "sip:a@192.0.2.1:5070;ob"
        # without an instance, contacts are bindings of their own
        r = await loc.apply_register(
            AOR, [cu("sip:a@192.0.2.1:5060;ob")], call_id="c4", cseq=1, now=T0, max_contacts=10
        )
        assert len(r.bindings) == 3


async def test_lookup_orders_by_q_then_most_recent(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        loc = s.location
        await loc.apply_register(AOR, [cu("sip:old", q=0.5)], call_id="a", cseq=1, now=T0, max_contacts=10)
        await loc.apply_register(
            AOR, [cu("sip:new", q=0.5)], call_id="b", cseq=1, now=T0 + 1, max_contacts=10
        )
        await loc.apply_register(AOR, [cu("sip:best", q=1.0)], call_id="c", cseq=1, now=T0, max_contacts=10)
        await loc.apply_register(
            AOR, [cu("sip:worst", q=0.0)], call_id="d", cseq=1, now=T0 + 2, max_contacts=10
        )
        assert [b.contact for b in await loc.lookup(AOR, T0 + 3)] == [
            "sip:best",
            "sip:new",
            "sip:old",
            "sip:worst",
        ]


async def test_lookup_many_in_one_pipeline(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        for i in range(5):
            await s.location.apply_register(
                f"u{i}@x", [cu(f"sip:u{i}@h")], call_id="c", cseq=1, now=T0, max_contacts=1
            )
        found = await s.location.lookup_many([f"u{i}@x" for i in range(7)], T0)
        assert {aor: [b.contact for b in bs] for aor, bs in found.items()} == {
            **{f"u{i}@x": [f"sip:u{i}@h"] for i in range(5)},
            "u5@x": [],
            "u6@x": [],
        }
        assert await s.location.lookup_many([], T0) == {}


async def test_remove_and_clear(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        loc = s.location
        await loc.apply_register(
            AOR,
            [cu("sip:a@1"), cu("sip:a@2"), cu("sip:a@3", instance="<urn:x>")],
            call_id="c",
            cseq=1,
            now=T0,
            max_contacts=10,
        )
        assert await loc.remove(AOR, "sip:a@1") == 1
        assert await loc.remove(AOR, "sip:a@3") == 1  # found by contact although keyed by instance
        assert await loc.remove(AOR, "sip:a@9") == 0
        assert [b.contact for b in await loc.lookup(AOR, T0)] == ["sip:a@2"]
        assert await loc.clear(AOR) == 1
        assert await loc.lookup(AOR, T0) == []


async def test_count_all(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        loc = s.location
        await loc.apply_register(
            "a@x", [cu("sip:1", 60), cu("sip:2", 600)], call_id="c", cseq=1, now=T0, max_contacts=9
        )
        await loc.apply_register("b@x", [cu("sip:3", 60)], call_id="c", cseq=1, now=T0, max_contacts=9)
        counts = await loc.count_all(T0)
        assert (counts.aors, counts.bindings) == (2, 3)
        counts = await loc.count_all(T0 + 60)
        assert (counts.aors, counts.bindings) == (1, 1)
        await loc.apply_register("a@x", [cu("sip:2", 0)], call_id="c", cseq=2, now=T0, max_contacts=9)
        assert (await loc.count_all(T0)).aors == 1


async def test_index_free_store_for_redis_cluster(redis_url: str) -> None:
    redis = create_redis(redis_url)
    try:
        loc = LocationStore(redis, index=False)
        r = await loc.apply_register(AOR, [cu("sip:a@h")], call_id="c", cseq=1, now=T0, max_contacts=1)
        assert r.ok
        assert await redis.exists("sipfarm:loc:aors") == 0
        assert await loc.remove(AOR, "sip:a@h") == 1
    finally:
        await redis.aclose()


async def test_100_contacts_registered_concurrently_by_two_nodes(open_single_stores: OpenStores) -> None:
    # One Redis only: redis-py 8.1's RedisCluster opening ~50 connections at once loses some
    # mid-handshake and retries the script (run twice: "out of order"). The nodes' own client
    # (ClusterPipe) keeps one connection per master; tests/e2e/test_redis_cluster.py covers it.
    async with open_single_stores() as node_a, open_single_stores() as node_b:

        async def register(i: int) -> None:
            store = (node_a if i % 2 else node_b).location
            r = await store.apply_register(
                AOR,
                [cu(f"sip:alice@10.0.{i // 256}.{i % 256}:5060")],
                call_id=f"call-{i}",
                cseq=1,
                now=T0,
                max_contacts=100,
                node="a" if i % 2 else "b",
            )
            assert r.ok

        await asyncio.gather(*(register(i) for i in range(100)))
        found = await node_a.location.lookup(AOR, T0 + 1)
        assert len(found) == 100
        assert len({b.contact for b in found}) == 100
        assert {b.node for b in found} == {"a", "b"}
        # one more is over the limit whichever node takes it
        r = await node_b.location.apply_register(
            AOR, [cu("sip:extra")], call_id="x", cseq=1, now=T0, max_contacts=100
        )
        assert r.outcome is RegisterOutcome.TOO_MANY_CONTACTS


async def test_bad_contact_updates_are_refused_before_redis(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        for bad in (cu("sip:a", -1), cu("sip:a", 60, q=1.5)):
            with pytest.raises(ValueError, match="bad contact"):
                await s.location.apply_register(AOR, [bad], call_id="c", cseq=1, now=T0, max_contacts=1)
