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
   its Request-URI.  A client's ACK for a 2xx without a body whose route set is ours, then a
   node's Record-Route sealed for its Call-ID, then ours with the callee's flow token goes
   straight to that flow (:meth:`BalancerCore._ack_past_node`): the node would only have
   forwarded it back here (a 2xx ACK is stateless there), so the farm's own route entries are
   consumed at its edge, two datagrams and a node's parse fewer per call.
3. REGISTER from a client gets a Path (RFC 3327) and dialog-creating requests a Record-Route,
   each with the token of the client's flow, so requests to the client come back through this
   balancer and out on the very connection (TCP/TLS/WS) or NAT binding it used.
4. Max-Forwards is capped at 70 on entry from clients (RFC 3261 16.6 step 3 counts down from
   there) and decremented.
5. A Via is added whose branch records the previous hop, signed
   (:class:`sipfarm.edge.HopBranches`); it is derived from the incoming branch, so retransmissions,
   the CANCEL and the ACK of a non-2xx get their INVITE's branch (RFC 3261 16.11, 17.2.3).

Responses pop our Via and go to the hop the branch names, and only there, over the flow the
request came in on (``send_response``: never dialling a connection).  The next Via is not
trusted for the destination: anyone can forge a response.  A response whose branch does not
verify, or whose flow is gone, is dropped and counted (``dropped_<reason>``).

A message is a node's (a request it sends to a client, a response that marks it alive) when
:meth:`NodeSet.sender` says so: its source is a node's address and, with a socket facing the
nodes alone (``--internal``), it came in there; one claiming a node's address elsewhere is a
client's here (the screen before parsing drops it first, see ``ClientScreen``).

A request taken to its Request-URI (from a node, with no token of ours) goes only where the
:class:`~sipfarm.transport.destinations.DestinationPolicy` permits: never to the farm's own
listeners or nodes (a loop), loopback or the operator's internal networks unless allowed (403).

A request for a client flow named by a flow token is sent over that flow only, never over a
new connection: when a phone's TCP/TLS/WS connection is gone, the node gets 430 Flow Failed
at once (RFC 5626 5.3) instead of a connection attempt to the phone's ephemeral port and
Timer B.  The flows of registered phones are kept usable (:mod:`sipfarm.balancer.keepalive`):
a 2xx to a REGISTER holds the client's connection open for the registration's lifetime, or
enters its UDP flow in the OPTIONS keepalive table (one dict look-up per received message).

No usable node: 503 with Retry-After, answered here.  Nothing here waits on Redis: node
membership is read in the background into :class:`~sipfarm.balancer.nodes.NodeSet`.

Overload (:mod:`sipfarm.balancer.overload`): with an ``admission`` control, a new
out-of-dialog INVITE or REGISTER whose hashed node is overloaded goes to another node of its
pool that is not, and is answered 503 with a randomized Retry-After here when every one is
(counted by method in ``shed``).  Everything else (in-dialog requests, ACK, CANCEL, BYE,
responses, OPTIONS to the balancer) is never shed.  The node's first response to each
admitted request feeds the control its delay.

Static cluster (:mod:`sipfarm.balancer.groups`): with ``groups`` rules, a request hashed in
step 2 whose target account a rule pins to a group is hashed among that group's usable nodes
only, and answered 503 with Retry-After here when the group has none (counted per group in
``group_unavailable``); an unpinned one goes to the ungrouped nodes (see ``NodeSet``).  A
dialog whose node is gone is re-hashed within that node's group.  Without rules the only cost
is one check of ``self.groups``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sipfarm.balancer.frontdoor import FrontDoor
from sipfarm.balancer.groups import GroupRules
from sipfarm.balancer.keepalive import HOLD_MARGIN, KEEPALIVE_PREFIX, FlowGone, Probe, RegisteredFlows
from sipfarm.balancer.nodes import Health, NodeEntry, NodeSet
from sipfarm.balancer.overload import AdmissionControl
from sipfarm.edge import (
    DIALOG_CREATING,
    HOP_PREFIX,
    IDENTITY_HEADERS,
    ChallengeTags,
    FlowTokens,
    HopBranches,
    OwnRoutes,
    bracket,
    is_ip_literal,
    plain_route_parts,
    route_uri,
    sealed_route_parts,
    transaction_key,
)
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, ServiceUnavailable, SipError, TooLargeToForward, TooManyHops
from sipfarm.sip.headers import (
    MAX_HEADER_VALUE,
    MAX_VIA_PARM,
    HeaderError,
    display_name,
    first_element,
    tag_of,
    via_branch,
)
from sipfarm.sip.memo import MAX_CACHED_KEY, bounded_key
from sipfarm.sip.message import SipMessage, error_response, make_response
from sipfarm.sip.parser import max_forwards, parse_message
from sipfarm.sip.uri import MAX_URI, SipURI, URIError, parse_uri
from sipfarm.sip.via import default_port, stamp_received, via_sent_by
from sipfarm.transport.config import MAX_DATAGRAM
from sipfarm.transport.destinations import DestinationPolicy

try:  # built by scripts/build-compiled.sh only: the interpreted build forwards every response the general way
    from sipfarm.sip._fastparse import response_hop as _response_hop

    HAVE_RESPONSE_HOP = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_RESPONSE_HOP = False

try:  # the same for in-dialog requests routed by our own Route entries
    from sipfarm.sip._fastparse import request_out as _request_out
    from sipfarm.sip._fastparse import request_scan as _request_scan
    from sipfarm.sip._fastparse import stamp_via as _stamp_via

    HAVE_REQUEST_HOP = True
except ImportError:  # pragma: no cover - which branch runs depends on the build
    HAVE_REQUEST_HOP = False

log = logging.getLogger("sipfarm.balancer")

PROBE_PREFIX = b"z9hG4bKlbprobe"
PIN_SECONDS = 64 * 0.5  # Timer B: an INVITE is CANCELled or answered within it
PIN_LIMIT = 200_000
NEW_WORK = frozenset((b"INVITE", b"REGISTER"))  # what overload shedding admits or sheds
MAX_FORWARDS_ENTRY = 70  # RFC 3261 8.1.1.6: what a UA starts with; more on entry is capped
ENTRIES_CACHE_LIMIT = 100_000  # flows whose Record-Route/Path entries are remembered
_RECORD_ROUTE = display_name("record-route") + b": "  # a Record-Route line as to_bytes writes it


class FlowFailed(SipError):
    """430: the flow a token names is gone (RFC 5626 5.3 / 11.5)."""

    status = 430
    counter = "flow_failed"


class Overloaded(ServiceUnavailable):
    """503 + Retry-After: every node a new INVITE/REGISTER may go to is overloaded (shed)."""

    counter = "shed"


