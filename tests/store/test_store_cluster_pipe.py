"""The hot path's client on a real 3-master + 3-replica Redis Cluster (``redis_cluster`` fixture):
slot routing, MOVED and ASK followed, replicas' acknowledgement (WAIT), the node's FarmState."""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import pytest

from sipfarm.node.farmstate import FarmState
from sipfarm.store import ContactUpdate, StoreUnavailable
from sipfarm.store.location import index_pieces, location_key
from sipfarm.store.redis_server import RedisClusterProcesses, query
from sipfarm.store.resp import RedisPipe, parse_cluster_url
from sipfarm.store.resp_cluster import SLOTS, ClusterPipe, command_slot, key_slot

T0 = 1_700_000_000.0


def test_key_slot_follows_the_specification() -> None:
    # the examples of the Redis Cluster specification
    assert key_slot(b"123456789") == 0x31C3 & (SLOTS - 1)
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}".replace(b"{}", b"{}"))
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert command_slot(("EVALSHA", "sha", 1, "k{x}", "arg")) == key_slot(b"x")
    assert command_slot(("PING",)) == -1


def test_cluster_urls_are_parsed_with_credentials_and_tls() -> None:
    seeds, urls = parse_cluster_url("rediss+cluster://:pw@10.0.0.1:7001,10.0.0.2:7002?ssl_cert_reqs=none")
    assert seeds == [("10.0.0.1", 7001), ("10.0.0.2", 7002)]
    assert urls[1] == "rediss://:pw@10.0.0.2:7002/0?ssl_cert_reqs=none"
    with pytest.raises(ValueError, match="seed node"):
        parse_cluster_url("redis+cluster://host:notaport")


async def test_commands_reach_the_master_of_their_slot(redis_cluster_url: str) -> None:
    pipe = ClusterPipe(redis_cluster_url)
    await pipe.connect()
    try:
        assert len(pipe.masters) == 3
        replies: list[Any] = []
        for i in range(300):  # one event-loop iteration: one pipeline per master
            pipe.call(replies.append, "SET", f"key:{i}", i)
        values = await asyncio.gather(*(pipe.execute("GET", f"key:{i}") for i in range(300)))
        assert replies == [b"OK"] * 300
        assert values == [str(i).encode() for i in range(300)]
        assert all(p.commands > 50 for p in pipe.masters.values())  # spread over the three
    finally:
        await pipe.close()


async def test_a_stale_slot_map_is_corrected_by_moved(redis_cluster_url: str) -> None:
    pipe = ClusterPipe(redis_cluster_url)
    await pipe.connect()
    try:
        wrong = next(iter(pipe.masters.values()))
        pipe._slots = [wrong] * SLOTS  # as if every slot had moved away from where we think
        values = await asyncio.gather(*(pipe.execute("INCR", f"moved:{i}") for i in range(100)))
        assert values == [1] * 100
        assert pipe.redirects > 0
        await asyncio.sleep(0.3)  # the background refresh has read the real map
        before = pipe.redirects
        assert await pipe.execute("INCR", "moved:1") == 2
        assert pipe.redirects == before
    finally:
        await pipe.close()


async def test_ask_is_followed_during_a_slot_migration(
    redis_cluster: RedisClusterProcesses, redis_cluster_url: str
) -> None:
    """A slot half migrated (MIGRATING on its owner, IMPORTING on another master): a key already
    moved is answered -ASK, which the client follows behind ASKING, leaving the map alone."""
    pipe = ClusterPipe(redis_cluster_url)
    await pipe.connect()
    key = "asked{aor-under-migration}"
    slot = key_slot(key.encode())
    owner = redis_cluster.master_of(key.encode())
    other = next(
        n
        for p, r in redis_cluster.roles().items()
        if r == "master" and p != owner.port
        for n in redis_cluster.nodes
        if n.port == p
    )
    ids = {n.port: query("127.0.0.1", n.port, "CLUSTER", "MYID").decode() for n in (owner, other)}
    try:
        query("127.0.0.1", other.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[owner.port])
        query("127.0.0.1", owner.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[other.port])
        # the key is not on the owner: the owner answers ASK, the importing node serves it
        assert await pipe.execute("SET", key, "there") == b"OK"
        assert pipe.redirects == 1
        assert query("127.0.0.1", other.port, "DBSIZE") != b"0"
    finally:
        for node in (owner, other):
            query("127.0.0.1", node.port, "CLUSTER", "SETSLOT", str(slot), "STABLE")
        query("127.0.0.1", other.port, "DEL", key)
        await pipe.close()


