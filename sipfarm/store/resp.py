"""A pipelined Redis client for the SIP hot path: callbacks, no task or future per command.

Why not redis-py here: a redis-py asyncio command costs a connection-pool checkout, a future and
a coroutine per call (~100 µs of CPU), the whole per-message budget of a node.  This client
writes each command into a buffer flushed once per event-loop iteration (so everything a burst
of SIP messages needs goes out as one pipeline), and hiredis parses the replies, which are handed
to callbacks in FIFO order from ``data_received``.  redis-py is still used for administration
(CLI, tests, membership) where convenience beats speed.

Failure model: a dead or slow connection fails every pending command with
:class:`StoreUnavailable` (the node answers 503) and is replaced in the background with
back-off; it is never reused half-read.  While disconnected, calls fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from sipfarm.store.errors import StoreUnavailable
from sipfarm.store.sentinel import (
    SentinelResolver,
    SwitchWatch,
    is_sentinel_url,
    parse_sentinel_url,
    unavailable_reply,
)

log = logging.getLogger("sipfarm.redis")

Reply = Any  # bytes | int | list | None | hiredis.ReplyError | StoreUnavailable
Callback = Callable[[Reply], None]


try:  # built by scripts/build-compiled.sh only: the interpreted build packs with hiredis
    from sipfarm.store._resppack import pack as _pack

    HAVE_RESPPACK = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_RESPPACK = False


def pack_command(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """One command in RESP: hiredis.pack_command's bytes (and errors). The C packer, when built,
    does the common case (str, bytes, int, float) without hiredis's sprintf per argument."""
    if HAVE_RESPPACK:
        packed = _pack(args)
        if packed is not None:
            return packed
    return hiredis.pack_command(args)  # type: ignore[arg-type,no-any-return]


_REPLY_ERROR: Final = hiredis.ReplyError  # Final: a C static in the compiled build, no dict look-up
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def parse_redis_url(url: str) -> tuple[str, int, int, str | None, str | None, ssl.SSLContext | None]:
    """``redis[s]://[[user]:password@]host:port/db[?ssl_ca_certs=PATH&ssl_cert_reqs=none|optional|required]``
    -> (host, port, db, username, password, TLS context or None), as redis-py reads the same URL.
    Raises ValueError for anything else."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", ""):
        raise ValueError(f"unsupported Redis URL scheme in {url!r} (use redis://HOST:PORT/DB or rediss://)")
    try:
        db = int(parsed.path.lstrip("/") or 0) if parsed.path not in ("", "/") else 0
        port = parsed.port or 6379
    except ValueError:
        raise ValueError(f"bad port or database number in the Redis URL {url!r}") from None
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    tls: ssl.SSLContext | None = None
    if parsed.scheme == "rediss":
        try:
            tls = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ssl_ca_certs in the Redis URL: {exc}") from None
        reqs = query.get("ssl_cert_reqs", "required").lower()
        if reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs={reqs!r} in the Redis URL: expected none, optional or required")
        if reqs != "required" or query.get("ssl_check_hostname", "true").lower() in ("false", "0", "no"):
            tls.check_hostname = False
        tls.verify_mode = _CERT_REQS[reqs]
    username = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    return parsed.hostname or "127.0.0.1", port, db, username, password, tls


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``redis[s]+cluster://[[user]:password@]host:port[,host:port...][/][?query]`` -> (seed nodes,
    one ``redis[s]://`` URL per seed with the same credentials and query). Raises ValueError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {url!r} (use redis+cluster://HOST:PORT[,HOST:PORT...])")
    netloc, _, query = rest.partition("?")
    netloc, _, path = netloc.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {path!r}, in {url!r}")
    userinfo, at, hosts = netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad seed node {item!r} in the Redis Cluster URL {url!r}")
        seeds.append((host, int(port)))
    single = scheme.lower().partition("+")[0]
    auth = userinfo + "@" if at else ""
    urls = [
        f"{single}://{auth}{'[' + h + ']' if ':' in h else h}:{p}/0{'?' + query if query else ''}" for h, p in seeds
    ]
    for u in urls:
        parse_redis_url(u)  # credentials and TLS options as for one Redis
    return seeds, urls


async def call_and_wait(call: Callable[..., None], *args: bytes | str | int | float) -> Reply:
    """``call(callback, *args)`` (a pipe's callback API) awaited: the reply, or its error raised."""
    fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

    def done(reply: Reply) -> None:
        if not fut.done():
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    call(done, *args)
    return await fut


class _RespProtocol(asyncio.Protocol):
    def __init__(self, owner: RedisPipe) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.owner._pending
        try:
            while True:
                reply = self.reader.gets()
                if reply is False:
                    break
                if not pending:
                    raise hiredis.ProtocolError("reply without a pending command")
                callback = pending.popleft()[0]
                if type(reply) is _REPLY_ERROR:  # one pointer compare per reply
                    reply = self.owner._error_reply(self, reply)
                self.owner._safe_call(callback, reply)
        except hiredis.ProtocolError as exc:
            log.warning("event=redis_protocol_error error=%s", exc)
            if self.transport is not None:
                self.transport.close()
        self.owner._replied()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)


