"""Redis Sentinel: which Redis is the master now (``redis+sentinel://`` URLs).

Theory of operation: the farm never caches the master's address across connections. Every
(re)connect of a client asks the sentinels in turn ``SENTINEL get-master-addr-by-name NAME``
(the one that answered last is asked first), then asks that server ``ROLE`` and accepts it only
if it says ``master``: a sentinel that has not yet heard of a failover, or a server that was
demoted a moment ago, is skipped rather than written to. A connection that later gets
``READONLY`` (its server became a replica, e.g. the old master coming back after a failover)
is dropped by its owner and the next connect asks the sentinels again. Sentinel's own
failover drops the clients of the servers it reconfigures (``CLIENT KILL TYPE normal``), so
a failover shows up as a lost connection first.

What a failover can lose: Redis replicates asynchronously. A write the master acknowledged
but had not yet sent to the replica that is promoted is gone, and so is the registration the
node answered 200 for. ``WAIT`` after the write (``[store] replicas_ack``) closes that window
at the cost of one replica round trip per batch. README (store/Redis) has the measured figures.

The URL: ``redis[s]+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB][?query]``.
USER/PASSWORD are the master's (and replicas'); ``sentinel_password=`` (and
``sentinel_username=``) authenticate to the sentinels; ``rediss+sentinel`` speaks TLS to
sentinels and servers alike, with the ``ssl_*`` options of a ``rediss://`` URL.

The parsing of URL and replies is sans-IO; :func:`find_master` is the one coroutine doing I/O
(short-lived connections, each bounded by the caller's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import hiredis

from .errors import StoreUnavailable

log = logging.getLogger("sipfarm.redis")

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379

# Error replies that mean "this server cannot take the command now", not "the command is
# wrong": the pipelined client answers StoreUnavailable (503) for them.
UNAVAILABLE_REPLIES = ("READONLY", "LOADING", "MASTERDOWN")


def is_sentinel_url(url: str) -> bool:
    """Whether ``url`` names a master through Redis Sentinel (``redis[s]+sentinel://``)."""
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


@dataclass(frozen=True, slots=True, eq=False)
class SentinelURL:
    """A parsed ``redis[s]+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_username: str | None
    sentinel_password: str | None
    tls: ssl.SSLContext | None
    query: str  # the ssl_* options, for the rediss:// URL of one server (redis_url)

    def redis_url(self, host: str, port: int) -> str:
        """The ``redis[s]://`` URL of one server of this service (same credentials and TLS)."""
        auth = ""
        if self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        scheme = "rediss" if self.tls is not None else "redis"
        h = f"[{host}]" if ":" in host else host
        return f"{scheme}://{auth}{h}:{port}/{self.db}{'?' + self.query if self.query else ''}"


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse ``redis[s]+sentinel://...`` (see the module docstring); ValueError names what is wrong."""
    from .resp import parse_redis_url  # noqa: PLC0415 - resp imports this module

    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Redis Sentinel URL: {url!r}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for raw in hosts.split(","):
        item = raw.strip()
        if item.startswith("["):  # [IPv6]:port
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.removeprefix(":")
        else:
            host, colon, port_text = item.rpartition(":")
            if not colon:
                host, port_text = item, ""
        port_text = port_text or str(DEFAULT_SENTINEL_PORT)
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad sentinel address {item!r} in {url!r} (expected HOST:PORT)")
        sentinels.append((host, int(port_text)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"expected /SERVICE[/DB] (the name sentinels monitor, e.g. /mymaster) in {url!r}")
    service = unquote(parts[0])
    if not parts[1:]:
        db = 0
    elif parts[1].isdigit():
        db = int(parts[1])
    else:
        raise ValueError(f"bad database number {parts[1]!r} in {url!r}")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(options) - {"sentinel_password", "sentinel_username", "ssl_ca_certs", "ssl_cert_reqs"}
    unknown -= {"ssl_check_hostname"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} in {url!r}")
    server_query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in options.items() if k.startswith("ssl_"))
    # credentials and TLS exactly as for one server: one parser, one set of rules
    single = scheme.partition("+")[0]
    auth = userinfo + "@" if at else ""
    first_host, first_port = sentinels[0]
    fh = f"[{first_host}]" if ":" in first_host else first_host
    _, _, _, username, password, tls = parse_redis_url(
        f"{single}://{auth}{fh}:{first_port}/0{'?' + server_query if server_query else ''}"
    )
    return SentinelURL(
        sentinels=tuple(sentinels),
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
        tls=tls,
        query=server_query,
    )


# --- replies (sans-IO) ---------------------------------------------------------------------


def master_address(reply: Any) -> tuple[str, int] | None:
    """``SENTINEL get-master-addr-by-name`` reply -> (host, port); None: the sentinel does not
    monitor that name. ValueError for a reply of another shape."""
    if reply is None:
        return None
    if isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, bytes) for x in reply):
        host, port = reply[0].decode(errors="replace"), reply[1]
        if port.isdigit() and 0 < int(port) < 65536 and host:
            return host, int(port)
    raise ValueError(f"unexpected get-master-addr-by-name reply {reply!r}")