class DestinationRefused(SipError):
    """403: a Request-URI naming the farm itself, loopback or an internal network."""

    status = 403
    counter = "destination_refused"


@dataclass(slots=True)
class BalancerStats:
    to_node: int = 0
    to_client: int = 0
    responses: int = 0
    no_node: int = 0
    flow_failed: int = 0
    rehashed: int = 0
    dropped: int = 0  # messages not forwarded and not answered, for the reasons in ``drops``
    local: int = 0
    acks_ended: int = 0  # ACKs of a node's stateless challenge, ended here (ChallengeTags)
    acks_past_node: int = 0  # 2xx ACKs sent on to the callee's flow without the node (also to_client)
    client_paths_removed: int = 0  # REGISTERs from clients whose own Path entries were removed
    errors: dict[str, int] = field(default_factory=dict)
    # responses: not_ours (another element's Via), forged (branch not ours or not for this
    # response), bad_via, no_flow (the client's connection is gone), send_failed; requests:
    # ack_unsent (an ACK that could not be sent: there is no answering it)
    drops: dict[str, int] = field(default_factory=dict)
    # static cluster: requests answered 503 because their group had no usable node, by group
    group_unavailable: dict[str, int] = field(default_factory=dict)
    # overload: new requests answered 503 here because every node they may go to is
    # overloaded, by method
    shed: dict[str, int] = field(default_factory=dict)

    def flat(self) -> dict[str, int]:
        out = {
            k: getattr(self, k)
            for k in (
                "to_node",
                "to_client",
                "responses",
                "no_node",
                "flow_failed",
                "rehashed",
                "dropped",
                "local",
                "acks_ended",
                "acks_past_node",
                "client_paths_removed",
            )
        }
        out.update({f"error_{k}": v for k, v in self.errors.items()})
        out.update({f"dropped_{k}": v for k, v in self.drops.items()})
        return out

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.drops[reason] = self.drops.get(reason, 0) + 1


