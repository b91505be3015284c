"""Accounts (SIP users) in Redis.

Key layout::

    sipfarm:acct:{user@domain}   hash: domain, user, ha1_md5, ha1_sha256, enabled, max_contacts, created
    sipfarm:accounts             set of "user@domain" (the index ``list`` walks with SSCAN)

The ``{user@domain}`` hash tag keeps an account in one Redis Cluster slot; every script
touches that one key only, and the index set is updated by a separate command (Cluster-safe,
never read on the SIP path).

The realm is the domain, so digest authentication (RFC 2617 3.2.2.2, RFC 7616 3.4.2,
RFC 8760 for SIP) needs only HA1 = H(user ":" realm ":" password): the password itself
is never stored.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib.resources import files
from typing import Final, cast

from redis.asyncio import Redis

from sipfarm.sip.memo import MAX_CACHED_KEY, key_size

from .errors import AccountExists, AccountNotFound, StoreError
from .redis_client import redis_errors

ACCOUNT_PREFIX: Final = "sipfarm:acct:"
ACCOUNT_INDEX: Final = "sipfarm:accounts"
DEFAULT_MAX_CONTACTS: Final = 10
#: the only staleness the store allows: an account read by ``cached_get`` may be this old
CACHE_TTL: Final = 5.0
CACHE_SIZE: Final = 10_000


class CacheMiss(enum.Enum):
    """What a look-up in a process's account cache answers when it holds nothing for the name
    (None there is a cached "no such account")."""

    MISS = "miss"


NOT_CACHED: Final = CacheMiss.MISS

_ADD_LUA: Final = files(__package__).joinpath("account_add.lua").read_text()
_UPDATE_LUA: Final = files(__package__).joinpath("account_update.lua").read_text()


def ha1_md5(user: str, realm: str, password: str) -> str:
    """HA1 for the ``MD5`` algorithm (RFC 2617 3.2.2.2)."""
    return hashlib.md5(f"{user}:{realm}:{password}".encode(), usedforsecurity=False).hexdigest()


def ha1_sha256(user: str, realm: str, password: str) -> str:
    """HA1 for the ``SHA-256`` algorithm (RFC 7616 3.4.2, for SIP RFC 8760)."""
    return hashlib.sha256(f"{user}:{realm}:{password}".encode()).hexdigest()


def account_key(user: str, domain: str) -> str:
    return f"{ACCOUNT_PREFIX}{{{user}@{domain}}}"


_ACCOUNT_FIELDS: Final = ("user", "domain", "ha1_md5", "ha1_sha256", "enabled", "max_contacts", "created")


class Account:
    """Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        user: str,
        domain: str,
        ha1_md5: str,
        ha1_sha256: str,
        enabled: bool,
        max_contacts: int,
        created: float,
    ) -> None:
        self.user: Final = user
        self.domain: Final = domain
        self.ha1_md5: Final = ha1_md5
        self.ha1_sha256: Final = ha1_sha256
        self.enabled: Final = enabled
        self.max_contacts: Final = max_contacts
        self.created: Final = created

    def _fields(self) -> tuple[object, ...]:
        return (self.user, self.domain, self.ha1_md5, self.ha1_sha256, self.enabled, self.max_contacts, self.created)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Account) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        # the HA1s are as good as the password: never in a log line or a traceback
        fields = zip(_ACCOUNT_FIELDS, self._fields(), strict=True)
        return "Account(" + ", ".join(f"{n}=<hidden>" if n.startswith("ha1") else f"{n}={v!r}" for n, v in fields) + ")"

    @property
    def aor(self) -> str:
        """``user@domain``: the address-of-record without scheme."""
        return f"{self.user}@{self.domain}"

    @property
    def ha1_by_algorithm(self) -> dict[str, str]:
        """HA1 per base digest algorithm name, as ``sipfarm.sip.auth.verify`` takes them."""
        return {"MD5": self.ha1_md5, "SHA-256": self.ha1_sha256}

    def to_fields(self) -> dict[str, str]:
        return {
            "user": self.user,
            "domain": self.domain,
            "ha1_md5": self.ha1_md5,
            "ha1_sha256": self.ha1_sha256,
            "enabled": "1" if self.enabled else "0",
            "max_contacts": str(self.max_contacts),
            "created": repr(self.created),
        }

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> Account:
        try:
            return cls(
                user=fields[b"user"].decode(),
                domain=fields[b"domain"].decode(),
                ha1_md5=fields[b"ha1_md5"].decode(),
                ha1_sha256=fields[b"ha1_sha256"].decode(),
                enabled=fields[b"enabled"] == b"1",
                max_contacts=int(fields[b"max_contacts"]),
                created=float(fields[b"created"]),
            )
        except (KeyError, ValueError) as e:
            raise StoreError(f"corrupt account record: {e!r}") from e


def _validate(user: str, domain: str) -> None:
    # '@' in user would make "user@domain" ambiguous; braces would break the hash tag.
    for name, value in (("user", user), ("domain", domain)):
        if not value or any(c in value for c in "@{}"):
            raise ValueError(f"invalid {name} {value!r}: empty or contains '@', '{{' or '}}'")