class _Acked:
    """The reply of one ``call_acked`` write, held until the WAIT behind it answers."""

    __slots__ = ("callback", "reply")

    def __init__(self, callback: Callback) -> None:
        self.callback = callback
        self.reply: Reply = None

    def replied(self, reply: Reply) -> None:
        self.reply = reply


class RedisPipe:
    """One pipelined connection to Redis, reconnecting by itself."""

    def __init__(
        self,
        url: str,
        *,
        command_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        # redis+sentinel://: the master's address is asked of the sentinels at every (re)connect
        self.sentinel: SentinelResolver | None = None
        self._switch_watch: SwitchWatch | None = None
        if is_sentinel_url(url):
            spec = parse_sentinel_url(url)
            self.sentinel = SentinelResolver(spec)
            self._switch_watch = SwitchWatch(self.sentinel, self._master_switched)
            self.host, self.port = spec.sentinels[0]  # until a master is found
            self.db, self.username, self.password, self.tls = spec.db, spec.username, spec.password, spec.tls
        else:
            self.host, self.port, self.db, self.username, self.password, self.tls = parse_redis_url(url)
        self.url = url
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.on_state = on_state
        self._proto: _RespProtocol | None = None
        self._pending: deque[tuple[Callback, float]] = deque()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors = 0
        self.commands = 0
        self.callback_failures = 0  # callbacks that raised (a bug): logged and counted
        # called once after each batch of replies (or failures) has gone to its callbacks: the
        # node's glue drains what the callbacks queued (one drain per batch, not per reply)
        self.after_replies: Callable[[], None] | None = None
        #: ``[store] replicas_ack``: a write made with ``call_acked`` is answered only once this
        #: many replicas have it (one ``WAIT`` per flushed batch); 0 = no WAIT
        self.replicas_ack = 0
        #: milliseconds the WAIT may block this connection (and every command behind it)
        self.replicas_timeout_ms = 100
        #: writes answered StoreUnavailable because fewer than ``replicas_ack`` replicas had them
        self.unacked = 0
        self._acked: list[_Acked] = []

    @property
    def connected(self) -> bool:
        return self._proto is not None

    async def connect(self) -> None:
        """Connect once (raises StoreUnavailable); afterwards the pipe reconnects by itself."""
        self._loop = asyncio.get_running_loop()
        if self._switch_watch is not None:
            self._switch_watch.start()
        await self._open()
        self._arm_watchdog()

    async def start(self) -> None:
        """Connect if Redis is there; otherwise keep trying in the background (never raises)."""
        self._loop = asyncio.get_running_loop()
        if self._switch_watch is not None:
            self._switch_watch.start()
        try:
            await self._open()
        except StoreUnavailable as exc:
            log.warning("event=redis_unavailable url=%s error=%s", self.url, str(exc).replace(" ", "_"))
            self._start_reconnect()
        self._arm_watchdog()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.sentinel is not None:  # raises StoreUnavailable: no master (yet)
            self.host, self.port = await self.sentinel.find_master(self.connect_timeout)
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _RespProtocol(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise StoreUnavailable(f"cannot connect to Redis at {self.host}:{self.port}: {exc}") from exc
        # AUTH / SELECT are pipelined ahead of anything else on the new connection.
        self._proto = proto
        if self.password:
            if self.username:
                self.call(self._check_setup, "AUTH", self.username, self.password)
            else:
                self.call(self._check_setup, "AUTH", self.password)
        if self.db:
            self.call(self._check_setup, "SELECT", self.db)
        if self.on_state is not None:
            self.on_state(True)

    def _check_setup(self, reply: Reply) -> None:
        if isinstance(reply, Exception):
            log.error("event=redis_setup_failed error=%s", reply)

    def call(self, callback: Callback, *args: bytes | str | int | float) -> None:
        """Queue one command; ``callback`` gets the reply, a ReplyError or StoreUnavailable."""
        if self._proto is None:
            self.errors += 1
            self._safe_call(callback, StoreUnavailable("Redis is not connected"))
            return
        self.commands += 1
        self._out.append(pack_command(args))
        self._pending.append((callback, time.monotonic()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def stats(self) -> dict[str, int]:
        """Counts for the node's ``sipfarm_node_redis_events_total{kind}`` (monotonic)."""
        counts = {"unacked_writes": self.unacked}
        if self.sentinel is not None:
            counts.update(self.sentinel.stats())
        return counts

    def require_replicas(self, count: int, timeout_ms: int = 100) -> None:
        """``[node] replicas_ack`` / ``replicas_ack_timeout``: see ``call_acked``. A WAIT blocks its
        connection up to ``timeout_ms``: the stall watchdog gives it that much more."""
        self.replicas_ack = count
        self.replicas_timeout_ms = timeout_ms
        if count > 0:
            self.command_timeout = max(self.command_timeout, timeout_ms / 1000 + 0.5)

    def call_acked(self, callback: Callback, *args: bytes | str | int | float) -> None:
        """``call`` for a write that must reach ``replicas_ack`` replicas before it is answered:
        the writes queued in one event-loop iteration share one ``WAIT`` behind them. Fewer
        replicas in ``replicas_timeout_ms`` answer StoreUnavailable (the write stays on the
        master: it may survive a failover, or not)."""
        if self.replicas_ack <= 0 or self._proto is None:
            self.call(callback, *args)
            return
        acked = _Acked(callback)
        self.call(acked.replied, *args)
        self._acked.append(acked)

    def _acked_done(self, batch: list[_Acked], reply: Reply) -> None:
        error: Exception | None = None
        if isinstance(reply, Exception):
            error = reply if isinstance(reply, StoreUnavailable) else StoreUnavailable(f"WAIT failed: {reply}")
        elif not isinstance(reply, int) or reply < self.replicas_ack:
            error = StoreUnavailable(f"write acknowledged by {reply} of {self.replicas_ack} replicas")
        for acked in batch:
            if error is not None and not isinstance(acked.reply, Exception):
                self.unacked += 1
                self._safe_call(acked.callback, error)
            else:
                self._safe_call(acked.callback, acked.reply)

    async def execute(self, *args: bytes | str | int | float) -> Reply:
        """Awaitable form for code off the hot path. Raises StoreUnavailable / ReplyError."""
        return await call_and_wait(self.call, *args)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._acked and self._proto is not None:
            batch, self._acked = self._acked, []
            self.commands += 1
            self._out.append(pack_command(("WAIT", self.replicas_ack, self.replicas_timeout_ms)))
            self._pending.append((partial(self._acked_done, batch), time.monotonic()))
        if self._out and self._proto is not None and self._proto.transport is not None:
            self._proto.transport.write(b"".join(self._out))
        self._out.clear()

    def _error_reply(self, proto: _RespProtocol, error: Exception) -> Reply:
        """An error reply as the callback sees it: READONLY/LOADING/MASTERDOWN are
        StoreUnavailable (503, retry later), not a failed command (500). READONLY behind
        Sentinel means the server is a replica now: drop the connection, so the next one goes
        to the master the sentinels name."""
        if not unavailable_reply(error):
            return error
        self.errors += 1
        readonly = str(error).startswith("READONLY")
        if readonly and self.sentinel is not None and proto is self._proto and proto.transport is not None:
            log.warning("event=redis_readonly host=%s port=%d", self.host, self.port)
            proto.transport.close()
        return StoreUnavailable(f"Redis {self.host}:{self.port}: {error}")

    def _safe_call(self, callback: Callback, reply: Reply) -> None:
        try:
            callback(reply)
        except Exception:  # a bug in one handler must not poison the connection
            self.callback_failures += 1  # counted: sipfarm_node_internal_errors_total
            log.exception("event=redis_callback_failed")

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, deque()
        self._out.clear()
        for callback, _ in pending:
            self.errors += 1
            self._safe_call(callback, StoreUnavailable(reason))
        acked, self._acked = self._acked, []  # queued, their WAIT not yet: fail them too
        for one in acked:
            self._safe_call(one.callback, StoreUnavailable(reason))
        if pending or acked:
            self._replied()

    def _replied(self) -> None:
        after = self.after_replies
        if after is not None:
            try:
                after()
            except Exception:
                log.exception("event=redis_after_replies_failed")

    def _lost(self, proto: _RespProtocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if self.on_state is not None:
            self.on_state(False)
        self._fail_pending(f"Redis connection lost: {exc or 'closed'}")
        if not self._closed:
            log.warning("event=redis_disconnected url=%s", self.url)
            self._start_reconnect()

    def _master_switched(self, address: tuple[str, int]) -> None:
        """The sentinels switched the master: leave the old one now (its pending commands
        fail with StoreUnavailable) and connect to the new one without waiting for back-off."""
        proto = self._proto
        if proto is not None:
            if (self.host, self.port) == address:
                return
            self._lost(proto, ConnectionError(f"sentinels switched the master to {address[0]}:{address[1]}"))
            if proto.transport is not None:
                proto.transport.abort()
        elif not self._closed:
            if self._reconnect_task is not None:
                self._reconnect_task.cancel()  # asleep in its back-off: start again at once
            self._reconnect_task = None
            self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closed and self._proto is None:
            try:
                await self._open()
                log.warning("event=redis_reconnected url=%s", self.url)
                return
            except StoreUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _arm_watchdog(self) -> None:
        if self._loop is None or self._closed:
            return
        self._watchdog = self._loop.call_later(min(0.25, self.command_timeout / 2), self._check_stalled)

    def _check_stalled(self) -> None:
        """A reply overdue by command_timeout means the connection is dead or stuck: replace it."""
        if self._pending and time.monotonic() - self._pending[0][1] > self.command_timeout:
            proto = self._proto
            log.warning("event=redis_timeout pending=%d", len(self._pending))
            if proto is not None:
                self._lost(proto, TimeoutError("reply overdue"))
                if proto.transport is not None:
                    proto.transport.abort()
        elif self._proto is None and not self._closed:
            self._start_reconnect()
        self._arm_watchdog()

    async def close(self) -> None:
        self._closed = True
        if self._switch_watch is not None:
            await self._switch_watch.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnect_task
        proto = self._proto
        self._proto = None
        self._fail_pending("Redis client closed")
        if proto is not None and proto.transport is not None:
            proto.transport.close()