async def test_writes_wait_for_replicas_when_asked(redis_cluster_url: str) -> None:
    pipe = ClusterPipe(redis_cluster_url)
    pipe.require_replicas(1, 1000)
    await pipe.connect()
    try:
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(50)]
        for i in range(50):
            pipe.call_acked(done[i].set_result, "SET", f"acked:{i}", i)
        assert await asyncio.gather(*done) == [b"OK"] * 50
        pipe.require_replicas(2, 50)  # one replica per master: never enough
        with pytest.raises(StoreUnavailable, match="acknowledged by 1 of 2"):
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            pipe.call_acked(fut.set_result, "SET", "acked:x", 1)
            raise (await fut)
    finally:
        await pipe.close()


async def test_farmstate_registers_and_counts_on_the_cluster(redis_cluster_url: str) -> None:
    pipe = ClusterPipe(redis_cluster_url)
    await pipe.connect()
    state = FarmState(pipe, cluster=True)
    try:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(200)]
        for i in range(200):
            state.register(
                f"user{i}@farm.test",
                [ContactUpdate(f"sip:user{i}@127.0.0.1:5060", 3600)],
                futures[i].set_result,
                call_id=f"c{i}",
                cseq=1,
                now=T0,
                max_contacts=5,
            )
        results = await asyncio.gather(*futures)
        assert all(getattr(r, "ok", False) for r in results), results[:3]
        found: asyncio.Future[Any] = loop.create_future()
        state.lookup("user7@farm.test", T0 + 1, found.set_result)
        assert [b.contact for b in await found] == ["sip:user7@127.0.0.1:5060"]
        # every shard of the index holds its AORs; together they count all
        total = 0
        for aor_index, _ in index_pieces(True):
            total += await pipe.execute("ZCARD", aor_index)
        assert total == 200
        assert location_key("user7@farm.test", True).startswith("sipfarm:loc:{")
    finally:
        await pipe.close()


def test_command_names_in_any_case_find_their_key() -> None:
    assert command_slot(("evalsha", "sha", 1, "k{x}")) == key_slot(b"x")
    assert command_slot((b"GET", b"k{x}")) == key_slot(b"x")
    assert command_slot(("ping", "x")) == -1


class _FakeNode(asyncio.Protocol):
    """A cluster node owning every slot that answers everything else with one error reply."""

    error = b"-CLUSTERDOWN The cluster is down\r\n"

    def __init__(self, port: list[int]) -> None:
        self.port = port
        self.reader = hiredis.Reader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (command := self.reader.gets()) is not False:
            name = bytes(command[0]).upper()
            if name == b"CLUSTER":
                host = b"127.0.0.1"
                port = str(self.port[0]).encode()
                self.transport.write(  # type: ignore[attr-defined]
                    b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n" + host + b"\r\n:" + port + b"\r\n$2\r\nid\r\n"
                )
            else:
                self.transport.write(self.error.replace(b"PORT", str(self.port[0]).encode()))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (b"-CLUSTERDOWN The cluster is down\r\n", "CLUSTERDOWN"),
        (b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n", "TRYAGAIN"),
        (b"-MOVED 3999 127.0.0.1:PORT\r\n", "too many redirections"),
    ],
)
async def test_cluster_errors_are_store_unavailable(error: bytes, message: str) -> None:
    """CLUSTERDOWN and TRYAGAIN answer 503 (StoreUnavailable); a MOVED loop stops after
    MAX_REDIRECTS. A fake node plays the cluster: these states are hard to hold still on a real one."""
    loop = asyncio.get_running_loop()
    port: list[int] = [0]

    def node() -> _FakeNode:
        fake = _FakeNode(port)
        fake.error = error
        return fake

    server = await loop.create_server(node, "127.0.0.1", 0)
    port[0] = server.sockets[0].getsockname()[1]
    pipe = ClusterPipe(f"redis+cluster://127.0.0.1:{port[0]}")
    try:
        await pipe.connect()
        with pytest.raises(StoreUnavailable, match=message):
            await pipe.execute("GET", "some-key")
    finally:
        await pipe.close()
        server.close()


