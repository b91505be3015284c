"""SIP over WebSocket (RFC 7118) for browser clients (SIP.js, JsSIP): ws and wss listeners.

The ``websockets`` library does the HTTP upgrade and framing; each WebSocket message carries
exactly one SIP message (RFC 7118 5), which goes through the same parser and callback as any
other transport via :meth:`TransportManager.deliver`.  The connection is registered as a flow
under the client's (transport, address), so responses and requests for that client find it
exactly as they find a TCP connection.  The ``sip`` subprotocol is negotiated (RFC 7118 4).

WebSocket connections count towards the transport's ``max_connections`` and
``max_connections_per_source`` with TCP/TLS ones, from the TCP accept (the TLS handshake of
wss comes first: the library runs it) until the connection is gone: over a limit, the HTTP
upgrade is answered 503.  The upgrade must arrive within ``ws_open_timeout``.

Origin (RFC 6455 10.2): browsers send the page's origin with every upgrade, so a listener
facing the Internet should name the origins of its web phones (``origins``): any other is
answered 403, so a page elsewhere cannot use a visitor's browser against the farm.  An entry
``https://*.example.net`` matches any subdomain.  Non-browser SIP-over-WebSocket clients send
no Origin and are served unless ``require_origin``.  Refusals are counted by reason in the
transport's ``refused`` stats (per_source, total, origin, handshake_timeout).  A source the
manager's ``allow_source`` refuses (the balancer's allow and deny lists) is closed at accept.

No permessage-deflate (RFC 7692) is negotiated: compressing SIP messages of a few hundred bytes
saves little, and its zlib state was most of a connection's memory (~55 KB of ~70 KB).

Keep-alives: CRLF messages (RFC 5626 3.5.1 over RFC 7118 6) and RFC 6455 pings together are
bounded per connection as on TCP (``ping_limit`` per ``ping_window``, :class:`PingLimit`);
over it the connection is closed as abuse (``ping_flood``).  Every frame, data or control, empty
or not, counts against ``ws_frame_limit`` per ``ws_frame_window``: over it the connection is closed as
abuse (``frame_flood``; red team, 2026-12-03: one connection of empty pongs or fragments, ~6 us
of the balancer each and no SIP message for the rate limits to see, pinned its CPU).

Idle connections: as on TCP, a connection without a SIP message or keep-alive for the
transport's ``idle_timeout`` is closed, unless a registration holds it (``hold``); the
library's pings keep NATs open and close a peer that stopped answering (``PING_TIMEOUT``).

Upgrade requests: at most ``MAX_UPGRADE_HEADERS`` header lines of ``MAX_UPGRADE_LINE`` bytes are
read, and one of more than ``MAX_UPGRADE_BYTES`` in all is answered 431; the headers of an
accepted one are not kept (the library held each connection's, up to ~1 MB, for its lifetime).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import deque
from typing import Any, cast

import websockets.http11
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event

from sipfarm.balancer.origins import OriginPolicy
from sipfarm.sip.address import Address
from sipfarm.transport.manager import REFUSED_SOURCE, TransportManager
from sipfarm.transport.stats import bump
from sipfarm.transport.stream import PingLimit

log = logging.getLogger("sipfarm.transport.ws")
# the library's own lines ("connection open", "connection closed": two at INFO per connection,
# ~27,000 lines in one red-team run; a TCP connection writes none): warnings and errors only
_LIBRARY_LOG = logging.getLogger("sipfarm.transport.ws.library")
_LIBRARY_LOG.setLevel(logging.WARNING)

MAX_PENDING_SENDS = 256
# RFC 6455 5.5.2 pings, answered by every browser without the page's help: they keep NATs and
# the connection open, and a peer that stops answering is closed (it is gone, whatever its
# registration says).  Silence is bounded by the transport's idle_timeout, as on TCP.
PING_INTERVAL = 30.0
# the upgrade request (a browser's is well under 2 KB, cookies of the page's domain included)
MAX_UPGRADE_HEADERS = 32
MAX_UPGRADE_LINE = 8192
MAX_UPGRADE_BYTES = 16384
# read by the library's HTTP parser at each request (module globals): the header lines it
# buffers for an upgrade not yet whole, 32 x 8 KB instead of 128 x 8 KB
websockets.http11.MAX_NUM_HEADERS = MAX_UPGRADE_HEADERS
websockets.http11.MAX_LINE_LENGTH = MAX_UPGRADE_LINE
_PROTOCOL_ERRORS = (1002, 1007, 1009)
_DATA_OPCODES = frozenset((Opcode.TEXT, Opcode.BINARY, Opcode.CONT))
PING_TIMEOUT = 30.0


class AdmittedConnection(ServerConnection):
    """A WebSocket connection counted against the transport's connection limits from the
    TCP accept until it is gone (``TransportManager.admit``/``release``)."""

    def __init__(self, *args: Any, manager: TransportManager, open_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.manager = manager
        self.open_timeout = open_timeout
        self.refused: str | None = None  # the limit it is over: answered 503 at the upgrade
        self.accepted_at = 0.0
        self.pings = PingLimit(manager.config.ping_limit, manager.config.ping_window)
        self.frames = PingLimit(manager.config.ws_frame_limit, manager.config.ws_frame_window)  # any frame
        # the incomplete message it holds, charged to the manager's partial_budget as a TCP
        # connection's is, and bounded in time by message_timeout (a fragmented message never
        # finished held ~70 KB a connection for ever: red team, 2026-12-03)
        self.flow: WebSocketFlow | None = None  # once the upgrade is done and the flow adopted
        self.fragments = 0  # bytes of the data frames of the message not finished yet
        self.messages = 0  # data messages finished: tells a stall timer which message it timed
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.accepted_at = self.loop.time()
        peer = transport.get_extra_info("peername")
        if not peer:  # reset between the kernel's accept and this call: counted, closed
            bump(self.manager.stats.refused, "reset")
            self.refused = REFUSED_SOURCE
            cast(asyncio.Transport, transport).abort()
            return
        host = str(peer[0])
        self.refused = self.manager.admit(self, host)
        if self.refused == REFUSED_SOURCE:
            cast(asyncio.Transport, transport).abort()  # the allow/deny lists: no HTTP answer

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # the library answers each ping with a pong as it reads it, without flow control: a
        # peer that pings and never reads would have every pong held here.  Over the stream
        # transports' limit of unsent bytes it is closed, as a TCP peer that does not read.
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > self.manager.config.write_buffer_limit:
            abort_for_abuse(self.manager, transport, "slow_reader")
            return
        flow = self.flow
        if flow is None or flow.closing:
            return
        # a frame not yet whole (in the library's reader) and the whole frames of a message
        # not yet finished
        pending = len(self.protocol.reader.buffer) + self.fragments
        if pending != flow.partial:
            self.manager.partial_changed(flow, pending)
        if pending and self._stall is None:
            timeout = self.manager.config.message_timeout
            self._stall = self.loop.call_later(timeout, self._stalled, self.messages)
        elif not pending and self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self, messages: int) -> None:
        self._stall = None
        flow = self.flow
        if flow is not None and flow.partial and self.messages == messages:
            flow.abort_for_abuse("stalled", "a WebSocket message not finished within message_timeout")

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        if isinstance(event, Frame) and self.frames.over(self.loop.time()):
            transport = self.transport
            if transport is not None:
                abort_for_abuse(self.manager, transport, "frame_flood")
            return
        if isinstance(event, Frame) and event.opcode in _DATA_OPCODES:
            if event.fin:
                self.fragments = 0
                self.messages += 1
            elif event.opcode is Opcode.CONT:
                self.fragments += len(event.data)
            else:
                self.fragments = len(event.data)
        # an RFC 6455 ping: the library has answered it already (in data_received), but a peer
        # that floods them is closed before the next read (abort drops the pongs unsent)
        if isinstance(event, Frame) and event.opcode is Opcode.PING and self.pings.over(self.loop.time()):
            transport = self.transport
            if transport is not None:
                abort_for_abuse(self.manager, transport, "ping_flood")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.manager.release(self)
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        flow = self.flow
        if flow is not None and flow.partial:
            self.manager.partial_changed(flow, 0)
        # no complete HTTP upgrade request in open_timeout (not a client that left early)
        late = self.loop.time() - self.accepted_at >= self.open_timeout * 0.9
        if self.refused is None and self.request is None and late:
            self.manager.count_refused("handshake_timeout")
        elif self.refused is None and self.response is not None and self.response.status_code != 101:
            self.manager.count_refused("bad_upgrade")  # a request the library answered 4xx/5xx


def abort_for_abuse(manager: TransportManager, transport: asyncio.BaseTransport, reason: str) -> None:
    """Close an abusive WebSocket peer's connection at once, counted as the stream transports
    count theirs (``connections_closed_abuse``, ``abuse[reason]``)."""
    if transport.is_closing():
        return
    manager.stats.connections_closed_abuse += 1
    manager.stats.abuse[reason] = manager.stats.abuse.get(reason, 0) + 1
    peer = transport.get_extra_info("peername")
    cast(asyncio.Transport, transport).abort()  # nothing owed to an abusive peer: do not flush
    if peer:
        manager.abused(str(peer[0]))


class WebSocketFlow:
    """The flow object the transport manager writes to for one WebSocket client.

    ``write`` is synchronous (called from the forwarding path): it queues the message, and one
    writer task per connection sends the queue in order.  A client that does not read fills the
    queue: over ``MAX_PENDING_SENDS`` messages its further messages are refused (counted as
    dropped by the manager); over the stream transports' ``write_buffer_limit`` bytes it is
    closed, as a TCP peer that does not read.
    """

    def __init__(self, connection: ServerConnection, remote: Address, manager: TransportManager) -> None:
        self.connection = connection
        self.remote = remote
        self.manager = manager
        self._loop = asyncio.get_running_loop()
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes in the queue
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self.partial = 0  # bytes of an incomplete message (AdmittedConnection counts them)
        self._last_activity = self._loop.time()  # a SIP message or keep-alive
        self._hold_until = 0.0  # loop time: not closed for idleness before it (a registration)
        self._idle: asyncio.TimerHandle | None = self._loop.call_later(manager.config.idle_timeout, self._idle_check)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def half_closed(self) -> bool:
        """Never: a WebSocket ends with a close handshake, not half a connection."""
        return False

    def abort_for_abuse(self, reason: str, detail: str) -> None:
        """Closed at once, counted as a stream connection's abuse (``abuse[reason]``)."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        log.debug("event=flow_closed_abuse remote=%s reason=%s detail=%s", self.remote, reason, detail)
        transport = self.connection.transport
        if transport is not None:
            abort_for_abuse(self.manager, transport, reason)

    def write(self, data: bytes) -> bool:
        if self._closing or len(self._queue) >= MAX_PENDING_SENDS:
            return False
        if self._queued + len(data) > self.manager.config.write_buffer_limit:
            self._closing = True
            self._wake.set()
            transport = self.connection.transport
            if transport is not None:
                abort_for_abuse(self.manager, transport, "slow_reader")
            return False
        self._queued += len(data)
        self._queue.append(data)
        self._wake.set()
        if self._writer is None:
            self._writer = self._loop.create_task(self._write_loop())
        return True

    async def _write_loop(self) -> None:
        try:
            while not self._closing:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    data = self._queue.popleft()
                    self._queued -= len(data)
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        await self.connection.send(data)  # binary frame (RFC 7118 5 allows both)
                    else:
                        await self.connection.send(text)
        except ConnectionClosed:
            self._closing = True

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._loop.create_task(self.connection.close())

    def touch(self) -> None:
        """A SIP message or keep-alive arrived: the idle timeout starts again."""
        self._last_activity = self._loop.time()

    def hold(self, seconds: float) -> None:
        """Do not close the flow for idleness for ``seconds`` from now (0 or less: release, the
        ordinary idle timeout applies again).  The caller bounds ``seconds``."""
        self._hold_until = self._loop.time() + seconds if seconds > 0 else 0.0
        if seconds <= 0 and self._idle is not None:  # a release may make the deadline earlier
            self._idle.cancel()
            self._idle = self._loop.call_later(
                max(0.0, self._last_activity + self.manager.config.idle_timeout - self._loop.time()),
                self._idle_check,
            )

    def _idle_check(self) -> None:
        self._idle = None
        if self._closing:
            return
        now = self._loop.time()
        deadline = max(self._last_activity + self.manager.config.idle_timeout, self._hold_until)
        if now >= deadline:
            self.manager.stats.connections_idle_closed += 1
            log.debug("event=flow_closed_idle remote=%s", self.remote)
            self.close()
            return
        self._idle = self._loop.call_later(deadline - now, self._idle_check)

    def stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


