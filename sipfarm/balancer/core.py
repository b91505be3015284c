"""The SIP-aware load balancer's forwarding logic: a stateless proxy with flow tokens.

Theory of operation
-------------------
Every message is forwarded statelessly (RFC 3261 16.11): the balancer keeps no transaction or
dialog, only its open client connections (in the transport layer).  Requests:

1. Route entries naming the balancer are removed (RFC 3261 16.4); the flow token in their user
   part (:mod:`sipfarm.edge`) names the client connection the request is for.
2. The next hop is, in order: that client flow; the node named by the next Route, while it is
   up (draining or not; when it is down or gone from the membership the Route entry is
   dropped and the request re-hashed: nodes keep no dialog state, so any node continues it);
   for requests from clients with no Route, a node chosen by consistent hash (REGISTER by
   address-of-record so one AOR's refreshes meet one node, everything else by Call-ID so a
   transaction and its CANCEL/ACK land together); a request from a node with no token goes to
   its Request-URI.
3. REGISTER from a client gets a Path (RFC 3327) and dialog-creating requests a Record-Route,
   each with the token of the client's flow, so requests to the client come back through this
   balancer and out on the very connection (TCP/TLS/WS) or NAT binding it used.
4. A Via with a branch derived from the incoming one (retransmissions and CANCEL keep matching)
   is added; responses pop it and follow the next Via (RFC 3261 16.7 / 18.2.2).

No usable node: 503 with Retry-After, answered here.  Nothing here waits on Redis: node
membership is read in the background into :class:`~sipfarm.balancer.nodes.NodeSet`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from sipfarm.balancer.nodes import Health, NodeEntry, NodeSet
from sipfarm.edge import DIALOG_CREATING, MAGIC_COOKIE, FlowTokens, bracket, is_ip_literal, pop_own_routes, route_uri
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, ServiceUnavailable, SipError, TooManyHops
from sipfarm.sip.headers import via_branch
from sipfarm.sip.message import SipMessage, error_response, make_response
from sipfarm.sip.parser import max_forwards
from sipfarm.sip.uri import SipURI, URIError
from sipfarm.sip.via import default_port, response_target, via_sent_by, via_value_target

log = logging.getLogger("sipfarm.balancer")

MAGIC = MAGIC_COOKIE
PROBE_PREFIX = b"z9hG4bKlbprobe"
PIN_SECONDS = 64 * 0.5  # Timer B: an INVITE is CANCELled or answered within it
PIN_LIMIT = 200_000


class FlowFailed(SipError):
    """430: the flow a token names is gone (RFC 5626 5.3 / 11.5)."""

    status = 430
    counter = "flow_failed"


@dataclass(slots=True)
class BalancerStats:
    to_node: int = 0
    to_client: int = 0
    responses: int = 0
    no_node: int = 0
    flow_failed: int = 0
    rehashed: int = 0
    dropped: int = 0
    local: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def flat(self) -> dict[str, int]:
        out = {
            k: getattr(self, k)
            for k in ("to_node", "to_client", "responses", "no_node", "flow_failed", "rehashed", "dropped", "local")
        }
        out.update({f"error_{k}": v for k, v in self.errors.items()})
        return out


class BalancerCore:
    def __init__(
        self,
        nodes: NodeSet,
        tokens: FlowTokens,
        *,
        public: dict[str, Address],
        internal: Address,
        send: Callable[[bytes, Address], bool] | None = None,
        retry_after: int = 5,
        aliases: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        self.nodes = nodes
        self.tokens = tokens
        self.public = public  # transport -> our address facing clients
        self.internal = internal  # our UDP address facing nodes
        self.send: Callable[[bytes, Address], bool] = send or (lambda data, dest: False)
        self.retry_after = retry_after
        self.stats = BalancerStats()
        # every host:port meaning "this balancer" in a Route or Via (bound and advertised)
        self._ours = {(a.host, a.port) for a in (*public.values(), internal)} | set(aliases)
        self._key = secrets.token_bytes(16)
        self._invites: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._clock = time.monotonic
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._to_tag = secrets.token_hex(4).encode()

    # -- entry point -----------------------------------------------------------------------------

    def on_message(self, msg: SipMessage, source: Address, local: Address) -> None:
        try:
            if msg.status:
                self._on_response(msg)
            else:
                self._on_request(msg, source, local)
        except SipError as exc:
            self.stats.errors[exc.counter] = self.stats.errors.get(exc.counter, 0) + 1
            if self._debug:
                log.debug(
                    "event=rejected status=%d call_id=%s source=%s detail=%s",
                    exc.status,
                    msg.call_id.decode("latin-1"),
                    source,
                    str(exc).replace(" ", "_"),
                )
            if msg.status == 0:
                answer = error_response(msg, exc, self._to_tag)
                if answer is not None:
                    self.send(answer.to_bytes(), source)

    # -- requests --------------------------------------------------------------------------------

    def _on_request(self, msg: SipMessage, source: Address, local: Address) -> None:
        if max_forwards(msg) <= 0:
            raise TooManyHops("Max-Forwards reached 0", partial=msg)
        from_node = self.nodes.by_address(source.host, source.port) is not None
        flow = self._pop_own_routes(msg)
        if msg.method == b"OPTIONS" and not msg.values("route") and self._is_for_us(msg):
            # keep-alive probes of the balancer itself; anything else (a REGISTER sent to
            # sip:balancer-ip:port) is the farm's business and goes to a node
            self._answer_locally(msg, source)
            return
        if flow is not None and from_node:
            # a token is an instruction only on the way to its client: the same Record-Route
            # entry comes back first in the route set of that client's own requests
            self._to_client(msg, self._udp_contact_or_flow(msg, flow), record_route=True)
            return
        if from_node:
            # from a node, no token of ours: an element outside the farm (its Request-URI)
            self._to_client(msg, self._uri_target(msg), record_route=True)
            return
        node = self._route_node(msg)
        if node is None:
            node = self._pick(msg)
        self._to_node(msg, node, source)

    def _udp_contact_or_flow(self, msg: SipMessage, flow: Address) -> Address:
        """For a UDP flow, the Request-URI (the Contact) when it names the flow's own IP: the
        client is not behind NAT and may receive on another port than it sent from (a UA whose
        registrar client and UAS are separate sockets).  Otherwise, and always for connection
        flows, the flow itself (NAT binding or connection, RFC 5626 5.3)."""
        if flow.transport != "udp" or msg.to_tag is not None:
            return flow
        try:
            uri = msg.request_uri
        except SipError:
            return flow
        if isinstance(uri, SipURI) and uri.host.strip("[]") == flow.host and uri.transport == "udp":
            return Address("udp", flow.host, uri.port or default_port("udp"))
        return flow

    def _route_node(self, msg: SipMessage) -> NodeEntry | None:
        """The node named by the top Route while usable; a dead one's entry is dropped."""
        routes = msg.values("route")
        if not routes:
            return None
        uri = route_uri(msg, routes[0])
        if uri is None:
            return None
        host, port = uri.host.strip("[]"), uri.port or default_port(uri.transport)
        node = self.nodes.by_address(host, port)
        if node is None:
            if not self.nodes.departed(host, port):
                return None  # not a node of ours: an element outside the farm
        elif node.health is Health.UP:
            return node  # a draining node still finishes its dialogs
        # RFC-wise the dialog continues on any node: the dead node's hop is removed
        msg.pop_first_value("route")
        self.stats.rehashed += 1
        return None

    def _pick(self, msg: SipMessage) -> NodeEntry:
        method = msg.method
        if method in (b"CANCEL", b"ACK"):
            # the node holding the INVITE transaction, even if the node set changed since
            pinned = self._invites.get(msg.call_id + b" %d" % msg.cseq[0])
            if pinned is not None:
                entry = self.nodes.nodes.get(pinned[0])
                if entry is not None and entry.health is Health.UP:
                    return entry
        key = self._aor_key(msg) if method == b"REGISTER" else msg.call_id
        node = self.nodes.pick(key)
        if node is None:
            self.stats.no_node += 1
            raise ServiceUnavailable("no node available", retry_after=self.retry_after, partial=msg)
        if method == b"INVITE" and msg.to_tag is None:
            self._pin_invite(msg, node)
        return node

    def _pin_invite(self, msg: SipMessage, node: NodeEntry) -> None:
        """Soft state, bounded in size and age: which node an initial INVITE went to, so its
        CANCEL and non-2xx ACK follow it across a change of the node set (losing it only
        falls back to hashing)."""
        invites = self._invites
        now = self._clock()
        invites[msg.call_id + b" %d" % msg.cseq[0]] = (node.id, now + PIN_SECONDS)
        while invites:
            oldest = next(iter(invites.values()))
            if len(invites) <= PIN_LIMIT and oldest[1] > now:
                break
            invites.popitem(last=False)

    def _aor_key(self, msg: SipMessage) -> bytes:
        to = msg.get("to") or b""
        lt, gt = to.find(b"<"), to.find(b">")
        if 0 <= lt < gt:
            return to[lt + 1 : gt].lower()
        return to.partition(b";")[0].strip().lower()

    def _to_node(self, msg: SipMessage, node: NodeEntry, source: Address) -> None:
        dest = node.address
        client_flow = source
        method = msg.method
        if source.reliable:
            _stamp_connection(msg, source)
        # _own_entries lists top first: prepend bottom first, so the node-facing entry (our
        # internal UDP address) ends on top and the node's requests to the client come to it
        if method == b"REGISTER":
            # RFC 3327: stay on the path to this UA (token = its flow)
            for value in reversed(self._own_entries(client_flow, dest.transport, path=True)):
                msg.prepend("path", value)
        elif method in DIALOG_CREATING and msg.to_tag is None:
            for value in reversed(self._own_entries(client_flow, dest.transport, path=False)):
                msg.prepend("record-route", value)
        self._forward(msg, dest, self.internal)
        self.stats.to_node += 1

    def _to_client(self, msg: SipMessage, flow: Address, *, record_route: bool) -> None:
        if record_route and msg.method in DIALOG_CREATING and msg.to_tag is None:
            for value in reversed(self._own_entries(flow, flow.transport, path=False, facing_client=True)):
                msg.prepend("record-route", value)
        facing = self.public.get(flow.transport) or self.internal
        self._forward(msg, flow, facing, flow_failure=True)
        self.stats.to_client += 1

    def _forward(self, msg: SipMessage, dest: Address, via_address: Address, *, flow_failure: bool = False) -> None:
        msg.set("max-forwards", str(max_forwards(msg) - 1).encode())
        msg.prepend("via", self._via(msg, dest.transport, via_address))
        if self._debug:
            log.debug(
                "event=forward method=%s call_id=%s dest=%s",
                msg.method.decode("latin-1"),
                msg.call_id.decode("latin-1"),
                dest,
            )
        if not self.send(msg.to_bytes(), dest):
            if msg.method == b"ACK":
                return
            msg.pop_first_value("via")
            if flow_failure:
                self.stats.flow_failed += 1
                raise FlowFailed("the client's flow is gone", partial=msg)
            raise ServiceUnavailable("node unreachable", retry_after=self.retry_after, partial=msg)

    def _via(self, msg: SipMessage, transport: str, via_address: Address) -> bytes:
        # RFC 3261 16.11: the same incoming branch gives the same outgoing one
        incoming = via_branch(msg.top_via_value) or msg.call_id + str(msg.cseq[0]).encode()
        if msg.method == b"ACK" and incoming:
            incoming += b"ack"  # the ACK of a non-2xx shares its INVITE's branch upstream only
        digest = hashlib.blake2b(incoming, key=self._key, digest_size=10).hexdigest().encode()
        host = via_address.host if ":" not in via_address.host else f"[{via_address.host}]"
        return b"SIP/2.0/%s %s:%d;branch=%slb%s" % (
            transport.upper().encode(),
            host.encode(),
            via_address.port,
            MAGIC,
            digest,
        )

    def _own_entries(
        self, client_flow: Address, node_transport: str, *, path: bool, facing_client: bool = False
    ) -> list[bytes]:
        """Our Record-Route/Path values, top first: the entry facing the receiver on top.

        The client-facing entry carries the client's flow token; when client and node sides
        are the same socket one entry does (RFC 5658 double Record-Route otherwise).
        """
        pub = self.public.get(client_flow.transport) or self.internal
        token = self.tokens.encode(client_flow)
        params = ";lr" + ("" if client_flow.transport == "udp" else f";transport={client_flow.transport}")
        if path:
            params += ";ob"
        client_entry = b"<sip:%s@%s:%d%s>" % (token.encode(), _host(pub).encode(), pub.port, params.encode())
        if pub == self.internal and client_flow.transport == "udp":
            return [client_entry]
        node_entry = b"<sip:%s:%d;lr>" % (_host(self.internal).encode(), self.internal.port)
        if facing_client:
            return [client_entry, node_entry]
        return [node_entry, client_entry]

    def _pop_own_routes(self, msg: SipMessage) -> Address | None:
        """Remove our Route entries; the flow named by a token in them, if any."""
        return pop_own_routes(msg, self._names_us, self.tokens)

    def _names_us(self, uri: SipURI) -> bool:
        return (uri.host, uri.port or default_port(uri.transport)) in self._ours

    def _uri_target(self, msg: SipMessage) -> Address:
        uri = msg.request_uri
        if not isinstance(uri, SipURI):
            raise BadMessage("Request-URI is not a SIP URI", partial=msg)
        host = (uri.param("maddr") or uri.host).strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        if not is_ip_literal(host):
            raise ServiceUnavailable(f"cannot resolve {host}", retry_after=None, partial=msg)
        return Address(uri.transport, host, uri.port or default_port(uri.transport))

    def _is_for_us(self, msg: SipMessage) -> bool:
        try:
            uri = msg.request_uri
        except (SipError, URIError):
            return False
        return (
            isinstance(uri, SipURI)
            and uri.user is None
            and (uri.host, uri.port or default_port(uri.transport)) in self._ours
        )

    def _answer_locally(self, msg: SipMessage, source: Address) -> None:
        """OPTIONS keep-alives (and anything else) addressed to the balancer itself."""
        self.stats.local += 1
        if msg.method == b"ACK":
            return
        status = 200 if msg.method == b"OPTIONS" else 405
        reply = make_response(msg, status, to_tag=self._to_tag, headers=(("allow", b"OPTIONS"),))
        self.send(reply.to_bytes(), response_target(reply, source))

    # -- responses -------------------------------------------------------------------------------

    def _on_response(self, msg: SipMessage) -> None:
        top = msg.top_via_value
        branch = via_branch(top) or b""
        if branch.startswith(PROBE_PREFIX):
            self.on_probe_response(branch)
            return
        try:
            if via_sent_by(top) not in self._ours:
                self.stats.dropped += 1  # not ours: RFC 3261 18.1.2 says discard
                return
            msg.pop_first_value("via")
            dest = via_value_target(msg.top_via_value)
        except SipError:
            self.stats.dropped += 1
            return
        if self._debug:
            log.debug(
                "event=forward_response status=%d call_id=%s dest=%s", msg.status, msg.call_id.decode("latin-1"), dest
            )
        if self.send(msg.to_bytes(), dest):
            self.stats.responses += 1
        else:
            self.stats.dropped += 1

    # -- probes ----------------------------------------------------------------------------------

    probe_listener: Callable[[bytes], None] | None = None

    def on_probe_response(self, branch: bytes) -> None:
        if self.probe_listener is not None:
            self.probe_listener(branch)

    def probe(self, node: NodeEntry) -> bytes:
        """Send an OPTIONS probe to ``node``; its branch."""
        branch = PROBE_PREFIX + secrets.token_hex(6).encode()
        addr = self.internal
        msg = (
            b"OPTIONS sip:%s:%d SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=%s\r\nMax-Forwards: 1\r\n"
            b"From: <sip:balancer@%s>;tag=%s\r\nTo: <sip:%s:%d>\r\nCall-ID: %s\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        ) % (
            node.address.host.encode(), node.address.port, _host(addr).encode(), addr.port, branch,
            _host(addr).encode(), self._to_tag, node.address.host.encode(), node.address.port, branch,
        )  # fmt: skip
        if not self.send(msg, node.address):
            self.nodes.mark_down(node)
        return branch


def _stamp_connection(msg: SipMessage, source: Address) -> None:
    """Name the connection a request came over in its top Via (``received`` and ``rport``).

    RFC 3261 18.2.2: the response goes back over that connection.  Stateless, we find it
    again only from the Via, and a TCP/TLS/WS client's sent-by port (or a WS client's
    ``.invalid`` host, RFC 7118 5) is not its connection's port: this is RFC 3581 rport,
    forced (as Kamailio's ``force_rport``).
    """
    try:
        via = msg.top_via
    except SipError:
        return
    port = str(source.port)
    if via.received == source.host and via.rport == port:
        return
    params = [(k, v) for k, v in via.params if k not in ("received", "rport")]
    params += [("received", source.host), ("rport", port)]
    msg.replace_first_value("via", replace(via, params=tuple(params)).to_bytes())


def _host(addr: Address) -> str:
    return bracket(addr.host)
