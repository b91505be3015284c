"""TCP and TLS: one protocol object per connection ("flow"), framing with StreamFramer.

Theory of operation
-------------------
A flow cuts messages out of the byte stream with the sans-IO :class:`StreamFramer`
(Content-Length framing, RFC 3261 18.3) and hands each one to the manager inline from
``data_received``.  RFC 5626 3.5.1 CRLFCRLF pings are answered with a CRLF pong: one pong
for all the pings of one read (a client sends one ping and waits for its pong, 4.4.1), and
more than ``ping_limit`` pings in ``ping_window`` close the flow as abuse (``ping_flood``).

Bounds, each enforced here and counted in :class:`TransportStats`:

* the framer's buffer never exceeds the maximum message size (plus one read);
* keep-alive pings are bounded in rate (``PingLimit``), so a flood of them costs one pong
  per read and the flow is closed within a read or two;
* a message must be complete ``message_timeout`` after its first byte (a stalled or dripping
  peer is closed), and a flow without traffic for ``idle_timeout`` is closed -- unless it is
  *held* (``hold``): the connection of a registered phone stays open for its registration's
  lifetime, since requests for the phone can only reach it over that flow (RFC 5626 5.3);
  a held flow is still closed for abuse, by its peer, or over the write-buffer limit;
* unsent data to a peer that does not read: above ``write_buffer_high`` we stop reading from
  it, above ``write_buffer_limit`` we close it;
* data for an outbound flow still connecting is queued up to ``connect_queue_limit``;
* an inbound flow that sends no message (keep-alive pings do not count) for
  ``first_message_timeout`` after it is accepted (TLS: after its handshake) is closed,
  counted as ``silent``; the first byte of a message is enough (then ``message_timeout``
  bounds the rest).

Half-closed connections: a TCP client may shut down its write side (FIN) once it has sent its
request, and still read.  A server answers over the connection a request came in on (RFC 3261
18.2.2), so the flow then stays open for writing (``eof_received`` returns True) until every
request it delivered has had a final response written (``_owed``: requests other than ACK in,
final responses out), and at most ``half_closed_timeout`` (or ``idle_timeout`` if shorter) from
the FIN, whatever is still owed (a request dropped unanswered); then it closes, flushing what is
buffered.  Meanwhile it still counts towards the connection limits (a registered one towards its
source's again: ``TransportManager.flow_half_closed``), a hold does not extend it, and a request
for the peer is refused (it cannot answer it: the sender learns at once, a 430 at the balancer).
A half-close with nothing owed closes at once, as before.  TLS cannot do this: asyncio's (and
uvloop's) SSL transport shuts the TLS session down itself when the peer's side ends, whatever
``eof_received`` returns.

A framing error (garbage, missing or bad Content-Length, oversize) leaves the stream with no
known message boundary, so the flow is closed; other flows are not affected.  Timers are lazy:
one ``call_at`` per flow, re-armed when it fires, so reading data never cancels a timer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.parser import StreamFramer
from sipfarm.transport.stats import bump

if TYPE_CHECKING:
    from sipfarm.transport.manager import TransportManager

logger = logging.getLogger(__name__)

PONG = b"\r\n"  # RFC 5626 3.5.1


class PingLimit:
    """At most ``limit`` keep-alive pings on one connection per ``window`` seconds (fixed
    windows: a burst across a window's end may reach twice ``limit``, still far above the one
    ping per 25-120 s of RFC 5626 4.4.1).  Shared by the stream and WebSocket transports."""

    __slots__ = ("_count", "_start", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._start = -float("inf")
        self._count = 0

    def over(self, now: float) -> bool:
        """Count one ping received at ``now`` (loop time); True when it is over the limit."""
        if now - self._start >= self.window:
            self._start = now
            self._count = 0
        self._count += 1
        return self._count > self.limit


class StreamFlow(asyncio.Protocol):
    """One TCP or TLS connection, inbound (``remote`` None until connected) or outbound."""

    def __init__(self, manager: TransportManager, transport_name: str, remote: Address | None) -> None:
        self._manager = manager
        self._stats = manager.stats
        self._config = manager.config
        self._deliver = manager.deliver
        self._loop = asyncio.get_running_loop()
        self.transport_name = transport_name
        self.remote = remote
        self.outbound = remote is not None
        self.local = Address(transport_name, "", 0)
        self._transport: asyncio.Transport | None = None
        self._framer = StreamFramer(self._config.max_message_size)
        self._pending: list[bytes] = []  # queued while connecting
        self._pending_size = 0
        self._closing = False
        self._established = False
        self._last_activity = self._loop.time()
        self._message_start: float | None = None  # first byte of an incomplete message
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._hold_until = 0.0  # loop time: not closed for idleness before it
        self._silent_until = 0.0  # loop time an inbound flow must have spoken by (0: it has)
        self._pings = PingLimit(self._config.ping_limit, self._config.ping_window)
        self.partial = 0  # bytes of an incomplete message buffered (the manager's budget)
        self._owed = 0  # requests delivered (ACK aside) minus final responses written
        self._half_closed_until = 0.0  # loop time: the peer sent FIN; closed by then (0: not)
        self._unframed = False  # the framing broke: nothing more is read (_close_when_answered)

    def __repr__(self) -> str:
        return f"<StreamFlow {self.remote} local={self.local}>"

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def half_closed(self) -> bool:
        """The peer shut down its write side: open for the answers it is owed only."""
        return self._half_closed_until > 0.0

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._closing

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        peer = tr.get_extra_info("peername")
        sock = tr.get_extra_info("sockname")
        if self.remote is None:
            if not peer:
                # reset by the peer between the kernel's accept and this call (RST right after
                # the handshake): nobody to talk to, counted, no traceback per connection
                bump(self._stats.refused, "reset")
                self._closing = True
                tr.abort()
                return
            self.remote = Address(self.transport_name, peer[0], peer[1])
        if sock is not None:
            self.local = Address(self.transport_name, sock[0], sock[1])
        if not self._manager.flow_established(self):
            self._closing = True
            tr.abort()
            return
        self._transport = tr
        self._established = True
        tr.set_write_buffer_limits(high=self._config.write_buffer_high)
        self._last_activity = now = self._loop.time()
        if not self.outbound:
            self._silent_until = now + self._config.first_message_timeout
            self._arm(self._silent_until)
            self._manager.quiet(self, self._evict)
        self._arm(now + self._config.idle_timeout)
        if self._pending:
            pending, self._pending, self._pending_size = self._pending, [], 0
            for data in pending:
                if not self.write(data):
                    self._stats.dropped += 1

    def data_received(self, data: bytes) -> None:
        if self._closing or self._unframed:
            return
        now = self._loop.time()
        self._last_activity = now
        framer = self._framer
        framer.receive_data(data)
        delivered = False
        ponged = False
        remote = cast(Address, self.remote)
        while True:
            try:
                event = framer.next_event()
            except SipError as exc:
                # no message boundary any more: the flow cannot continue; a request whose header
                # section could be read gets its 400 (413) first, flushed as the flow closes
                bump(self._stats.parse_errors, exc.counter)
                answer = self._manager.framing_answer(exc)
                if self._owed > 0:
                    self._close_when_answered(exc.counter, str(exc), answer)
                else:
                    self.abort_for_abuse(exc.counter, str(exc), answer=answer)
                return
            if event is None:
                break
            if event is StreamFramer.PING:
                self._stats.keepalive_pings += 1
                if self._pings.over(now):
                    self.abort_for_abuse("ping_flood", "more than ping_limit pings in ping_window")
                    return
                if not ponged:  # one pong answers every ping of this read
                    ponged = True
                    self.write(PONG)
                continue
            delivered = True
            if not event.startswith((b"SIP/", b"ACK ")):
                self._owed += 1  # a request: a final response is owed (none to an ACK)
            self._deliver(event, remote, self.local)
            if self.closing:  # the callback closed us
                return
        # A ping is no first message: the deadline holds until a message starts (a flow that
        # only pings held a slot for idle_timeout, red team 2026-12-02).  A partial ping is
        # no message either: it does not start the message timeout.
        in_message = framer.in_message
        if (delivered or in_message) and self._silent_until:
            self._silent_until = 0.0
            self._manager.spoke(self)
        if in_message:
            if delivered or self._message_start is None:
                self._message_start = now
                self._arm(now + self._config.message_timeout)
            self._manager.partial_changed(self, framer.buffered)
        else:
            self._message_start = None
            if self.partial:
                self._manager.partial_changed(self, 0)

    def eof_received(self) -> bool | None:
        """The peer sent FIN: keep writing while answers are owed (see the module docstring)."""
        if self._closing or self._transport is None or self._owed <= 0 or self.transport_name != "tcp":
            return None  # nothing owed (or TLS, which closes anyway): close our side too
        self._stats.half_closed += 1
        self._leave_when_answered()
        return True

    def _leave_when_answered(self) -> None:
        """Close once every answer owed is written (``write``), at most ``half_closed_timeout``
        from now (``_on_timer``): after the peer's FIN, or a framing error behind requests."""
        self._half_closed_until = self._loop.time() + min(self._config.half_closed_timeout, self._config.idle_timeout)
        self._hold_until = 0.0
        self._manager.flow_half_closed(self)
        self._arm(self._half_closed_until)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._transport = None
        if self.partial:
            self._manager.partial_changed(self, 0)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._stats.dropped += len(self._pending)
            self._pending.clear()
        self._manager.flow_closed(self, established=self._established)

    def pause_writing(self) -> None:
        # The peer does not read what we send: stop reading what it sends.
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()

    # -- used by the manager -------------------------------------------------------------------

    def write(self, data: bytes) -> bool:
        if self._closing:
            return False
        tr = self._transport
        if tr is None:  # still connecting
            if self._pending_size + len(data) > self._config.connect_queue_limit:
                return False
            self._pending.append(data)
            self._pending_size += len(data)
            return True
        if self._half_closed_until and not data.startswith(b"SIP/2.0 "):
            return False  # a request the peer, whose write side is shut, could never answer
        if tr.get_write_buffer_size() + len(data) > self._config.write_buffer_limit:
            self.abort_for_abuse("slow_reader", "write buffer limit reached")
            return False
        tr.write(data)
        self._last_activity = self._loop.time()
        if self._owed and data.startswith(b"SIP/2.0 ") and data[8:9] != b"1":
            self._owed -= 1  # a final response
            if not self._owed and self._half_closed_until:
                self.close()  # every answer the half-closed peer was owed is written: flushed, closed
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def hold(self, seconds: float) -> None:
        """Do not close the flow for idleness for ``seconds`` from now (0 or less: release,
        the ordinary idle timeout applies again).  The caller bounds ``seconds``."""
        if self._half_closed_until:
            return  # the peer is leaving: bounded by half_closed_timeout, never held
        now = self._loop.time()
        self._hold_until = now + seconds if seconds > 0 else 0.0
        if self._established and not self._closing:
            # re-armed only when this makes the timer earlier (a release); when the hold
            # extends the deadline, the pending timer re-arms itself for the rest
            self._arm(max(self._last_activity + self._config.idle_timeout, self._hold_until))

    def abort_for_abuse(self, reason: str, detail: str, *, answer: bytes | None = None) -> None:
        """Close for abuse: at once, nothing flushed, or with ``answer`` (the error response to
        a request that broke the framing) written last and flushed (a TCP close, not a reset)."""
        if self._closing:
            return
        self._closing = True
        tr = self._transport
        if tr is not None:
            if self._write_answer(tr, answer):
                tr.close()  # flushes the answer, then closes (no further read is handled)
            else:
                tr.abort()  # nothing owed to an abusive peer: do not flush
        self._count_abuse(reason, detail)

    def _close_when_answered(self, reason: str, detail: str, answer: bytes | None) -> None:
        """A framing error after requests the flow still owes answers to (a valid request and
        garbage in one write, red team 2026-12-03: the answer was lost with the connection).
        Counted as abuse as :meth:`abort_for_abuse` does, but nothing more is read, and the flow
        closes once those answers are written, as after a half-close; ``answer``, the broken
        request's, goes first."""
        tr = self._transport
        if tr is None:
            self.abort_for_abuse(reason, detail, answer=answer)
            return
        self._unframed = True
        self._message_start = None  # the garbage is no message in progress (no stall timeout)
        tr.pause_reading()
        self._write_answer(tr, answer)
        self._leave_when_answered()
        self._count_abuse(reason, detail)

    def _count_abuse(self, reason: str, detail: str) -> None:
        """Counted, logged, and told to the manager (its source's bans) unless the farm chose
        the peer (an outbound connection); last, once the flow's own state is settled."""
        self._stats.connections_closed_abuse += 1
        bump(self._stats.abuse, reason)
        logger.debug("event=flow_closed_abuse remote=%s reason=%s detail=%r", self.remote, reason, detail)
        if self.remote is not None and not self.outbound:
            self._manager.abused(self.remote.host)

    def _write_answer(self, tr: asyncio.Transport, answer: bytes | None) -> bool:
        """Write the answer to a request that broke the framing, within the write-buffer limit."""
        if answer is None or tr.get_write_buffer_size() + len(answer) > self._config.write_buffer_limit:
            return False
        tr.write(answer)
        return True

    def _evict(self) -> None:
        """Closed to make room for a new source at max_connections (``TransportManager.quiet``)."""
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def connect_failed(self) -> None:
        """The outbound connection could not be set up: drop what was queued."""
        self._closing = True
        self._stats.dropped += len(self._pending)
        self._pending.clear()
        self._pending_size = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- timers --------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        """Make sure the flow's one timer fires no later than ``when``."""
        if self._timer is not None:
            if self._timer_at <= when:
                return  # fires earlier; it re-arms itself for the rest
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._loop.time()
        if self._half_closed_until:
            if now >= self._half_closed_until:
                self._stats.half_closed_timeouts += 1
                logger.debug("event=flow_closed_half_closed remote=%s owed=%d", self.remote, self._owed)
                self.close()
                return
            self._arm(self._half_closed_until)
        if self._silent_until:
            if now >= self._silent_until:
                self._manager.count_refused("silent")
                logger.debug("event=flow_closed_silent remote=%s", self.remote)
                self._closing = True
                if self._transport is not None:
                    self._transport.abort()
                return
            self._arm(self._silent_until)
        if self._message_start is not None:
            deadline = self._message_start + self._config.message_timeout
            if now >= deadline:
                self._stats.connections_closed_abuse += 1
                bump(self._stats.abuse, "stalled")
                logger.debug("event=flow_closed_abuse remote=%s reason=stalled", self.remote)
                self._closing = True
                if self._transport is not None:
                    self._transport.abort()
                return
            self._arm(deadline)
        idle_deadline = max(self._last_activity + self._config.idle_timeout, self._hold_until)
        if now >= idle_deadline:
            self._stats.connections_idle_closed += 1
            logger.debug("event=flow_closed_idle remote=%s", self.remote)
            self.close()
            return
        self._arm(idle_deadline)
