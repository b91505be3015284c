"""SIP over WebSocket (RFC 7118) for browser clients (SIP.js, JsSIP): ws and wss listeners.

The ``websockets`` library does the HTTP upgrade and framing; each WebSocket message carries
exactly one SIP message (RFC 7118 5), which goes through the same parser and callback as any
other transport via :meth:`TransportManager.deliver`.  The connection is registered as a flow
under the client's (transport, address), so responses and requests for that client find it
exactly as they find a TCP connection.  The ``sip`` subprotocol is negotiated (RFC 7118 4).

WebSocket connections count towards the transport's ``max_connections`` with TCP/TLS ones:
over it, the HTTP upgrade is answered 503; a handshake that raced past that check is closed
(1013, try again later) when its flow would be registered.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from sipfarm.sip.address import Address
from sipfarm.transport.manager import TransportManager

log = logging.getLogger("sipfarm.transport.ws")

MAX_PENDING_SENDS = 256
# RFC 6455 5.5.2 pings, answered by every browser without the page's help: they keep NATs and
# the connection open, and a peer that stops answering is closed (it is gone, whatever its
# registration says).  There is no idle timeout on WebSockets (compare TransportConfig).
PING_INTERVAL = 30.0
PING_TIMEOUT = 30.0


class WebSocketFlow:
    """The flow object the transport manager writes to for one WebSocket client.

    ``write`` is synchronous (called from the forwarding path): it queues the message, and one
    writer task per connection sends the queue in order.  A client that does not read fills the
    bounded queue and its further messages are refused (counted as dropped by the manager).
    """

    def __init__(self, connection: ServerConnection, remote: Address) -> None:
        self.connection = connection
        self.remote = remote
        self._loop = asyncio.get_running_loop()
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    def write(self, data: bytes) -> bool:
        if self._closing or len(self._queue) >= MAX_PENDING_SENDS:
            return False
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

    def hold(self, seconds: float) -> None:
        """Nothing to hold: a WebSocket has no idle timeout here.  The library's pings
        (``PING_INTERVAL``) keep a live connection open however long it is silent, and close
        one whose peer stopped answering them (``PING_TIMEOUT``)."""


async def listen_websocket(
    manager: TransportManager, where: Address, ssl_context: ssl.SSLContext | None, *, reuse_port: bool = False
) -> tuple[Address, Server]:
    """Listen for SIP over ws (or wss with ``ssl_context``); returns the bound address."""
    transport = "wss" if ssl_context is not None else "ws"
    local = Address(transport, where.host, where.port)

    async def handler(connection: ServerConnection) -> None:
        peer: Any = connection.remote_address
        remote = Address(transport, str(peer[0]), int(peer[1]))
        if connection.subprotocol != "sip":
            log.debug("event=ws_without_sip_subprotocol remote=%s", remote)
        flow = WebSocketFlow(connection, remote)
        if not manager.adopt_flow(remote, flow):
            flow._closing = True
            await connection.close(1013, "too many connections")
            return
        try:
            async for message in connection:
                data = message.encode("utf-8") if isinstance(message, str) else bytes(message)
                manager.deliver(data, remote, local)
        except ConnectionClosed:
            pass
        finally:
            flow._closing = True
            flow._wake.set()
            manager.drop_flow(remote, flow)

    def admit(connection: ServerConnection, _request: Request) -> Response | None:
        if manager.at_connection_limit:
            manager.stats.connections_refused += 1
            return connection.respond(503, "Too many connections\n")
        return None

    server = await serve(
        handler,
        where.host,
        where.port,
        process_request=admit,
        ssl=ssl_context,
        subprotocols=["sip"],  # type: ignore[list-item]
        max_size=manager.config.max_message_size,
        ping_interval=PING_INTERVAL,
        ping_timeout=PING_TIMEOUT,
        reuse_port=reuse_port or None,
    )
    sock = next(iter(server.sockets))
    host, port = sock.getsockname()[:2]
    bound = Address(transport, host, port)
    log.info("event=listening address=%s", bound)
    return bound, server