class BalancerCore:
    def __init__(
        self,
        nodes: NodeSet,
        tokens: FlowTokens,
        *,
        public: dict[str, Address],
        internal: Address,
        send: Callable[[bytes, Address, Address], bool] | None = None,
        send_response: Callable[[bytes, Address], bool] | None = None,
        retry_after: int = 5,
        aliases: frozenset[tuple[str, int]] = frozenset(),
        destinations: DestinationPolicy | None = None,
        hop_secret: bytes | None = None,
        registrations: RegisteredFlows | None = None,
        hold: Callable[[Address, float], bool] | None = None,
        hold_max: float = 7200.0,
        groups: GroupRules | None = None,
        front: FrontDoor | None = None,
        admission: AdmissionControl | None = None,
        shed_retry_after: tuple[int, int] = (1, 5),
        stamp_via: bool = False,
    ) -> None:
        """``send`` sends a request (may open a connection); ``send_response`` sends a response
        over an existing flow only (``TransportManager.send(..., connect=False)``).
        ``hop_secret`` signs the previous hop into our Via branches: the farm-wide flow secret,
        so any worker or balancer can route a response, and recognises the To tag of a node's
        stateless challenge, whose ACK ends here (:class:`ChallengeTags`).  ``destinations`` judges Request-URIs
        (default: loopback refused); our own addresses are added to it.
        ``registrations`` keeps registered flows usable (default: no UDP keepalives);
        ``hold(flow, seconds)`` keeps a client connection open that long
        (``TransportManager.hold_flow``), at most ``hold_max`` plus a margin.
        ``groups``: the static cluster's rules (none: any node serves any account).
        ``front``: scanner and domain checks of clients' requests (none: no checks here; its
        rate limits and bans apply before parsing, in the transport).
        ``admission``: overload shedding (none: never shed); a shed request's Retry-After is
        drawn from ``shed_retry_after`` (inclusive), so shed phones do not come back at once.
        ``stamp_via``: add received/rport to the top Via of clients' requests here (RFC 3261
        18.2.1, RFC 3581), for a transport told not to (``TransportConfig.stamp_via`` False):
        a node's requests need no stamp (answers to them are routed by our branch), so the
        balancer skips the work for them."""
        self.nodes = nodes
        self.tokens = tokens
        self.public = public  # transport -> our address facing clients
        self.internal = internal  # our UDP address facing nodes
        # send(data, dest, local): a request leaves from our socket ``local``, the one its Via
        # names, since the next hop answers to the source (RFC 3581); a worker's private port
        self.send: Callable[[bytes, Address, Address], bool] = send or (lambda data, dest, local: False)
        self.send_response: Callable[[bytes, Address], bool] = send_response or (lambda data, dest: False)
        self.retry_after = retry_after
        self.stats = BalancerStats()
        # every host:port meaning "this balancer" in a Route or Via (bound and advertised)
        self._ours = {(_bare(host), port) for host, port in _pairs((*public.values(), internal), aliases)}
        self.destinations = destinations if destinations is not None else DestinationPolicy()
        self.destinations.add_own(self._ours)
        farm_secret = hop_secret if hop_secret is not None else secrets.token_bytes(32)
        self.branches = HopBranches(farm_secret)
        self.challenge_tags = ChallengeTags(farm_secret)
        self.own_routes = OwnRoutes(self._ours_at, tokens)
        self.stamp_via = stamp_via
        # (transport, our address) -> the start of the Via we write, "SIP/2.0/UDP host:port;"
        self._via_prefixes: dict[tuple[str, Address], bytes] = {}
        self._our_via_starts: set[bytes] = set()  # the same, to recognise them in responses
        self._via_starts: tuple[bytes, ...] = ()  # the same, for response_hop (C)
        self._invites: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        # (client flow, path, facing client) -> our Record-Route/Path entries for it
        self._entries: dict[tuple[Address, bool, bool], tuple[bytes, ...]] = {}
        self._clock = time.monotonic
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._to_tag = secrets.token_hex(4).encode()  # our answers to clients' requests
        # our answers to nodes' requests (430 Flow Failed...): a node proxies them on to the
        # caller, whose ACK (same To tag) must go on to that node's server transaction
        self._node_to_tag = secrets.token_hex(4).encode()
        self.registrations = registrations if registrations is not None else RegisteredFlows(interval=0)
        self._registered_udp = self.registrations.flows  # read on every received message
        self.hold: Callable[[Address, float], bool] = hold or (lambda flow, seconds: False)
        self.hold_max = hold_max
        self.groups: GroupRules | None = groups if groups else None  # None: the one check per request
        self.front = front
        self.admission = admission
        self.shed_retry_after = shed_retry_after

    # -- entry point -----------------------------------------------------------------------------

    def on_message(self, msg: SipMessage, source: Address, local: Address) -> None:
        hop = source
        registered = self._registered_udp.get(source)
        if registered is not None:
            registered.heard = True  # a registered UDP phone is alive (keepalive table)
        try:
            if msg.status:
                node = self.nodes.sender(source, local)
                if node is not None:
                    node.heard = True  # alive, whatever its probes (see NodeSet.due_probes)
                self._on_response(msg)
            else:
                # responses go to the source: the connection, or the UDP address and port the
                # request came from (RFC 3581 rport, forced): never where a Via points
                from_node = self.nodes.sender(source, local) is not None
                if self.stamp_via and not from_node:
                    stamp_received(msg, source)
                front = self.front
                if (
                    front is not None
                    and not from_node
                    and not front.inspect(msg, source.host, self._names_us, self._clock(), source.transport != "udp")
                ):
                    return  # a scanner or a domain not served: dropped unanswered (counted there)
                self._on_request(msg, source, hop, from_node=from_node)
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
                from_node = self.nodes.sender(source, local) is not None
                answer = error_response(msg, exc, self._node_to_tag if from_node else self._to_tag)
                if answer is not None:
                    self.send_response(answer.to_bytes(), hop)

    # -- requests --------------------------------------------------------------------------------

    def _on_request(self, msg: SipMessage, source: Address, hop: Address, *, from_node: bool) -> None:
        # what the request says is read once here and handed down (Max-Forwards, the To tag,
        # the top Route left): no header list scanned twice for the same value
        hops = max_forwards(msg)
        if hops <= 0:
            if msg.method == b"OPTIONS" and not msg.has("route") and self._is_for_us(msg):
                # RFC 3261 16.3 step 3: an element may answer an OPTIONS for itself at 0
                # (monitoring sends Max-Forwards 0 so that nothing goes further)
                self._answer_locally(msg, hop)
                return
            raise TooManyHops("Max-Forwards reached 0", partial=msg)
        flow, route, plain = self.own_routes.pop(msg)
        method = msg.method
        if method == b"OPTIONS" and route is None and self._is_for_us(msg):
            # keep-alive probes of the balancer itself; anything else (a REGISTER sent to
            # sip:balancer-ip:port) is the farm's business and goes to a node
            self._answer_locally(msg, hop)
            return
        to_tag = msg.to_tag
        if method == b"ACK" and to_tag == (self._node_to_tag if from_node else self._to_tag):
            # the ACK of a non-2xx answered here (503 shed, no node): ends here too (RFC 3261
            # 17.2.1), no node knows that transaction
            self.stats.local += 1
            return
        if method == b"ACK" and not from_node and self.challenge_tags.matches(to_tag, hop, msg.call_id, msg.cseq[0]):
            # the ACK of a node's stateless 407 or 403: no node holds a transaction it could
            # match (the node would parse it and drop it), so it ends here, one crossing less
            self.stats.acks_ended += 1
            return
        if (
            method == b"ACK"
            and not from_node
            and route is not None
            and to_tag is not None
            and not msg.body
            and not any(msg.has(name) for name in IDENTITY_HEADERS)
        ):
            values = tuple(msg.values("route"))
            past = self._ack_past_node(values, 0, msg.call_id)
            if past is not None:
                callee, count = past
                for _ in range(count):
                    msg.pop_first_value("route")
                self._to_client(msg, callee, hop, min(hops, MAX_FORWARDS_ENTRY), to_tag, connect=False)
                self.stats.acks_past_node += 1
                return
        if flow is not None and from_node:
            # a token is an instruction only on the way to its client: the same Record-Route
            # entry comes back first in the route set of that client's own requests
            # over the flow or not at all: 430 at once when the connection is gone (RFC 5626 5.3)
            self._to_client(msg, self._udp_contact_or_flow(msg.uri, flow, to_tag), hop, hops, to_tag, connect=False)
            return
        if from_node:
            # from a node, no token of ours: an element outside the farm (its Request-URI)
            self._to_client(msg, self._uri_target(msg), hop, hops, to_tag)
            return
        # new work (admission control, the INVITE's pin): its Call-ID and CSeq number, the
        # pending request's key, made once here for _hash and _to_node
        txn = msg.call_id + b" %d" % msg.cseq[0] if to_tag is None and method in NEW_WORK else None
        node = self._route_node(msg, route, plain, to_tag, txn) if route is not None else None
        if node is None:
            node = self._pick(msg, to_tag, txn)
        self._to_node(msg, node, source, hop, hops, to_tag, txn)

    def _udp_contact_or_flow(self, request_uri: bytes, flow: Address, to_tag: bytes | None) -> Address:
        """For a UDP flow and a request without To tag, the Request-URI ``request_uri`` (the
        Contact) when it names the flow's own IP: the client is not behind NAT and may receive
        on another port than it sent from (a UA whose registrar client and UAS are separate
        sockets).  Otherwise (a Request-URI that does not parse included), and always for
        connection flows, the flow itself (NAT binding or connection, RFC 5626 5.3).  Read
        from the URI's bytes, so that the general path and :meth:`forward_request` share it."""
        if flow.transport != "udp" or to_tag is not None:
            return flow
        try:
            uri = parse_uri(request_uri)  # memoised: msg.request_uri's parse, without its 400/416
        except URIError:
            return flow
        return self._udp_contact(flow, uri)

    def _udp_contact(self, flow: Address, uri: object) -> Address:
        if isinstance(uri, SipURI) and uri.host.strip("[]") == flow.host and uri.transport == "udp":
            contact = Address("udp", flow.host, uri.port or default_port("udp"))
            if self.destinations.permits(contact) and not self._is_node(contact):
                return contact
        return flow

    def _route_node(
        self,
        msg: SipMessage,
        top: bytes,
        plain: tuple[bytes, str, int] | None,
        to_tag: bytes | None,
        txn: bytes | None,
    ) -> NodeEntry | None:
        """The node named by the top Route ``top`` while usable (None: pick one by hash);
        ``plain``: what ``plain_route_parts`` read of ``top`` already, if it did."""
        if plain is None:
            plain = plain_route_parts(top)  # the node's entry, as written: read, not parsed
        if plain is not None:
            host, port = plain[1], plain[2]
        else:
            uri = route_uri(msg, top)
            if uri is None:
                return None
            host, port = uri.host.strip("[]"), uri.port or default_port(uri.transport)
        node = self.nodes.by_address(host, port)
        if node is None:
            if not self.nodes.departed(host, port):
                return None  # not a node of ours: an element outside the farm
        elif node.health is Health.UP:
            return node  # a draining node still finishes its dialogs
        # the dialog continues on any node: the dead node's Record-Route stays on top, sealed
        # for this Call-ID, and the node picked by hash takes it as the farm's own
        self.stats.rehashed += 1
        if self.groups is None:
            return None
        # static cluster: any node of the dead node's group (its Request-URI is a Contact, not
        # the account the rules match)
        group = node.group if node is not None else self.nodes.departed_group(host, port)
        return self._hash(msg, group, to_tag, txn)

    def _ack_past_node(self, routes: tuple[bytes, ...], count: int, call_id: bytes) -> tuple[Address, int] | None:
        """The callee's flow and how many leading Route elements to remove, for a client's ACK
        whose elements from ``count`` on are a node's Record-Route entry sealed for ``call_id``
        (a node of the farm's, present or departed) followed only by entries of ours, one with
        a flow token: the route set of a dialog the farm set up to a phone registered here.
        The node would forward that ACK back here unchanged but for its Via and Max-Forwards
        (an ACK for a 2xx is stateless in a proxy, RFC 3261 16.11), so it goes to the flow at
        once.  None for anything else (the node's business, as before): a seal that does not
        verify, an entry in another shape, another element after the node's, an invalid
        token, no token."""
        if count >= len(routes):
            return None
        parts = sealed_route_parts(routes[count])
        if parts is None:
            return None
        user, host, port, seal = parts
        if user or not (self.nodes.by_address(host, port) is not None or self.nodes.departed(host, port)):
            return None
        if not self.tokens.seal_matches(seal, host, port, call_id):
            return None
        rest = routes[count + 1 :]
        popped = self.own_routes.pop_values(rest, call_id)
        if popped is None:
            return None
        flow, taken, _, _ = popped
        if flow is None or taken != len(rest):
            return None
        return flow, count + 1 + taken

    def _pick(self, msg: SipMessage, to_tag: bytes | None, txn: bytes | None) -> NodeEntry:
        if msg.method in (b"CANCEL", b"ACK"):
            entry = self._pinned(msg.call_id, msg.cseq[0])
            if entry is not None:
                return entry
        return self._hash(msg, self.groups.group_of(msg) if self.groups is not None else None, to_tag, txn)

    def _pinned(self, call_id: bytes, seq: int) -> NodeEntry | None:
        """The node holding the INVITE transaction (Call-ID, CSeq number) while up, even if
        the node set changed since (see :meth:`_pin_invite`)."""
        pinned = self._invites.get(bounded_key(call_id + b" %d" % seq))
        if pinned is not None:
            entry = self.nodes.nodes.get(pinned[0])
            if entry is not None and entry.health is Health.UP:
                return entry
        return None

    def _pinned_or_hashed(self, call_id: bytes, seq: int) -> NodeEntry | None:
        """:meth:`_pick` of an ACK or CANCEL without static-cluster groups (None: no node;
        the general path answers 503 and counts it)."""
        entry = self._pinned(call_id, seq)
        return entry if entry is not None else self.nodes.pick(call_id)

    def _hash(self, msg: SipMessage, group: str | None, to_tag: bytes | None, txn: bytes | None) -> NodeEntry:
        """The node by consistent hash, among the nodes of ``group`` if not None; ``txn``: a
        new INVITE/REGISTER's Call-ID and CSeq number (None: not new work)."""
        method = msg.method
        call_id = msg.call_id
        key = self._aor_key(msg) if method == b"REGISTER" else call_id
        if group is None:
            node = self.nodes.pick(key)
            if node is None:
                self.stats.no_node += 1
                raise ServiceUnavailable("no node available", retry_after=self.retry_after, partial=msg)
        else:
            node = self.nodes.pick_in(group, key)
            if node is None:
                unavailable = self.stats.group_unavailable
                unavailable[group] = unavailable.get(group, 0) + 1
                raise ServiceUnavailable(f"no node of group {group}", retry_after=self.retry_after, partial=msg)
        admission = self.admission
        if admission is not None and txn is not None:
            pending = admission.pending_node(txn)
            if pending is None:
                node = self._admit(msg, node, group, admission)
                admission.admitted(call_id, node.id, self._clock())
            elif pending != node.id:
                # a retransmission follows its original, which was diverted to another node
                entry = self.nodes.nodes.get(pending)
                if entry is not None and entry.usable:
                    node = entry
        if txn is not None and method == b"INVITE":
            self._pin_invite(txn, node)
        return node

    def _admit(self, msg: SipMessage, node: NodeEntry, group: str | None, admission: AdmissionControl) -> NodeEntry:
        """``node`` when it is not overloaded, else the least loaded other node of the pool
        that is not; none: shed (503 + Retry-After, answered here)."""
        # credentials: the second half of work already begun (a challenged INVITE/REGISTER)
        credentials = _has_credentials(msg)
        if credentials:
            first = admission.follow_up(msg.call_id, self._clock())
            if first is not None:  # its challenge came from that node: finish the call there
                entry = self.nodes.nodes.get(first)
                if entry is not None and entry.usable:
                    return entry
        if not admission.overloaded(node.id, credentials=credentials):
            return node
        best: NodeEntry | None = None
        best_fill = 0.0
        for node_id in self.nodes.pool(group):
            if node_id == node.id or admission.overloaded(node_id, credentials=credentials):
                continue
            entry = self.nodes.nodes.get(node_id)
            if entry is None:
                continue
            load = admission.nodes.get(node_id)
            fill = 0.0 if load is None else len(load.pending) / load.limit
            if best is None or fill < best_fill:
                best, best_fill = entry, fill
        if best is not None:
            admission.stats.diverted += 1
            return best
        method = msg.method.decode("latin-1")
        self.stats.shed[method] = self.stats.shed.get(method, 0) + 1
        low, high = self.shed_retry_after
        raise Overloaded("every node overloaded", retry_after=random.randint(low, high), partial=msg)

    def _pin_invite(self, key: bytes, node: NodeEntry) -> None:
        """Soft state, bounded in size and age: which node an initial INVITE (Call-ID and CSeq
        number ``key``) went to, so its CANCEL and non-2xx ACK follow it across a change of
        the node set (losing it only falls back to hashing)."""
        invites = self._invites
        now = self._clock()
        invites[bounded_key(key)] = (node.id, now + PIN_SECONDS)  # a long Call-ID: 17 bytes
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

    def _to_node(
        self,
        msg: SipMessage,
        node: NodeEntry,
        source: Address,
        hop: Address,
        hops: int,
        to_tag: bytes | None,
        txn: bytes | None,
    ) -> None:
        """``txn``: a new INVITE/REGISTER's Call-ID and CSeq number (None: not new work)."""
        dest = node.address
        client_flow = source
        method = msg.method
        hops = min(hops, MAX_FORWARDS_ENTRY)  # capped on entry, decremented below
        # _own_entries lists top first, the node-facing entry (our internal UDP address) on
        # top, so that the node's requests to the client come to it
        register = method == b"REGISTER"
        if register:
            # RFC 3327: stay on the path to this UA (token = its flow). A client's own Path
            # entries go: Path is the proxies' between a UA and its registrar, and the farm's
            # edge is here; kept, they were stored in the binding and sent back as the Route of
            # every request to it (64 entries of 900 bytes: 57 KB per branch, ~3,800 times what
            # the subscriber sent, red team 2026-12-03)
            if msg.has("path"):
                msg.remove("path")
                self.stats.client_paths_removed += 1
            msg.prepend_values("path", self._own_entries(client_flow, dest.transport, path=True))
        elif method in DIALOG_CREATING and to_tag is None:
            msg.prepend_values("record-route", self._own_entries(client_flow, dest.transport, call_id=msg.call_id))
        self._forward(msg, dest, self.internal, hop, hops)
        if register:  # sent: its 2xx may come (one refused as too large is not remembered)
            self.registrations.on_register(client_flow, msg)
        self.stats.to_node += 1
        admission = self.admission
        if admission is not None and txn is not None:
            admission.sent(txn, node.id, self._clock())

    def _to_client(
        self, msg: SipMessage, flow: Address, hop: Address, hops: int, to_tag: bytes | None, *, connect: bool = True
    ) -> None:
        """A request from a node to a client (Record-Routed when it creates a dialog)."""
        entries = self._client_record_route(msg.method, flow, to_tag, msg.call_id)
        if entries:
            msg.prepend_values("record-route", entries)
        facing = self.public.get(flow.transport) or self.internal
        self._forward(msg, flow, facing, hop, hops, flow_failure=True, connect=connect)
        self.stats.to_client += 1

    def _client_record_route(
        self, method: bytes, flow: Address, to_tag: bytes | None, call_id: bytes
    ) -> tuple[bytes, ...]:
        """Our Record-Route entries (top first) for a node's request to the client on ``flow``:
        those of a dialog-creating request (no To tag), the client-facing entry on top; none
        for the rest."""
        if method in DIALOG_CREATING and to_tag is None:
            return self._own_entries(flow, flow.transport, facing_client=True, call_id=call_id)
        return ()

    def _forward(
        self,
        msg: SipMessage,
        dest: Address,
        via_address: Address,
        hop: Address,
        hops: int,
        *,
        flow_failure: bool = False,
        connect: bool = True,
    ) -> None:
        """Send ``msg`` on with Max-Forwards ``hops - 1`` (RFC 3261 16.6 step 3) and our Via."""
        msg.set("max-forwards", b"%d" % (hops - 1))
        msg.prepend("via", self._via(msg, dest.transport, via_address, hop))
        if self._debug:
            log.debug(
                "event=forward method=%s call_id=%s dest=%s",
                msg.method.decode("latin-1"),
                msg.call_id.decode("latin-1"),
                dest,
            )
        data = msg.to_bytes()
        if len(data) > MAX_DATAGRAM and not dest.reliable:
            # no datagram carries it (a request near the limit on entry, grown by our Via and
            # Record-Route): 513 here, before admission control counts it as sent to a node
            msg.pop_first_value("via")
            if msg.method == b"ACK":
                self.stats.drop("ack_too_large")
                return
            raise TooLargeToForward(f"{len(data)} bytes", partial=msg)
        # ``send_response`` never dials: the flow that exists, or nothing
        sent = self.send(data, dest, via_address) if connect or not dest.reliable else self.send_response(data, dest)
        if not sent:
            if msg.method == b"ACK":
                self.stats.drop("ack_unsent")  # nothing to answer an ACK with
                return
            msg.pop_first_value("via")
            if flow_failure:
                self.stats.flow_failed += 1
                raise FlowFailed("the client's flow is gone", partial=msg)
            raise ServiceUnavailable("node unreachable", retry_after=self.retry_after, partial=msg)

    def _via(self, msg: SipMessage, transport: str, via_address: Address, hop: Address) -> bytes:
        # RFC 3261 16.11: the same incoming branch (and hop) gives the same outgoing one, so the
        # CANCEL and the ACK of a non-2xx (which carry their INVITE's branch, 17.1.1.3) match
        # the INVITE's transaction upstream; an ACK for a 2xx has a branch of its own anyway
        return self._via_with(transaction_key(msg, msg.top_via_value), transport, via_address, hop)

    def _via_with(self, key: bytes, transport: str, via_address: Address, hop: Address) -> bytes:
        """Our Via for a request whose transaction key is ``key`` (see :meth:`_via`)."""
        branch = self.branches.encode(hop, key)
        prefix = self._via_prefixes.get((transport, via_address))
        if prefix is None:
            prefix = b"SIP/2.0/%s %s:%d;" % (transport.upper().encode(), _host(via_address).encode(), via_address.port)
            # one per (transport, address of ours): bounded by the listeners
            self._via_prefixes[(transport, via_address)] = prefix
            self._our_via_starts.add(prefix)
            self._via_starts = tuple(self._our_via_starts)
        return prefix + b"branch=" + branch

    def _sent_by_us(self, top: bytes) -> bool:
        """Whether the via-parm ``top`` names this balancer (RFC 3261 18.1.2)."""
        semi = top.find(b";")
        if semi > 0 and top[: semi + 1] in self._our_via_starts and top.find(b'"') < 0 and top.find(b"[") < 0:
            # the very start of a Via we write: what via_sent_by reads from it is ours
            return True
        host, port = via_sent_by(top)
        return (_bare(host), port) in self._ours

    def _own_entries(
        self,
        client_flow: Address,
        node_transport: str,
        *,
        path: bool = False,
        facing_client: bool = False,
        call_id: bytes = b"",
    ) -> tuple[bytes, ...]:
        """Our Path (``path``) or Record-Route values, top first: the entry facing the
        receiver on top.

        The client-facing entry carries the client's flow token; when client and node sides
        are the same socket one entry does (RFC 5658 double Record-Route otherwise).  A Path's
        token is the flow's, the same for every REGISTER: its entries are remembered (bounded).
        A Record-Route's is a dialog token, valid with ``call_id`` only (``FlowTokens.encode``:
        both parties of a call see it): made for each dialog.
        """
        if not path:
            return self._make_entries(client_flow, path=False, facing_client=facing_client, call_id=call_id)
        key = (client_flow, path, facing_client)
        entries = self._entries.get(key)
        if entries is None:
            entries = self._make_entries(client_flow, path=path, facing_client=facing_client)
            if len(self._entries) >= ENTRIES_CACHE_LIMIT:
                self._entries.clear()  # a miss only costs formatting them again
            self._entries[key] = entries
        return entries

    def _make_entries(
        self, client_flow: Address, *, path: bool, facing_client: bool, call_id: bytes = b""
    ) -> tuple[bytes, ...]:
        pub = self.public.get(client_flow.transport) or self.internal
        token = self.tokens.encode(client_flow, pub.host, pub.port, call_id)
        params = ";lr" + ("" if client_flow.transport == "udp" else f";transport={client_flow.transport}")
        if path:
            params += ";ob"
        client_entry = b"<sip:%s@%s:%d%s>" % (token.encode(), _host(pub).encode(), pub.port, params.encode())
        if pub == self.internal and client_flow.transport == "udp":
            return (client_entry,)
        # sealed as the farm's (RFC 5658 entry facing the nodes): a node takes the balancer as
        # a farm element when a dialog or a Path routes through it, whatever its network
        seal = self.tokens.seal(self.internal.host, self.internal.port).encode()
        node_entry = b"<sip:%s:%d;lr;sf=%s>" % (_host(self.internal).encode(), self.internal.port, seal)
        if facing_client:
            return (client_entry, node_entry)
        return (node_entry, client_entry)

    def flow_token(self, flow: Address) -> str:
        """The token our Path entries carry for ``flow`` (a Record-Route's is a dialog token:
        :meth:`_make_entries`)."""
        pub = self.public.get(flow.transport) or self.internal
        return self.tokens.encode(flow, pub.host, pub.port)

    def _names_us(self, uri: SipURI) -> bool:
        return (_bare(uri.host), uri.port or default_port(uri.transport)) in self._ours

    def _ours_at(self, host: str, port: int) -> bool:
        return (_bare(host), port) in self._ours

    def _is_node(self, dest: Address) -> bool:
        return self.nodes.by_address(dest.host, dest.port) is not None

    def _uri_target(self, msg: SipMessage) -> Address:
        uri = msg.request_uri
        if not isinstance(uri, SipURI):
            raise BadMessage("Request-URI is not a SIP URI", partial=msg)
        host = (uri.param("maddr") or uri.host).strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        if not is_ip_literal(host):
            raise ServiceUnavailable(f"cannot resolve {host}", retry_after=None, partial=msg)
        dest = Address(uri.transport, host, uri.port or default_port(uri.transport))
        # the Request-URI is whatever the request's sender wrote: never the farm itself (a
        # loop), loopback or an internal network unless the operator allows it
        if not self.destinations.permits(dest) or self._is_node(dest):
            raise DestinationRefused("destination not allowed", partial=msg)
        return dest

    def _is_for_us(self, msg: SipMessage) -> bool:
        try:
            uri = msg.request_uri
        except (SipError, URIError):
            return False
        return isinstance(uri, SipURI) and uri.user is None and self._names_us(uri)

    def _answer_locally(self, msg: SipMessage, hop: Address) -> None:
        """OPTIONS keep-alives (and anything else) addressed to the balancer itself."""
        self.stats.local += 1
        if msg.method == b"ACK":
            return
        status = 200 if msg.method == b"OPTIONS" else 405
        reply = make_response(msg, status, to_tag=self._to_tag, headers=(("allow", b"OPTIONS"),))
        self.send_response(reply.to_bytes(), hop)

    # -- requests routed by our own Route entries, from their bytes ---------------------------

    def request_fast_path(self) -> Callable[[bytes, Address, Address, int], bool] | None:
        """What ``TransportManager.fast_request`` is set to: :meth:`forward_request` when the
        C reader exists (the compiled build), else None (every request the general way)."""
        return self.forward_request if HAVE_REQUEST_HOP else None

    def forward_request(self, data: bytes, source: Address, local: Address, max_size: int) -> bool:
        """The common request routed by our own Route entries, forwarded from its bytes: in a
        dialog (a client's ACK or BYE to its node, a node's to the client its flow token
        names), or a node's initial request to the client its token names (an INVITE routed
        by our Path entry: Record-Routed here as on the general path).  False when it is not
        (the caller then parses it and calls :meth:`on_message`).

        ``request_scan`` (sipfarm/sip/_fastparse.c) takes only a request the general path
        would parse to the same pieces (CRLF only, ``name: value`` lines, no compact or
        repeated single headers, Route values ``<...>`` only, one via-parm on the first Via
        line, no REGISTER, OPTIONS, Path or Expires...) and returns them; every decision is
        taken here as there, with the same functions: the To tag (``tag_of``), the Route
        entries that are ours and their token (``OwnRoutes.pop_values``), the node a Route
        names (up: else the general path, which re-hashes), the client's address
        (``_udp_contact_or_flow``) and our Record-Route entries (``_client_record_route``) for
        a request without To tag, the stamp, the branch, the front door's User-Agent check.
        A client's request without To tag (new work: hashed, admitted) and anything the
        general path would answer, re-hash, parse further or log (debug) is declined before
        any side effect; ``request_out`` then writes the very bytes ``to_bytes`` would (our
        Record-Route lines where ``prepend`` puts them), and the same counters, drops and
        error answers follow."""
        if self._debug:
            return False
        found = _request_scan(data, max_size)
        if found is None:
            return False
        method, uri, to_value, routes, mf, top_via, call_id, seq, agent = found
        if len(top_via) > MAX_VIA_PARM or len(to_value) > MAX_HEADER_VALUE or len(uri) > MAX_URI:
            return False  # over the parser's bounds (sip/headers.py): the general path's 400
        try:
            to_tag = tag_of(to_value)
        except HeaderError:
            return False
        if method == b"ACK" and to_tag in (self._to_tag, self._node_to_tag):
            return False  # the ACK of an answer of ours: the general path
        from_node = self.nodes.sender(source, local) is not None
        if to_tag is None and not from_node:
            return False  # a client's new work: hashed, admitted and Record-Routed there
        hops = int(mf)
        if hops <= 0:
            return False  # TooManyHops, answered there
        popped = self.own_routes.pop_values(routes, call_id)
        if popped is None:
            return False
        if method == b"ACK" and not from_node and self.challenge_tags.matches(to_tag, source, call_id, seq):
            # the ACK of a node's stateless challenge ends here, as on the general path, after
            # the same side effects (a registered flow heard, the front door's check)
            registered = self._registered_udp.get(source)
            if registered is not None:
                registered.heard = True
            front = self.front
            if front is None or front.inspect_in_dialog(agent, source.host, self._clock(), source.transport != "udp"):
                self.stats.acks_ended += 1
            return True
        flow, count, route, plain = popped
        node: NodeEntry | None = None
        past: tuple[Address, int] | None = None  # a 2xx ACK's way past the node (_ack_past_node)
        record_route = b""
        if count == 0:
            if routes or method != b"ACK":
                return False  # not routed by us
            # the ACK of a non-2xx (no Route: RFC 3261 17.1.1.3) from a client: its INVITE's node
            if self.groups is not None or from_node:
                return False  # a group to read from the message, or a node's: the general path
            node = self._pinned_or_hashed(call_id, seq)
            if node is None:
                return False  # no node: 503, answered there
        if from_node:
            if flow is None:
                return False  # to its Request-URI: the destination policy's case
            dest = self._udp_contact_or_flow(uri, flow, to_tag)
            entries = self._client_record_route(method, dest, to_tag, call_id)
            if entries:
                record_route = b"".join([_RECORD_ROUTE + value + b"\r\n" for value in entries])
            via_address = self.public.get(dest.transport) or self.internal
            connect = False
        else:
            if method == b"ACK" and node is None and route is not None and to_tag is not None:
                past = self._ack_past_node(routes, count, call_id)
                if past is not None and (data.find(b"\r\n\r\n") != len(data) - 4 or _names_identity(data)):
                    return False  # a body, or an identity header the node strips: the general path
            if past is not None:
                dest, count = past
                via_address = self.public.get(dest.transport) or self.internal
                connect = False
            else:
                if node is None:
                    if route is None:
                        return False  # hashed: the general path picks
                    if plain is None:
                        plain = plain_route_parts(route)
                        if plain is None:
                            return False
                    node = self.nodes.by_address(plain[1], plain[2])
                    if node is None or node.health is not Health.UP:
                        return False  # not a node of ours, or re-hashed: the general path
                dest = node.address
                via_address = self.internal
                connect = True
            hops = min(hops, MAX_FORWARDS_ENTRY)
            if self.stamp_via:
                stamped = _stamp_via(top_via, source.host.encode("ascii"), source.port)
                if stamped is False:
                    return False  # the via parser's case
                if isinstance(stamped, bytes):
                    top_via = stamped
        try:
            key = via_branch(top_via) or call_id + b" %d" % seq
        except HeaderError:
            return False
        via = self._via_with(key, dest.transport, via_address, source)
        out = _request_out(data, max_size, count, b"%d" % (hops - 1), via, top_via, record_route)
        if out is None or (len(out) > MAX_DATAGRAM and not dest.reliable):
            return False  # (too large: 513, answered there)
        # the general path's side effects, in its order (on_message, _on_request, _forward)
        registered = self._registered_udp.get(source)
        if registered is not None:
            registered.heard = True
        front = self.front
        if (
            front is not None
            and not from_node
            and not front.inspect_in_dialog(agent, source.host, self._clock(), source.transport != "udp")
        ):
            return True  # a scanner: dropped unanswered (counted there)
        sent = self.send(out, dest, via_address) if connect or not dest.reliable else self.send_response(out, dest)
        if not sent:
            if method != b"ACK":
                self._fast_request_failed(data, source, max_size, from_node)
                return True
            self.stats.drop("ack_unsent")  # nothing to answer an ACK with
        if from_node or past is not None:
            self.stats.to_client += 1
            if past is not None:
                self.stats.acks_past_node += 1
        else:
            self.stats.to_node += 1
        return True

    def _fast_request_failed(self, data: bytes, source: Address, max_size: int, from_node: bool) -> None:
        """A request of :meth:`forward_request` not sent: the general path's 430 (to a client)
        or 503 (to a node), counted and answered from the request as it would have it."""
        msg = parse_message(data, max_size=max_size)
        if self.stamp_via and not from_node:
            stamp_received(msg, source)
        exc: SipError
        if from_node:
            self.stats.flow_failed += 1
            exc = FlowFailed("the client's flow is gone", partial=msg)
        else:
            exc = ServiceUnavailable("node unreachable", retry_after=self.retry_after, partial=msg)
        self.stats.errors[exc.counter] = self.stats.errors.get(exc.counter, 0) + 1
        answer = error_response(msg, exc, self._node_to_tag if from_node else self._to_tag)
        if answer is not None:
            self.send_response(answer.to_bytes(), source)

    # -- responses -------------------------------------------------------------------------------

    def response_fast_path(self) -> Callable[[bytes, Address, Address, int], bool] | None:
        """What ``TransportManager.fast_response`` is set to: :meth:`forward_response` when the
        C reader exists (the compiled build), else None (every response the general way)."""
        return self.forward_response if HAVE_RESPONSE_HOP else None

    def forward_response(self, data: bytes, source: Address, local: Address, max_size: int) -> bool:
        """The common response, forwarded from its bytes: False when it is not (the caller then
        parses it and calls :meth:`on_message`).

        ``response_hop`` (sipfarm/sip/_fastparse.c) takes only a response the general path
        would forward with the very bytes it makes (CRLF only, ``name: value`` lines, single
        headers once, Content-Length equal to the body, one of our Vias on top with nothing
        after its branch but more via-parms, a next Via with a branch, no 2xx to a
        REGISTER...), and cuts our via-parm out.  Its branch is verified here as there
        (``HopBranches.decode`` with the next Via's branch), and the same counters and side
        effects follow: the same datagram to the same hop, or the same drop.  Messages that
        are not that shape, probes, keepalives, and everything when debug logging is on take
        the general path."""
        if self._debug or data.startswith(b"430 ", 8):
            return False  # a 430 may have to become 480 (_on_response)
        found = _response_hop(data, self._via_starts, HOP_PREFIX, max_size)
        if found is None:
            return False
        out, branch, key, pending = found
        registered = self._registered_udp.get(source)
        if registered is not None:
            registered.heard = True
        node = self.nodes.sender(source, local)
        if node is not None:
            node.heard = True
        dest = self.branches.decode(branch, key)
        if dest is None:
            self.stats.drop("forged")
            return True
        admission = self.admission
        if admission is not None and pending is not None:
            admission.answered(pending, self._clock())
        if self.send_response(out, dest):
            self.stats.responses += 1
        else:
            self.stats.drop("no_flow" if dest.reliable else "send_failed")
        return True

    def _on_response(self, msg: SipMessage) -> None:
        try:
            # our via-parm and what follows it on its line, read once (first_element) for the
            # checks and the removal below; odd values (a quoted string...) the general way
            at, top, rest = _split_top_via(msg)
            if at < 0:
                top = msg.top_via_value
            branch = via_branch(top) or b""
            if branch.startswith(PROBE_PREFIX):
                self.on_probe_response(branch)
                return
            if branch.startswith(KEEPALIVE_PREFIX):
                self.registrations.on_probe_response(branch)  # consumed: never forwarded
                return
            if not self._sent_by_us(top):
                self.stats.drop("not_ours")  # RFC 3261 18.1.2: discard
                return
            if at < 0:
                msg.pop_first_value("via")
            elif rest:
                header = msg.headers[at]
                msg.headers[at] = (header[0], header[1], rest)
            else:
                del msg.headers[at]
            key = transaction_key(msg, msg.top_via_value)
        except (SipError, HeaderError):
            self.stats.drop("bad_via")
            return
        # RFC 3261 16.7 step 3 / 18.2.2: the hop we recorded, never one the response names
        dest = self.branches.decode(branch, key)
        if dest is None:
            self.stats.drop("forged")
            if self._debug:
                log.debug("event=response_dropped reason=forged call_id=%s", msg.call_id.decode("latin-1"))
            return
        if self._debug:
            log.debug(
                "event=forward_response status=%d call_id=%s dest=%s", msg.status, msg.call_id.decode("latin-1"), dest
            )
        admission = self.admission
        if admission is not None:
            method = msg.cseq[1]
            if method in NEW_WORK:
                # the node's first answer to a new request: its delay (see overload.py)
                admission.answered(msg.call_id + b" %d" % msg.cseq[0], self._clock())
        if msg.status == 430 and self.nodes.by_address(dest.host, dest.port) is None:
            # RFC 5626 11.5: 430 Flow Failed is between proxies, never for a phone (a node
            # forwards the one of an in-dialog request's flow as it came)
            msg.status, msg.reason = 480, b"Temporarily Unavailable"
        if self.send_response(msg.to_bytes(), dest):
            self.stats.responses += 1
            if msg.cseq[1] == b"REGISTER" and 200 <= msg.status < 300:
                self._registered(dest, msg)
        else:
            self.stats.drop("no_flow" if dest.reliable else "send_failed")

    def _registered(self, flow: Address, msg: SipMessage) -> None:
        """A 2xx to a client's REGISTER went out on ``flow``: keep that flow usable while the
        registration lasts (held connection, or UDP keepalives), or let it go (expires 0)."""
        reg = self.registrations.on_register_ok(flow, msg, self._clock())
        if reg is None or not flow.reliable:
            return
        # RFC 5626 5.3: requests for the phone can reach it over this connection only
        seconds = min(float(reg.expires), self.hold_max) + HOLD_MARGIN if reg.expires > 0 else 0.0
        self.hold(flow, seconds)

    # -- keepalives ------------------------------------------------------------------------------

    def keepalive_tick(self, now: float) -> list[FlowGone]:
        """Send the OPTIONS keepalives that are due; the phones found gone (``now``: the
        clock of ``_clock``).  The caller removes their bindings."""
        gone: list[FlowGone] = []
        for action in self.registrations.handle_timer(now):
            if isinstance(action, Probe):
                self._send_keepalive(action)
            else:
                gone.append(action)
        return gone

    def _send_keepalive(self, probe: Probe) -> None:
        """An ordinary OPTIONS to the phone's contact (RFC 3261 11), from the balancer, over
        the flow (or to its contact's port when the phone is not behind NAT, see
        ``_udp_contact_or_flow``); its answer comes back here by its branch."""
        pub = self.public.get("udp") or self.internal
        try:
            dest = self._udp_contact(probe.flow, parse_uri(probe.contact))
        except ValueError:  # URIError
            dest = probe.flow
        contact = probe.contact.encode("latin-1", "replace")
        data = (
            b"OPTIONS %s SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=%s;rport\r\nMax-Forwards: 70\r\n"
            b"From: <sip:balancer@%s>;tag=%s\r\nTo: <sip:%s>\r\nCall-ID: %s\r\nCSeq: 1 OPTIONS\r\n"
            b"Content-Length: 0\r\n\r\n"
        ) % (
            contact, _host(pub).encode(), pub.port, probe.branch, _host(pub).encode(), self._to_tag,
            probe.aor.encode("latin-1", "replace"), probe.branch[len(KEEPALIVE_PREFIX):],
        )  # fmt: skip
        self.send(data, dest, pub)

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
            _host(node.address).encode(), node.address.port, _host(addr).encode(), addr.port, branch,
            _host(addr).encode(), self._to_tag, _host(node.address).encode(), node.address.port, branch,
        )  # fmt: skip
        if not self.send(msg, node.address, self.internal):
            self.nodes.mark_down(node)
        return branch


