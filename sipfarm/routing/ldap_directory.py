"""The shared directory: SIP accounts and aliases looked up in LDAP, cached in Redis.

Theory of operation. A lookup of ``user@domain`` asks, in order:

1. a small in-process cache (``local_ttl``, default 2 s; answered synchronously, like
   :class:`sipfarm.node.farmstate.FarmState`);
2. Redis, shared by every node: ``sipfarm:ldap:{user@domain}`` holds the entry as compact JSON
   with the wall-clock time it was read from LDAP. It is *fresh* for ``cache_ttl`` and kept
   ``stale_ttl`` for outages. "No such user" is cached too (``negative_ttl``, shorter);
3. LDAP, through a pool of ``pool_size`` connections (one search, bounded by ``timeout``).

When LDAP fails (down, refused, slow past ``timeout``, bind refused), a cached entry up to
``stale_ttl`` old is served instead; with none, the answer is :class:`StoreUnavailable` (the
node answers ``503`` with ``Retry-After``, RFC 3261 21.5.4). A lookup never waits longer than
``timeout`` for LDAP (plus as much for Redis), and after a failed connect the pool backs off
(``RECONNECT_BACKOFF_*``) answering "unavailable" at once instead of queueing lookups on a
dead server.

Concurrent lookups of one ``user@domain`` share one Redis read and one LDAP search. Results
reach the caller through a callback, never an exception; a task runs per cache miss only.

The LDAP client is ``bonsai`` (libldap underneath, asyncio-native: the socket is watched by the
event loop, nothing blocks it; the TCP connect runs in a thread of bonsai's). This module is not
in the mypyc build (``_ReaderConnection`` subclasses bonsai's connection).

Configuration (``LdapConfig.from_dict``)::

    [ldap]
    url = "ldap://127.0.0.1:389"              # or ldaps://
    bind_dn = "cn=sipfarm,ou=services,dc=example,dc=com"   # omit both to bind anonymously
    bind_password = "secret"
    base = "ou=people,dc=example,dc=com"
    filter = "(&(objectClass=sipAccount)(uid={user})(sipDomain={domain}))"  # default (uid={user})
    pool_size = 4            # connections per node
    timeout = 1.0            # s, per lookup (connect, bind, search)
    cache_ttl = 30.0         # s, a Redis answer is fresh
    stale_ttl = 300.0        # s, served while LDAP is down
    negative_ttl = 5.0       # s, "no such user"
    local_ttl = 2.0          # s, in-process (0: off)
    max_contacts = 10        # the Account's binding limit

    [ldap.attributes]
    user = "uid"
    ha1 = "sipHA1"           # MD5 HA1, hex; and/or
    password = "userPassword"   # plaintext (both HA1s computed); HA1 wins when both are there
    ha1_sha256 = "sipHA1SHA256" # optional
    aliases = "sipAlias"     # multi-valued: sip:/sips:/tel: URIs, user@domain, or user
    enabled = "sipEnabled"   # optional; enabled_mode "value" (TRUE/FALSE, absent: enabled),
    enabled_mode = "value"   # "presence" (enabled iff present) or "absence" (a lock flag)

Passwords read from LDAP (``password`` attribute) become HA1 values at once (realm = domain,
RFC 7616 3.4.2): Redis never holds a plaintext password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import bonsai
from bonsai.asyncio import AIOLDAPConnection
from redis.asyncio import Redis

from sipfarm.sip.auth import ha1
from sipfarm.sip.memo import MAX_CACHED_KEY, key_size
from sipfarm.store.accounts import DEFAULT_MAX_CONTACTS, Account
from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.redis_client import redis_errors

log = logging.getLogger(__name__)

CACHE_PREFIX: Final = "sipfarm:ldap:"
#: after the first failed connect, wait this long before the next; doubled per failure up to MAX
RECONNECT_BACKOFF_MIN: Final = 0.05
RECONNECT_BACKOFF_MAX: Final = 2.0
LOCAL_CACHE_SIZE: Final = 10_000

# Every stored entry has a time; an entry with "n" is "no such user".
_T, _NEGATIVE, _MD5, _SHA256, _ENABLED, _ALIASES = "t", "n", "m", "s", "e", "a"


def cache_key(user: str, domain: str) -> str:
    # {user@domain}: a Redis Cluster hash tag, as the account store's keys
    return f"{CACHE_PREFIX}{{{user}@{domain}}}"


# -- configuration --------------------------------------------------------------------------------


class EnabledMode(Enum):
    """How the ``enabled`` attribute reads."""

    VALUE = "value"  # TRUE/FALSE (RFC 4517 3.3.3 Boolean); absent means enabled
    PRESENCE = "presence"  # enabled iff the attribute is present
    ABSENCE = "absence"  # enabled iff it is absent (a lock flag such as nsAccountLock)


@dataclass(frozen=True, slots=True)
class LdapAttributes:
    """Which LDAP attribute holds what. ``ha1`` and ``password`` may both be set: HA1 wins."""

    user: str = "uid"
    ha1: str | None = None
    ha1_sha256: str | None = None
    password: str | None = None
    aliases: str | None = None
    enabled: str | None = None
    enabled_mode: EnabledMode = EnabledMode.VALUE

    def requested(self) -> list[str]:
        names = (self.user, self.ha1, self.ha1_sha256, self.password, self.aliases, self.enabled)
        return [name for name in names if name is not None]


_CONFIG_KEYS: Final = frozenset(
    {
        "url",
        "bind_dn",
        "bind_password",
        "base",
        "filter",
        "attributes",
        "pool_size",
        "timeout",
        "cache_ttl",
        "stale_ttl",
        "negative_ttl",
        "local_ttl",
        "max_contacts",
    }
)
_ATTRIBUTE_KEYS: Final = frozenset({"user", "ha1", "ha1_sha256", "password", "aliases", "enabled", "enabled_mode"})


@dataclass(frozen=True, slots=True)
class LdapConfig:
    """The ``[ldap]`` table. ``filter`` has ``{user}`` and may have ``{domain}``; both are escaped
    (RFC 4515 3) before they are put in."""

    url: str
    base: str
    attributes: LdapAttributes
    filter: str
    bind_dn: str = ""  # "" binds anonymously
    bind_password: str = ""
    pool_size: int = 4
    timeout: float = 1.0
    cache_ttl: float = 30.0
    stale_ttl: float = 300.0
    negative_ttl: float = 5.0
    local_ttl: float = 2.0
    max_contacts: int = DEFAULT_MAX_CONTACTS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, prefix: str = "ldap") -> LdapConfig:
        """Validate a TOML table; a ``ValueError`` names the bad key (``ldap.timeout: ...``)."""
        unknown = sorted(set(data) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{prefix}: unknown keys {', '.join(unknown)}")

        def string(key: str, default: str | None = None, *, empty: bool = False) -> str:
            value = data.get(key, default)
            if value is None:
                raise ValueError(f"{prefix}.{key}: required")
            if not isinstance(value, str) or (not value and not empty):
                raise ValueError(f"{prefix}.{key}: must be a non-empty string, not {value!r}")
            return value

        def number(key: str, default: float) -> float:
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{prefix}.{key}: must be a positive number, not {value!r}")
            return float(value)

        def integer(key: str, default: int) -> int:
            value = data.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{prefix}.{key}: must be a positive integer, not {value!r}")
            return value

        url = string("url")
        parts = urlsplit(url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"{prefix}.url: must be ldap://host[:port] or ldaps://host[:port], not {url!r}")
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError(f"{prefix}.url: bad port in {url!r}") from None
        attributes = _attributes_from_dict(data.get("attributes"), f"{prefix}.attributes")
        filter_template = string("filter", f"({attributes.user}={{user}})")
        _check_filter(filter_template, f"{prefix}.filter")
        timeout = number("timeout", 1.0)
        cache_ttl = number("cache_ttl", 30.0)
        stale_ttl = number("stale_ttl", 300.0)
        if stale_ttl < cache_ttl:
            raise ValueError(f"{prefix}.stale_ttl: must be >= cache_ttl ({cache_ttl}), not {stale_ttl}")
        local_ttl = data.get("local_ttl", 2.0)
        if isinstance(local_ttl, bool) or not isinstance(local_ttl, int | float) or local_ttl < 0:
            raise ValueError(f"{prefix}.local_ttl: must be a number >= 0 (0: no local cache), not {local_ttl!r}")
        bind_dn = string("bind_dn", "", empty=True)
        bind_password = string("bind_password", "", empty=True)
        if bind_password and not bind_dn:
            raise ValueError(f"{prefix}.bind_password: given without bind_dn")
        return cls(
            url=url,
            base=string("base"),
            attributes=attributes,
            filter=filter_template,
            bind_dn=bind_dn,
            bind_password=bind_password,
            pool_size=integer("pool_size", 4),
            timeout=timeout,
            cache_ttl=cache_ttl,
            stale_ttl=stale_ttl,
            negative_ttl=(number("negative_ttl", 5.0)),
            local_ttl=float(local_ttl),
            max_contacts=integer("max_contacts", DEFAULT_MAX_CONTACTS),
        )


def _attributes_from_dict(data: object, prefix: str) -> LdapAttributes:
    if data is None:
        raise ValueError(f"{prefix}: required (at least ha1 or password)")
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix}: must be a table, not {data!r}")
    unknown = sorted(set(data) - _ATTRIBUTE_KEYS)
    if unknown:
        raise ValueError(f"{prefix}: unknown keys {', '.join(map(str, unknown))}")
    names: dict[str, str | None] = {}
    for key in ("user", "ha1", "ha1_sha256", "password", "aliases", "enabled"):
        value = data.get(key)
        # RFC 4512 1.4: an attribute description is a keystring (or an OID), options after ';'
        if value is not None and (
            not isinstance(value, str) or not value or not all(c.isalnum() or c in "-.;" for c in value)
        ):
            raise ValueError(f"{prefix}.{key}: must be an LDAP attribute name, not {value!r}")
        names[key] = value
    if names["ha1"] is None and names["password"] is None:
        raise ValueError(f"{prefix}: needs ha1 or password (or both)")
    mode_name = data.get("enabled_mode", "value")
    try:
        mode = EnabledMode(mode_name)
    except ValueError:
        choices = ", ".join(m.value for m in EnabledMode)
        raise ValueError(f"{prefix}.enabled_mode: must be one of {choices}, not {mode_name!r}") from None
    return LdapAttributes(
        user=names["user"] or "uid",
        ha1=names["ha1"],
        ha1_sha256=names["ha1_sha256"],
        password=names["password"],
        aliases=names["aliases"],
        enabled=names["enabled"],
        enabled_mode=mode,
    )


def _check_filter(template: str, key: str) -> None:
    if "{user}" not in template:
        raise ValueError(f"{key}: must contain {{user}}, not {template!r}")
    try:
        sample = template.format(user="u", domain="d")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{key}: only {{user}} and {{domain}} may be substituted ({exc!r}) in {template!r}") from None
    depth = 0
    for c in sample:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            break
    if not (sample.startswith("(") and sample.endswith(")")) or depth != 0:
        raise ValueError(f"{key}: must be one parenthesized LDAP filter (RFC 4515), not {template!r}")


# -- pure pieces ----------------------------------------------------------------------------------


def escape_filter_value(value: str) -> str:
    """RFC 4515 3: in an assertion value, ``*``, ``(``, ``)``, ``\\`` and NUL are written as
    ``\\`` and two hex digits; everything else (UTF-8 included) stands for itself."""
    return (
        value.replace("\\", "\\5c").replace("*", "\\2a").replace("(", "\\28").replace(")", "\\29").replace("\0", "\\00")
    )


def build_filter(template: str, user: str, domain: str) -> str:
    return template.format(user=escape_filter_value(user), domain=escape_filter_value(domain))


def expand_alias(value: str, domain: str) -> str | None:
    """An alias target as a URI: ``sip:``/``sips:``/``tel:`` URIs as given, ``user@domain`` as a
    ``sip:`` URI, a bare ``user`` in the looked-up domain; None for an empty value."""
    value = value.strip()
    if not value:
        return None
    scheme, colon, _ = value.partition(":")
    if colon and scheme.lower() in ("sip", "sips", "tel"):
        return value
    if "@" in value:
        return f"sip:{value}"
    return f"sip:{value}@{domain}"


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """What the directory says about one ``user@domain``; ``ha1_md5 == ""``: no credentials
    (an alias-only entry), not an account."""

    ha1_md5: str
    ha1_sha256: str
    enabled: bool
    aliases: tuple[str, ...]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _values(attrs: Mapping[str, Any], name: str | None) -> list[str]:
    if name is None:
        return []
    values = attrs.get(name)
    if values is None:  # LDAPEntry is case-insensitive; a plain dict from a test may not be
        lowered = name.lower()
        values = next((v for k, v in attrs.items() if k.lower() == lowered), None)
    if values is None:
        return []
    if isinstance(values, str | bytes):
        return [_text(values)]
    return [_text(v) for v in values]


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in "0123456789abcdef" for c in value)


def entry_from_attributes(
    attrs: Mapping[str, Any], user: str, domain: str, attributes: LdapAttributes
) -> DirectoryEntry:
    """Map one LDAP entry's attributes. HA1s are lower-case hex or ""; a malformed one counts as
    absent (that algorithm cannot authenticate), never as a crash."""
    md5 = next(iter(_values(attrs, attributes.ha1)), "").strip().lower()
    sha256 = next(iter(_values(attrs, attributes.ha1_sha256)), "").strip().lower()
    md5 = md5 if _is_hex(md5, 32) else ""
    sha256 = sha256 if _is_hex(sha256, 64) else ""
    passwords = _values(attrs, attributes.password)
    if passwords and not md5:
        password = passwords[0]
        md5 = ha1("MD5", user, domain, password)
        if not sha256:
            sha256 = ha1("SHA-256", user, domain, password)
    enabled_values = _values(attrs, attributes.enabled)
    if attributes.enabled is None:
        enabled = True
    elif attributes.enabled_mode is EnabledMode.PRESENCE:
        enabled = bool(enabled_values)
    elif attributes.enabled_mode is EnabledMode.ABSENCE:
        enabled = not enabled_values
    else:
        enabled = not enabled_values or enabled_values[0].strip().upper() == "TRUE"
    aliases = tuple(
        target for target in (expand_alias(v, domain) for v in _values(attrs, attributes.aliases)) if target
    )
    return DirectoryEntry(ha1_md5=md5, ha1_sha256=sha256, enabled=enabled, aliases=aliases)


def encode_record(entry: DirectoryEntry | None, fetched: float) -> bytes:
    """Compact JSON for Redis; ``fetched`` is wall-clock time (nodes compare it)."""
    record: dict[str, object]
    if entry is None:
        record = {_T: round(fetched, 3), _NEGATIVE: 1}
    else:
        record = {_T: round(fetched, 3), _MD5: entry.ha1_md5, _SHA256: entry.ha1_sha256}
        if not entry.enabled:
            record[_ENABLED] = 0
        if entry.aliases:
            record[_ALIASES] = list(entry.aliases)
    return json.dumps(record, separators=(",", ":")).encode()


def decode_record(data: bytes) -> tuple[float, DirectoryEntry | None]:
    """``(fetched, entry or None)``; ``ValueError`` for anything else."""
    try:
        record = json.loads(data)
        fetched = float(record[_T])
        if record.get(_NEGATIVE):
            return fetched, None
        aliases = record.get(_ALIASES, [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise TypeError(f"bad aliases {aliases!r}")
        entry = DirectoryEntry(
            ha1_md5=str(record[_MD5]),
            ha1_sha256=str(record[_SHA256]),
            enabled=bool(record.get(_ENABLED, 1)),
            aliases=tuple(aliases),
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt directory cache record {data[:80]!r}: {exc!r}") from exc
    return fetched, entry


def _plausible(name: str) -> bool:
    """Non-empty and encodable (a name decoded with ``surrogateescape`` may not be)."""
    if not name:
        return False
    if name.isascii():
        return True
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


# -- the shared cache -----------------------------------------------------------------------------


class DirectoryCache(Protocol):
    """Where nodes share directory answers. Failures raise :class:`StoreError`."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...


