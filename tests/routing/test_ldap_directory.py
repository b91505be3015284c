"""The LDAP directory against a real ``slapd`` (tests/fixtures/slapd.py) and a real Redis.

What a node would notice: the right account or alias targets, one LDAP search shared by
nodes through Redis, cached answers while LDAP is down, a quick StoreUnavailable (503) for
the rest and no stalled event loop, and lookups working again once slapd is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.slapd import (
    ATTRIBUTES,
    BASE,
    BIND_DN,
    BIND_PASSWORD,
    DOMAIN,
    EVIL_USER,
    FILTER,
    SlapdProcess,
    ha1_md5,
    ha1_sha256,
    running_slapd,
)
from fixtures.startup import START_TIMEOUT_S
from hypothesis import given
from hypothesis import strategies as st

from sipfarm import ports
from sipfarm.routing.ldap_directory import (
    DirectoryEntry,
    EnabledMode,
    LdapConfig,
    LdapDirectory,
    RedisDirectoryCache,
    build_filter,
    cache_key,
    decode_record,
    encode_record,
    escape_filter_value,
    expand_alias,
)
from sipfarm.store.accounts import Account
from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.redis_client import create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 30)


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[SlapdProcess]:
    with running_slapd(tmp_path / "slapd") as server:
        yield server


def config_dict(url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "url": url,
        "bind_dn": BIND_DN,
        "bind_password": BIND_PASSWORD,
        "base": BASE,
        "filter": FILTER,
        "attributes": dict(ATTRIBUTES),
        "pool_size": 2,
        **overrides,
    }


async def account(directory: LdapDirectory, user: str, domain: str = DOMAIN) -> Account | StoreError | None:
    fut: asyncio.Future[Account | StoreError | None] = asyncio.get_running_loop().create_future()
    directory.get_account(user, domain, fut.set_result)
    return await fut


async def aliases(directory: LdapDirectory, user: str, domain: str = DOMAIN) -> tuple[str, ...] | StoreError:
    fut: asyncio.Future[tuple[str, ...] | StoreError] = asyncio.get_running_loop().create_future()
    directory.aliases(user, domain, fut.set_result)
    return await fut


class Node:
    """One node's directory over the shared Redis; closes both."""

    def __init__(self, url: str, redis_url: str | None, **overrides: Any) -> None:
        self.redis = create_redis(redis_url) if redis_url else None
        cache = RedisDirectoryCache(self.redis) if self.redis is not None else None
        self.wall = time.time()
        self.directory = LdapDirectory(
            LdapConfig.from_dict(config_dict(url, **overrides)), cache, wall_clock=lambda: self.wall
        )

    async def close(self) -> None:
        await self.directory.aclose()
        if self.redis is not None:
            await self.redis.aclose()


async def with_node(url: str, redis_url: str | None, body: Callable[[Node], Awaitable[None]], **kw: Any) -> None:
    node = Node(url, redis_url, **kw)
    try:
        await body(node)
    finally:
        await node.close()


