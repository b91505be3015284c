"""The hot path's pipelined client on a Redis Cluster: one :class:`RedisPipe` per master.

Theory of operation
-------------------
A command goes to the master that owns its key's hash slot (CRC16 of the key, or of its
``{hash tag}``, mod 16384: the Redis Cluster specification). The slot map comes from
``CLUSTER SLOTS`` of any reachable node (the seeds of the URL, then every node learnt since),
read at start and again whenever it proves stale:

* ``-MOVED slot host:port``: the slot has a new owner for good (a failover, a finished
  migration). The slot is pointed there at once, the command is sent again, and the whole map
  is read again in the background.
* ``-ASK slot host:port``: the slot is migrating and this key has already moved; the command
  goes once to that node behind ``ASKING`` (pipelined back to back on its connection), the
  map is left alone.
* ``-TRYAGAIN`` (a multi-key command during a migration), ``-CLUSTERDOWN`` (slots uncovered)
  and a master connection lost answer :class:`StoreUnavailable`: the node answers 503 and the
  UA, or the balancer, tries again. A lost master also starts a map refresh, repeated until every
  slot has a reachable master: a replica promoted after ``cluster-node-timeout`` is found so.

Each master connection is a :class:`RedisPipe`: everything a burst of SIP messages sends in one
event-loop iteration still leaves as one pipeline per master. Redirections are bounded
(``MAX_REDIRECTS`` per command). The single-Redis path never comes here: ``open_pipe`` returns a
plain :class:`RedisPipe` for a ``redis://`` URL.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial

from sipfarm.store.errors import StoreUnavailable
from sipfarm.store.resp import Callback, RedisPipe, Reply, call_and_wait, is_cluster_url, parse_cluster_url

log = logging.getLogger("sipfarm.redis")

SLOTS = 16384
#: redirections (MOVED, ASK) one command may follow before it fails
MAX_REDIRECTS = 5
#: seconds between two map refreshes while a slot has no reachable master
REFRESH_RETRY = 0.1
REFRESH_RETRY_MAX = 1.0

_KEY_AT_3 = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})
_NO_KEY = frozenset({"PING", "WAIT", "CLUSTER", "SCRIPT", "INFO", "TIME", "ECHO", "ASKING", "READONLY"})


def key_slot(key: bytes) -> int:
    """The hash slot of ``key`` (Redis Cluster specification, "Keys hash tags")."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) & (SLOTS - 1)


