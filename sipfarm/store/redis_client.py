"""Redis client factory, and the one place Redis exceptions become store exceptions.

Timeouts are short on purpose: a node that waits seconds for Redis holds the whole SIP
transaction, while a quick ``503 Retry-After`` lets the UA or the balancer go elsewhere.

redis-py drops (never reuses) a connection whose command was cancelled or timed out
mid-reply, so a half-read reply can never be handed to the next command; the store relies
on that and ``tests/store/test_store_failures.py`` guards it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, cast
from urllib.parse import unquote

from redis import exceptions as rexc
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .errors import StoreError, StoreUnavailable
from .sentinel import SentinelURL, is_sentinel_url, parse_sentinel_url

DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_CONNECT_TIMEOUT = 0.5
DEFAULT_MAX_CONNECTIONS = 128

# Replies that mean "this Redis cannot serve now", not "the request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError, MaxConnectionsError, auth failures
    rexc.TimeoutError,
    rexc.ReadOnlyError,  # a replica promoted/demoted under us
    rexc.OutOfMemoryError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.RedisClusterException,  # "cannot be connected": no seed node reachable
    TimeoutError,  # asyncio.timeout / wait_for around a store call
    OSError,
)


def create_redis(
    url: str,
    *,
    socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    client_name: str | None = None,
) -> Redis:
    """Return an asyncio Redis client for ``url`` (``redis://host:port/db``, ``rediss://``, ``unix://``,
    ``redis[s]+sentinel://host:port[,host:port...]/service[/db]``).

    - every command and connect is bounded by the timeouts above;
    - one immediate retry on a connection error, so the first command after a Redis restart
      replaces the dead pooled connection instead of failing (a Lua script that had already
      run before the connection died is then run twice: for REGISTER that yields the "out of
      order" outcome, i.e. a 500 the UA recovers from by re-registering);
    - at most ``max_connections`` commands in flight; one more fails at once with
      :class:`StoreUnavailable` (Redis that far behind is overload: answer 503 rather than
      queue; a waiting ``BlockingConnectionPool`` also costs ~20 us CPU per command).
    - behind Sentinel, each new connection asks the sentinels for the master, and a connection
      answered READONLY (its server demoted) is dropped and fails with StoreUnavailable.
    Replies are ``bytes`` (no decoding cost on the hot path).

    ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS)
    gives redis-py's ``RedisCluster`` over those seed nodes, typed as ``Redis``: the stores use
    only commands both serve (single-slot scripts and transactions, pipelines without one).
    """
    if is_sentinel_url(url):
        return _sentinel_redis(
            parse_sentinel_url(url),
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            client_name=client_name,
        )
    from sipfarm.store.resp import is_cluster_url, parse_cluster_url  # noqa: PLC0415

    if is_cluster_url(url):
        seeds, seed_urls = parse_cluster_url(url)
        kwargs: dict[str, Any] = dict(parse_url(seed_urls[0]))
        for key in ("host", "port", "db"):
            kwargs.pop(key, None)
        if kwargs.pop("connection_class", None) is SSLConnection:
            kwargs["ssl"] = True
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            max_connections=max_connections,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            client_name=client_name,
            decode_responses=False,
            require_full_coverage=False,
            **kwargs,
        )
        return cast("Redis", cluster)  # duck-typed: see above
    pool = ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1),
        client_name=client_name,
        decode_responses=False,
    )
    return Redis.from_pool(pool)  # the client owns its pool: aclose() closes it


def is_cluster_client(redis: object) -> bool:
    """Whether ``redis`` (from ``create_redis``) talks to a Redis Cluster."""
    return isinstance(redis, RedisCluster)


class SentinelRedis(Redis):
    """A client on a Sentinel-managed master that also closes its sentinel clients."""

    sentinel_manager: Sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.sentinel_manager.aclose()


def _sentinel_redis(
    url: SentinelURL, *, socket_timeout: float, connect_timeout: float, max_connections: int, client_name: str | None
) -> Redis:
    tls: dict[str, object] = {}
    if url.tls is not None:
        tls = {"ssl": True, "ssl_cert_reqs": url.tls.verify_mode, "ssl_check_hostname": url.tls.check_hostname}
        for key, value in (kv.split("=", 1) for kv in url.query.split("&") if kv):
            if key == "ssl_ca_certs":
                tls["ssl_ca_certs"] = unquote(value)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        url.sentinels,
        sentinel_kwargs={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),  # the next sentinel is the retry
            "username": url.sentinel_username,
            "password": url.sentinel_password,
            **tls,
        },
    )
    pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        url.service,
        sentinel,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1),
        client_name=client_name,
        db=url.db,
        username=url.username,
        password=url.password,
        decode_responses=False,
        **tls,
    )
    client = SentinelRedis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as from_pool: the client owns its pool
    client.sentinel_manager = sentinel
    return client


class RedisErrors:
    """``with redis_errors:`` turns Redis/socket failures into :class:`StoreError`.

    A class rather than ``@contextmanager``: it is entered once per store call on the hot path.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        if isinstance(exc, _UNAVAILABLE):
            raise StoreUnavailable(f"redis unavailable: {exc!r}") from exc
        if isinstance(exc, rexc.RedisError):
            raise StoreError(f"redis error: {exc!r}") from exc


redis_errors = RedisErrors()