def _run_delay() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (the kernel's schedstat)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _steal() -> list[float]:
    """Seconds each CPU was kept from running by the hypervisor (/proc/stat's steal column)."""
    try:
        with open("/proc/stat", "rb") as f:
            lines = [line.split() for line in f if line[:3] == b"cpu" and line[3:4] != b" "]
        return [int(fields[8]) / _TICK for fields in lines]
    except (OSError, IndexError, ValueError):
        return []


class LoopLag:
    """The longest the event loop went without running a 10 ms ticker, less what a loaded
    machine took from it: a blocked loop shows, a busy machine does not.

    Taken off each gap between ticks: the loop thread's wait for a CPU (runnable, not running:
    its ``run_delay`` in /proc/thread-self/schedstat) and the largest steal of any CPU (the
    hypervisor did not run the VM). What is left is the loop thread running code or sleeping
    in a call that blocks it, which is what a stalled event loop means; on a loaded CI machine
    the gap itself reached a second.
    """

    def __init__(self) -> None:
        self.worst = 0.0
        #: the largest gap as measured, machine stalls included (for messages)
        self.worst_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _now() -> tuple[float, float, list[float]]:
        """The clock, the run delay and the steal, read with no wait for a CPU in between (a
        wait there would count in one gap's time and in the other's delay)."""
        for _ in range(5):
            delay, steal = _run_delay(), _steal()
            now = time.monotonic()
            if _run_delay() == delay:
                break
        return now, delay, steal

    async def _run(self) -> None:
        last, delay, steal = self._now()
        while True:
            await asyncio.sleep(0.01)
            now, now_delay, now_steal = self._now()
            stolen = max((b - a for a, b in zip(steal, now_steal, strict=False)), default=0.0)
            gap = now - last - 0.01
            self.worst_gap = max(self.worst_gap, gap)
            self.worst = max(self.worst, gap - (now_delay - delay) - stolen)
            last, delay, steal = now, now_delay, now_steal

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


# -- configuration and the pure pieces ----------------------------------------------------------


def test_config_from_dict_defaults() -> None:
    config = LdapConfig.from_dict(
        {"url": "ldap://127.0.0.1:3890", "base": BASE, "attributes": {"password": "userPassword"}}
    )
    assert config.filter == "(uid={user})"
    assert (config.timeout, config.cache_ttl, config.stale_ttl, config.pool_size) == (1.0, 30.0, 300.0, 4)
    assert config.attributes.enabled_mode is EnabledMode.VALUE
    assert config.bind_dn == ""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": None}, "ldap.url: required"),
        ({"url": "http://127.0.0.1:389"}, "ldap.url: must be ldap://"),
        ({"url": "ldap://127.0.0.1:99999"}, "ldap.url: bad port"),
        ({"base": ""}, "ldap.base: must be a non-empty string"),
        ({"filter": "(uid=alice)"}, "ldap.filter: must contain {user}"),
        ({"filter": "(uid={user})(x={realm})"}, "ldap.filter: only {user} and {domain}"),
        ({"filter": "(&(uid={user})"}, "ldap.filter: must be one parenthesized"),
        ({"filter": "uid={user}"}, "ldap.filter: must be one parenthesized"),
        ({"attributes": {"user": "uid"}}, "ldap.attributes: needs ha1 or password"),
        ({"attributes": {"ha1": "sip HA1"}}, "ldap.attributes.ha1: must be an LDAP attribute name"),
        ({"attributes": {"ha1": "x", "enabled_mode": "maybe"}}, "ldap.attributes.enabled_mode: must be one of"),
        ({"attributes": {"ha1": "x", "colour": "y"}}, "ldap.attributes: unknown keys colour"),
        ({"timeout": 0}, "ldap.timeout: must be a positive number"),
        ({"timeout": True}, "ldap.timeout: must be a positive number"),
        ({"pool_size": 1.5}, "ldap.pool_size: must be a positive integer"),
        ({"cache_ttl": 60, "stale_ttl": 30}, "ldap.stale_ttl: must be >= cache_ttl"),
        ({"local_ttl": -1}, "ldap.local_ttl: must be a number >= 0"),
        ({"bind_dn": "", "bind_password": "x"}, "ldap.bind_password: given without bind_dn"),
        ({"bind_pw": "x"}, "ldap: unknown keys bind_pw"),
    ],
)
def test_config_from_dict_names_the_bad_key(change: dict[str, Any], message: str) -> None:
    data = config_dict("ldap://127.0.0.1:3890")
    data.update(change)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValueError, match="^" + message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        LdapConfig.from_dict(data)


def test_filter_values_are_escaped_per_rfc4515() -> None:
    # RFC 4515 4 examples
    assert escape_filter_value("Parens R Us (for all your parenthetical needs)") == (
        r"Parens R Us \28for all your parenthetical needs\29"
    )
    assert escape_filter_value("*") == r"\2a"
    assert escape_filter_value(r"C:\MyFile") == r"C:\5cMyFile"
    assert escape_filter_value("a\0b") == r"a\00b"
    assert escape_filter_value("Lučić") == "Lučić"
    assert build_filter(FILTER, EVIL_USER, "x)(y") == (
        r"(&(objectClass=sipAccount)(uid=ev\2al\29\28uid=\2a)(sipDomain=x\29\28y))"
    )


