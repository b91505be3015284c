"""``redis+sentinel://``: URL and reply parsing (sans-IO), and both clients (the pipelined
RedisPipe of the hot path, redis-py's for everything else) following a real failover of a
master + replica + 3 sentinels set."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

import pytest
from fixtures.redis_sentinel import SERVICE

from sipfarm.config import ConfigError, NodeConfig
from sipfarm.store import StoreUnavailable, create_redis
from sipfarm.store.redis_client import redis_errors
from sipfarm.store.redis_server import free_port
from sipfarm.store.resp import RedisPipe
from sipfarm.store.sentinel import is_master_role, master_address, parse_sentinel_url, switch_master

# --- sans-IO ---------------------------------------------------------------------------------


def test_parse_sentinel_url() -> None:
    u = parse_sentinel_url("redis+sentinel://:s%40cret@127.0.0.1:26379,10.0.0.2:26380,host3/mymaster/2")
    assert u.sentinels == (("127.0.0.1", 26379), ("10.0.0.2", 26380), ("host3", 26379))
    assert (u.service, u.db, u.username, u.password, u.tls) == ("mymaster", 2, None, "s@cret", None)
    assert u.redis_url("10.0.0.9", 6380) == "redis://:s%40cret@10.0.0.9:6380/2"
    u = parse_sentinel_url("redis+sentinel://user:pw@[::1]:5000/svc?sentinel_password=spw&sentinel_username=su")
    assert u.sentinels == (("::1", 5000),)
    assert (u.username, u.password, u.sentinel_username, u.sentinel_password, u.db) == ("user", "pw", "su", "spw", 0)
    u = parse_sentinel_url("rediss+sentinel://127.0.0.1:26379/svc?ssl_cert_reqs=none")
    assert u.tls is not None and u.tls.verify_mode == ssl.CERT_NONE
    assert u.redis_url("127.0.0.1", 1) == "rediss://127.0.0.1:1/0?ssl_cert_reqs=none"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://127.0.0.1:26379", "SERVICE"),
        ("redis+sentinel://127.0.0.1:26379/", "SERVICE"),
        ("redis+sentinel://127.0.0.1:26379/svc/x", "database"),
        ("redis+sentinel://127.0.0.1:26379/svc/1/2", "SERVICE"),
        ("redis+sentinel://127.0.0.1:99999/svc", "sentinel address"),
        ("redis+sentinel://127.0.0.1:26379,/svc", "sentinel address"),
        ("redis+sentinel://127.0.0.1:26379/svc?bogus=1", "bogus"),
        ("rediss+sentinel://127.0.0.1:26379/svc?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_sentinel_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinel_url(url)
    with pytest.raises(ConfigError, match=f"redis: .*{message}"):
        NodeConfig(redis=url).validate()


def test_config_accepts_sentinel_url() -> None:
    NodeConfig(redis="redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/0").validate()


def test_sentinel_replies() -> None:
    assert master_address([b"127.0.0.1", b"6380"]) == ("127.0.0.1", 6380)
    assert master_address(None) is None
    for bad in ([b"h"], [b"h", b"x"], b"OK", [b"", b"1"]):
        with pytest.raises(ValueError, match="get-master-addr-by-name"):
            master_address(bad)
    assert is_master_role([b"master", 10, []])
    assert not is_master_role([b"slave", b"127.0.0.1", 6379, b"connected", 10])
    assert not is_master_role([b"sentinel", [b"mymaster"]])
    assert not is_master_role(None)
    message = [b"message", b"+switch-master", b"mymaster 127.0.0.1 6379 127.0.0.1 6380"]
    assert switch_master(message, "mymaster") == ("127.0.0.1", 6380)
    assert switch_master(message, "other") is None
    assert switch_master([b"subscribe", b"+switch-master", 1], "mymaster") is None
    assert switch_master([b"message", b"+sdown", b"master mymaster 127.0.0.1 6379"], "mymaster") is None


# --- real sentinels --------------------------------------------------------------------------


def _run(coro: Any) -> None:
    """The async part of a test, bounded."""
    asyncio.run(asyncio.wait_for(coro, 90.0))


async def test_no_sentinel_answers_is_unavailable_at_once() -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/{SERVICE}"
    started = time.monotonic()
    pipe = RedisPipe(url, connect_timeout=0.5)
    with pytest.raises(StoreUnavailable, match="no master for 'mymaster'"):
        await pipe.connect()
    await pipe.close()
    client = create_redis(url)
    try:
        with pytest.raises(StoreUnavailable), redis_errors:
            await client.get("k")
    finally:
        await client.aclose()
    assert time.monotonic() - started < 10


def test_clients_follow_a_failover(sentinel_set) -> None:
    farm = sentinel_set(password="pw")  # started outside the async test's 60 s bound
    _run(_clients_follow_a_failover(farm))


async def _clients_follow_a_failover(farm) -> None:
    """A forced failover (``SENTINEL FAILOVER``): the old master is demoted but alive, so a
    client that kept talking to it would read stale data and get READONLY on writes."""
    old = (farm.master.host, farm.master.port)
    pipe = RedisPipe(farm.url, command_timeout=1.0, connect_timeout=0.5)
    client = create_redis(farm.url)
    try:
        await pipe.connect()
        assert (pipe.host, pipe.port) == old
        assert await pipe.execute("SET", "before", "1") == b"OK"
        with redis_errors:
            assert await client.set("before-py", "1")
        # a pipe on the replica: READONLY is "unavailable" (503), not a failed command (500)
        replica = RedisPipe(f"redis://:pw@127.0.0.1:{farm.replica.port}/0")
        await replica.connect()
        with pytest.raises(StoreUnavailable, match="READONLY"):
            await replica.execute("SET", "x", "1")
        await replica.close()

        with farm.sentinel_client(farm.sentinels[0]) as s:
            assert s.sentinel_failover(SERVICE)
        new = await asyncio.to_thread(farm.wait_failover, old)
        assert new == (farm.replica.host, farm.replica.port)

        # Both clients end up writing to the new master within a bounded time, with no call
        # hanging meanwhile (each answers or fails with StoreUnavailable). Until sentinel has
        # demoted the old master (it finds it on its next INFO, up to 10 s later) that one still
        # takes writes: a client connected to it keeps writing there, and those writes are
        # lost when it is demoted (README, store/Redis: what a failover can lose).
        deadline = time.monotonic() + 40
        failures = 0
        i = 0
        moved = False
        while not moved and time.monotonic() < deadline:
            i += 1
            t0 = time.monotonic()
            try:
                await pipe.execute("SET", "after", i)
            except StoreUnavailable:
                failures += 1
            try:
                with redis_errors:
                    await client.set("after-py", i)
            except StoreUnavailable:
                failures += 1
            assert time.monotonic() - t0 < 5, "a store call hung during the failover"
            with farm.client(farm.replica) as r:
                moved = r.get("after") == b"%d" % i and r.get("after-py") == b"%d" % i
            if not moved:
                await asyncio.sleep(0.1)
        assert moved, f"clients did not follow the failover ({failures} failed calls)"
        assert (pipe.host, pipe.port) == new
        assert pipe.sentinel is not None and pipe.sentinel.master_changes == 1
        assert pipe.stats()["sentinel_switch_master"] == 1  # +switch-master heard
        assert await pipe.execute("GET", "before") == b"1"  # replicated before the failover
        with farm.client(farm.replica) as r:
            assert r.execute_command("ROLE")[0] == b"master"
        with farm.client(farm.master) as r:
            assert r.execute_command("ROLE")[0] == b"slave"  # the old master, demoted
    finally:
        await pipe.close()
        await client.aclose()


def test_tls_sentinels_and_servers(sentinel_set) -> None:
    farm = sentinel_set(password="pw", tls=True)
    _run(_tls_sentinels_and_servers(farm))


async def _tls_sentinels_and_servers(farm) -> None:
    """``rediss+sentinel://``: sentinels, master and replica speak TLS only (one certificate, the
    URL's ``ssl_ca_certs``); both clients find the master, and the pipelined one follows a
    switch heard over TLS."""
    assert farm.url.startswith("rediss+sentinel://")
    old = (farm.master.host, farm.master.port)
    pipe = RedisPipe(farm.url, command_timeout=1.0, connect_timeout=1.0)
    client = create_redis(farm.url)
    try:
        await pipe.connect()
        assert (pipe.host, pipe.port) == old
        assert await pipe.execute("SET", "k", "1") == b"OK"
        with redis_errors:
            assert await client.get("k") == b"1"
        with farm.sentinel_client(farm.sentinels[0]) as s:
            assert s.sentinel_failover(SERVICE)
        new = await asyncio.to_thread(farm.wait_failover, old)
        deadline = time.monotonic() + 20
        while (pipe.host, pipe.port) != new and time.monotonic() < deadline:
            with contextlib.suppress(StoreUnavailable):
                await pipe.execute("GET", "k")
            await asyncio.sleep(0.1)
        assert (pipe.host, pipe.port) == new
        assert await pipe.execute("GET", "k") == b"1"
    finally:
        await pipe.close()
        await client.aclose()
