"""The transport layer of a node or the balancer: listeners, flows, one message callback.

Theory of operation
-------------------
``listen`` binds UDP sockets and TCP/TLS servers.  Every datagram and every message framed on a
stream goes through :meth:`TransportManager.deliver`, inline from the protocol callback:

1. ``parse_message``; a :class:`SipError` is counted by kind and, unless it is a drop,
   answered with :func:`error_response` straight back to the source (the one place a
   SipError becomes a response);
2. for requests, RFC 3261 18.2.1 / RFC 3581 ``received``/``rport`` stamping of the top Via;
3. the user's ``on_message(msg, source, local)``.  A SipError it raises is answered the same
   way; any other exception is logged with the Call-ID and counted.  Nothing escapes.

Two optional hooks let the process refuse sources cheaply: ``screen(data, source, local)`` before
step 1 (False: dropped unparsed and unanswered; the balancer's front door and allow/deny
lists, a node's ``accept_from``), and ``allow_source(host)`` when a connection is accepted,
before the limits below and any TLS handshake (False: closed at once), and when a UDP
keep-alive arrives (False: ignored, unanswered).

``send(data, dest)`` picks the socket: UDP through a listening socket (the one named by
``local`` when given, so answers leave from the address the request reached); TCP/TLS over the
flow to ``dest`` -- the connection a peer opened to us is keyed by its address, so answering
the source of a request reuses it (RFC 3261 18.2.2) -- or a new outbound connection, with the
data queued (bounded) until it is up.

Connection limits: every connection counts towards ``max_connections`` from the moment it is
accepted (or dialled) until it is gone, and an inbound one towards its source address's
``max_connections_per_source`` too (``admit``/``release``, one entry per connection object,
so a connection closed in any way frees its slot exactly once).  A TLS listener is our own
accept loop (``_accept_tls``): a source over its limit is closed before its handshake costs
anything, and the handshake (``connect_accepted_socket``, bounded by
``tls_handshake_timeout``) holds its slot; one that fails or does not finish is counted.
At ``max_connections``, a connection from a source that has none evicts the oldest
established inbound connection that has not sent a SIP message yet (``quiet``/``spoke``;
counted as refused ``evicted``), so connections that only ping or say nothing cannot keep
new sources out; a connection that carried a message is never evicted.  A connection a phone
registered over (``hold_flow``: the farm answered its REGISTER 2xx) stops counting towards its
source's limit, up to ``REGISTERED_PER_SOURCE_FACTOR`` times that limit: an office of a hundred
TLS phones behind one NAT address has a hundred connections that each proved an account, and
its 65th phone was refused for good; the limit is for connections that proved nothing.

Responses: ``send(data, dest, connect=False)``.  An element never opens a connection to send a
response: it goes over the flow its request came in on, and when that flow is gone the
response is dropped and counted (``stats.no_flow``).  Otherwise anything that names a
destination in a response (a forged Via, a stale flow) could make us dial a local service.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

from sipfarm.edge import is_ip_literal
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, SipError
from sipfarm.sip.headers import HeaderError
from sipfarm.sip.message import SipMessage, error_response
from sipfarm.sip.parser import parse_message
from sipfarm.sip.uri import URIError
from sipfarm.sip.via import stamp_received
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.stats import TransportStats, bump
from sipfarm.transport.stream import StreamFlow
from sipfarm.transport.subject import source_subject
from sipfarm.transport.udp import HAVE_BATCHIO, BatchedUdpEndpoint, UdpBatches, UdpEndpoint, bind_udp_socket

logger = logging.getLogger(__name__)

MessageCallback = Callable[[SipMessage, Address, Address], None]
"""``on_message(msg, source, local)``: synchronous, called inline for every parsed message."""

STREAM_TRANSPORTS = frozenset({"tcp", "tls"})
#: ``admit``'s reason for a connection from a source ``allow_source`` refuses
REFUSED_SOURCE = "source"
#: a source's connections that registered a phone do not count towards its limit, up to this
#: many times the limit (64 x 16: an office of 1,024 phones behind one address)
REGISTERED_PER_SOURCE_FACTOR = 16


class Flow(Protocol):
    """A connection ``send`` can write to: a TCP/TLS :class:`StreamFlow`, or one another
    listener owns (a WebSocket, see ``adopt_flow``)."""

    @property
    def remote(self) -> Address | None: ...

    @property
    def closing(self) -> bool: ...

    def write(self, data: bytes) -> bool: ...

    def close(self) -> None: ...

    def hold(self, seconds: float) -> None: ...

    # the peer shut down its write side: open for the answers owed to it only (never held)
    @property
    def half_closed(self) -> bool: ...

    # bytes of an incomplete message it buffers (the manager's ``partial_budget``)
    partial: int

    def abort_for_abuse(self, reason: str, detail: str) -> None: ...


_LOG_INTERVAL = 1.0  # at most one error log line per second; the rest go to debug and counters


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _to_tag() -> bytes:
    return b"%08x" % random.getrandbits(32)


class TransportManager:
    """Listeners and connections of one process; see the module docstring."""

    def __init__(
        self,
        on_message: MessageCallback,
        *,
        config: TransportConfig | None = None,
        stats: TransportStats | None = None,
        tls_client_context: ssl.SSLContext | None = None,
        on_send_failure: Callable[[Address], None] | None = None,
    ) -> None:
        self.on_message = on_message
        # told when queued data to ``dest`` is lost (connect failed): the transaction layer
        # turns it into a transport error at once (RFC 3261 16.9) instead of waiting for Timer B
        self.on_send_failure = on_send_failure
        # told the source of every keep-alive the transport consumes itself (a STUN Binding
        # request or a CRLF on UDP): traffic from that flow that never reaches ``on_message``
        self.on_keepalive: Callable[[Address], None] | None = None
        # told the host of every stream connection closed for abuse (a flood of pings or frames,
        # garbage framing, a slow reader...): the balancer's front door bans a source that keeps
        # coming back (each new connection started the abuse over: red team, 2026-12-03)
        self.on_abuse: Callable[[str], None] | None = None
        # checked before parsing: False drops the message unparsed and unanswered (the
        # balancer's front door: a banned or flooding source costs a dict look-up or two)
        # ``local``: the socket it came in on (a node's address proves something only on the
        # balancer's socket facing the nodes, see sipfarm.balancer.nodes)
        self.screen: Callable[[bytes, Address, Address], bool] | None = None
        # after the screen, before parsing: the balancer's forwarding of the common response
        # from its bytes (``BalancerCore.forward_response``); False: not handled, parse it
        # (data, source, local, max_size)
        self.fast_response: Callable[[bytes, Address, Address, int], bool] | None = None
        # the same for the common request routed by our Route (``BalancerCore.forward_request``), when
        # this transport does not stamp Vias itself (the balancer's core stamps clients')
        self.fast_request: Callable[[bytes, Address, Address, int], bool] | None = None
        # sources (IP address strings) ``max_connections_per_source`` does not apply to
        self.limit_exempt: Callable[[str], bool] | None = None
        # checked first when a connection is accepted (TCP, TLS before its handshake, WebSocket)
        # and before a UDP keep-alive is answered, with the source's IP address: False refuses
        # the source (the connection closed at once, the keep-alive ignored). The balancer's
        # allow/deny lists, a node's accept_from; the owner counts what it refuses
        self.allow_source: Callable[[str], bool] | None = None
        # checked before a STUN Binding request on UDP is answered, with its source: False drops
        # it (the balancer answers only its registered flows: RFC 5626 keepalives, never a
        # reflector for datagrams whose source is forged)
        self.stun_allowed: Callable[[Address], bool] | None = None
        self.config = config if config is not None else TransportConfig()
        self.stats = stats if stats is not None else TransportStats()
        self._tls_client_context = tls_client_context
        self._max_size = self.config.max_message_size
        self._stamp = self.config.stamp_via
        self._udp: dict[Address, UdpEndpoint | BatchedUdpEndpoint] = {}
        self._udp_v4: UdpEndpoint | BatchedUdpEndpoint | None = None
        self._udp_v6: UdpEndpoint | BatchedUdpEndpoint | None = None
        self._udp_batches: UdpBatches | None = None  # the batched endpoints' send queues
        self._servers: list[tuple[Address, asyncio.Server]] = []
        self._tls_listeners: list[tuple[Address, socket.socket]] = []
        self._flows: dict[Address, Flow] = {}  # also adopted WebSocket flows (duck-typed)
        self.partial_bytes = 0  # incomplete stream messages buffered, all flows (partial_budget)
        self._connecting: set[asyncio.Task[None]] = set()
        # every open connection (the flow or WebSocket object) -> its source host, "" outbound
        self._open: dict[object, str] = {}
        self._per_source: dict[str, int] = {}  # those that count towards the per-source limit
        # inbound connections a phone registered over -> source: not counted in _per_source
        self._registered: dict[object, str] = {}
        self._registered_per_source: dict[str, int] = {}
        self._adopted: dict[object, object] = {}  # adopted flow -> the connection admit counted
        # established inbound connections that have sent no SIP message yet, oldest first,
        # with how to close one: what a new source may evict at max_connections
        self._quiet: dict[object, Callable[[], None]] = {}
        self._closed = False
        self._last_error_log = -_LOG_INTERVAL
        self._suppressed_logs = 0

    # -- listening -----------------------------------------------------------------------------

    @property
    def addresses(self) -> list[Address]:
        """The bound addresses of every listener, in the order ``listen`` was called."""
        return [*self._udp, *(addr for addr, _ in self._servers), *(addr for addr, _ in self._tls_listeners)]

    def address(self, transport: str) -> Address:
        """The first bound address of ``transport`` (``udp``, ``tcp``, ``tls``)."""
        for addr in self.addresses:
            if addr.transport == transport:
                return addr
        raise LookupError(f"no {transport} listener")

    async def listen(
        self, where: str | Address, *, ssl: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> Address:
        """Bind ``udp:HOST:PORT``, ``tcp:...`` or ``tls:...`` (port 0: a free one).

        ``tls`` needs a server ``ssl`` context.  ``reuse_port`` sets SO_REUSEPORT so worker
        processes can share the port.  Returns the bound address.
        """
        if self._closed:
            raise RuntimeError("transport manager is closed")
        addr = Address.parse(where) if isinstance(where, str) else where
        loop = asyncio.get_running_loop()
        if addr.transport == "udp":
            if ssl is not None:
                raise ValueError("an ssl context makes no sense for udp")
            sock = bind_udp_socket(addr.host, addr.port, reuse_port=reuse_port, recv_buffer=self.config.udp_recv_buffer)
            endpoint: UdpEndpoint | BatchedUdpEndpoint
            if self.batched_udp:
                if self._udp_batches is None:
                    self._udp_batches = UdpBatches(loop)
                batched = BatchedUdpEndpoint(self, sock, self._udp_batches, self.config.udp_batch_interval)
                batched.start()
                endpoint = batched
            else:
                _, endpoint = await loop.create_datagram_endpoint(lambda: UdpEndpoint(self), sock=sock)
            bound = endpoint.local
            self._udp[bound] = endpoint
            if ":" in bound.host:
                self._udp_v6 = self._udp_v6 or endpoint
            else:
                self._udp_v4 = self._udp_v4 or endpoint
            logger.info("event=listening address=%s reuse_port=%s batched=%s", bound, reuse_port, self.batched_udp)
            return bound
        if addr.transport not in STREAM_TRANSPORTS:
            raise ValueError(f"unsupported transport {addr.transport!r} in {str(addr)!r}")
        if (addr.transport == "tls") != (ssl is not None):
            raise ValueError("tls listeners need an ssl context, tcp listeners must not have one")
        name = addr.transport
        if ssl is not None:
            return self._listen_tls(addr, ssl, reuse_port)
        server = await loop.create_server(
            lambda: StreamFlow(self, name, None),
            addr.host,
            addr.port,
            reuse_port=reuse_port or None,
            backlog=self.config.backlog,
        )
        # typeshed says tuple, uvloop returns a list: read it untyped (compiled code checks types)
        sockname = cast(Any, server).sockets[0].getsockname()
        bound = Address(name, sockname[0], sockname[1])
        self._servers.append((bound, server))
        logger.info("event=listening address=%s reuse_port=%s", bound, reuse_port)
        return bound

    @property
    def batched_udp(self) -> bool:
        """Whether UDP sockets are read and written in batches (recvmmsg/sendmmsg): the C
        extension is built (compiled build) and ``udp_batchio`` is on."""
        return HAVE_BATCHIO and self.config.udp_batchio

    def _listen_tls(self, addr: Address, context: ssl.SSLContext, reuse_port: bool) -> Address:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        sockname = sock.getsockname()
        bound = Address("tls", sockname[0], sockname[1])
        self._tls_listeners.append((bound, sock))
        self._spawn(self._accept_tls(sock, context))
        logger.info("event=listening address=%s reuse_port=%s", bound, reuse_port)
        return bound

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _accept_tls(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        """Accept TLS connections: the limits first (``admit``), then the handshake."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and the like: do not spin
                logger.warning("event=accept_failed error=%r", exc)
                await asyncio.sleep(0.1)
                continue
            flow = StreamFlow(self, "tls", None)
            if self.admit(flow, str(peer[0])) is not None:
                conn.close()
                continue
            self._spawn(self._handshake(flow, conn, context))

    async def _handshake(self, flow: StreamFlow, conn: socket.socket, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.config.tls_handshake_timeout
        started = loop.time()
        try:
            await loop.connect_accepted_socket(lambda: flow, conn, ssl=context, ssl_handshake_timeout=timeout)
        except BaseException as exc:  # the connection never reached the flow: free its slot here
            self.release(flow)
            conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            slow = loop.time() - started >= timeout * 0.9
            self.count_refused("handshake_timeout" if slow else "handshake_failed")
            logger.debug("event=tls_handshake_failed error=%r", exc)

    # -- receiving (hot path) ------------------------------------------------------------------

    def deliver(self, data: bytes, source: Address, local: Address) -> None:
        """Parse one message from ``source`` and hand it to the callback. Never raises."""
        screen = self.screen
        if screen is not None and not screen(data, source, local):
            return
        fast = self.fast_response
        if fast is not None:
            try:
                if fast(data, source, local, self._max_size):
                    self.stats.received[source.transport] += 1
                    return
            except Exception:  # a bug there must not take the transport down either
                self.stats.callback_errors += 1
                self._log_exception("fast_response_failed", source, b"")
                return
        fast = self.fast_request
        if fast is not None and not self._stamp:
            try:
                if fast(data, source, local, self._max_size):
                    self.stats.received[source.transport] += 1
                    return
            except Exception:  # as above
                self.stats.callback_errors += 1
                self._log_exception("fast_request_failed", source, b"")
                return
        try:
            msg = parse_message(data, max_size=self._max_size)
            if self._stamp and msg.status == 0:
                stamp_received(msg, source)
        except SipError as exc:
            bump(self.stats.parse_errors, exc.counter)
            logger.debug("event=parse_error source=%s error=%s", source, exc)
            self._answer_error(None, exc, source, local)
            return
        except Exception:  # a parser bug must not take the transport down
            self.stats.internal_errors += 1
            self._log_exception("parse_failed", source, b"")
            return
        self.stats.received[source.transport] += 1
        try:
            self.on_message(msg, source, local)
        except SipError as exc:
            bump(self.stats.rejected, exc.counter)
            self._answer_error(msg if msg.status == 0 else None, exc, source, local)
        except (HeaderError, URIError) as exc:
            # a value the full grammar rejects, read only where the handler needed it (a top
            # Via with "branch =" and nothing after it): the sender's error, a 400 like those
            # the parser's own checks give, not a handler failure
            bad = BadMessage(str(exc), partial=msg)
            bump(self.stats.rejected, bad.counter)
            self._answer_error(msg if msg.status == 0 else None, bad, source, local)
        except Exception:
            self.stats.callback_errors += 1
            self._log_exception("callback_failed", source, msg.call_id)

    def _answer_error(self, request: SipMessage | None, exc: SipError, source: Address, local: Address) -> None:
        try:
            response = error_response(request, exc, _to_tag())
            if response is None:
                return
            data = response.to_bytes()
        except Exception:
            self.stats.internal_errors += 1
            self._log_exception("error_response_failed", source, b"")
            return
        if self.send(data, source, local=local, connect=False):
            self.stats.error_responses += 1

    def framing_answer(self, exc: SipError) -> bytes | None:
        """The answer to a stream message that broke the framing (no or a bad Content-Length,
        too large), from the header section it had: None when that is not an answerable
        request. Counted with the error responses."""
        try:
            response = error_response(None, exc, _to_tag())
            if response is None:
                return None
            data = response.to_bytes()
        except Exception:
            self.stats.internal_errors += 1
            logger.exception("event=framing_answer_failed error=%s", exc)
            return None
        self.stats.error_responses += 1
        return data

    def _log_exception(self, event: str, source: Address, call_id: bytes) -> None:
        now = asyncio.get_running_loop().time()
        cid = call_id.decode("latin-1")
        if now - self._last_error_log >= _LOG_INTERVAL:
            self._last_error_log = now
            suppressed, self._suppressed_logs = self._suppressed_logs, 0
            logger.exception("event=%s source=%s call_id=%s suppressed=%d", event, source, cid, suppressed)
        else:
            self._suppressed_logs += 1
            logger.debug("event=%s source=%s call_id=%s", event, source, cid, exc_info=True)

    # -- sending -------------------------------------------------------------------------------

    def send(self, data: bytes, dest: Address, *, local: Address | None = None, connect: bool = True) -> bool:
        """Send one message to ``dest``; False (and counted as dropped) when it cannot be.

        UDP leaves through the listening socket ``local`` when given (else the first one of the
        address family); ``dest.host`` must be an IP address (resolve names first: a name
        here would block the loop).  TCP/TLS uses the flow to ``dest``, opening one if needed
        unless ``connect`` is False: responses are sent that way (only over an existing flow,
        counted in ``no_flow`` when there is none; see the module docstring).
        """
        transport = dest.transport
        if transport == "udp":
            endpoint = self._udp.get(local) if local is not None else None
            if endpoint is None:
                endpoint = self._udp_v6 if ":" in dest.host else self._udp_v4
            if endpoint is None or not is_ip_literal(dest.host) or not endpoint.send(data, dest):
                self.stats.dropped += 1
                return False
            self.stats.sent["udp"] += 1
            return True
        if transport in ("ws", "wss"):
            ws_flow = self._flows.get(dest)
            if ws_flow is None or ws_flow.closing:
                self.stats.no_flow += 1  # a WebSocket is never dialled, request or response
                self.stats.dropped += 1
                return False
            if not ws_flow.write(data):
                self.stats.dropped += 1
                return False
            self.stats.sent[transport] += 1
            return True
        if transport in STREAM_TRANSPORTS:
            flow = self._flows.get(dest)
            if flow is None or flow.closing:
                if not connect:
                    self.stats.no_flow += 1
                    self.stats.dropped += 1
                    return False
                flow = self._connect(dest)
            if flow is None or not flow.write(data):
                self.stats.dropped += 1
                return False
            self.stats.sent[transport] += 1
            return True
        self.stats.dropped += 1
        return False

    def send_request(self, data: bytes, dest: Address, local: Address) -> bool:
        """``send`` for a request a proxy forwards: over UDP from its socket ``local`` (the one
        its Via names), over a connection it may open.  A method, not a lambda: the
        balancer calls it for every request (compiled, no interpreted frame)."""
        return self.send(data, dest, local=local if dest.transport == "udp" else None)

    def send_on_flow(self, data: bytes, dest: Address) -> bool:
        """``send`` over an existing flow only (``connect=False``): what responses use."""
        return self.send(data, dest, connect=False)

    def abused(self, host: str) -> None:
        """A connection from ``host`` was closed for abuse (counted by its closer): told on."""
        if self.on_abuse is not None:
            self.on_abuse(host)

    def hold_flow(self, dest: Address, seconds: float) -> bool:
        """Keep the connection to ``dest`` open without traffic for ``seconds`` (0: release);
        False when there is no such open connection.  For a registered phone's flow: its
        registration's lifetime (RFC 5626 5.3: requests reach it over that flow only)."""
        flow = self._flows.get(dest)
        if flow is None or flow.closing or flow.half_closed:
            return False
        flow.hold(seconds)
        self._registered_flow(self._adopted.get(flow, flow), seconds > 0)
        return True

    def _registered_flow(self, connection: object, registered: bool) -> None:
        """A phone registered over ``connection`` (or unregistered): it counts towards its
        source's ``max_connections_per_source`` only while it holds no registration, and while
        the source has ``REGISTERED_PER_SOURCE_FACTOR`` times that many registered ones."""
        key = self._open.get(connection)
        if not key:
            return  # outbound, or not admitted here
        counted = self._per_source
        by_source = self._registered_per_source
        if registered and connection not in self._registered:
            limit = self.config.max_connections_per_source
            if limit is not None and by_source.get(key, 0) >= REGISTERED_PER_SOURCE_FACTOR * limit:
                return
            self._registered[connection] = key
            by_source[key] = by_source.get(key, 0) + 1
            _decrement(counted, key)
        elif not registered and connection in self._registered:
            del self._registered[connection]
            _decrement(by_source, key)
            counted[key] = counted.get(key, 0) + 1

    def flow_half_closed(self, flow: Flow) -> None:
        """``flow``'s peer shut down its write side: it is leaving, so a registration it
        carried no longer spares it its source's connection limit."""
        self._registered_flow(self._adopted.get(flow, flow), False)

    def has_flow(self, dest: Address) -> bool:
        """Whether a TCP/TLS connection to ``dest`` is open (or being opened)."""
        flow = self._flows.get(dest)
        return flow is not None and not flow.closing

    def _connect(self, dest: Address) -> StreamFlow | None:
        if self._closed:
            return None
        if len(self._open) >= self.config.max_connections:
            self.stats.connections_refused += 1
            return None
        context: ssl.SSLContext | None = None
        if dest.transport == "tls":
            if self._tls_client_context is None:
                self._tls_client_context = ssl.create_default_context()
            context = self._tls_client_context
        flow = StreamFlow(self, dest.transport, dest)
        self._flows[dest] = flow
        self._open[flow] = ""
        task = asyncio.get_running_loop().create_task(self._open_connection(flow, dest, context))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return flow

    async def _open_connection(self, flow: StreamFlow, dest: Address, context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: flow,
                    dest.host,
                    dest.port,
                    ssl=context,
                    server_hostname=dest.host if context is not None else None,
                    ssl_handshake_timeout=self.config.tls_handshake_timeout if context is not None else None,
                ),
                self.config.connect_timeout,
            )
        except asyncio.CancelledError:
            flow.connect_failed()
            self._forget(flow)
            raise
        except Exception as exc:  # OSError, TimeoutError, ssl.SSLError, bad host...
            self.stats.connect_failures += 1
            logger.debug("event=connect_failed dest=%s error=%r", dest, exc)
            flow.connect_failed()
            self._forget(flow)
            if self.on_send_failure is not None:
                try:
                    self.on_send_failure(dest)
                except Exception:
                    self._log_exception("send_failure_callback_failed", dest, b"")

    # -- flow bookkeeping (called by StreamFlow) ----------------------------------------------

    def flow_established(self, flow: StreamFlow) -> bool:
        """A connection is up (an inbound one: accepted, before any TLS handshake); False
        refuses it (over a connection limit, or closing)."""
        remote = flow.remote
        assert remote is not None
        if self._closed:
            return False
        if not flow.outbound:
            if self.admit(flow, remote.host) is not None:
                return False
            self._flows[remote] = flow
        self.stats.connections_opened += 1
        return True

    def partial_changed(self, flow: Flow, buffered: int) -> None:
        """``flow`` (a TCP/TLS connection or a WebSocket) now buffers ``buffered`` bytes of an
        incomplete message; over the ``partial_budget`` in all, the flow holding the most is
        closed (see TransportConfig)."""
        self.partial_bytes += buffered - flow.partial
        flow.partial = buffered
        while self.partial_bytes > self.config.partial_budget:
            largest = max(
                (f for f in self._flows.values() if not f.closing),
                key=lambda f: f.partial,
                default=None,
            )
            if largest is None or largest.partial == 0:
                break
            logger.debug(  # counted (abuse partial_budget); one line per closed connection
                "event=partial_budget_exceeded remote=%s partial_bytes=%d budget=%d",
                largest.remote,
                self.partial_bytes,
                self.config.partial_budget,
            )
            self.partial_bytes -= largest.partial
            largest.partial = 0
            largest.abort_for_abuse("partial_budget", "the most buffered when over the partial budget")

    def flow_closed(self, flow: StreamFlow, *, established: bool) -> None:
        if established:
            self.stats.connections_closed += 1
        self._forget(flow)

    def _forget(self, flow: Flow) -> None:
        self.release(flow)
        remote = flow.remote
        if remote is not None and self._flows.get(remote) is flow:
            del self._flows[remote]

    # -- connection limits ------------------------------------------------------------------------

    def admit(self, connection: object, host: str) -> str | None:
        """Count a connection just accepted from ``host`` towards the limits.  None when
        admitted (``release(connection)`` frees the slot, once, however it closes); else the
        reason it is refused (``total`` or ``per_source``, counted; ``source``: a source
        ``allow_source`` refuses, counted by its owner): the caller closes it."""
        if connection in self._open:
            return None
        allow_source = self.allow_source
        if allow_source is not None and not allow_source(host):
            self.stats.connections_refused += 1
            return REFUSED_SOURCE
        reason: str | None = None
        if self._closed or (len(self._open) >= self.config.max_connections and not self._evict_for(host)):
            reason = "total"
        else:
            limit = self.config.max_connections_per_source
            key = source_subject(host)
            if limit is not None and self._per_source.get(key, 0) >= limit:
                exempt = self.limit_exempt
                if exempt is None or not exempt(host):
                    reason = "per_source"
        if reason is not None:
            self.stats.connections_refused += 1
            self.count_refused(reason)
            logger.debug("event=connection_refused source=%s reason=%s", host, reason)
            return reason
        key = source_subject(host)
        self._open[connection] = key
        self._per_source[key] = self._per_source.get(key, 0) + 1
        return None

    def quiet(self, connection: object, close: Callable[[], None]) -> None:
        """An admitted inbound connection is established and has sent no SIP message yet:
        ``close()`` may evict it for a new source at ``max_connections``."""
        if connection in self._open:
            self._quiet[connection] = close

    def spoke(self, connection: object) -> None:
        """The connection started a SIP message: never evicted."""
        self._quiet.pop(connection, None)

    def _evict_for(self, host: str) -> bool:
        """At max_connections: make room for ``host`` if it has no connection, by closing the
        oldest quiet one (True when done)."""
        if not self._quiet or self.connections_from(host):
            return False
        victim, close = next(iter(self._quiet.items()))
        self.release(victim)
        self.count_refused("evicted")
        logger.debug("event=connection_evicted for_source=%s", host)
        close()
        return True

    def release(self, connection: object) -> None:
        """The connection ``admit`` counted is gone (idempotent)."""
        self._quiet.pop(connection, None)
        key = self._open.pop(connection, None)
        if not key:
            return
        if self._registered.pop(connection, None) is not None:
            _decrement(self._registered_per_source, key)
        else:
            _decrement(self._per_source, key)

    def count_refused(self, reason: str) -> None:
        """Count an inbound connection refused or closed before its first message."""
        bump(self.stats.refused, reason)

    def connections_from(self, host: str) -> int:
        """Open inbound connections from ``host`` (for status and tests; an IPv6 host: from
        its /64, see :func:`~sipfarm.transport.subject.source_subject`)."""
        key = source_subject(host)
        return self._per_source.get(key, 0) + self._registered_per_source.get(key, 0)

    @property
    def open_connections(self) -> int:
        """Every connection counted towards ``max_connections``."""
        return len(self._open)

    # -- flows owned by other listeners (WebSocket) ----------------------------------------------

    @property
    def at_connection_limit(self) -> bool:
        """Whether ``max_connections`` connections are open (new ones are refused)."""
        return self._closed or len(self._open) >= self.config.max_connections

    def adopt_flow(self, remote: Address, flow: Flow, connection: object | None = None) -> bool:
        """Register a connection another listener accepted (e.g. a WebSocket) so ``send`` to
        ``remote`` writes to it. ``flow`` needs ``write(bytes) -> bool``, ``closing`` and
        ``close()``.  ``connection`` is what the listener passed to ``admit`` at accept (it
        calls ``release`` when the connection is gone); without it the flow is admitted
        here.  False (counted) over a limit or when closing: the listener closes it."""
        if self._closed:
            return False
        key = connection if connection is not None else flow
        if key not in self._open and self.admit(key, remote.host) is not None:
            return False
        self._flows[remote] = flow
        if connection is not None:
            self._adopted[flow] = connection
        self.stats.connections_opened += 1
        return True

    def drop_flow(self, remote: Address, flow: Flow, connection: object | None = None) -> None:
        self._adopted.pop(flow, None)
        self.release(connection if connection is not None else flow)
        if self._flows.get(remote) is flow:
            del self._flows[remote]
            self.stats.connections_closed += 1

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close listeners, connections and pending connects."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._connecting):
            task.cancel()
        for _, server in self._servers:
            server.close()
        for _, sock in self._tls_listeners:
            sock.close()
        for flow in list(self._flows.values()):
            flow.close()
        for endpoint in self._udp.values():
            endpoint.close()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        for _, server in self._servers:
            await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        self._servers.clear()
        self._tls_listeners.clear()
        self._udp.clear()
        self._udp_v4 = self._udp_v6 = None