def _as_bytes(value: bytes | str | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def command_slot(args: tuple[bytes | str | int | float, ...]) -> int:
    """The slot of a command's first key; -1 for a command with no key (any master serves it).
    Command names as the farm writes them (upper case ``str``) are looked up as they are."""
    if len(args) < 2:
        return -1
    first = args[0]
    name = first if isinstance(first, str) else _as_bytes(first).decode()
    if name in _KEY_AT_3:
        if len(args) < 4 or int(args[2]) == 0:
            return -1
        return key_slot(_as_bytes(args[3]))
    if name in _NO_KEY or (not name.isupper() and name.upper() in _NO_KEY):
        return -1
    if not name.isupper() and name.upper() in _KEY_AT_3:
        return command_slot((name.upper(), *args[1:]))
    return key_slot(_as_bytes(args[1]))


class _Redirected:
    """One command under way, kept to send it again after a MOVED or ASK."""

    __slots__ = ("acked", "args", "callback", "owner", "redirects")

    def __init__(
        self, owner: ClusterPipe, callback: Callback, args: tuple[bytes | str | int | float, ...], acked: bool
    ):
        self.owner = owner
        self.callback = callback
        self.args = args
        self.acked = acked
        self.redirects = 0

    def replied(self, reply: Reply) -> None:
        if isinstance(reply, Exception) and not isinstance(reply, StoreUnavailable):
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ")):
                self.owner._redirect(self, text)
                return
            if text.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                self.owner.errors += 1
                reply = StoreUnavailable(f"Redis Cluster: {text}")
        self.callback(reply)


class ClusterPipe(RedisPipe):
    """:class:`RedisPipe`'s interface over every master of a Redis Cluster (``call``, ``call_acked``,
    ``execute``, ``start``, ``connect``, ``close``, ``after_replies``)."""

    def __init__(
        self,
        url: str,
        *,
        command_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        seeds, seed_urls = parse_cluster_url(url)
        super().__init__(seed_urls[0], command_timeout=command_timeout, connect_timeout=connect_timeout)
        self.url = url
        self.cluster_state = on_state
        self._template = seed_urls[0]
        self._seeds: list[tuple[str, int]] = list(seeds)
        self._slots: list[RedisPipe | None] = [None] * SLOTS
        self._masters: dict[tuple[str, int], RedisPipe] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self.refreshes = 0
        self.redirects = 0
        self._gone_unacked = 0  # unacknowledged writes counted by master pipes since dropped
        self._started: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._up = False

    # -- the slot map --------------------------------------------------------------------------

    @property
    def masters(self) -> dict[tuple[str, int], RedisPipe]:
        return self._masters

    def _node_url(self, host: str, port: int) -> str:
        scheme, _, rest = self._template.partition("://")
        netloc, slash, tail = rest.partition("/")
        userinfo, at, _ = netloc.rpartition("@")
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{userinfo}{at}{shown}:{port}{slash}{tail}"

    def _pipe_for(self, address: tuple[str, int]) -> RedisPipe:
        pipe = self._masters.get(address)
        if pipe is None:
            pipe = RedisPipe(
                self._node_url(*address),
                command_timeout=self.command_timeout,
                connect_timeout=self.connect_timeout,
                on_state=partial(self._master_state, address),
            )
            pipe.require_replicas(self.replicas_ack, self.replicas_timeout_ms)
            pipe.after_replies = self._forward_replies
            self._masters[address] = pipe
        return pipe

    async def _start_master(self, address: tuple[str, int]) -> None:
        """Connect a master's pipe once; from then on it reconnects by itself (its own back-off
        and watchdog: started once, never again while it is in the map)."""
        if address in self._started:
            return
        self._started.add(address)
        await self._masters[address].start()

    def _forward_replies(self) -> None:
        self._replied()

    def _master_state(self, address: tuple[str, int], up: bool) -> None:
        if not up and not self._closed:
            log.warning("event=redis_cluster_master_lost master=%s:%d", *address)
            self.refresh_soon()

    async def _read_slots(self) -> list[tuple[int, int, tuple[str, int]]]:
        """``CLUSTER SLOTS`` of the first node that answers: (first, last, master) ranges."""
        candidates = list(dict.fromkeys([*self._masters, *self._seeds]))
        last: Exception | None = None
        for address in candidates:
            probe = RedisPipe(
                self._node_url(*address), command_timeout=self.command_timeout, connect_timeout=self.connect_timeout
            )
            reply: Reply = None
            try:
                await probe.connect()
                reply = await asyncio.wait_for(probe.execute("CLUSTER", "SLOTS"), self.command_timeout)
            except Exception as exc:  # unreachable, or an error reply (not a cluster node, NOAUTH...)
                last = exc
            await probe.close()
            if reply is None:
                continue
            ranges: list[tuple[int, int, tuple[str, int]]] = []
            if isinstance(reply, list):
                for entry in reply:
                    host = entry[2][0].decode() if isinstance(entry[2][0], bytes) else ""
                    ranges.append((int(entry[0]), int(entry[1]), (host or address[0], int(entry[2][1]))))
            if ranges:
                return ranges
            last = StoreUnavailable(f"CLUSTER SLOTS of {address[0]}:{address[1]} is empty")
        raise StoreUnavailable(f"no Redis Cluster node answered CLUSTER SLOTS: {last}")

    async def refresh(self) -> bool:
        """Read the slot map again; True when every slot has a master whose connection is up."""
        ranges = await self._read_slots()
        self.refreshes += 1
        self._last_refresh = time.monotonic()
        slots: list[RedisPipe | None] = [None] * SLOTS
        wanted: set[tuple[str, int]] = set()
        for first, last, address in ranges:
            wanted.add(address)
            pipe = self._pipe_for(address)
            for slot in range(first, last + 1):
                slots[slot] = pipe
        self._slots = slots
        for address in [a for a in self._masters if a not in wanted]:  # demoted or gone
            self._started.discard(address)
            old = self._masters.pop(address)
            self._gone_unacked += old.unacked
            old.after_replies = None
            await old.close()
        for address in wanted:
            await self._start_master(address)
        complete = all(s is not None for s in slots) and all(self._masters[a].connected for a in wanted)
        self._set_up(complete)
        return complete

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            if self.cluster_state is not None:
                self.cluster_state(up)

    def refresh_soon(self) -> None:
        """Read the map again in the background, and again until it is complete."""
        if self._closed or self._loop is None:
            return
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = self._loop.create_task(self._refresh_until_complete())

    async def _refresh_until_complete(self) -> None:
        delay = REFRESH_RETRY
        while not self._closed:
            try:
                if await self.refresh():
                    return
            except StoreUnavailable as exc:
                log.warning("event=redis_cluster_refresh_failed error=%s", str(exc).replace(" ", "_"))
            await asyncio.sleep(delay)
            delay = min(delay * 2, REFRESH_RETRY_MAX)

    # -- RedisPipe's interface -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._up

    async def connect(self) -> None:
        """Read the map and connect every master (raises StoreUnavailable); then keep it current."""
        self._loop = asyncio.get_running_loop()
        if not await self.refresh():
            self.refresh_soon()
            raise StoreUnavailable("Redis Cluster: a slot has no reachable master")

    async def start(self) -> None:
        """Connect if the cluster is there; otherwise keep trying in the background (never raises)."""
        self._loop = asyncio.get_running_loop()
        try:
            if await self.refresh():
                return
        except StoreUnavailable as exc:
            log.warning("event=redis_unavailable url=%s error=%s", self.url, str(exc).replace(" ", "_"))
        self.refresh_soon()

    def stats(self) -> dict[str, int]:
        # masters come and go (a pipe of a demoted master is dropped): their counts are kept
        return {
            "unacked_writes": self._gone_unacked + sum(p.unacked for p in self._masters.values()),
            "cluster_redirects": self.redirects,
            "cluster_map_refreshes": self.refreshes,
        }

    def require_replicas(self, count: int, timeout_ms: int = 100) -> None:
        super().require_replicas(count, timeout_ms)
        for pipe in self._masters.values():
            pipe.require_replicas(count, timeout_ms)

    def call(self, callback: Callback, *args: bytes | str | int | float) -> None:
        self._send(_Redirected(self, callback, args, False), None, False)

    def call_acked(self, callback: Callback, *args: bytes | str | int | float) -> None:
        self._send(_Redirected(self, callback, args, True), None, False)

    def _send(self, command: _Redirected, pipe: RedisPipe | None, asking: bool) -> None:
        if pipe is None:
            slot = command_slot(command.args)
            pipe = next((p for p in self._masters.values() if p.connected), None) if slot < 0 else self._slots[slot]
        if pipe is None:
            self.errors += 1
            self.refresh_soon()
            self._safe_call(command.callback, StoreUnavailable("Redis Cluster: no master for the slot"))
            return
        self.commands += 1
        if asking:
            pipe.call(_ignore, "ASKING")
        if command.acked:
            pipe.call_acked(command.replied, *command.args)
        else:
            pipe.call(command.replied, *command.args)

    def _redirect(self, command: _Redirected, text: str) -> None:
        kind, slot_text, where = ([*text.split(), "", ""])[:3]
        host, _, port = where.rpartition(":")
        command.redirects += 1
        self.redirects += 1
        if command.redirects > MAX_REDIRECTS or not port.isdigit() or not slot_text.isdigit():
            self.errors += 1
            command.callback(StoreUnavailable(f"Redis Cluster: too many redirections ({text})"))
            return
        address = (host.strip("[]") or self._seeds[0][0], int(port))
        pipe = self._pipe_for(address)
        if address not in self._started and self._loop is not None:
            task = self._loop.create_task(self._start_master(address))
            self._tasks.add(task)  # a reference until done: the loop holds tasks weakly
            task.add_done_callback(self._tasks.discard)
        if kind == "MOVED":
            self._slots[int(slot_text)] = pipe
            if time.monotonic() - self._last_refresh > REFRESH_RETRY:
                self.refresh_soon()
        if not pipe.connected:
            # a node new to us: its connection is being opened; send once it is (or fail)
            self._loop_call_later(command, pipe, kind == "ASK")
            return
        self._send(command, pipe, kind == "ASK")

    def _loop_call_later(self, command: _Redirected, pipe: RedisPipe, asking: bool) -> None:
        loop = self._loop
        if loop is None:
            command.callback(StoreUnavailable("Redis Cluster: not started"))
            return
        deadline = time.monotonic() + self.connect_timeout

        def retry() -> None:
            if pipe.connected or time.monotonic() > deadline or self._closed:
                self._send(command, pipe, asking)
                self._replied()
            else:
                loop.call_later(0.01, retry)

        loop.call_later(0.01, retry)

    async def execute(self, *args: bytes | str | int | float) -> Reply:
        return await call_and_wait(self.call, *args)

    async def close(self) -> None:
        self._closed = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task
        self._started.clear()
        masters, self._masters = self._masters, {}
        self._gone_unacked += sum(p.unacked for p in masters.values())
        self._slots = [None] * SLOTS
        for pipe in masters.values():
            pipe.after_replies = None
            await pipe.close()


def _ignore(_reply: Reply) -> None:
    return None


def open_pipe(url: str, **kwargs: float) -> RedisPipe:
    """The hot path's client for ``url``: a :class:`ClusterPipe` for ``redis+cluster://``, else a
    plain :class:`RedisPipe` (the single-Redis path pays nothing for the cluster's)."""
    if is_cluster_url(url):
        return ClusterPipe(url, **kwargs)  # type: ignore[arg-type]
    return RedisPipe(url, **kwargs)  # type: ignore[arg-type]
