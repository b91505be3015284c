"""Host names of next hops to addresses, without blocking the event loop (RFC 3263, A/AAAA).

SIP URIs in Route sets, Request-URIs and Paths may name hosts (a gateway, a container's
service name).  The forwarding path asks :meth:`Resolver.cached` (a dict look-up); on a miss it
calls :meth:`Resolver.resolve` with a callback and carries on when the answer comes.  One
``getaddrinfo`` runs per name at a time whatever the number of waiting requests; answers are
cached for ``ttl`` seconds, failures for ``negative_ttl``.  (SRV and NAPTR records are not
looked up: the port is the URI's, else the transport's default, RFC 3263 4.2's last fallback.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("sipfarm.resolver")

Done = Callable[[str | None], None]
AddrInfo = list[tuple[int, int, int, str, tuple[Any, ...]]]
Lookup = Callable[[str], Awaitable[AddrInfo]]
UNRESOLVABLE = ""  # cached negative answer
# RFC 1035 2.3.4: a name is at most 255 octets on the wire, 253 characters written out.  A
# longer host (off the wire: as long as a message) is unresolvable at once, never looked up
# nor remembered, so the cache holds at most max_entries x 253 characters of names.
MAX_NAME = 253


async def _getaddrinfo(host: str) -> AddrInfo:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    return [(int(f), int(t), p, c, tuple(sa)) for f, t, p, c, sa in infos]


class Resolver:
    def __init__(
        self,
        *,
        ttl: float = 60.0,
        negative_ttl: float = 5.0,
        timeout: float = 2.0,
        max_entries: int = 10_000,
        lookup: Lookup | None = None,
    ) -> None:
        self._getaddrinfo = lookup or _getaddrinfo
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self.max_entries = max_entries
        self._cache: dict[str, tuple[str, float]] = {}
        self._waiting: dict[str, list[Done]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.after: Callable[[], None] | None = None  # called after each batch of callbacks

    def cached(self, host: str) -> str | None:
        """The cached address ('' = known unresolvable), or None when not (or no longer) known."""
        if len(host) > MAX_NAME:
            return UNRESOLVABLE
        hit = self._cache.get(host)
        if hit is None:
            return None
        if hit[1] < time.monotonic():
            del self._cache[host]
            return None
        return hit[0]

    def resolve(self, host: str, done: Done) -> None:
        """Call ``done(ip)`` (None: unresolvable) once ``host`` is resolved; maybe at once."""
        hit = self.cached(host)
        if hit is not None:
            done(hit or None)
            return
        waiting = self._waiting.get(host)
        if waiting is not None:
            if len(waiting) < 1000:
                waiting.append(done)
            else:
                done(None)
            return
        if len(self._waiting) >= self.max_entries:
            done(None)  # that many names being looked up at once: no more (bounded)
            return
        self._waiting[host] = [done]
        task = asyncio.get_running_loop().create_task(self._lookup(host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, host: str) -> None:
        address: str | None = None
        try:
            infos = await asyncio.wait_for(self._getaddrinfo(host), self.timeout)
            # IPv4 first: the farm's sockets are mostly IPv4 (an IPv6-only name still resolves)
            for wanted in (socket.AF_INET, socket.AF_INET6):
                address = next((str(sa[0]) for family, _, _, _, sa in infos if family == wanted), None)
                if address is not None:
                    break
        except (OSError, TimeoutError, UnicodeError) as exc:
            log.info("event=resolve_failed host=%s error=%s", host, str(exc).replace(" ", "_"))
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        ttl = self.ttl if address else self.negative_ttl
        self._cache[host] = (address or UNRESOLVABLE, time.monotonic() + ttl)
        for done in self._waiting.pop(host, []):
            try:
                done(address)
            except Exception:
                log.exception("event=resolve_callback_failed host=%s", host)
        if self.after is not None:
            self.after()
