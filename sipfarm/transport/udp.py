"""UDP: one endpoint per listening socket, a thin layer over the manager.

Each datagram is one message (RFC 3261 18.3): handed to the manager inline, no buffering and
no task.  Responses and requests leave through the same socket (``send``), so a client behind
NAT sees them come from the address it sent to (RFC 3581).

Keep-alives share the port (RFC 5626 4.4): a datagram whose first byte is below ``A`` cannot
start a SIP message, so only those are looked at more closely.  A CRLF is counted and
ignored; a STUN Binding request is answered here with the sender's address
(:mod:`sipfarm.transport.stun`, RFC 5626 8), any other STUN message dropped and counted.
Neither reaches the parser; both tell the manager's ``on_keepalive`` the flow is alive.  A
source the manager's ``allow_source`` hook refuses gets neither answer nor notice, and a STUN
request from a source its ``stun_allowed`` hook refuses (the balancer's: not a registered flow)
is dropped, counted: a forged source cannot make the farm a reflector.

Two endpoints do this.  :class:`BatchedUdpEndpoint`, when the C extension
:mod:`sipfarm.transport._batchio` is built (``scripts/build-compiled.sh``), reads the socket
with ``loop.add_reader`` and ``recvmmsg`` (up to :data:`BATCH` datagrams a system call) and
queues what is sent meanwhile: the queues of every socket are written with one ``sendmmsg``
each when the batch is handled (:class:`UdpBatches`); a send from anywhere else (a timer, a
Redis reply) is written on the loop's next iteration, one ``call_soon`` for all of them.  Per
datagram that saves a ``recvmsg``, a ``sendmsg`` and, under load, an event loop wake-up.
With ``batch_interval`` > 0 a busy socket is read once per interval: once a wake-up finds
:data:`BUSY` or more datagrams waiting, the socket is read by a timer while each read finds
that many, so more of them share a wake-up and a system call; under a light load (one datagram
a wake-up) every datagram is read as it comes, as with 0.  :class:`UdpEndpoint` is asyncio's datagram
protocol, used without the extension (the interpreted build) and for ``udp_batchio = false``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from sipfarm.sip.address import Address
from sipfarm.transport.config import MAX_DATAGRAM
from sipfarm.transport.stats import bump
from sipfarm.transport.stun import BINDING_REQUEST, StunError, binding_response, is_stun, parse_header

if TYPE_CHECKING:
    from sipfarm.transport.manager import TransportManager

try:  # built by scripts/build-compiled.sh only: the interpreted build falls back to asyncio's
    from sipfarm.transport._batchio import counters as batch_counters
    from sipfarm.transport._batchio import recv_batch, send_batch

    HAVE_BATCHIO = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_BATCHIO = False

logger = logging.getLogger(__name__)

#: datagrams read by one recvmmsg, and read rounds per wake-up at most (then the loop runs
#: its other callbacks: a flood on one socket does not starve the rest)
BATCH = 64
_MAX_ROUNDS = 8
#: the receive buffer of one datagram: the largest UDP payload fits (nothing is ever cut;
#: a message over max_message_size is answered 413 by the manager, as without batching)
_BUFSIZE = 65536
#: with a batch interval: datagrams a read must find for the socket to be read once per interval
#: (fewer: the load is light, and each datagram is read as it comes)
BUSY = 2
#: a send queue this long is written at once, not at the end of the batch
_FLUSH_AT = 64
#: source addresses remembered (forgotten all at once beyond: a scan costs one Address each)
_SOURCES = 4096

UdpDestination = tuple[str, int]


def _nothing_buffered() -> int:
    return 0


def consume_keepalive(
    manager: TransportManager, data: bytes, host: str, port: int, send: Callable[[bytes, Address], bool]
) -> bool:
    """Handle a CRLF or STUN keep-alive (True); False for anything else (the parser's)."""
    stats = manager.stats
    allow_source = manager.allow_source
    if is_stun(data):
        try:
            header = parse_header(data)
        except StunError as exc:
            bump(stats.stun_dropped, exc.reason)
            return True
        if header.type != BINDING_REQUEST:
            # responses, indications, other methods: nothing this usage sends or answers
            bump(stats.stun_dropped, "stun_not_binding_request")
            return True
        source = Address("udp", host, port)
        if allow_source is not None and not allow_source(host):
            return True  # a refused source learns nothing, not even its address
        stun_allowed = manager.stun_allowed
        if stun_allowed is not None and not stun_allowed(source):
            bump(stats.stun_dropped, "stun_not_registered")
            return True
        try:
            # RFC 5626 8 / RFC 5389 7.3.1: a success response naming the source address
            response = binding_response(header, host, port)
        except ValueError:  # an address the OS gave in a form we cannot encode
            bump(stats.stun_dropped, "stun_unencodable_source")
            return True
        if send(response, source):
            stats.stun_answered += 1
    elif data and not data.strip(b"\r\n"):
        # CRLF keep-alive some clients send over UDP: nothing to parse, nothing to answer
        source = Address("udp", host, port)
        if allow_source is not None and not allow_source(host):
            return True
    else:
        return False
    stats.keepalive_pings += 1
    on_keepalive = manager.on_keepalive
    if on_keepalive is not None:
        on_keepalive(source)
    return True


class UdpEndpoint(asyncio.DatagramProtocol):
    """The asyncio datagram protocol of one bound UDP socket (no C extension)."""

    def __init__(self, manager: TransportManager) -> None:
        self._manager = manager
        self._deliver = manager.deliver
        self._stats = manager.stats
        self._send_limit = manager.config.udp_send_buffer_limit
        self.local = Address("udp", "", 0)
        self.transport: asyncio.DatagramTransport | None = None
        self._buffered: Callable[[], int] = _nothing_buffered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        # asyncio's and uvloop's datagram transports both have it; typeshed does not know
        self._buffered = getattr(transport, "get_write_buffer_size", _nothing_buffered)
        sockname = transport.get_extra_info("sockname")
        self.local = Address("udp", sockname[0], sockname[1])

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        host = cast(str, addr[0])
        port = cast(int, addr[1])
        # a SIP message starts with a method (a token, in practice letters) or "SIP/2.0"
        if data[:1] < b"A" and consume_keepalive(self._manager, data, host, port, self.send):
            return
        self._deliver(data, Address("udp", host, port), self.local)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier sends (port unreachable...): per packet, so debug only
        self._stats.send_errors += 1
        logger.debug("event=udp_error local=%s error=%s", self.local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def send(self, data: bytes, dest: Address) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing() or len(data) > MAX_DATAGRAM:
            return False
        # Datagrams the kernel could not take wait in user space; do not let them pile up.
        if self._buffered() > self._send_limit:
            return False
        transport.sendto(data, (dest.host, dest.port))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UdpBatches:
    """The send queues of a manager's batched endpoints, written together.

    While a batch is handled (``begin``/``end``) a send only queues; ``end`` writes every queue
    that got something, one ``sendmmsg`` per socket.  A send outside a batch arms one
    ``call_soon`` that writes them all on the loop's next iteration.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.depth = 0  # batches being handled (one, or nested when a handler reads another)
        self.pending: list[BatchedUdpEndpoint] = []
        self.scheduled = False

    def queued(self, endpoint: BatchedUdpEndpoint) -> None:
        """``endpoint`` has datagrams to write (called once until they are written)."""
        self.pending.append(endpoint)
        if self.depth == 0 and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def begin(self) -> None:
        self.depth += 1

    def end(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.pending:
            self.flush()

    def flush(self) -> None:
        self.scheduled = False
        pending = self.pending
        if not pending:
            return
        self.pending = []
        for endpoint in pending:
            try:
                endpoint.flush()
            except Exception:  # one endpoint's failure must not stop the others' writes
                logger.exception("event=udp_flush_failed local=%s", endpoint.local)


class BatchedUdpEndpoint:
    """One bound UDP socket read with recvmmsg and written with sendmmsg (see the module)."""

    def __init__(
        self, manager: TransportManager, sock: socket.socket, batches: UdpBatches, batch_interval: float
    ) -> None:
        self._manager = manager
        self._deliver = manager.deliver
        self._stats = manager.stats
        self._send_limit = manager.config.udp_send_buffer_limit
        self._sock = sock
        self._fd = sock.fileno()
        self._batches = batches
        self._loop = batches.loop
        self.batch_interval = batch_interval
        sockname = sock.getsockname()
        self.local = Address("udp", sockname[0], sockname[1])
        # the Address of recent sources (a NamedTuple: building one runs Python code)
        self._sources: dict[tuple[str, int], Address] = {}
        self._queue: list[tuple[bytes, UdpDestination | None]] = []
        self._queued_bytes = 0
        self._pending = False  # in the batches' pending list
        self._writing = False  # waiting for the socket to be writable (add_writer)
        self._reading = False  # the loop watches the socket (add_reader)
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    # -- receiving -------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def _on_readable(self) -> None:
        """Datagrams are waiting: read and handle them now, then (batch_interval > 0), if this
        wake-up found :data:`BUSY` or more, stop watching the socket and read it once per
        interval while each read finds that many: datagrams arriving one at a time never wait."""
        if self.receive() >= BUSY and self.batch_interval > 0 and not self.closed:
            self._loop.remove_reader(self._fd)
            self._reading = False
            self._timer = self._loop.call_later(self.batch_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        if self.receive() >= BUSY:
            self._timer = self._loop.call_later(self.batch_interval, self._on_timer)
        else:  # quiet again: back to waking on the first datagram
            self.start()

    def receive(self) -> int:
        """Read and handle what the socket holds (bounded: ``_MAX_ROUNDS`` batches); the
        datagrams handled."""
        total = 0
        batches = self._batches
        batches.begin()
        try:
            for _ in range(_MAX_ROUNDS):
                try:
                    batch = recv_batch(self._fd, BATCH, _BUFSIZE)
                except OSError as exc:
                    # an error queued on the socket (ICMP for an earlier send: what asyncio
                    # hands to error_received), or the socket closed under us
                    if self.closed:
                        break
                    self._stats.send_errors += 1
                    logger.debug("event=udp_error local=%s error=%s", self.local, exc)
                    continue
                self.handle(batch)
                total += len(batch)
                if len(batch) < BATCH:
                    break
        finally:
            batches.end()
        return total

    def handle(self, batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        """Hand each datagram of a batch to the manager (keep-alives answered here)."""
        deliver = self._deliver
        local = self.local
        manager = self._manager
        send = self.send
        sources = self._sources
        for data, addr in batch:
            try:
                if data[:1] < b"A" and consume_keepalive(manager, data, addr[0], addr[1], send):
                    continue
                source = sources.get(addr)
                if source is None:
                    if len(sources) >= _SOURCES:
                        sources.clear()
                    source = sources[addr] = Address("udp", addr[0], addr[1])
                deliver(data, source, local)
            except Exception:  # a bug on one datagram must not lose the rest of the batch
                self._stats.internal_errors += 1
                logger.exception("event=udp_datagram_failed local=%s source=%s", local, addr)

    # -- sending ---------------------------------------------------------------------------------

    def send(self, data: bytes, dest: Address) -> bool:
        """Queue ``data`` for ``dest``: written at the end of the batch being handled, or on
        the loop's next iteration.  False (the manager counts a drop) when closed or when
        ``udp_send_buffer_limit`` bytes already wait, or for a datagram no UDP packet can
        carry (``MAX_DATAGRAM``: the kernel would refuse it later, after the sender took it as
        sent)."""
        if self.closed or self._queued_bytes > self._send_limit or len(data) > MAX_DATAGRAM:
            return False
        queue = self._queue
        queue.append((data, (dest.host, dest.port)))
        self._queued_bytes += len(data)
        if len(queue) >= _FLUSH_AT and not self._writing:
            self.flush()  # bound the queue (and the wait) in a long batch
        elif not self._pending:
            self._pending = True
            self._batches.queued(self)
        return True

    def flush(self) -> None:
        """Write the queue with sendmmsg; what the kernel cannot take yet waits for the socket
        to be writable (bounded by ``udp_send_buffer_limit``)."""
        self._pending = False
        queue = self._queue
        if not queue or self.closed:
            return
        errors = batch_counters()[1]
        try:
            consumed = send_batch(self._fd, queue)
        except Exception as exc:  # the socket itself failed (not one datagram): drop the queue
            self._stats.send_errors += len(queue)
            logger.warning("event=udp_send_failed local=%s datagrams=%d error=%s", self.local, len(queue), exc)
            consumed = len(queue)
        # datagrams the kernel refused (EPERM, ECONNREFUSED, EMSGSIZE...; what asyncio hands to
        # error_received): the extension's counter is process-wide, ours is the difference
        self._stats.send_errors += batch_counters()[1] - errors
        if consumed >= len(queue):
            queue.clear()
            self._queued_bytes = 0
            if self._writing:
                self._loop.remove_writer(self._fd)
                self._writing = False
            return
        del queue[:consumed]
        self._queued_bytes = sum(len(data) for data, _ in queue)
        if not self._writing:
            self._loop.add_writer(self._fd, self.flush)
            self._writing = True

    def close(self) -> None:
        """Stop reading, write what is queued (once, best effort) and close the socket."""
        if self.closed:
            return
        if self._queue:
            self.flush()
        self.closed = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._queued_bytes = 0
        self._sock.close()


def bind_udp_socket(host: str, port: int, *, reuse_port: bool = False, recv_buffer: int | None = None) -> socket.socket:
    """A bound, non-blocking UDP socket (SO_REUSEPORT lets worker processes share the port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            if not hasattr(socket, "SO_REUSEPORT"):
                raise ValueError("reuse_port is not supported on this platform")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if recv_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