async def test_registrations_go_on_through_a_slot_migration(
    redis_cluster: RedisClusterProcesses, redis_cluster_url: str
) -> None:
    """The slot of one location shard moves to another master (IMPORTING/MIGRATING, MIGRATE key
    by key, SETSLOT NODE) while REGISTERs and lookups of its AORs keep coming: ASK and MOVED are
    followed; a script finding its keys split between the two masters gets TRYAGAIN, a 503 the
    UA retries; afterwards every AOR is there, served by the new master."""
    from sipfarm.store.location import shard_tag  # noqa: PLC0415

    tag = shard_tag("m0@farm.test")
    aors = [a for a in (f"m{i}@farm.test" for i in range(20_000)) if shard_tag(a) == tag][:12]
    pipe = ClusterPipe(redis_cluster_url)
    await pipe.connect()
    state = FarmState(pipe, cluster=True)
    loop = asyncio.get_running_loop()

    async def register(aor: str, cseq: int) -> Any:
        fut: asyncio.Future[Any] = loop.create_future()
        state.register(aor, [ContactUpdate(f"sip:{aor}", 3600)], fut.set_result,
                       call_id=aor, cseq=cseq, now=T0, max_contacts=5)  # fmt: skip
        return await fut

    async def lookup(aor: str) -> Any:
        fut: asyncio.Future[Any] = loop.create_future()
        state.lookup(aor, T0 + 1, fut.set_result)
        return await fut

    key = location_key(aors[0], True)
    slot = key_slot(key.encode())
    source = redis_cluster.master_of(key.encode())
    masters = [p for p, r in redis_cluster.roles().items() if r == "master" and p != source.port]
    target = masters[0]
    ids = {p: query("127.0.0.1", p, "CLUSTER", "MYID").decode() for p in (source.port, target)}
    src = RedisPipe(f"redis://127.0.0.1:{source.port}/0")  # the source node itself, for the move
    await src.connect()
    try:
        assert [getattr(await register(a, 1), "ok", False) for a in aors] == [True] * len(aors)
        query("127.0.0.1", target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source.port])
        query("127.0.0.1", source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target])
        cseq = 1
        outcomes: list[str] = []
        while True:  # one key at a time, a round of REGISTERs and lookups between two moves
            moving = await src.execute("CLUSTER", "GETKEYSINSLOT", slot, 1)
            cseq += 1
            for aor in aors:
                result = await register(aor, cseq)
                outcomes.append("ok" if getattr(result, "ok", False) else type(result).__name__)
                found = await lookup(aor)
                assert [b.contact for b in found] == [f"sip:{aor}"]  # one key: always served (ASK)
            if not moving:
                break
            migrated = await src.execute("MIGRATE", "127.0.0.1", target, moving[0], 0, 5000)
            assert migrated in (b"OK", b"NOKEY"), migrated
        for port in (target, source.port):
            query("127.0.0.1", port, "CLUSTER", "SETSLOT", str(slot), "NODE", ids[target])
        refused = outcomes.count("StoreUnavailable")
        print(f"slot {slot} moved key by key: {outcomes.count('ok')} REGISTERs ok, "
              f"{refused} answered 503 (TRYAGAIN), {pipe.redirects} redirections")  # fmt: skip
        assert pipe.redirects > 0  # ASK during the move (and MOVED once it is done)
        assert set(outcomes) <= {"ok", "StoreUnavailable"}, set(outcomes)
        cseq += 1
        assert [getattr(await register(a, cseq), "ok", False) for a in aors] == [True] * len(aors)
        assert [[b.contact for b in await lookup(a)] for a in aors] == [[f"sip:{a}"] for a in aors]
        assert redis_cluster.master_of(key.encode()).port == target
    finally:
        await src.close()
        await pipe.close()