class AccountStore:
    """Async account CRUD over one Redis client; ``cached_get`` for the SIP hot path."""

    def __init__(
        self,
        redis: Redis,
        *,
        cache_ttl: float = CACHE_TTL,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._add = redis.register_script(_ADD_LUA)
        self._update = redis.register_script(_UPDATE_LUA)
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = clock
        # (user, domain) -> (expires at monotonic time, account or None)
        self._cache: OrderedDict[tuple[str, str], tuple[float, Account | None]] = OrderedDict()

    async def add(
        self,
        user: str,
        domain: str,
        password: str,
        max_contacts: int = DEFAULT_MAX_CONTACTS,
        *,
        enabled: bool = True,
        now: float | None = None,
    ) -> Account:
        """Create an account; raise :class:`AccountExists` if ``user@domain`` is taken."""
        _validate(user, domain)
        if max_contacts < 1:
            raise ValueError(f"max_contacts must be >= 1, not {max_contacts}")
        account = Account(
            user=user,
            domain=domain,
            ha1_md5=ha1_md5(user, domain, password),
            ha1_sha256=ha1_sha256(user, domain, password),
            enabled=enabled,
            max_contacts=max_contacts,
            created=time.time() if now is None else now,
        )
        args = [x for kv in account.to_fields().items() for x in kv]
        with redis_errors:
            # two commands, not a pipeline: redis-py's Cluster pipelines take no scripts
            created = await self._add(keys=[account_key(user, domain)], args=args)
            await self._redis.sadd(ACCOUNT_INDEX, account.aor)  # idempotent when the account existed
        self._forget(user, domain)
        if created != 1:
            raise AccountExists(f"account {account.aor} exists")
        return account

    async def delete(self, user: str, domain: str) -> None:
        """Remove an account; raise :class:`AccountNotFound` if there is none.

        Its registrations are not touched (``LocationStore.clear``), they expire on their own.
        """
        with redis_errors:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(account_key(user, domain))
                pipe.srem(ACCOUNT_INDEX, f"{user}@{domain}")
                deleted, _ = await pipe.execute()
        self._forget(user, domain)
        if deleted != 1:
            raise AccountNotFound(f"no account {user}@{domain}")

    async def get(self, user: str, domain: str) -> Account | None:
        """The account as Redis has it now (one ``HGETALL``), or None."""
        with redis_errors:
            fields = await self._redis.hgetall(account_key(user, domain))
        # decode_responses=False (redis_client.create_redis): keys and values are bytes
        return Account.from_fields(cast("dict[bytes, bytes]", fields)) if fields else None

    async def cached_get(self, user: str, domain: str) -> Account | None:
        """``get`` through a small per-process cache (LRU, ``cache_size`` entries).

        An answer, including "no such account", is reused for ``cache_ttl`` seconds: that is
        the only staleness the store allows (a password change or deletion made on another
        node takes up to ``cache_ttl`` to be seen here; changes made through this instance
        are seen at once).
        """
        key = (user, domain)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1]
        account = await self.get(user, domain)
        if key_size(key) <= MAX_CACHED_KEY:  # a user name off the wire: a long one is not kept
            self._cache[key] = (now + self._cache_ttl, account)
            self._cache.move_to_end(key)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return account

    async def set_password(self, user: str, domain: str, password: str) -> None:
        """Replace both HA1s; raise :class:`AccountNotFound` if there is no such account."""
        await self._update_fields(
            user,
            domain,
            {"ha1_md5": ha1_md5(user, domain, password), "ha1_sha256": ha1_sha256(user, domain, password)},
        )

    async def set_enabled(self, user: str, domain: str, enabled: bool) -> None:
        """Enable or disable an account; raise :class:`AccountNotFound` if there is none."""
        await self._update_fields(user, domain, {"enabled": "1" if enabled else "0"})

    async def set_max_contacts(self, user: str, domain: str, max_contacts: int) -> None:
        """Change the binding limit; raise :class:`AccountNotFound` if there is no such account."""
        if max_contacts < 1:
            raise ValueError(f"max_contacts must be >= 1, not {max_contacts}")
        await self._update_fields(user, domain, {"max_contacts": str(max_contacts)})

    async def list(self, domain: str | None = None) -> list[Account]:
        """All accounts (of ``domain`` if given), sorted by domain then user.

        SSCAN over the index set, then one pipelined HGETALL per batch: no ``KEYS``.
        """
        accounts: list[Account] = []
        with redis_errors:
            suffix = b"@" + domain.encode() if domain is not None else b""
            members: list[bytes] = [
                member async for member in self._redis.sscan_iter(ACCOUNT_INDEX, count=1000) if member.endswith(suffix)
            ]
            for start in range(0, len(members), 500):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for member in members[start : start + 500]:
                        pipe.hgetall(ACCOUNT_PREFIX + "{" + member.decode() + "}")
                    replies = await pipe.execute()
                # A member whose hash is gone (deleted between SSCAN and HGETALL) is skipped.
                accounts.extend(Account.from_fields(fields) for fields in replies if fields)
        accounts.sort(key=lambda a: (a.domain, a.user))
        return accounts

    async def _update_fields(self, user: str, domain: str, fields: dict[str, str]) -> None:
        args = [x for kv in fields.items() for x in kv]
        with redis_errors:
            updated = await self._update(keys=[account_key(user, domain)], args=args)
        self._forget(user, domain)
        if updated != 1:
            raise AccountNotFound(f"no account {user}@{domain}")

    def _forget(self, user: str, domain: str) -> None:
        self._cache.pop((user, domain), None)