class RedisDirectoryCache:
    """:class:`DirectoryCache` over an asyncio redis-py client (``redis_client.create_redis``)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def get(self, key: str) -> bytes | None:
        with redis_errors:
            value = await self._redis.get(key)
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        with redis_errors:
            await self._redis.set(key, value, px=max(1, int(ttl * 1000)))


# -- the LDAP connection pool ---------------------------------------------------------------------


class LdapUnavailable(Exception):
    """The directory cannot answer now (down, refused, timed out, backing off, bind refused)."""


#: how often a wait for a reply polls libldap without a wakeup: a safety net, should a reply sit
#: in libldap's buffer with nothing left to read on the socket
_REPOLL_INTERVAL: Final = 0.05


class _ReaderConnection(AIOLDAPConnection):
    """bonsai's asyncio connection, waking up on "readable" only.

    ``AIOLDAPConnection`` watches its socket for "writable" too, which a connected socket always
    is: the loop would call back every iteration until the reply came, a busy loop for as long
    as a stalled server takes. libldap writes a request before the wait starts; what is awaited
    is always something to read: the dummy socket the connect thread pings when it is done, then
    the bind reply, then search replies (``fileno()`` changes between the first two).

    The wait always unwatches its descriptor, also when cancelled (bonsai's leaves it watched,
    and the loop then calls a dead connection back forever).
    """

    async def _poll(self, msg_id: int, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - bonsai's signature
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        watched = -1
        timer: asyncio.TimerHandle | None = None

        def ready() -> None:
            nonlocal watched, timer
            if fut.done():
                return
            try:
                result = super(AIOLDAPConnection, self).get_result(msg_id)  # the C poll, not the coroutine
            except bonsai.LDAPError as exc:
                fut.set_exception(exc)
                return
            if result is not None:
                fut.set_result(result)
                return
            fd = self.fileno()
            if fd != watched:
                if watched >= 0:
                    loop.remove_reader(watched)
                watched = fd
                if fd >= 0:
                    loop.add_reader(fd, ready)
            if timer is not None:
                timer.cancel()
            timer = loop.call_later(_REPOLL_INTERVAL, ready)

        try:
            ready()  # the reply may be in libldap's buffer already
            return await asyncio.wait_for(fut, timeout)
        finally:
            if watched >= 0:
                loop.remove_reader(watched)
            if timer is not None:
                timer.cancel()


class LdapPool:
    """Up to ``size`` bound connections; a broken one is closed and replaced on demand.

    After a failed connect, further connects wait ``RECONNECT_BACKOFF_MIN`` doubling to
    ``RECONNECT_BACKOFF_MAX`` (with jitter, so nodes do not reconnect in step); meanwhile
    ``acquire`` raises :class:`LdapUnavailable` at once rather than queueing.
    """

    def __init__(
        self,
        config: LdapConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self._client = bonsai.LDAPClient(config.url)
        if config.bind_dn:
            self._client.set_credentials("SIMPLE", user=config.bind_dn, password=config.bind_password)
        self._client.set_async_connection_class(_ReaderConnection)
        self._client.set_server_chase_referrals(False)
        self._idle: list[AIOLDAPConnection] = []
        self._size = 0  # open or opening connections, lent or idle
        self._waiters: list[asyncio.Future[AIOLDAPConnection | None]] = []
        self._failures = 0
        self._retry_at = 0.0
        self._closed = False
        #: connections opened (a metric: reconnects show up here)
        self.connects = 0

    @property
    def size(self) -> int:
        return self._size

    async def acquire(self) -> tuple[AIOLDAPConnection, bool]:
        """A bound connection and whether it was used before (it may have died since)."""
        if self._closed:
            raise LdapUnavailable("pool closed")
        if self._idle:
            return self._idle.pop(), True
        if self._size < self._config.pool_size:
            self._size += 1
            return await self._open(), False
        waiter: asyncio.Future[AIOLDAPConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over just as we were cancelled
                handed = waiter.result()
                if handed is None:
                    self._free_slot()
                else:
                    self.release(handed, healthy=True)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        if conn is None:  # a slot freed by a dropped connection: open our own
            return await self._open(), False
        return conn, True

    def release(self, conn: AIOLDAPConnection, *, healthy: bool) -> None:
        if healthy and not self._closed:
            while self._waiters:
                waiter = self._waiters.pop(0)
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self._idle.append(conn)
            return
        self._close(conn)
        self._free_slot()

    def drop_idle(self) -> None:
        """Close the idle connections (after one turned out dead, the others likely are too)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)
            self._free_slot()

    def close(self) -> None:
        self._closed = True
        self.drop_idle()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(LdapUnavailable("pool closed"))
        self._waiters.clear()

    async def _open(self) -> AIOLDAPConnection:
        """Open a connection in a slot already counted in ``_size``."""
        if self._clock() < self._retry_at:
            self._free_slot()
            raise LdapUnavailable(f"reconnecting to {self._config.url} after {self._failures} failed connects")
        ok = refused = False
        started = self._clock()
        try:
            conn: AIOLDAPConnection = await self._client.connect(is_async=True, timeout=self._config.timeout)
            ok = True
        except bonsai.LDAPError as exc:
            refused = True
            raise LdapUnavailable(f"connect to {self._config.url}: {exc!r}") from exc
        except TimeoutError as exc:
            refused = True
            raise LdapUnavailable(f"connect to {self._config.url} timed out") from exc
        finally:
            if not ok:
                self._free_slot()
                # the server refused, or did not answer for about a timeout: down. A connect
                # cancelled early by the lookup's deadline (spent queueing behind others in a
                # busy node) says nothing about the directory and starts no backoff
                refused = refused or self._clock() - started >= 0.8 * self._config.timeout
            if refused:
                if self._failures == 0:
                    log.warning("event=ldap_down url=%s", self._config.url)
                self._failures += 1
                backoff = min(RECONNECT_BACKOFF_MAX, RECONNECT_BACKOFF_MIN * 2 ** (self._failures - 1))
                self._retry_at = self._clock() + backoff * random.uniform(0.5, 1.0)
        if self._failures:
            log.warning("event=ldap_up url=%s failed_connects=%d", self._config.url, self._failures)
        self._failures = 0
        self.connects += 1
        if self._closed:
            self._close(conn)
            self._free_slot()
            raise LdapUnavailable("pool closed")
        return conn

    def _free_slot(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self._size -= 1

    @staticmethod
    def _close(conn: AIOLDAPConnection) -> None:
        # Unwatch the socket before its descriptor is closed (and reused): _ReaderConnection
        # does when its wait ends, this is in case a wait of bonsai's own ever left it watched.
        with contextlib.suppress(Exception):
            fd = conn.fileno()
            if fd >= 0:
                loop = asyncio.get_running_loop()
                loop.remove_reader(fd)
                loop.remove_writer(fd)
        with contextlib.suppress(Exception):
            conn.close()


# -- the directory --------------------------------------------------------------------------------

_Result = DirectoryEntry | None | StoreError


class LdapDirectory:
    """Accounts and aliases from LDAP through the shared cache; see the module docstring.

    ``get_account`` and ``aliases`` call back exactly once, possibly before they return (an
    in-process cache hit), never raising into the caller. Per-lookup failures are logged at
    debug level only (an outage would flood the log): the pool logs ``ldap_down``/``ldap_up``
    once per outage, the counters say the rest. Counters for metrics: ``searches``
    (LDAP searches sent), ``cache_hits`` (fresh answers from Redis), ``local_hits``,
    ``stale_served`` (stale answers served because LDAP failed), ``failures`` (LDAP lookups that
    failed), ``cache_errors`` (Redis reads/writes that failed: the lookup goes on without it).
    """

    def __init__(
        self,
        config: LdapConfig,
        cache: DirectoryCache | None,
        *,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._cache = cache
        self._wall = wall_clock
        self._clock = clock
        self._pool = LdapPool(config, clock=clock)
        self._attrlist = config.attributes.requested()
        self._local: OrderedDict[tuple[str, str], tuple[float, DirectoryEntry | None]] = OrderedDict()
        self._inflight: dict[tuple[str, str], list[Callable[[_Result], None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.searches = 0
        self.cache_hits = 0
        self.local_hits = 0
        self.stale_served = 0
        self.failures = 0
        self.cache_errors = 0

    @property
    def pool(self) -> LdapPool:
        return self._pool

    # -- the callback API ---------------------------------------------------------------------

    def get_account(self, user: str, domain: str, callback: Callable[[Account | StoreError | None], None]) -> None:
        """The account, None (no such user, or an entry without credentials), or a StoreError
        (StoreUnavailable: LDAP down and nothing cached)."""
        self._lookup(user, domain, lambda result: callback(self._account(user, domain, result)))

    def aliases(self, user: str, domain: str, callback: Callable[[tuple[str, ...] | StoreError], None]) -> None:
        """The URIs ``user@domain`` expands to; () when it is no alias (or no entry)."""
        self._lookup(
            user,
            domain,
            lambda result: callback(
                result.aliases
                if isinstance(result, DirectoryEntry)
                else (result if isinstance(result, StoreError) else ())
            ),
        )

    async def aclose(self) -> None:
        """Stop lookups in flight (their callbacks get StoreUnavailable) and close the pool."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._pool.close()

    def _account(self, user: str, domain: str, result: _Result) -> Account | StoreError | None:
        if not isinstance(result, DirectoryEntry):
            return result
        if not result.ha1_md5:
            return None
        return Account(
            user=user,
            domain=domain,
            ha1_md5=result.ha1_md5,
            ha1_sha256=result.ha1_sha256,
            enabled=result.enabled,
            max_contacts=self.config.max_contacts,
            created=0.0,  # unknown: the directory owns the account's history
        )

    def _lookup(self, user: str, domain: str, callback: Callable[[_Result], None]) -> None:
        key = (user, domain)
        if self.config.local_ttl > 0:
            hit = self._local.get(key)
            if hit is not None:
                if hit[0] > self._clock():
                    self.local_hits += 1
                    self._deliver(callback, hit[1])
                    return
                del self._local[key]
        waiting = self._inflight.get(key)
        if waiting is not None:
            waiting.append(callback)
            return
        self._inflight[key] = [callback]
        try:
            task = asyncio.get_running_loop().create_task(self._resolve(key))
        except RuntimeError as exc:  # no running loop: a caller outside the node
            del self._inflight[key]
            self._deliver(callback, StoreError(f"directory lookup outside an event loop: {exc}"))
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, key: tuple[str, str]) -> None:
        result: _Result = StoreUnavailable("directory lookup interrupted")
        try:
            result = await self._find(*key)
        except asyncio.CancelledError:
            result = StoreUnavailable("directory closing")
            raise
        except Exception as exc:  # a bug: answer 500 rather than leave the callers waiting
            log.exception("event=ldap_lookup_error user=%s domain=%s", *key)
            result = StoreError(f"directory lookup failed: {exc!r}")
        finally:
            callbacks = self._inflight.pop(key, [])
            # a user name off the wire as long as a message is looked up every time, not kept
            if not isinstance(result, StoreError) and self.config.local_ttl > 0 and key_size(key) <= MAX_CACHED_KEY:
                self._local[key] = (self._clock() + self.config.local_ttl, result)
                if len(self._local) > LOCAL_CACHE_SIZE:
                    self._local.popitem(last=False)
            for callback in callbacks:
                self._deliver(callback, result)

    @staticmethod
    def _deliver(callback: Callable[[_Result], None], result: _Result) -> None:
        try:
            callback(result)
        except Exception:
            log.exception("event=ldap_callback_error")

    async def _find(self, user: str, domain: str) -> _Result:
        if not _plausible(user) or not _plausible(domain):
            return None  # no entry can have that name: not worth a search (nor a traceback)
        key = cache_key(user, domain)
        cached: tuple[float, DirectoryEntry | None] | None = None
        if self._cache is not None:
            try:
                async with asyncio.timeout(self.config.timeout):
                    data = await self._cache.get(key)
                if data is not None:
                    cached = decode_record(data)
            except (StoreError, TimeoutError, ValueError) as exc:
                self.cache_errors += 1
                log.debug("event=ldap_cache_read_failed key=%s error=%r", key, exc)
            if cached is not None:
                fetched, entry = cached
                # a negative record lives only negative_ttl in Redis: present means fresh
                if entry is None or self._wall() - fetched < self.config.cache_ttl:
                    self.cache_hits += 1
                    return entry
        try:
            entry = await self._search(user, domain)
        except LdapUnavailable as exc:
            self.failures += 1
            if cached is not None and self._wall() - cached[0] < self.config.stale_ttl:
                self.stale_served += 1
                log.debug("event=ldap_stale_served key=%s error=%s", key, exc)
                return cached[1]
            log.debug("event=ldap_unavailable key=%s error=%s", key, exc)
            return StoreUnavailable(f"LDAP directory unavailable: {exc}")
        except StoreError as exc:
            self.failures += 1
            log.warning("event=ldap_error key=%s error=%s", key, exc)
            return exc
        if self._cache is not None and len(key) <= 2 * MAX_CACHED_KEY:  # a long name is not kept in Redis
            ttl = self.config.negative_ttl if entry is None else self.config.stale_ttl
            try:
                async with asyncio.timeout(self.config.timeout):
                    await self._cache.set(key, encode_record(entry, self._wall()), ttl)
            except (StoreError, TimeoutError) as exc:
                self.cache_errors += 1
                log.debug("event=ldap_cache_write_failed key=%s error=%r", key, exc)
        return entry

    async def _search(self, user: str, domain: str) -> DirectoryEntry | None:
        """One search, retried once on a fresh connection if a reused one turned out dead;
        ``LdapUnavailable`` past ``timeout`` or when the server cannot answer."""
        config = self.config
        filter_exp = build_filter(config.filter, user, domain)
        deadline = self._clock() + config.timeout
        results: list[Any] = []
        try:
            async with asyncio.timeout(config.timeout):
                for attempt in range(2):
                    conn, reused = await self._pool.acquire()
                    healthy = False
                    try:
                        self.searches += 1
                        # sizelimit 2: one match is an account, two is a filter that is too wide
                        results = await conn.search(
                            config.base,
                            bonsai.LDAPSearchScope.SUBTREE,
                            filter_exp,
                            attrlist=self._attrlist,
                            timeout=max(0.001, deadline - self._clock()),
                            sizelimit=2,
                        )
                        healthy = True
                    except bonsai.SizeLimitError:
                        healthy = True
                        raise StoreError(f"LDAP filter {filter_exp!r} matches more than one entry") from None
                    except (bonsai.ConnectionError, bonsai.errors.ClosedConnection):
                        if reused and attempt == 0:
                            self._pool.drop_idle()
                            continue
                        raise
                    finally:
                        self._pool.release(conn, healthy=healthy)
                    break
        except TimeoutError as exc:
            raise LdapUnavailable(f"no answer within {config.timeout} s") from exc
        except bonsai.LDAPError as exc:
            raise LdapUnavailable(f"{exc!r}") from exc
        if len(results) > 1:
            raise StoreError(f"LDAP filter {filter_exp!r} matches more than one entry")
        if not results:
            return None
        return entry_from_attributes(results[0], user, domain, config.attributes)