def is_master_role(reply: Any) -> bool:
    """Whether a ``ROLE`` reply says master (``[b"master", offset, replicas]``)."""
    return isinstance(reply, list) and bool(reply) and reply[0] == b"master"


def unavailable_reply(error: Exception) -> bool:
    """Whether an error reply means "not now" (a replica, loading, master link down)."""
    return str(error).startswith(UNAVAILABLE_REPLIES)


def _auth(username: str | None, password: str | None) -> list[tuple[str, ...]]:
    if not password:
        return []
    return [("AUTH", username, password)] if username else [("AUTH", password)]


# --- I/O ---------------------------------------------------------------------------------


async def _exchange(host: str, port: int, commands: Sequence[tuple[str, ...]], tls: ssl.SSLContext | None) -> list[Any]:
    """Send ``commands`` on a new connection and return their replies (errors as values)."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=tls, server_hostname=host if tls is not None else None
    )
    try:
        writer.write(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]
        parser = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < len(commands):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("connection closed")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        return replies
    finally:
        writer.transport.abort()  # nothing left to say; no half-close wait


class SentinelResolver:
    """Finds the current master of one service; remembers which sentinel answered last."""

    def __init__(self, url: SentinelURL) -> None:
        self.url = url
        self._order = list(url.sentinels)
        self.master: tuple[str, int] | None = None
        #: times the master found differed from the one before (a failover seen by this client)
        self.master_changes = 0
        #: sentinels that did not answer (or not usefully), servers named master that were not
        self.sentinel_failures = 0
        self.not_master = 0
        #: +switch-master messages heard (SwitchWatch)
        self.switches = 0

    def stats(self) -> dict[str, int]:
        """Monotonic counts for the node's ``sipfarm_node_redis_events_total{kind}``."""
        return {
            "sentinel_master_changes": self.master_changes,
            "sentinel_switch_master": self.switches,
            "sentinel_failures": self.sentinel_failures,
            "sentinel_not_master": self.not_master,
        }

    async def find_master(self, timeout: float) -> tuple[str, int]:  # noqa: ASYNC109 - per exchange
        """Ask the sentinels for the master, check it with ROLE; raise StoreUnavailable if no
        sentinel names a server that says it is the master. Each exchange is bounded by
        ``timeout``."""
        url = self.url
        errors: list[str] = []
        tried: set[tuple[str, int]] = set()
        for sentinel in list(self._order):
            ask = [
                *_auth(url.sentinel_username, url.sentinel_password),
                ("SENTINEL", "get-master-addr-by-name", url.service),
            ]
            try:
                replies = await asyncio.wait_for(_exchange(*sentinel, ask, url.tls), timeout)
                address = master_address(replies[-1])
            except (OSError, TimeoutError, ValueError, hiredis.ProtocolError) as exc:
                self.sentinel_failures += 1
                errors.append(f"sentinel {sentinel[0]}:{sentinel[1]}: {exc or type(exc).__name__}")
                continue
            if isinstance(replies[0], Exception):
                self.sentinel_failures += 1
                errors.append(f"sentinel {sentinel[0]}:{sentinel[1]}: {replies[0]}")
                continue
            if address is None:
                self.sentinel_failures += 1
                errors.append(f"sentinel {sentinel[0]}:{sentinel[1]} does not monitor {url.service!r}")
                continue
            if address in tried:
                continue
            tried.add(address)
            try:
                replies = await asyncio.wait_for(
                    _exchange(*address, [*_auth(url.username, url.password), ("ROLE",)], url.tls), timeout
                )
            except (OSError, TimeoutError, hiredis.ProtocolError) as exc:
                errors.append(f"master {address[0]}:{address[1]}: {exc or type(exc).__name__}")
                continue
            if not is_master_role(replies[-1]):
                self.not_master += 1
                errors.append(f"{address[0]}:{address[1]} is not a master (ROLE {replies[-1]!r})")
                continue
            self._order.remove(sentinel)
            self._order.insert(0, sentinel)
            if self.master is not None and self.master != address:
                self.master_changes += 1
            self.master = address
            return address
        raise StoreUnavailable(f"no master for {url.service!r}: " + "; ".join(errors))


