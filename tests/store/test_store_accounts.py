"""AccountStore against a real redis-server."""

from __future__ import annotations

import hashlib

import pytest
from store_support import OpenStores

from sipfarm.store import AccountExists, AccountNotFound, ha1_md5, ha1_sha256
from sipfarm.store.accounts import Account, AccountStore


def test_ha1_md5_matches_rfc2617_example() -> None:
    # RFC 2617 3.5: Mufasa / "Circle Of Life" at realm testrealm@host.com
    assert ha1_md5("Mufasa", "testrealm@host.com", "Circle Of Life") == "939e7578ed9e3c518a452acee763bce9"


def test_ha1_values_give_rfc7616_example_responses() -> None:
    # RFC 7616 3.9.1: the same user, password "Circle of Life", GET /dir/index.html, qop=auth.
    user, realm, password = "Mufasa", "http-auth@example.org", "Circle of Life"
    nonce = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v"
    cnonce = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"
    for ha1, h, expected in (
        (ha1_md5(user, realm, password), hashlib.md5, "8ca523f5e9506fed4657c9700eebdbec"),
        (
            ha1_sha256(user, realm, password),
            hashlib.sha256,
            "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
        ),
    ):
        ha2 = h(b"GET:/dir/index.html").hexdigest()
        response = h(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}".encode()).hexdigest()
        assert response == expected


async def test_add_then_get_returns_the_account_without_its_password(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        added = await s.accounts.add("alice", "example.com", "s3cret", max_contacts=3, now=1000.0)
        got = await s.accounts.get("alice", "example.com")
        assert got == added
        assert got is not None
        assert got.aor == "alice@example.com"
        assert got.ha1_md5 == ha1_md5("alice", "example.com", "s3cret")
        assert got.ha1_sha256 == ha1_sha256("alice", "example.com", "s3cret")
        assert (got.enabled, got.max_contacts, got.created) == (True, 3, 1000.0)
        raw = await s.accounts._redis.hgetall("sipfarm:acct:{alice@example.com}")
        assert b"s3cret" not in b"".join(k + v for k, v in raw.items())  # type: ignore[operator]
        assert await s.accounts.get("bob", "example.com") is None


async def test_stored_ha1_verifies_with_the_sip_digest_code(open_stores: OpenStores) -> None:
    auth = pytest.importorskip("sipfarm.sip.auth")
    async with open_stores() as s:
        account = await s.accounts.add("alice", "example.com", "pw")
        for algorithm, value in account.ha1_by_algorithm.items():
            assert value == auth.ha1(algorithm, "alice", "example.com", "pw")


async def test_duplicate_add_fails_and_keeps_the_first(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        first = await s.accounts.add("alice", "example.com", "one")
        with pytest.raises(AccountExists):
            await s.accounts.add("alice", "example.com", "two")
        assert await s.accounts.get("alice", "example.com") == first


async def test_delete(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.accounts.add("alice", "example.com", "pw")
        await s.accounts.delete("alice", "example.com")
        assert await s.accounts.get("alice", "example.com") is None
        assert await s.accounts.list() == []
        with pytest.raises(AccountNotFound):
            await s.accounts.delete("alice", "example.com")


async def test_set_password_changes_ha1(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.accounts.add("alice", "example.com", "old")
        await s.accounts.set_password("alice", "example.com", "new")
        got = await s.accounts.get("alice", "example.com")
        assert got is not None
        assert got.ha1_md5 == ha1_md5("alice", "example.com", "new")
        assert got.ha1_sha256 == ha1_sha256("alice", "example.com", "new")
        with pytest.raises(AccountNotFound):
            await s.accounts.set_password("bob", "example.com", "x")
        assert await s.accounts.get("bob", "example.com") is None  # no half-created account


async def test_enable_and_max_contacts(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        await s.accounts.add("alice", "example.com", "pw")
        await s.accounts.set_enabled("alice", "example.com", False)
        await s.accounts.set_max_contacts("alice", "example.com", 2)
        got = await s.accounts.get("alice", "example.com")
        assert got is not None
        assert (got.enabled, got.max_contacts) == (False, 2)


async def test_list_all_and_by_domain(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        for user, domain in [("bob", "b.org"), ("alice", "a.org"), ("carol", "a.org"), ("x", "aa.org")]:
            await s.accounts.add(user, domain, "pw")
        assert [a.aor for a in await s.accounts.list()] == [
            "alice@a.org",
            "carol@a.org",
            "x@aa.org",
            "bob@b.org",
        ]
        assert [a.aor for a in await s.accounts.list("a.org")] == ["alice@a.org", "carol@a.org"]
        assert await s.accounts.list("nowhere.org") == []


async def test_invalid_names_are_refused(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        for user, domain in [("", "a.org"), ("a@b", "a.org"), ("a", "{x}"), ("a", "")]:
            with pytest.raises(ValueError, match="invalid"):
                await s.accounts.add(user, domain, "pw")


async def test_cached_get_is_stale_for_at_most_its_ttl(open_stores: OpenStores) -> None:
    clock = [0.0]
    async with open_stores() as s, open_stores() as other_node:
        cached = AccountStore(s.accounts._redis, cache_ttl=5.0, clock=lambda: clock[0])
        assert await cached.cached_get("alice", "example.com") is None  # negative answer cached
        await other_node.accounts.add("alice", "example.com", "pw")
        assert await cached.cached_get("alice", "example.com") is None
        clock[0] = 5.1
        got = await cached.cached_get("alice", "example.com")
        assert got is not None
        await other_node.accounts.set_password("alice", "example.com", "new")
        assert await cached.cached_get("alice", "example.com") == got
        clock[0] = 10.2
        fresh = await cached.cached_get("alice", "example.com")
        assert fresh is not None
        assert fresh.ha1_md5 == ha1_md5("alice", "example.com", "new")
        # a change made through the caching instance itself is seen at once
        await cached.set_password("alice", "example.com", "newer")
        mine = await cached.cached_get("alice", "example.com")
        assert mine is not None
        assert mine.ha1_md5 == ha1_md5("alice", "example.com", "newer")


async def test_cache_is_bounded(open_stores: OpenStores) -> None:
    async with open_stores() as s:
        cached = AccountStore(s.accounts._redis, cache_size=3)
        for i in range(10):
            await cached.cached_get(f"u{i}", "example.com")
        assert len(cached._cache) == 3


def test_an_accounts_repr_hides_its_ha1s() -> None:
    account = Account("alice", "farm.test", "a" * 32, "b" * 64, True, 5, 0.0)
    text = repr(account)
    assert "a" * 32 not in text and "b" * 64 not in text
    assert "user='alice'" in text and "ha1_md5=<hidden>" in text


async def test_cached_get_keeps_no_answer_for_long_user_names(open_stores: OpenStores) -> None:
    """A user name off the wire may be as long as a message: answered, never remembered."""
    async with open_stores() as s:
        cached = AccountStore(s.accounts._redis, cache_ttl=5.0)
        for i in range(50):
            assert await cached.cached_get(f"u{i}" + "x" * 8192, "example.com") is None
        assert len(cached._cache) == 0
        assert await cached.cached_get("alice", "example.com") is None
        assert len(cached._cache) == 1