async def listen_websocket(
    manager: TransportManager,
    where: Address,
    ssl_context: ssl.SSLContext | None,
    *,
    reuse_port: bool = False,
    origins: OriginPolicy | None = None,
) -> tuple[Address, Server]:
    """Listen for SIP over ws (or wss with ``ssl_context``); returns the bound address.
    ``origins``: the Origin check (default: any origin, or none)."""
    transport = "wss" if ssl_context is not None else "ws"
    local = Address(transport, where.host, where.port)
    policy = origins if origins is not None else OriginPolicy()
    open_timeout = manager.config.ws_open_timeout

    async def handler(connection: ServerConnection) -> None:
        peer: Any = connection.remote_address
        remote = Address(transport, str(peer[0]), int(peer[1]))
        request = connection.request
        if request is not None:
            request.headers = Headers()  # read by admit; the library would keep them for good
        if connection.subprotocol != "sip":
            log.debug("event=ws_without_sip_subprotocol remote=%s", remote)
        flow = WebSocketFlow(connection, remote, manager)
        config = manager.config
        pings = (
            connection.pings
            if isinstance(connection, AdmittedConnection)
            else PingLimit(config.ping_limit, config.ping_window)
        )
        if not manager.adopt_flow(remote, flow, connection):
            flow._closing = True
            flow.stop_idle()  # its timer would hold the flow and the connection for idle_timeout
            await connection.close(1013, "too many connections")
            return
        if isinstance(connection, AdmittedConnection):
            connection.flow = flow  # its incomplete messages are charged from now on
        quiet = True  # no SIP message yet: evictable at max_connections (TransportManager.quiet)
        ws_transport = connection.transport
        manager.quiet(connection, ws_transport.abort)
        try:
            async for message in connection:
                data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
                flow.touch()
                if data and not data.strip(b"\r\n"):
                    # RFC 5626 3.5.1 CRLF keep-alive, usable over WebSocket (RFC 7118 6): a
                    # double-CRLF ping is answered with a CRLF pong, and no SIP parse is tried
                    manager.stats.keepalive_pings += 1
                    if pings.over(connection.loop.time()):
                        abort_for_abuse(manager, connection.transport, "ping_flood")
                        break
                    if data.startswith(b"\r\n\r\n"):
                        flow.write(b"\r\n")
                    if manager.on_keepalive is not None:
                        manager.on_keepalive(remote)
                    continue
                if quiet:
                    quiet = False
                    manager.spoke(connection)
                manager.deliver(data, remote, local)
        except ConnectionClosed:
            pass
        finally:
            sent = connection.protocol.close_sent
            if sent is not None and sent.code in _PROTOCOL_ERRORS:
                # the peer broke RFC 6455 (1002), sent a text frame that is not UTF-8 (1007) or a
                # message over max_message_size (1009): counted as a stream's framing abuse
                manager.stats.connections_closed_abuse += 1
                manager.stats.abuse["ws_protocol"] = manager.stats.abuse.get("ws_protocol", 0) + 1
            flow._wake.set()
            flow.stop_idle()
            if flow.partial:
                manager.partial_changed(flow, 0)
            flow._closing = True
            manager.drop_flow(remote, flow, connection)

    def admit(connection: ServerConnection, request: Request) -> Response | None:
        if isinstance(connection, AdmittedConnection) and connection.refused is not None:
            return connection.respond(503, "Too many connections\n")  # counted by admit
        if sum(len(name) + len(value) + 4 for name, value in request.headers.raw_items()) > MAX_UPGRADE_BYTES:
            manager.count_refused("upgrade_too_large")
            if isinstance(connection, AdmittedConnection):
                connection.refused = "upgrade_too_large"  # counted: not again as a bad upgrade
            return connection.respond(431, "Request header fields too large\n")
        values = request.headers.get_all("Origin")
        origin = values[0] if len(values) == 1 else None
        if len(values) > 1 or not policy.allows(origin):
            manager.count_refused("origin")
            if isinstance(connection, AdmittedConnection):
                connection.refused = "origin"  # counted: not again as a bad upgrade
            log.debug("event=ws_origin_refused origin=%r", origin)
            return connection.respond(403, "Origin not allowed\n")
        return None

    server = await serve(
        handler,
        where.host,
        where.port,
        process_request=admit,
        create_connection=functools.partial(  # type: ignore[arg-type]
            AdmittedConnection, manager=manager, open_timeout=open_timeout
        ),
        open_timeout=open_timeout,
        ssl=ssl_context,
        subprotocols=["sip"],  # type: ignore[list-item]
        max_size=manager.config.max_message_size,
        # no permessage-deflate (the library's default): its zlib state cost ~40 KB more per
        # connection, 400 MB over max_connections, for SIP messages of a few hundred bytes
        # (Kamailio's websocket module has none either); a browser offering it is served without
        compression=None,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        reuse_port=reuse_port or None,
        logger=_LIBRARY_LOG,
    )
    sock = next(iter(server.sockets))
    host, port = sock.getsockname()[:2]
    bound = Address(transport, host, port)
    log.info("event=listening address=%s", bound)
    return bound, server