@given(st.text())
def test_escaped_values_hold_no_filter_syntax(value: str) -> None:
    escaped = escape_filter_value(value)
    assert not any(c in escaped for c in "*()\0")
    # RFC 4515 3: every backslash starts a two-hex-digit escape; undoing them gives the value back
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-f]{2})*", escaped, re.DOTALL)
    unescaped = re.sub(r"\\([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), escaped)
    assert unescaped == value


def test_alias_targets_become_uris() -> None:
    assert expand_alias("sip:a@b.example", DOMAIN) == "sip:a@b.example"
    assert expand_alias("SIPS:a@b.example", DOMAIN) == "SIPS:a@b.example"
    assert expand_alias("tel:+15551234", DOMAIN) == "tel:+15551234"
    assert expand_alias("bob@other.example", DOMAIN) == "sip:bob@other.example"
    assert expand_alias("carol", DOMAIN) == "sip:carol@example.com"
    assert expand_alias("  ", DOMAIN) is None


def test_cache_records_round_trip() -> None:
    entry = DirectoryEntry("a" * 32, "b" * 64, enabled=False, aliases=("sip:x@y",))
    assert decode_record(encode_record(entry, 1000.5)) == (1000.5, entry)
    assert decode_record(encode_record(None, 7.0)) == (7.0, None)
    assert encode_record(DirectoryEntry("a" * 32, "", True, ()), 1.0) == b'{"t":1.0,"m":"' + b"a" * 32 + b'","s":""}'
    for bad in (b"", b"[]", b'{"t":1}', b'{"m":"x"}', b'{"t":1,"m":"x","s":"y","a":[1]}'):
        with pytest.raises(ValueError, match="corrupt directory cache record"):
            decode_record(bad)


# -- against slapd --------------------------------------------------------------------------------


async def test_lookups(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        d = node.directory
        alice = await account(d, "alice")
        assert isinstance(alice, Account)
        assert (alice.user, alice.domain, alice.enabled) == ("alice", DOMAIN, True)
        assert alice.ha1_md5 == ha1_md5("alice", DOMAIN, "alicepw")
        assert alice.ha1_sha256 == ha1_sha256("alice", DOMAIN, "alicepw")

        bob = await account(d, "bob")  # plaintext password: both HA1s computed
        assert isinstance(bob, Account)
        assert bob.ha1_md5 == ha1_md5("bob", DOMAIN, "bobpw")
        assert bob.ha1_sha256 == ha1_sha256("bob", DOMAIN, "bobpw")
        assert bob.enabled

        carol = await account(d, "carol")
        assert isinstance(carol, Account)
        assert not carol.enabled

        other = await account(d, "alice", "other.example")  # {domain} is part of the filter
        assert isinstance(other, Account)
        assert other.ha1_md5 == ha1_md5("alice", "other.example", "otherpw")
        assert other.ha1_sha256 == ""

        assert await account(d, "nobody") is None
        assert await account(d, "alice", "nowhere.example") is None
        assert await account(d, "sales") is None  # an alias, no credentials
        assert await aliases(d, "sales") == ("sip:alice@example.com", "sip:bob@example.com", "sip:carol@example.com")
        assert await aliases(d, "alice") == ()
        assert await aliases(d, "nobody") == ()

        # Escaping: the metacharacter user is found as itself, "*" is nobody, not everybody.
        evil = await account(d, EVIL_USER)
        assert isinstance(evil, Account)
        assert evil.ha1_md5 == ha1_md5(EVIL_USER, DOMAIN, "evilpw")
        assert await account(d, "*") is None
        assert await account(d, "*)(uid=*") is None
        assert await account(d, "alice", "*") is None
        assert await account(d, "") is None
        assert await account(d, "al\udcffice") is None  # undecodable bytes (surrogateescape)
        assert await account(d, "Lučić") is None
        assert d.failures == 0

    await with_node(slapd.url, redis_url, body)


async def test_wide_filter_is_an_error_not_an_account(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        result = await account(node.directory, "alice", "ignored")
        assert isinstance(result, StoreError)
        assert not isinstance(result, StoreUnavailable)
        assert "more than one entry" in str(result)

    # a misconfigured filter that ignores the user: every entry matches
    await with_node(slapd.url, redis_url, body, filter="(|(uid={user})(objectClass=sipAccount))")


async def test_redis_cache_is_shared_by_nodes(slapd: SlapdProcess, redis_url: str) -> None:
    a = Node(slapd.url, redis_url, local_ttl=0)
    b = Node(slapd.url, redis_url, local_ttl=0)
    try:
        assert isinstance(await account(a.directory, "bob"), Account)
        assert await account(a.directory, "nobody") is None
        assert a.directory.searches == 2

        # node B: both answers from Redis, LDAP not asked
        bob = await account(b.directory, "bob")
        assert isinstance(bob, Account)
        assert bob.ha1_md5 == ha1_md5("bob", DOMAIN, "bobpw")
        assert await account(b.directory, "nobody") is None
        assert (b.directory.searches, b.directory.cache_hits) == (0, 2)

        # the record: compact JSON, HA1s only (never the password), kept stale_ttl; "no such
        # user" kept negative_ttl
        assert a.redis is not None
        raw = await a.redis.get(cache_key("bob", DOMAIN))
        assert b"bobpw" not in raw
        assert json.loads(raw)["m"] == bob.ha1_md5
        assert 290_000 < await a.redis.pttl(cache_key("bob", DOMAIN)) <= 300_000
        assert 0 < await a.redis.pttl(cache_key("nobody", DOMAIN)) <= 5_000

        # past cache_ttl the record is stale: B asks LDAP again (and refreshes it)
        b.wall += 31
        assert isinstance(await account(b.directory, "bob"), Account)
        assert b.directory.searches == 1
    finally:
        await a.close()
        await b.close()


async def test_concurrent_lookups_share_one_search(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        d = node.directory
        results = await asyncio.gather(*(account(d, "alice") for _ in range(20)))
        assert all(isinstance(r, Account) for r in results)
        assert d.searches == 1
        # then the in-process cache answers at once (synchronously)
        got: list[object] = []
        d.get_account("alice", DOMAIN, got.append)
        assert isinstance(got[0], Account)
        assert d.local_hits == 1
        # many users over a pool of 2 connections
        users = ["alice", "bob", "carol", "sales", "nobody", EVIL_USER] * 5
        results = await asyncio.gather(*(account(d, u, f"d{i}.example") for i, u in enumerate(users)))
        assert all(r is None for r in results)
        assert d.pool.size <= 2
        assert d.failures == 0

    await with_node(slapd.url, redis_url, body)


async def test_slapd_stopped_mid_test(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        d = node.directory
        assert isinstance(await account(d, "alice"), Account)
        assert await account(d, "nobody") is None
        assert await aliases(d, "sales") != ()
        slapd.stop()
        node.wall += 60  # past cache_ttl: the records are stale, LDAP is asked first

        with LoopLag() as lag:
            started = time.monotonic()
            alice = await account(d, "alice")  # stale but served
            assert isinstance(alice, Account)
            assert alice.ha1_md5 == ha1_md5("alice", DOMAIN, "alicepw")
            assert await aliases(d, "sales") == (
                "sip:alice@example.com",
                "sip:bob@example.com",
                "sip:carol@example.com",
            )
            assert d.stale_served == 2

            # never looked up: 503, quickly, for one lookup or many at once
            bob = await account(d, "bob")
            assert isinstance(bob, StoreUnavailable)
            assert bob.sip_status == 503
            many = await asyncio.gather(*(account(d, f"user{i}") for i in range(20)))
            assert all(isinstance(r, StoreUnavailable) for r in many)
            assert time.monotonic() - started < 2.0
        assert lag.worst < 0.3, (lag.worst, lag.worst_gap)

        node.wall += 300  # past stale_ttl: even alice is not served any more
        assert isinstance(await account(d, "alice"), StoreUnavailable)
        node.wall -= 300

        # slapd back: lookups work again once the pool's backoff has passed (at most 2 s)
        slapd.start()
        connects = d.pool.connects
        deadline = time.monotonic() + 5
        while not isinstance(bob := await account(d, "bob"), Account):
            assert isinstance(bob, StoreUnavailable)
            assert time.monotonic() < deadline, "no reconnect to slapd within 5 s"
            await asyncio.sleep(0.05)
        assert bob.ha1_md5 == ha1_md5("bob", DOMAIN, "bobpw")
        assert d.pool.connects > connects

    await with_node(slapd.url, redis_url, body, local_ttl=0)


async def test_restarted_slapd_is_used_without_a_failed_lookup(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        d = node.directory
        await asyncio.gather(*(account(d, u) for u in ("alice", "bob")))  # two pooled connections
        slapd.stop()
        slapd.start()
        # the pooled connections are dead: the lookup retries on a new one, no 503
        assert isinstance(await account(d, "carol"), Account)
        assert d.failures == 0

    await with_node(slapd.url, redis_url, body, local_ttl=0)


async def test_stalled_slapd_times_out(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        d = node.directory
        assert isinstance(await account(d, "alice"), Account)
        slapd.pause()  # the socket stays open, nothing answers
        try:
            node.wall += 60
            with LoopLag() as lag:
                cpu = time.process_time()
                started = time.monotonic()
                results = await asyncio.gather(account(d, "alice"), account(d, "bob"), account(d, "carol"))
                elapsed = time.monotonic() - started
                assert isinstance(results[0], Account)  # stale, after the timeout
                assert all(isinstance(r, StoreUnavailable) for r in results[1:])
                assert 0.4 < elapsed < 2.0  # timeout = 0.5 s: waited for it, not longer
                # bob and carol needed new connections, whose binds went unanswered: the pool backs
                # off, the next lookup is answered at once
                assert d.pool.size == 0
                searches, started = d.searches, time.monotonic()
                sales = await account(d, "sales")
                # at once: refused by the pool's backoff, no connect tried and no search sent (so
                # no timeout waited out); the time has room for a loaded machine (it was < 0.1 s
                # against the 0.5 s timeout)
                assert isinstance(sales, StoreUnavailable) and "reconnecting" in str(sales), sales
                assert d.searches == searches
                assert time.monotonic() - started < 2.0
                cpu = time.process_time() - cpu
            assert lag.worst < 0.3, (lag.worst, lag.worst_gap)
            # waiting is not polling: bonsai's own asyncio wait spins on "writable" (~0.25 s of
            # CPU here, ~0.01 s without)
            assert cpu < 0.1
        finally:
            slapd.resume()
        node.wall -= 60
        deadline = time.monotonic() + 5
        while not isinstance(await account(d, "bob"), Account):
            assert time.monotonic() < deadline, "slapd not used again within 5 s of SIGCONT"
            await asyncio.sleep(0.05)

    await with_node(slapd.url, redis_url, body, local_ttl=0, timeout=0.5)


async def test_bind_refused_is_unavailable(slapd: SlapdProcess, redis_url: str) -> None:
    async def body(node: Node) -> None:
        started = time.monotonic()
        result = await account(node.directory, "alice")
        assert isinstance(result, StoreUnavailable)
        assert "connect" in str(result)
        assert time.monotonic() - started < 2.0

    await with_node(slapd.url, redis_url, body, bind_password="wrong")


async def test_redis_down_lookups_go_to_ldap(slapd: SlapdProcess) -> None:
    async def body(node: Node) -> None:
        d = node.directory
        assert isinstance(await account(d, "alice"), Account)
        assert d.cache_errors == 2  # read and write
        assert d.searches == 1

    dead = f"redis://127.0.0.1:{ports.free_port('127.0.0.1', udp=False, tcp=True)}/0"
    await with_node(slapd.url, dead, body)


async def test_without_redis(slapd: SlapdProcess) -> None:
    async def body(node: Node) -> None:
        assert isinstance(await account(node.directory, "alice"), Account)

    await with_node(slapd.url, None, body)


async def test_close_answers_lookups_in_flight(slapd: SlapdProcess, redis_url: str) -> None:
    node = Node(slapd.url, redis_url, timeout=5.0)
    try:
        assert isinstance(await account(node.directory, "alice"), Account)
        slapd.pause()
        got: list[object] = []
        node.directory.get_account("bob", DOMAIN, got.append)
        await asyncio.sleep(0.1)
        assert got == []  # waiting for the paused slapd
        started = time.monotonic()
        await node.directory.aclose()
        assert time.monotonic() - started < 2.5  # at once, not the 5 s timeout (room for a loaded machine)
        assert len(got) == 1
        assert isinstance(got[0], StoreUnavailable)
    finally:
        slapd.resume()
        await node.close()