def switch_master(message: Any, service: str) -> tuple[str, int] | None:
    """The new master's address from a ``+switch-master`` pub/sub message about ``service``
    (``[b"message", b"+switch-master", b"NAME OLDIP OLDPORT NEWIP NEWPORT"]``); None for any
    other message (subscribe confirmations, other services)."""
    if not (isinstance(message, list) and len(message) == 3 and message[0] == b"message"):
        return None
    if message[1] != b"+switch-master" or not isinstance(message[2], bytes):
        return None
    fields = message[2].decode(errors="replace").split()
    if len(fields) != 5 or fields[0] != service or not fields[4].isdigit():
        return None
    return fields[3], int(fields[4])


class SwitchWatch:
    """Listens to one sentinel at a time for ``+switch-master`` of the service and calls
    ``on_switch(address)`` at once: a client then leaves the old master when the sentinels
    switch, not only when the old master drops it or answers READONLY (which, for a master
    demoted alive, comes on the sentinels' next look at it, up to 10 s later; writes it takes
    meanwhile are lost). One connection; when it is lost, the next sentinel, with back-off."""

    RETRY_MIN = 0.1
    RETRY_MAX = 2.0

    def __init__(self, resolver: SentinelResolver, on_switch: Callable[[tuple[str, int]], None]) -> None:
        self.resolver = resolver
        self.on_switch = on_switch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        url = self.resolver.url
        delay = self.RETRY_MIN
        while True:
            for host, port in list(self.resolver._order):
                try:
                    await self._listen(host, port, url)
                    delay = self.RETRY_MIN
                except (OSError, TimeoutError, hiredis.ProtocolError, ValueError) as exc:
                    log.debug("event=sentinel_watch_lost sentinel=%s:%d error=%r", host, port, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RETRY_MAX)

    async def _listen(self, host: str, port: int, url: SentinelURL) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=url.tls, server_hostname=host if url.tls is not None else None),
            self.RETRY_MAX,
        )
        try:
            commands = [*_auth(url.sentinel_username, url.sentinel_password), ("SUBSCRIBE", "+switch-master")]
            writer.write(b"".join(hiredis.pack_command(c) for c in commands))  # type: ignore[arg-type]
            parser = hiredis.Reader()
            while data := await reader.read(65536):
                parser.feed(data)
                while (message := parser.gets()) is not False:
                    if isinstance(message, hiredis.ReplyError):
                        raise ValueError(f"sentinel {host}:{port}: {message}")
                    address = switch_master(message, url.service)
                    if address is not None:
                        self.resolver.switches += 1
                        log.warning("event=sentinel_switch_master service=%s master=%s:%d", url.service, *address)
                        self.on_switch(address)
            raise ConnectionError("connection closed")
        finally:
            writer.transport.abort()
