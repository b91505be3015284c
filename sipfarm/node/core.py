"""A registrar/proxy node's SIP logic: a thin, sans-IO dispatcher over its transaction users.

Theory of operation
-------------------
Inputs: :meth:`NodeCore.on_message` (a parsed message, its source, the listener it reached,
``now``), :meth:`NodeCore.handle_timer` (``now``), Redis answers and name resolutions (as
callbacks of the stores and the resolver).  Outputs: :meth:`NodeCore.datagrams_to_send` and
:meth:`NodeCore.next_deadline` (the transaction timers and Timer C, one timer source).  The
asyncio glue (:mod:`sipfarm.node.glue`) drains the output after every input; nothing here
touches a socket, a loop or a clock of its own.

Requests toward a client's connection held here (a phone registered straight to the node over
TCP, TLS or WebSocket) must not open a new one: a NATed phone cannot be dialled.  After each
:meth:`NodeCore.datagrams_to_send`, :attr:`NodeCore.flow_destinations` names those of its
destinations; the glue sends requests to them over an existing connection only and reports a
failure with :meth:`NodeCore.transport_failure`, which the proxy answers 430 (RFC 5626 5.3).

Requests go through the transaction layer first, which absorbs retransmissions; what is new
goes to the :class:`~sipfarm.registrar.registrar.Registrar` (REGISTER) or the
:class:`~sipfarm.proxy.proxy.Proxy` (everything else); both authenticate through the one
:class:`~sipfarm.protect.authenticator.Authenticator`.  Every SipError on a transaction is
answered in one place (:meth:`~sipfarm.element.Element.fail`); SipErrors raised before a
transaction exists are answered by the transport, statelessly.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Final, Protocol

from sipfarm.edge import ChallengeTags, FlowTokens, HopBranches
from sipfarm.element import Element, NodeIdentity
from sipfarm.metrics import NodeMetrics
from sipfarm.protect.authenticator import DEFAULT_ALGORITHMS, Authenticator
from sipfarm.protect.guard import Guard
from sipfarm.proxy.media import MediaHook
from sipfarm.proxy.nexthop import NameResolver
from sipfarm.proxy.pending import MAX_PENDING_INVITE_BYTES, MAX_PENDING_INVITES, PendingInvites
from sipfarm.proxy.proxy import MAX_FORWARDS, LocationSource, Proxy, ServerLocation
from sipfarm.registrar.bindings import ExpiresPolicy
from sipfarm.registrar.gruu import TempGruus
from sipfarm.registrar.registrar import FLOW_TIMER_STREAM, FLOW_TIMER_UDP, BindingStore, Registrar
from sipfarm.routing.router import Router
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.parser import max_forwards, require_understood, validate_request
from sipfarm.sip.transaction import TimerConfig, TransactionLayer
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.resolver import Resolver

log = logging.getLogger("sipfarm.node")

__all__ = ["NodeCore", "NodeIdentity"]

_EVENT_ROUNDS = 8  # events may queue more output and events; bounded


class FarmStore(LocationSource, BindingStore, Protocol):
    """The shared state the node's transaction users read and write: FarmState over Redis,
    or a dict-backed twin in the in-memory test tier."""


# no answer refuses them (RFC 3261 8.2.2.3, 16.3 step 4): an ACK and a CANCEL are not checked
_NOT_REFUSED: Final = frozenset((b"ACK", b"CANCEL"))
_EXTENSION_HEADERS: Final = frozenset(("proxy-require", "require"))


class NodeCore:
    """The registrar and proxy of one node worker."""

    def __init__(
        self,
        identity: NodeIdentity,
        state: FarmStore,
        nonces: auth.NonceFactory,
        *,
        metrics: NodeMetrics | None = None,
        timers: TimerConfig | None = None,
        max_transactions: int = 200_000,
        max_transaction_bytes: int = 256 * 2**20,
        policy: ExpiresPolicy | None = None,
        auth_requests: bool = True,
        digest_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
        timer_c: float = 180.0,
        max_pending_invites: int = MAX_PENDING_INVITES,
        max_pending_invite_bytes: int = MAX_PENDING_INVITE_BYTES,
        flow_tokens: FlowTokens | None = None,
        temp_gruus: TempGruus | None = None,
        flow_timer_udp: int = FLOW_TIMER_UDP,
        flow_timer_stream: int = FLOW_TIMER_STREAM,
        router: Router | None = None,
        media: MediaHook | None = None,
        locator: ServerLocation | None = None,
        guard: Guard | None = None,
        resolver: NameResolver | None = None,
        destinations: DestinationPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.state = state
        self.metrics = metrics or NodeMetrics()
        self.layer = TransactionLayer(timers=timers, max_transactions=max_transactions, max_bytes=max_transaction_bytes)
        self.element = Element(identity, self.layer, self.metrics, clock=clock, wall=wall_clock)
        tokens = flow_tokens or FlowTokens(secrets.token_bytes(32))
        gruus = temp_gruus or TempGruus(secrets.token_bytes(32))
        self.auth = Authenticator(self.element, nonces, state, guard, algorithms=digest_algorithms, bindings=state)
        self.registrar = Registrar(
            self.element,
            self.auth,
            state,
            policy=policy,
            flow_tokens=tokens,
            temp_gruus=gruus,
            flow_timer_udp=flow_timer_udp,
            flow_timer_stream=flow_timer_stream,
        )
        self.proxy = Proxy(
            self.element,
            self.auth,
            state,
            resolver or Resolver(),
            flow_tokens=tokens,
            temp_gruus=gruus,
            router=router,
            media=media,
            locator=locator,
            auth_requests=auth_requests,
            timer_c=timer_c,
            destinations=destinations,
            pending_invites=PendingInvites(max_pending_invites, max_pending_invite_bytes),
        )
        self.auth.binding_client = self.proxy.binding_client  # reads the proxy's current flow tokens
        # client flows among the destinations of the last datagrams_to_send(): requests to
        # them go over an existing connection only (see the module docstring)
        self.flow_destinations: set[Address] = set()

    # -- secrets shared by the farm (fetched from Redis after start) ------------------------------

    @property
    def nonces(self) -> auth.NonceFactory:
        return self.auth.nonces

    @nonces.setter
    def nonces(self, value: auth.NonceFactory) -> None:
        self.auth.nonces = value

    def use_farm_secret(self, secret: bytes) -> None:
        """The farm-wide secret (Redis): flow tokens, seals, balancers' hop branches, the tags of
        stateless challenges, and the temporary GRUUs any node resolves."""
        self.flow_tokens = FlowTokens(secret)
        self.element.hops = HopBranches(secret)
        self.element.challenge_tags = ChallengeTags(secret)
        self.temp_gruus = TempGruus(secret)

    @property
    def flow_tokens(self) -> FlowTokens:
        return self.proxy.flow_tokens

    @flow_tokens.setter
    def flow_tokens(self, value: FlowTokens) -> None:
        self.proxy.flow_tokens = value
        self.registrar.flow_tokens = value

    @property
    def temp_gruus(self) -> TempGruus:
        return self.proxy.temp_gruus

    @temp_gruus.setter
    def temp_gruus(self, value: TempGruus) -> None:
        self.proxy.temp_gruus = value
        self.registrar.temp_gruus = value

    # -- inputs ----------------------------------------------------------------------------------

    def on_message(self, msg: SipMessage, source: Address, local: Address, now: float | None = None) -> None:
        """A parsed message from the transport. SipErrors raised before a transaction exists
        propagate to the transport, which answers them statelessly."""
        if now is None:
            now = self.element.now()
        if msg.status:
            self.proxy.on_response(msg, source, now)
        else:
            self._on_request(msg, source, local, now)

    def handle_timer(self, now: float) -> None:
        self.layer.handle_timer(now)
        self.proxy.handle_timer(now)

    def transport_failure(self, dest: Address, now: float) -> None:
        """Sending to ``dest`` failed (a connection could not be made or was lost, or a client's
        flow in :attr:`flow_destinations` was gone): its transactions end with a transport error."""
        self.layer.transport_error(dest, now)

    # -- outputs ---------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """What to send now. The transaction layer's events (timeouts, ACKs for 2xx, stray
        responses, terminations) are the proxy's inputs: they are handled first."""
        layer = self.layer
        out = layer.datagrams_to_send()
        for _ in range(_EVENT_ROUNDS):
            events = layer.events()
            if not events:
                break
            for event in events:
                self.proxy.on_event(event)
            out += layer.datagrams_to_send()
        proxy = self.proxy
        if proxy.flow_sends or self.flow_destinations:
            # this batch's flows; the proxy starts the next batch's (bounded by one drain)
            self.flow_destinations, proxy.flow_sends = proxy.flow_sends, set()
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next be called (None: nothing armed)."""
        layer_deadline = self.layer.next_deadline()
        proxy_deadline = self.proxy.next_deadline()
        if layer_deadline is None:
            return proxy_deadline
        if proxy_deadline is None:
            return layer_deadline
        return min(layer_deadline, proxy_deadline)

    # -- requests --------------------------------------------------------------------------------

    def _check_extensions(self, msg: SipMessage) -> None:
        """BadExtension (420) for option-tags the node does not understand: in Proxy-Require of
        any request but ACK and CANCEL (RFC 3261 16.3 step 4), in Require of a request the node
        answers itself, a REGISTER or an OPTIONS to it (8.2.2.3)."""
        method = msg.method
        if msg.has("proxy-require") and method not in _NOT_REFUSED:
            require_understood(msg, "proxy-require")
        if msg.has("require") and (method == b"REGISTER" or (method == b"OPTIONS" and self.proxy.is_us(msg))):
            require_understood(msg, "require")

    def _on_request(self, msg: SipMessage, source: Address, local: Address, now: float) -> None:
        self.metrics.requests.inc(msg.method)
        # RFC 3261 16.3 step 1 (and 8.2 for the registrar): the grammar first, then any policy.
        # The parser's quick pass leaves From, To, Contact, the Vias below the top one and the
        # Request-URI's headers to this check; without it a malformed request was challenged,
        # refused as foreign (403) or answered 200 instead of 400 (RFC 4475 3.1.2). A BadMessage
        # here propagates to the transport, which answers it statelessly and counts it.
        validate_request(msg)
        for key, _, _ in msg.headers:  # one pass: most requests carry neither
            if key in _EXTENSION_HEADERS:
                self._check_extensions(msg)
                break
        if msg.method == b"REGISTER" and not msg.has("authorization"):
            # RFC 3261 8.2.7: a challenge may be sent by a stateless UAS. No transaction to keep
            # for 32 s: a lost 401 just gets a fresh challenge on the retransmission.
            self.registrar.challenge_stateless(msg, source)
            return
        if self.proxy.stateless_407(msg, source) or self.proxy.stateless_refusal(msg, source):
            return
        if msg.method == b"OPTIONS" and msg.to_tag is None and not msg.has("route") and self.proxy.is_us(msg):
            # a keep-alive or a balancer's probe: answered without a transaction, so a probe
            # every second costs no memory for 32 s (RFC 3261 8.2.7 allows a stateless UAS)
            msg.to  # noqa: B018 - parsed here: a malformed To gets 400, not an echo of itself
            if max_forwards(msg) >= 0:
                self.element.send_stateless(msg, self.proxy.options_answer(msg), source)
                return
        # Responses go to the source: the connection, or the UDP address the request came from
        # (RFC 3581 rport, forced as Kamailio's force_rport does): never to a port the request
        # names. Farm elements send from the port their Via names, so this is where they listen.
        # an INVITE's 100 Trying goes once the node has done what it does at once: one it
        # refuses at once (a dialog not ours, a Route not served) gets its final alone, sent
        # once, not the 100 and a final resent for 32 s to a source anyone can forge
        invite = msg.method == b"INVITE"
        stx = self.layer.receive_request(msg, source, now, trying=False)
        if stx is None:
            return  # retransmission absorbed, or an ACK (AckFor2xx event)
        try:
            # nothing from outside lives longer than a request of our own (RFC 3261 16.6 step 3)
            if max_forwards(msg) > MAX_FORWARDS:
                msg.set("max-forwards", b"%d" % MAX_FORWARDS)
            routes = self.proxy.own_routes(msg)
            if msg.method == b"REGISTER":
                # the registrar is the REGISTER's UAS, not a proxy: Max-Forwards 0 is no reason
                # to refuse it (RFC 3261 16.3 step 3 is a proxy's check; a phone sending 1 got
                # 483 behind the balancer, red team 2026-12-03)
                self.registrar.on_register(stx, msg, source)
            else:
                self.proxy.on_request(stx, msg, local, routes)
        except SipError as exc:
            self.element.fail(stx, exc)
        if invite:
            self.layer.start_trying(stx, now)
