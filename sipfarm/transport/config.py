"""Limits and timeouts of the transport layer, as one typed, validated object."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sipfarm.sip.parser import MAX_MESSAGE_SIZE

#: the largest UDP payload over IPv4 (65,535 - 8 - 20): a longer message cannot be sent at all
MAX_DATAGRAM = 65507


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Every bound the transports enforce; the defaults suit a proxy facing the Internet."""

    # One number for the largest message, datagram or stream (STYLE 16); above it a datagram is
    # answered 413 and a stream connection closed.
    max_message_size: int = MAX_MESSAGE_SIZE
    # A stream connection with no traffic either way for this long is closed.  Clients keep
    # their flows open with RFC 5626 CRLFCRLF pings (every 95-120 s by 4.4.1), well under it;
    # the balancer holds a registered phone's connection open longer (``StreamFlow.hold``).
    idle_timeout: float = 300.0
    # A stream message must be complete this long after its first byte arrived; a peer that
    # stalls (or drips, slowloris-style) mid-message is closed.
    message_timeout: float = 10.0
    # An inbound stream connection must start its first message (CRLFCRLF pings do not count)
    # this long after it was accepted (TCP) or its TLS handshake completed; a silent one is
    # closed and counted (``refused["silent"]``) instead of holding a slot for idle_timeout.
    first_message_timeout: float = 10.0
    # A TCP connection whose peer shut down its write side (FIN) after its requests stays open
    # for writing their answers this long at most (or idle_timeout if shorter), then closes:
    # 64*T1, RFC 3261's Timer B/F, the time a client waits for a transaction's answer.
    half_closed_timeout: float = 32.0
    # RFC 5626 4.4.1 keep-alives come one at a time, every 25-120 s: more than ``ping_limit``
    # pings within ``ping_window`` seconds on one connection (CRLFCRLF on TCP/TLS, CRLF
    # messages and RFC 6455 pings on WebSocket) close it as abuse (``abuse["ping_flood"]``).
    # Red team, 2026-12-02: 0.8 MB/s of pings on one connection took half a core.
    ping_limit: int = 10
    ping_window: float = 10.0
    connect_timeout: float = 5.0
    # The TLS handshake of an inbound or outbound connection (counted as ``handshake_timeout``
    # when an inbound one does not finish in time), and the HTTP upgrade of a WebSocket
    # (the ``websockets`` library's open_timeout; for wss it bounds the TLS handshake too).
    tls_handshake_timeout: float = 5.0
    ws_open_timeout: float = 10.0
    # WebSocket frames of any kind (data, continuation, control; empty ones too) one connection
    # may send per ``ws_frame_window`` seconds: over it, closed as abuse (``frame_flood``).  A
    # SIP client sends about a frame a message; red team, 2026-12-03: empty pongs or fragments
    # on one connection (~6 us of the balancer each, no SIP message) pinned its CPU.
    ws_frame_limit: int = 400
    ws_frame_window: float = 4.0
    # Open connections (inbound from accept, handshakes included, and outbound), and inbound
    # ones from one source IP address (None: no such limit; ``limit_exempt`` of the manager
    # names sources it does not apply to).  Over either, a new connection is closed at
    # accept, before any TLS handshake; a WebSocket upgrade is answered 503.
    max_connections: int = 10_000
    max_connections_per_source: int | None = None
    # Bytes of incomplete stream messages buffered over all connections (each at most
    # max_message_size): over it, the connection holding the most is closed
    # (``abuse["partial_budget"]``), so stalled partial messages on many connections cost a
    # bounded amount of memory, not max_connections x max_message_size (640 MB by default).
    partial_budget: int = 32 * 1024 * 1024
    # Above ``write_buffer_high`` bytes unsent to a stream peer, stop reading from it (it does
    # not read our answers); above ``write_buffer_limit`` close it.
    write_buffer_high: int = 64 * 1024
    write_buffer_limit: int = 1024 * 1024
    # Data queued for an outbound connection while it is being set up.
    connect_queue_limit: int = 256 * 1024
    # UDP: datagrams queued in user space when the socket is full are dropped above this.
    udp_send_buffer_limit: int = 1024 * 1024
    udp_recv_buffer: int | None = None  # SO_RCVBUF; None keeps the OS default
    # UDP sockets read with recvmmsg and written with sendmmsg (sipfarm/transport/_batchio.c,
    # in the compiled build only; without it, or False: asyncio's datagram transport).
    udp_batchio: bool = True
    # With batching: 0 reads a socket on every wake-up of the loop; > 0 reads it once per this
    # many seconds while it is busy (udp.BUSY or more datagrams a read: more of them per wake-up
    # and system call, each waiting up to that long), and on every wake-up while it is not.
    udp_batch_interval: float = 0.0
    backlog: int = 1024
    # Apply RFC 3261 18.2.1 / RFC 3581 (received, rport) to requests before the callback.
    stamp_via: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or value is None:
                continue
            if f.name == "udp_batch_interval" and value == 0:
                continue
            if not value > 0:
                raise ValueError(f"transport config: {f.name} must be positive, got {value!r}")
        if self.write_buffer_high > self.write_buffer_limit:
            raise ValueError("transport config: write_buffer_high must not exceed write_buffer_limit")
