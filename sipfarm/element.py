"""What every transaction user of a node shares: its name, its clock and the one place it answers.

The registrar (:mod:`sipfarm.registrar.registrar`), the proxy (:mod:`sipfarm.proxy.proxy`) and
the authenticator (:mod:`sipfarm.protect.authenticator`) are sans-IO: they queue responses and
requests on the node's :class:`~sipfarm.sip.transaction.TransactionLayer` and never touch a
socket or a timer.  :class:`Element` carries what they all need: the node's identity (how it
names itself on the wire), the transaction layer, metrics, the clocks (injected: a test runs
Timer C's three minutes in microseconds) and the answering helpers, so that a
:class:`~sipfarm.sip.errors.SipError` becomes a response in exactly one place (:meth:`fail`).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sipfarm.edge import HOP_PREFIX, ChallengeTags, HopBranches, bracket, transaction_key
from sipfarm.metrics import NodeMetrics
from sipfarm.proxy.forking import ProxyCall
from sipfarm.sip.address import Address
from sipfarm.sip.errors import ServerInternalError, ServiceUnavailable, SipError
from sipfarm.sip.headers import via_branch
from sipfarm.sip.message import SipMessage, error_response
from sipfarm.sip.transaction import RELEASED, InvalidTransition, ServerTransaction, TransactionLayer, TxState
from sipfarm.sip.uri import SipURI
from sipfarm.sip.via import default_port
from sipfarm.store.errors import StoreError, StoreUnavailable

log = logging.getLogger("sipfarm.node")
outcomes = logging.getLogger("sipfarm.requests")  # one line per answered request (operators keep it on)

# INVITE server transaction states that take no more final responses (a non-2xx was sent).
_AFTER_NON_2XX = frozenset({TxState.COMPLETED, TxState.CONFIRMED, TxState.TERMINATED})


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """How the node names itself on the wire."""

    node_id: str
    domains: frozenset[str]
    # transport -> (host, port) for our Via sent-by and Record-Route
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    # every host:port that means "this node" in a Route or Request-URI (hosts without brackets)
    aliases: frozenset[tuple[str, int]] = frozenset()
    # transport -> (host, port) for Record-Route and Path when they differ from the Via's: the
    # port every worker of the node shares, where a worker's Via names its private port (a
    # dialog must outlive the worker that set it up)
    route_addresses: dict[str, tuple[str, int]] = field(default_factory=dict)

    def address(self, transport: str) -> tuple[str, int]:
        return self.addresses.get(transport) or self.addresses["udp"]

    def route_address(self, transport: str) -> tuple[str, int]:
        return self.route_addresses.get(transport) or self.route_addresses.get("udp") or self.address(transport)

    def record_route(self, transport: str, seal: str = "") -> bytes:
        host, port = self.route_address(transport)
        suffix = "" if transport == "udp" else f";transport={transport}"
        if seal:
            suffix += f";sf={seal}"
        return f"<sip:{bracket(host)}:{port};lr{suffix}>".encode()

    def via(self, transport: str, branch: bytes) -> bytes:
        host, port = self.address(transport)
        return f"SIP/2.0/{transport.upper()} {bracket(host)}:{port};branch=".encode() + branch

    def names(self, uri: SipURI) -> bool:
        """``uri`` names this node (host and port, the transport's default port if none)."""
        port = uri.port or default_port(uri.transport)
        return (uri.host.strip("[]"), port) in self.aliases


class Element:
    """The shared duties of a node's transaction users toward the transaction layer."""

    def __init__(
        self,
        identity: NodeIdentity,
        layer: TransactionLayer,
        metrics: NodeMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.layer = layer
        self.metrics = metrics
        self.now = clock  # monotonic: transaction timers, Timer C, latency
        self.wall = wall  # wall clock: nonces and binding expiry, shared with other nodes
        tag_key = hashlib.blake2b(identity.node_id.encode(), digest_size=8).digest()
        self._tag_state = hashlib.blake2b(digest_size=5, key=tag_key)
        # reads the client a balancer forwarded a request for (its signed Via branch)
        self.hops: HopBranches | None = None
        # the To tag of a stateless answer (the farm's secret replaces this key once read)
        self.challenge_tags = ChallengeTags(secrets.token_bytes(32))

    def client(self, msg: SipMessage, source: Address) -> Address:
        """Who sent ``msg``: ``source``, or when that is a farm balancer, the client it names
        in its branch (signed with the farm's secret: a client cannot forge it). Bans and
        logs are about this address: behind a balancer every request comes from the balancer."""
        hops = self.hops
        if hops is None:
            return source
        top = msg.top_via_value
        if top.find(HOP_PREFIX) < 0:
            return source
        vias = msg.values("via")
        if len(vias) < 2:
            return source
        branch = via_branch(top)
        if branch is None:
            return source
        hop = hops.decode(branch, transaction_key(msg, vias[1]))
        return hop if hop is not None else source

    def tag(self, msg: SipMessage) -> bytes:
        """A To tag that is stable for retransmissions of the same request."""
        h = self._tag_state.copy()  # keyed once (the same digest as blake2b(..., key=tag_key))
        h.update(msg.call_id + msg.top_via_value)
        return h.hexdigest().encode()

    def stateless_tag(self, msg: SipMessage, client: Address) -> bytes:
        """The To tag of an answer no transaction keeps, to an initial INVITE or other request
        that gets an ACK, from ``client`` (:meth:`client`): its ACK is ended by the balancer
        (:class:`ChallengeTags`)."""
        return self.challenge_tags.tag(client, msg.call_id, msg.cseq[0])

    def reply(self, stx: ServerTransaction, response: SipMessage) -> None:
        if 200 <= response.status < 300 and stx.state in _AFTER_NON_2XX and response.cseq[1] == b"INVITE":
            # RFC 3261 16.7 step 5, RFC 6026 7.2: a 2xx is forwarded even after the caller got a
            # non-2xx final (a callee answering as our 487 for a CANCEL went up): statelessly,
            # so the caller can ACK and hang up the call it did not want
            self.layer.send_stateless(response, stx.source)
            self.metrics.responses.inc(response.status)
            self.metrics.errors("late_2xx_forwarded").inc()
            return
        request = stx.request  # the layer releases it once the final response is sent
        try:
            self.layer.send_response(stx, response, self.now())
        except InvalidTransition:
            return  # the transaction ended meanwhile (client gave up): nothing to answer
        self.metrics.responses.inc(response.status)
        if response.status >= 200:
            if request is not RELEASED:  # else a 2xx again (a retransmission, another fork)
                self.log_outcome(request, response.status, stx.source)
            call = stx.context
            if isinstance(call, ProxyCall):
                call.release_messages()

    def send_stateless(self, request: SipMessage, response: SipMessage, source: Address) -> None:
        """A response sent without a transaction (a challenge, a refusal) back to ``source``."""
        self.layer.send_stateless(response, source)  # the source, never a port the Via names
        self.metrics.responses.inc(response.status)
        self.log_outcome(request, response.status, source)

    def fail(self, stx: ServerTransaction, exc: SipError) -> None:
        """The one place a SipError on a transaction becomes its answer."""
        self.metrics.errors(exc.counter).inc()
        call = stx.context
        if isinstance(call, ProxyCall):
            if call.answered:
                return
            call.answered = True
        response = error_response(stx.request, exc, self.tag(stx.request))
        if response is not None:
            self.reply(stx, response)

    def store_failed(self, stx: ServerTransaction, msg: SipMessage, exc: StoreError) -> None:
        self.metrics.redis_errors.inc()
        if isinstance(exc, StoreUnavailable):
            error: SipError = ServiceUnavailable("Redis unavailable", retry_after=exc.retry_after, partial=msg)
        else:
            log.warning("event=store_error call_id=%s error=%s", msg.call_id.decode("latin-1"), exc)
            error = ServerInternalError("store error", partial=msg)
        self.fail(stx, error)

    def log_outcome(self, request: SipMessage, status: int, source: Address, user: str = "") -> None:
        """One line per final answer at INFO (method, status, source: the client behind a
        balancer, user): a failing phone is diagnosed from these, fail2ban reads the 401/403/407
        ones. Run at ``warning`` to keep them out (the benchmark does)."""
        level = logging.INFO
        if not outcomes.isEnabledFor(level):
            return
        client = self.client(request, source)
        if not user:
            try:
                uri = request.name_addr_uri("from")
                user = uri.aor if isinstance(uri, SipURI) else ""
            except SipError:
                user = ""
        outcomes.log(
            level,
            "event=request method=%s status=%d source=%s user=%s call_id=%s",
            request.method.decode("latin-1"),
            status,
            client,
            user or "-",
            request.call_id.decode("latin-1"),
        )
