"""The proxy's side of rtpengine's ng control protocol: requests to media relays, sans-IO.

Theory of operation
-------------------
An ng request is one UDP datagram ``<cookie> <bencoded dictionary>``; the relay answers
``<same cookie> <bencoded dictionary>`` (see :mod:`media.ng` for the relay's side).  rtpengine
caches replies by cookie and answers a repeated cookie with the cached reply without executing
it again, so a retransmission is the same datagram, and every new request needs a cookie never
used before: ``<random prefix of this client>_<counter>``, unique across nodes, workers and
restarts.

:class:`NgClient` has three inputs and two outputs, as a sans-IO QUIC connection has:

* :meth:`NgClient.request` (the API user: a command, a relay address, ``now``, a callback);
* :meth:`NgClient.receive_datagram` (a reply from a relay, matched by cookie);
* :meth:`NgClient.handle_timer` (``now``): retransmissions, and the timeout of a request that
  had no reply after ``tries`` sends over ``timeout`` seconds;
* :meth:`NgClient.datagrams_to_send` and :meth:`NgClient.next_deadline` are its output.

A request's callback gets the reply dictionary (``"result"`` ``"ok"``/``"pong"``), or an
:class:`NgError`: :class:`NgTimeout` (no reply in time), :class:`NgRefused` (the relay's
``"error"`` reply, with its ``error-reason``).  Callbacks run inside ``receive_datagram`` or
``handle_timer``; ``wake`` (set by the glue) is called when a request is queued, so the glue
sends it at once without the proxy knowing about sockets.

A timeout never blocks the proxy: the caller of :meth:`request` goes on, its callback fires
later.  The bound is ``timeout`` (default 1 s), so one dead relay delays a call's setup by at
most that much per relay tried (Kamailio's rtpengine module: a dead rtpengine hangs a worker
for its whole ``rtpengine_tout_ms`` times retries; here nothing waits).
"""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from media.bencode import BencodeError, Value, decode, encode

__all__ = ["NgClient", "NgError", "NgRefused", "NgReply", "NgTimeout", "RelayAddress"]

RelayAddress = tuple[str, int]
NgReply = dict[bytes, Value]
Callback = Callable[["NgReply | NgError"], None]

DEFAULT_TIMEOUT = 1.0  # seconds from the first send to giving up
DEFAULT_TRIES = 3  # sends of the same datagram within the timeout
MAX_PENDING = 10_000  # requests waiting for a reply; more are refused at once


class NgError(Exception):
    """A request that got no usable reply."""


class NgTimeout(NgError):
    """No reply from the relay within the timeout (every retransmission lost, or relay dead)."""


class NgRefused(NgError):
    """The relay answered ``"result": "error"``; ``reason`` is its ``error-reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True, eq=False)
class _Pending:
    cookie: bytes
    datagram: bytes
    relay: RelayAddress
    callback: Callback
    sends_left: int
    next_send: float
    expires: float
    done: bool = False


@dataclass(slots=True)
class NgClient:
    """Outstanding ng requests of one node worker, keyed by cookie (see the module docstring)."""

    timeout: float = DEFAULT_TIMEOUT
    tries: int = DEFAULT_TRIES
    prefix: bytes = field(default_factory=lambda: secrets.token_hex(6).encode())
    wake: Callable[[], None] | None = None
    timeouts: int = 0  # requests that timed out (for metrics and tests)
    stray_replies: int = 0  # replies matching no outstanding request (late, or not ours)
    _counter: int = 0
    _pending: dict[bytes, _Pending] = field(default_factory=dict)
    _outbox: list[tuple[bytes, RelayAddress]] = field(default_factory=list)
    _timers: list[tuple[float, int, _Pending]] = field(default_factory=list)
    _seq: int = 0

    def __len__(self) -> int:
        return len(self._pending)

    # -- inputs ----------------------------------------------------------------------------------

    def request(self, relay: RelayAddress, message: Mapping[str, Value], now: float, callback: Callback) -> None:
        """Send ``message`` (with its ``"command"``) to ``relay``; ``callback`` gets the reply
        or an :class:`NgError`, never synchronously."""
        if len(self._pending) >= MAX_PENDING:
            # answered on the next timer: a callback never runs inside request()
            pending = _Pending(b"", b"", relay, callback, 0, now, now)
            self._arm(now, pending)
            return
        self._counter += 1
        cookie = b"%s_%d" % (self.prefix, self._counter)
        datagram = cookie + b" " + encode(dict(message))
        interval = self.timeout / max(self.tries, 1)
        pending = _Pending(cookie, datagram, relay, callback, self.tries - 1, now + interval, now + self.timeout)
        self._pending[cookie] = pending
        self._outbox.append((datagram, relay))
        self._arm(min(pending.next_send, pending.expires) if pending.sends_left else pending.expires, pending)
        if self.wake is not None:
            self.wake()

    def receive_datagram(self, data: bytes, source: RelayAddress | None = None) -> None:
        """A datagram from ``source``: the reply to the request with its cookie, if it comes
        from the relay that request went to (else ignored: a reply rewrites SDP, so one forged
        by anyone who learnt a cookie must not steer a call's media)."""
        cookie, space, body = data.partition(b" ")
        pending = self._pending.get(cookie) if space else None
        if pending is None or (source is not None and source != pending.relay):
            self.stray_replies += 1
            return
        del self._pending[cookie]
        pending.done = True
        result: NgReply | NgError
        try:
            reply = decode(body)
        except BencodeError as exc:
            result = NgRefused(f"unreadable reply: {exc}")
        else:
            if not isinstance(reply, dict):
                result = NgRefused("reply is not a dictionary")
            elif reply.get(b"result") == b"error":
                reason = reply.get(b"error-reason", b"")
                result = NgRefused(reason.decode("utf-8", "replace") if isinstance(reason, bytes) else "error")
            else:
                result = reply
        pending.callback(result)

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, pending = heapq.heappop(timers)
            if pending.done:
                continue
            if not pending.cookie:  # refused at request(): too many outstanding
                pending.done = True
                pending.callback(NgTimeout("too many ng requests outstanding"))
                continue
            if now >= pending.expires:
                pending.done = True
                del self._pending[pending.cookie]
                self.timeouts += 1
                pending.callback(NgTimeout(f"no ng reply from {pending.relay[0]}:{pending.relay[1]}"))
                continue
            # a retransmission: the same cookie, so the relay answers it from its cache
            self._outbox.append((pending.datagram, pending.relay))
            pending.sends_left -= 1
            pending.next_send = now + self.timeout / max(self.tries, 1)
            self._arm(min(pending.next_send, pending.expires) if pending.sends_left else pending.expires, pending)

    # -- outputs ---------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, RelayAddress]]:
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].done:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def _arm(self, at: float, pending: _Pending) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at, self._seq, pending))
