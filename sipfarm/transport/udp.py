"""UDP: one datagram endpoint per listening socket, a thin layer over the manager.

Each datagram is one message (RFC 3261 18.3): handed to the manager inline, no buffering and
no task.  Responses and requests leave through the same socket (``send``), so a client behind
NAT sees them come from the address it sent to (RFC 3581).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from sipfarm.sip.address import Address

if TYPE_CHECKING:
    from sipfarm.transport.manager import TransportManager

logger = logging.getLogger(__name__)


def _nothing_buffered() -> int:
    return 0


class UdpEndpoint(asyncio.DatagramProtocol):
    """The protocol of one bound UDP socket."""

    def __init__(self, manager: TransportManager) -> None:
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
        if data[:1] in (b"\r", b"\n") and not data.strip(b"\r\n"):
            # CRLF keep-alive some clients send over UDP: nothing to parse, nothing to answer
            self._stats.keepalive_pings += 1
            return
        self._deliver(data, Address("udp", cast(str, addr[0]), cast(int, addr[1])), self.local)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier sends (port unreachable...): per packet, so debug only
        self._stats.send_errors += 1
        logger.debug("event=udp_error local=%s error=%s", self.local, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def send(self, data: bytes, dest: Address) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        # Datagrams the kernel could not take wait in user space; do not let them pile up.
        if self._buffered() > self._send_limit:
            return False
        transport.sendto(data, (dest.host, dest.port))
        return True


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