# with Identity's compact form ("y", RFC 8224): any line starting with y declines (rare, safe)
_IDENTITY_NAMES = (*(b"\n" + name.encode() for name in IDENTITY_HEADERS), b"\ny")


def _names_identity(data: bytes) -> bool:
    """Whether the message ``data`` may carry one of :data:`~sipfarm.edge.IDENTITY_HEADERS` (a header line
    starting with its name, in any case)."""
    lower = data.lower()
    return any(lower.find(name) >= 0 for name in _IDENTITY_NAMES)


def _has_credentials(msg: SipMessage) -> bool:
    """Whether ``msg`` has a Proxy-Authorization or Authorization header: one pass."""
    # a tuple literal: compiled as two comparisons, cheaper here than a frozenset's hash
    return any(key in ("proxy-authorization", "authorization") for key, _, _ in msg.headers)


def _split_top_via(msg: SipMessage) -> tuple[int, bytes, bytes]:
    """(index of the first Via line, its first via-parm, the rest of that line stripped: what
    ``pop_first_value`` leaves of it) read with one ``first_element``; index -1 when the
    value needs the general reader (a quoted string, an empty element) or there is no Via."""
    headers = msg.headers
    for i in range(len(headers)):
        header = headers[i]
        if header[0] == "via":
            value = header[2]
            if value.find(b",") < 0:
                return i, value, b""
            found = first_element(value)
            if found is None:
                return -1, b"", b""
            return i, found[0], found[1]
    return -1, b"", b""


def _bare(host: str) -> str:
    """A host as compared with our own addresses: no brackets, IPv6 in its canonical form."""
    # a host off the wire (a Via's, a Route's) may be as long as a message: short ones remembered
    return _bare_cached(host) if len(host) <= MAX_CACHED_KEY else _canonical_host(host)


@functools.lru_cache(maxsize=1024)
def _bare_cached(host: str) -> str:
    return _canonical_host(host)


def _canonical_host(host: str) -> str:
    host = host.strip("[]").lower()
    if ":" in host:
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return host
    return host


def _pairs(addresses: Iterable[Address], aliases: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(a.host, a.port) for a in addresses] + list(aliases)


def _host(addr: Address) -> str:
    return bracket(addr.host)
