"""UDP: one datagram endpoint per listening socket, a thin layer over the manager.

Each datagram is one message (RFC 3261 18.3): handed to the manager inline, no buffering and
no task.  Responses and requests leave through the same socket (``send``), so a client behind
NAT sees them come from the address it sent to (RFC 3581).

Keep-alives share the port (RFC 5626 4.4): a datagram whose first byte is below ``A`` cannot
start a SIP message, so only those are looked at more closely.  A CRLF is counted and
ignored; a STUN Binding request is answered here with the sender's address
(:mod:`sipfarm.transport.stun`, RFC 5626 8), any other STUN message dropped and counted.
Neither reaches the parser; both tell the manager's ``on_keepalive`` the flow is alive.  A
source the manager's ``allow_source`` hook refuses gets neither answer nor notice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from sipfarm.sip.address import Address
from sipfarm.transport.stats import bump
from sipfarm.transport.stun import BINDING_REQUEST, StunError, binding_response, is_stun, parse_header

if TYPE_CHECKING:
    from sipfarm.transport.manager import TransportManager

logger = logging.getLogger(__name__)


def _nothing_buffered() -> int:
    return 0


class UdpEndpoint(asyncio.DatagramProtocol):
    """The protocol of one bound UDP socket."""

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
        # a SIP message starts with a method (a token, in practice letters) or "SIP/2.0"
        if data[:1] < b"A" and self._keepalive(data, addr):
            return
        self._deliver(data, Address("udp", cast(str, addr[0]), cast(int, addr[1])), self.local)

    def _keepalive(self, data: bytes, addr: tuple[str | int, ...]) -> bool:
        """Handle a CRLF or STUN keep-alive (True); False for anything else (the parser's)."""
        stats = self._stats
        allow_source = self._manager.allow_source
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
            source = Address("udp", cast(str, addr[0]), cast(int, addr[1]))
            if allow_source is not None and not allow_source(source.host):
                return True  # a refused source learns nothing, not even its address
            try:
                # RFC 5626 8 / RFC 5389 7.3.1: a success response naming the source address
                response = binding_response(header, source.host, source.port)
            except ValueError:  # an address the OS gave in a form we cannot encode
                bump(stats.stun_dropped, "stun_unencodable_source")
                return True
            if self.send(response, source):
                stats.stun_answered += 1
        elif data and not data.strip(b"\r\n"):
            # CRLF keep-alive some clients send over UDP: nothing to parse, nothing to answer
            source = Address("udp", cast(str, addr[0]), cast(int, addr[1]))
            if allow_source is not None and not allow_source(source.host):
                return True
        else:
            return False
        stats.keepalive_pings += 1
        on_keepalive = self._manager.on_keepalive
        if on_keepalive is not None:
            on_keepalive(source)
        return True

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
