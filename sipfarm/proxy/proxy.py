"""The RFC 3261 section 16 proxy of a node, as a sans-IO transaction user.

Theory of operation
-------------------
The node hands the proxy every request that is not a REGISTER, inside its server transaction,
and every response; the proxy answers through :class:`~sipfarm.element.Element` and sends
through the transaction layer.  It never does I/O: Redis (accounts, bindings) is reached
through callback-style stores, names through an injected resolver, media through the
:class:`~sipfarm.proxy.media.MediaHook`.  Its one timer, Timer C (16.6 step 11, 16.8), is
exposed with :meth:`Proxy.next_deadline` / :meth:`Proxy.handle_timer` like the transaction
layer's.

* initial requests (no To tag): 407 challenge (statelessly when there are no credentials),
  else caller account + callee bindings + callee account in one pipeline; then parallel and
  serial (q-value) forking over the bindings, Record-Route on dialog-creating requests
  (RFC 5658 double entries when the transport changes), best-response selection (16.7).
* in-dialog requests (To tag) and ACK for 2xx: loose routing by the Route set alone (16.12),
  so any node continues any dialog: nodes hold no dialog state.
* CANCEL: 200, and CANCEL of every branch that has heard a provisional (16.10, 9.1).
* GRUUs (RFC 5627 6.1): a Request-URI with ``gr`` reaches the bindings of that one instance,
  initial or in dialog (a GRUU as a dialog's remote target; with no Route too, for a UA that
  ignored the Record-Route: authenticated like an initial request, ACK aside), from any node:
  a temporary GRUU
  decodes with the farm secret (:mod:`sipfarm.registrar.gruu`), the bindings are in Redis.
  One ``bytes.find`` is all a request without ``;gr`` pays.
* client flows (a phone connected straight to this node, named by a flow token in our Path or
  Record-Route, or the connection a binding was registered over): requests to them are
  marked in :attr:`Proxy.flow_sends` so the transport uses the existing connection only; a
  send that fails there is a transport error answered 430 Flow Failed at once, for that
  branch alone (RFC 5626 5.3), instead of a connection to the phone's NATed port and Timer B.
* dead flows: a 430 on a branch of an initial request to a registered binding (the edge's,
  this node's own, or the phone's) removes that binding from the location store, unless it
  was registered anew meanwhile (RFC 5626 11): later calls no longer fork to a gone flow.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import logging
import secrets
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Protocol

from sipfarm.edge import (
    DIALOG_CREATING,
    IDENTITY_HEADERS,
    MAX_OWN_ENTRIES,
    FlowTokenError,
    FlowTokens,
    add_uri_param,
    flow_uri,
    route_uri,
    sealed_route_parts,
)
from sipfarm.element import Element
from sipfarm.protect.authenticator import AccountSource, AuthAnswer, Authenticator, Verdict
from sipfarm.proxy.forking import Branch, BranchState, ProxyCall, Target
from sipfarm.proxy.media import Done, MediaHook, NoMedia
from sipfarm.proxy.nexthop import NameResolver, Unresolved, uri_destination
from sipfarm.proxy.pending import PendingInvites
from sipfarm.registrar.gruu import GruuError, GruuTarget, TempGruus, read_gruu
from sipfarm.routing.router import Action, Decision, Router
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import (
    BadGateway,
    BadMessage,
    CallDoesNotExist,
    Forbidden,
    LoopDetected,
    NotFound,
    ServerInternalError,
    ServiceUnavailable,
    SipError,
    TemporarilyUnavailable,
    TooManyHops,
)
from sipfarm.sip.headers import HeaderError, parse_name_addr, via_branch
from sipfarm.sip.ids import random_hex
from sipfarm.sip.message import SipMessage, error_response, make_response
from sipfarm.sip.parser import max_forwards
from sipfarm.sip.transaction import (
    MAGIC_COOKIE,
    RELEASED,
    AckFor2xx,
    ClientTransaction,
    ServerTransaction,
    StrayResponse,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
)
from sipfarm.sip.uri import SipURI, URIError, parse_uri
from sipfarm.sip.via import default_port
from sipfarm.store.accounts import Account
from sipfarm.store.errors import StoreError
from sipfarm.store.location import Binding
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.subject import source_subject

log = logging.getLogger("sipfarm.proxy")

ALLOW = b"INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, INFO, UPDATE, PRACK, SUBSCRIBE, NOTIFY, REFER"
# Out-of-dialog requests that need no credentials: ACK and CANCEL cannot be challenged (RFC
# 3261 22.1), REGISTER is the registrar's. Every other request to a user is authenticated: an
# unauthenticated OPTIONS or BYE answered by the phone itself would tell who is registered.
UNAUTHENTICATED = frozenset({b"ACK", b"CANCEL", b"REGISTER"})
# Identity headers only the farm may write (RFC 3325 5: stripped from untrusted senders).
MAX_FORWARDS = 70  # RFC 3261 16.6 step 3 / 8.1.1.6: what a request may carry past our door
SERIAL_FORK_SECONDS = 30.0  # how long one q-value group rings before the next is tried
FAILOVER_SECONDS = 2.0  # a gateway address silent this long: the next one (RFC 3263 4.3)
# in-dialog requests whose SDP the media hook sees before they go on: offers (re-INVITE, RFC
# 3261 14; UPDATE, RFC 3311) and answers to an offer in a reliable 18x (PRACK, RFC 3262); a
# re-INVITE without SDP too (its 2xx will carry the offer). ACK bodies go through _send_ack.
_IN_DIALOG_MEDIA = frozenset({b"INVITE", b"UPDATE", b"PRACK"})
# requests whose 18x/2xx SDP the hook sees (an answer, or an offer when the request had none)
_MEDIA_RESPONSES = frozenset({b"UPDATE", b"PRACK"})
_ANSWERED_ELSEWHERE: Final = b'SIP;cause=200;text="Call completed elsewhere"'
MAX_REASON: Final = 256  # a caller's Reason passed on to the branches' CANCELs, at most


class OwnRoutes:
    """What removing the Route entries that are ours (RFC 3261 16.4) found (immutable: Final
    attributes; a plain class, not a frozen dataclass: its __init__ is ~15x cheaper compiled)."""

    def __init__(self, flow: Address | None = None, sealed: bool = False, popped: bool = False) -> None:
        self.flow: Final = flow  # a client flow one of them named (flow token)
        self.sealed: Final = sealed  # one was the farm's Record-Route (or Path) entry for this Call-ID
        self.popped: Final = popped  # at least one entry named us

    # value semantics, as the frozen dataclass had
    def __eq__(self, other: object) -> bool:
        return isinstance(other, OwnRoutes) and (self.flow, self.sealed, self.popped) == (
            other.flow,
            other.sealed,
            other.popped,
        )

    def __hash__(self) -> int:
        return hash((self.flow, self.sealed, self.popped))

    def __repr__(self) -> str:
        return f"OwnRoutes(flow={self.flow!r}, sealed={self.sealed}, popped={self.popped})"


NO_ROUTES = OwnRoutes()


class LocationSource(AccountSource, Protocol):
    def lookup(self, aor: str, now: float, callback: Callable[[list[Binding] | StoreError], None]) -> None: ...

    def remove_binding(self, aor: str, binding: Binding, callback: Callable[[bool | StoreError], None]) -> None:
        """Remove ``binding`` if it is still stored as looked up (contact, Path, flow)."""


class Proxy:
    def __init__(
        self,
        element: Element,
        authenticator: Authenticator,
        state: LocationSource,
        resolver: NameResolver,
        *,
        flow_tokens: FlowTokens,
        temp_gruus: TempGruus | None = None,
        router: Router | None = None,
        media: MediaHook | None = None,
        locator: ServerLocation | None = None,
        auth_requests: bool = True,
        timer_c: float = 180.0,
        serial_fork: float = SERIAL_FORK_SECONDS,
        destinations: DestinationPolicy | None = None,
        pending_invites: PendingInvites | None = None,
    ) -> None:
        self.element = element
        self.auth = authenticator
        self.state = state
        self.resolver = resolver
        self.flow_tokens = flow_tokens
        self.temp_gruus = temp_gruus or TempGruus(secrets.token_bytes(32))
        self.router = router or Router(element.identity.domains)  # the one routing step
        self.media = media or NoMedia()  # the RTP relay hook
        self.locator = locator  # RFC 3263 for gateways by name; None: A/AAAA only
        # offers and answers in dialog (re-INVITE, UPDATE) go through the hook only when it
        # anchors media: with NoMedia, in-dialog requests pay nothing for it
        self.anchoring = media is not None and not isinstance(media, NoMedia)
        self.auth_requests = auth_requests
        # RFC 3261 16.6 step 11 / 16.8: Timer C per INVITE branch (> 3 min), reset by provisionals
        self.timer_c = timer_c
        self.serial_fork = serial_fork
        # where requests may go when the destination came from a message, not from the farm
        self.destinations = destinations if destinations is not None else DestinationPolicy()
        self.destinations.add_own(element.identity.aliases)
        # an authenticated caller's INVITEs in progress here, per account: each account's share
        # of the node's transaction memory (sipfarm.proxy.pending)
        self.pending_invites = pending_invites if pending_invites is not None else PendingInvites()
        self._timer_c: dict[Branch, float] = {}
        self._timer_heap: list[tuple[float, int, Branch]] = []
        self._timer_seq = 0
        # destinations of the requests queued since the node last drained its output that are
        # client connections held here: the transport sends to them without dialling (RFC 5626
        # 5.3). The node takes the set with each drain, so it holds one drain's worth at most.
        self.flow_sends: set[Address] = set()
        identity = element.identity
        self._domain_bytes = frozenset(d.encode() for d in identity.domains)
        self._loop_key = hashlib.blake2b(identity.node_id.encode(), digest_size=8).digest()
        # the keyed hash's state once the key block is absorbed: each loop hash copies it (the
        # same digest as blake2b(data, key=...), without compressing the key block again)
        self._loop_hasher = hashlib.blake2b(key=self._loop_key, digest_size=6)

    # -- entry points ----------------------------------------------------------------------------

    def stateless_407(self, msg: SipMessage, source: Address) -> bool:
        """An initial request a caller must authenticate for, with no credentials, to a user of
        a served domain, not routed anywhere else: its 407 goes without a transaction (its ACK,
        matching nothing, is dropped as an ACK whose Request-URI no hop serves). Its To tag is
        a challenge tag (:class:`~sipfarm.edge.ChallengeTags`): a balancer ends that ACK."""
        if not self.auth_requests or msg.method in UNAUTHENTICATED or msg.has("proxy-authorization"):
            return False
        if msg.has("route") or msg.to_tag is not None or max_forwards(msg) <= 0:
            return False
        uri = msg.request_uri
        if not (isinstance(uri, SipURI) and uri.user is not None and uri.host in self.element.identity.domains):
            return False
        client = self.element.client(msg, source)  # behind a balancer: the hop its branch names
        if self.router.table.trusted and self.router.table.trusts(client.host):
            return False  # a trusted gateway's call: routed, not challenged
        tag = self.element.stateless_tag(msg, client)
        if self.auth.banned(client):
            self.element.send_stateless(msg, self.auth.refusal(msg, tag=tag), source)
            return True
        realm = self.auth.caller_realm(msg, uri)
        self.element.send_stateless(msg, self.auth.challenge(msg, 407, realm, client, tag=tag), source)
        return True

    def stateless_refusal(self, msg: SipMessage, source: Address) -> bool:
        """An initial INVITE the node refuses before any routing work, answered without a
        transaction (RFC 3261 8.2.7 allows a stateless UAS): Max-Forwards 0 (483), and a
        Request-URI the routing table rejects at once (a domain the farm does not serve, not
        a SIP URI, no user: 403/404).  An INVITE server transaction over UDP sends its final
        answer again and again until the ACK (Timer G: ~11 copies in 32 s), so one spoofed
        INVITE made the node reflect a dozen datagrams at its victim (red team, 2026-12-02);
        now each INVITE gets one answer, as the stateless 407 does, and its ACK (To tag: a
        challenge tag) ends at the balancer.  A served user's INVITE goes on (routed, or
        challenged by :meth:`stateless_407`)."""
        if msg.method != b"INVITE" or msg.to_tag is not None:
            return False
        response: SipMessage | None
        element = self.element
        if max_forwards(msg) <= 0:
            exc = TooManyHops("Max-Forwards reached 0", partial=msg)
            element.metrics.errors(exc.counter).inc()
            response = error_response(msg, exc, element.stateless_tag(msg, element.client(msg, source)))
        else:
            if msg.has("route"):
                return False  # ours to pop first (own_routes)
            uri = msg.request_uri
            if isinstance(uri, SipURI) and uri.user is not None and uri.host in element.identity.domains:
                return False
            decision = self.router.decide(uri)
            if decision.action is not Action.REJECT:
                return False
            element.metrics.errors(f"route_{decision.status}").inc()
            tag = element.stateless_tag(msg, element.client(msg, source))  # decoded only when refusing
            response = make_response(msg, decision.status, decision.reason or None, to_tag=tag)
        if response is not None:
            element.send_stateless(msg, response, source)
        return True

    def own_routes(self, msg: SipMessage) -> OwnRoutes:
        """RFC 3261 16.4: remove the leading Route entries that are ours.

        Ours: entries naming this node; and, on top, a farm node's Record-Route sealed for this
        Call-ID whichever node it names (with the entries of that node right below it): the
        balancer sends a dialog whose node died to another node, which continues it.  A flow
        token counts only in an entry naming us: a flow lives in the node that holds it.
        """
        if not msg.has("route"):
            return NO_ROUTES
        identity = self.element.identity
        tokens = self.flow_tokens
        flow: Address | None = None
        sealed = popped = False
        taken_over: str | None = None  # the host of a dead node whose entries we took
        for index in range(MAX_OWN_ENTRIES):
            routes = msg.values("route")
            if not routes:
                break
            parts = sealed_route_parts(routes[0])
            if parts is not None:  # the shape the farm writes: no parse (see sealed_route_parts)
                user_part, host, port, given = parts
                names_us = (host, port) in identity.aliases
                seal = tokens.seal_matches(given, host, port, msg.call_id)
                user = user_part.decode("latin-1")
                domain = False
            else:
                uri = route_uri(msg, routes[0])
                if uri is None:
                    break
                names_us = identity.names(uri)
                seal = uri.param("sf") is not None and tokens.sealed(uri, msg.call_id)
                user, host, port = uri.user or "", uri.host, uri.port or default_port(uri.transport)
                # the farm's domain itself (a phone whose outbound proxy is "sip:farm.test"
                # preloads that Route, and the domain leads here)
                domain = not user and host in identity.domains
            if not (names_us or domain):
                if not seal or user or (index > 0 and host != taken_over):
                    break
                taken_over = host
            msg.pop_first_value("route")
            popped = True
            sealed = sealed or seal
            if user and names_us:
                try:
                    flow = tokens.decode(user, host, port, ours=True, call_id=msg.call_id)
                except FlowTokenError:
                    raise BadMessage("invalid flow token in Route", partial=msg) from None
        return OwnRoutes(flow, sealed, popped)

    def on_request(self, stx: ServerTransaction, msg: SipMessage, local: Address, routes: OwnRoutes) -> None:
        """Every request but REGISTER, its own Route entries already removed (``routes``)."""
        method = msg.method
        now = self.element.now()
        if method == b"CANCEL":
            self._on_cancel(stx, msg, now)
            return
        flow = routes.flow
        if flow is not None and flow != stx.source:
            # our own Path/Record-Route entry naming a client's connection held here, sealed for
            # this request by the node that routed (and authenticated) it: deliver on the flow.
            # Unsealed, it is a URI someone copied (a Path echoed in a 200, a Record-Route):
            # it opens nothing (out of dialog 403, in dialog 404).
            if not routes.sealed:
                self.element.metrics.errors("flow_route_unsealed").inc()
                if msg.to_tag is None:
                    raise Forbidden("route not usable", partial=msg)
                raise NotFound("no such dialog route", partial=msg)
            if max_forwards(msg) <= 0:
                raise TooManyHops("Max-Forwards reached 0", partial=msg)
            self._forward_to(stx, msg, local, flow, now, record_route_flow=flow, client_flow=flow.reliable)
            return
        _strip_identity(msg)  # nobody outside the farm asserts an identity (RFC 3325)
        if max_forwards(msg) <= 0:
            if method == b"OPTIONS" and self.is_us(msg):
                self._answer_options(stx, msg)
                return
            raise TooManyHops("Max-Forwards reached 0", partial=msg)
        if msg.to_tag is None and msg.has("route"):
            # an initial request whose next Route is not ours: the farm routes initial requests
            # itself and relays them nowhere a sender names (RFC 3261 16.4 leaves the choice)
            self.element.metrics.errors("foreign_route").inc()
            raise NotFound("route not served here", partial=msg)
        if msg.to_tag is not None:
            if not routes.sealed:
                # RFC 3261 16.12 loose routing needs our Record-Route on top: without it this is
                # not a dialog the farm set up (a relay attempt, or a dialog of a stranger),
                # unless it is addressed to a GRUU of ours with no Route left (RFC 5627 6.1)
                gruu = self._gruu_request_uri(msg) if msg.uri.find(b";gr") >= 0 else None
                if gruu is None:
                    self.element.metrics.errors("in_dialog_not_ours").inc()
                    raise NotFound("no dialog through this proxy", partial=msg)
                self._check_loop(msg)
                self._routeless_to_gruu(stx, msg, local, gruu)
                return
            self._check_loop(msg)
            self._forward_along_route(stx, msg, local, now)
            return
        if method == b"OPTIONS" and self.is_us(msg):
            self._answer_options(stx, msg)
            return
        self._check_loop(msg)
        self._on_initial(stx, msg, local, now)

    def options_answer(self, msg: SipMessage) -> SipMessage:
        """200 to an OPTIONS addressed to this node (RFC 3261 11.2)."""
        headers = (("allow", ALLOW), ("accept", b"application/sdp"), ("supported", b"path, outbound, gruu"))
        return make_response(msg, 200, to_tag=self.element.tag(msg), headers=headers)

    def _answer_options(self, stx: ServerTransaction, msg: SipMessage) -> None:
        msg.to  # noqa: B018 - parsed here: a malformed To gets 400, not an echo of itself
        self.element.reply(stx, self.options_answer(msg))

    # -- initial requests ------------------------------------------------------------------------

    def _on_initial(self, stx: ServerTransaction, msg: SipMessage, local: Address, now: float) -> None:
        call = ProxyCall(server_tx=stx, request=msg, started=now)
        stx.context = call
        self.router.route(msg, msg.request_uri, partial(self._decided, call, msg, local))

    def _decided(self, call: ProxyCall, msg: SipMessage, local: Address, decision: Decision) -> None:
        try:
            self._on_decision(call, msg, local, decision)
        except SipError as exc:
            self.element.fail(call.server_tx, exc)

    def _on_decision(self, call: ProxyCall, msg: SipMessage, local: Address, decision: Decision) -> None:
        stx = call.server_tx
        element = self.element
        if call.cancelled or call.answered:
            return
        if decision.action is Action.REJECT:
            element.metrics.errors(f"route_{decision.status}").inc()
            call.answered = True
            element.reply(stx, make_response(msg, decision.status, decision.reason or None, to_tag=element.tag(msg)))
            return
        uri = msg.request_uri
        assert isinstance(uri, SipURI)
        realm = ""
        creds: auth.Credentials | None = None
        if self.auth_requests and msg.method not in UNAUTHENTICATED and not self._trusted_call(msg, stx, decision):
            realm = self.auth.caller_realm(msg, uri)
            creds = self.auth.credentials(msg, "proxy-authorization", realm)
            if creds is None:
                call.answered = True
                element.reply(stx, self.auth.challenge(msg, 407, realm, element.client(msg, stx.source)))
                return
        gruu: GruuTarget | None = None
        lookups: list[str] = []  # AORs whose bindings are read (with the first one's account)
        user = decision.user
        if decision.action is Action.LOCAL:
            aor = decision.aor
            if msg.uri.find(b";gr") >= 0:
                try:
                    gruu = read_gruu(uri, self.temp_gruus)
                except GruuError:
                    # not a temporary GRUU of ours: looked up as the user it names, who does not
                    # exist, selecting no binding: the answer (and round trips) of an unknown user
                    element.metrics.errors("gruu_invalid").inc()
                    gruu = GruuTarget(user, decision.domain, "")
                else:
                    if gruu is not None:
                        aor, user = gruu.aor, gruu.user
            call.aor = aor
            lookups.append(aor)
        elif decision.action is Action.ALIAS:
            lookups.extend(a for a in (self._local_aor(t) for t in decision.targets) if a)
        # authentication (account + guard) and the lookups: one pipeline
        needed = (1 if creds is not None else 0) + len(lookups) + (1 if decision.action is Action.LOCAL else 0)
        join = _Join(needed, partial(self._route_with, call, msg, local, realm, gruu, decision))
        if creds is not None:
            client = element.client(msg, stx.source)
            self.auth.authenticate(creds, msg, client, realm, partial(join.done, "auth"))
        for index, aor in enumerate(lookups):
            self.state.lookup(aor, element.wall(), partial(join.done, f"bindings{index}"))
        if decision.action is Action.LOCAL:
            self.state.get_account(user, decision.domain, partial(join.done, "callee"))
        if needed == 0:
            self._route_with(call, msg, local, realm, gruu, decision, {})

    def _auth_refused(self, stx: ServerTransaction, msg: SipMessage, realm: str, answer: AuthAnswer) -> bool:
        """Answer a request whose credentials did not pass (Redis failure, ban, wrong or stale:
        407 again) and return True; else consume them, check the From against the account
        (:meth:`_assert_identity`) and return False."""
        element = self.element
        if answer.error is not None:
            element.store_failed(stx, msg, answer.error)
            return True
        if answer.verdict is not Verdict.OK:
            if answer.verdict is Verdict.BANNED:
                element.reply(stx, self.auth.refusal(msg))
            else:
                stale = answer.verdict is Verdict.STALE
                client = element.client(msg, stx.source)
                element.reply(stx, self.auth.challenge(msg, 407, realm, client, stale=stale))
            return True
        msg.remove("proxy-authorization")  # ours, consumed (RFC 3261 22.3)
        account = answer.account
        assert account is not None
        self._assert_identity(msg, account)
        return False

    def _trusted_call(self, msg: SipMessage, stx: ServerTransaction, decision: Decision) -> bool:
        """A call from a trusted gateway or trunk (by address) to the farm's users: no digest.
        Forwarding onwards (to a gateway) still needs a user's credentials: no transit."""
        if decision.action not in (Action.LOCAL, Action.ALIAS):
            return False
        return self._trusted_peer(msg, stx)

    def _trusted_peer(self, msg: SipMessage, stx: ServerTransaction) -> bool:
        if not self._trusted_source(msg, stx):
            return False
        self.element.metrics.errors("trusted_peer_call").inc()
        return True

    def _trusted_source(self, msg: SipMessage, stx: ServerTransaction) -> bool:
        """The request comes from a trusted gateway or trunk (the routing table's ``trusted``)."""
        table = self.router.table
        return bool(table.trusted) and table.trusts(self.element.client(msg, stx.source).host)

    def _local_aor(self, target: str) -> str | None:
        """``user@domain`` of an alias target that is a user of a served domain, else None."""
        try:
            uri = parse_uri(target)
        except (URIError, ValueError):
            return None
        if isinstance(uri, SipURI) and uri.user is not None and uri.host in self.element.identity.domains:
            return uri.aor
        return None

    def _route_with(
        self,
        call: ProxyCall,
        msg: SipMessage,
        local: Address,
        realm: str,
        gruu: GruuTarget | None,
        decision: Decision,
        results: dict[str, object],
    ) -> None:
        """Routing goes on once the lookups of :meth:`_on_decision` are all answered."""
        stx = call.server_tx
        element = self.element
        try:
            if call.cancelled or call.answered:
                return
            answer = results.get("auth")
            if isinstance(answer, AuthAnswer):
                if self._auth_refused(stx, msg, realm, answer):
                    call.answered = True
                    return
                account = answer.account
                if account is not None and self.pending_invites.enabled:
                    # every request the account has the node hold, not only its INVITEs: 60 KB
                    # MESSAGEs to a phone that never answers each hold two transactions for
                    # Timer F (red team, 2026-12-03)
                    self.pending_invites.admit(f"{account.user}@{account.domain}", call)
            for value in results.values():
                if isinstance(value, StoreError):
                    element.store_failed(stx, msg, value)
                    return
            if decision.action is Action.LOCAL:
                bindings = results["bindings0"]
                assert isinstance(bindings, list)
                if gruu is not None:
                    bindings = gruu.select(bindings)  # RFC 5627 6.1: that device only, no forking
                    results["bindings0"] = bindings
                if not bindings:
                    callee = results["callee"]
                    if callee is not None:
                        assert isinstance(callee, Account)
                        raise TemporarilyUnavailable("user not registered", partial=msg)
                    # no such user, told only now, after authentication: the unknown rule (a
                    # GRUU's device is not forwarded to a catch-all: it gets the rule's reject,
                    # else 404)
                    decision = self.router.unknown(decision.user, decision.domain, gruu=gruu is not None)
                    if decision.action is not Action.FORWARD:
                        self._unknown_user(call, msg, decision)
                        return
            if decision.action is Action.REDIRECT:
                self._redirect(call, msg, decision.uri)
                return
            if decision.action is Action.FORWARD and self.locator is not None:
                located = parse_uri(decision.uri)
                if isinstance(located, SipURI) and not _ip_literal(located.host):
                    # a gateway by name: RFC 3263 (NAPTR, SRV, A/AAAA), its targets in order
                    self.locator.locate_uri(located, partial(self._located, call, msg, local, decision))
                    return
            self._start_targets(call, msg, local, self._decision_targets(msg, decision, results))
        except SipError as exc:
            element.fail(stx, exc)

    def _start_targets(self, call: ProxyCall, msg: SipMessage, local: Address, targets: list[Target]) -> None:
        element = self.element
        call.set_targets(targets)
        call.record_route = msg.method in DIALOG_CREATING
        call.inbound = local.transport
        element.metrics.invite_seconds.observe(element.now() - call.started)
        if msg.method == b"INVITE" and msg.body:
            # every device a browser (RFC 7118 Contact transport): the offer asks for WebRTC
            # media; a fork to browsers and desk phones at once gets the desk phones' kind
            to_webrtc = bool(targets) and all(_websocket_uri(t.uri) for t in targets)
            sender = owner = None
            if self.anchoring:  # what only a relay needs (NoMedia passes the SDP on untouched)
                sender = element.client(msg, call.server_tx.remote).host
                # whose call the relay counts (max_ports_per_owner): the account
                # _assert_identity wrote (a client's own P-Asserted-Identity is stripped on
                # entry), else the caller's address, but for a trusted gateway or trunk: the
                # operator's own peer carries many callers' calls, none of them bounded
                identity = msg.get("p-asserted-identity")
                if identity:
                    owner = identity.decode("latin-1")
                elif not self._trusted_source(msg, call.server_tx):
                    owner = sender
            self.media.offer(msg, partial(self._offered, call, msg), to_webrtc=to_webrtc, sender=sender, owner=owner)
        else:
            self._start_group(call, element.now())

    def _located(self, call: ProxyCall, msg: SipMessage, local: Address, decision: Decision, found: object) -> None:
        """The gateway's addresses in RFC 3263 order: one serial group each, the next tried
        when one fails (RFC 3263 4.3); those the destination policy refuses are skipped."""
        stx = call.server_tx
        if call.cancelled or call.answered or stx.terminated:
            return
        try:
            if not isinstance(found, list) or not found:
                log.warning("event=route_locate_failed rule=%s uri=%s error=%s", decision.rule, decision.uri, found)
                self.element.metrics.errors("route_locate_failed").inc()
                raise ServiceUnavailable("gateway not found", partial=msg)
            targets = []
            for index, located in enumerate(found[:MAX_LOCATED]):
                dest = Address(located.transport, located.ip, located.port)
                if not self.destinations.permits(dest):
                    self.element.metrics.errors("destination_refused").inc()
                    continue
                q = 1.0 - index / 100
                targets.append(Target(decision.uri.encode(), dest, q=q, credentials=decision.credentials))
            if not targets:
                log.warning("event=route_destination_refused rule=%s uri=%s", decision.rule, decision.uri)
                raise ServerInternalError("route destination not allowed", partial=msg)
            call.failover = True
            self._start_targets(call, msg, local, targets)
        except SipError as exc:
            self.element.fail(stx, exc)

    def _decision_targets(self, msg: SipMessage, decision: Decision, results: dict[str, object]) -> list[Target]:
        """The branches of a decision: the bindings read (LOCAL, an alias's local users), an
        alias's outside URIs, a forward's URI."""
        if decision.action is Action.FORWARD:
            target = self._uri_target(decision.uri.encode(), decision.rule)
            if target is None:
                raise ServerInternalError("route destination not allowed", partial=msg)
            return [target.with_credentials(decision.credentials)]
        targets: list[Target] = []
        for name in sorted(k for k in results if k.startswith("bindings")):
            bindings = results[name]
            assert isinstance(bindings, list)
            targets.extend(t for t in (self._binding_target(b, msg.call_id, initial=True) for b in bindings) if t)
        if decision.action is Action.ALIAS:
            for alias in decision.targets:
                if self._local_aor(alias) is None:
                    try:
                        target = self._uri_target(alias.encode(), decision.rule)
                    except (SipError, URIError, ValueError):
                        continue  # a name being resolved, or not a URI: the others still ring
                    if target is not None:
                        targets.append(target)
            if not targets:
                raise TemporarilyUnavailable("no alias target reachable", partial=msg)
        return targets

    def _uri_target(self, uri: bytes, rule: str) -> Target | None:
        """A branch to a URI the router table names (a gateway, a voicemail, an alias outside
        the farm): its host resolved, and allowed by the destination policy (a table naming a
        loopback or internal address needs ``allow_destinations``)."""
        try:
            dest = self._destination(parse_uri(uri))
        except Unresolved as pending:
            # the next request finds the name cached; this one gets 503 with Retry-After
            self.resolver.resolve(pending.host, _ignore)
            raise ServiceUnavailable(f"resolving {pending.host}") from None
        if not self.destinations.permits(dest):
            self.element.metrics.errors("destination_refused").inc()
            log.warning("event=route_destination_refused rule=%s dest=%s", rule, dest)
            return None
        return Target(uri=uri, destination=dest)

    def _unknown_user(self, call: ProxyCall, msg: SipMessage, decision: Decision) -> None:
        """A served domain's user with no account: the unknown rule's reject or redirect."""
        if decision.action is Action.REDIRECT:
            self._redirect(call, msg, decision.uri)
            return
        self.element.metrics.errors(f"route_{decision.status}").inc()
        if decision.status == 404 and not decision.reason:
            raise NotFound("no such user", partial=msg)
        call.answered = True
        element = self.element
        response = make_response(msg, decision.status, decision.reason or None, to_tag=element.tag(msg))
        element.reply(call.server_tx, response)

    def _trunk_retry(self, branch: Branch, challenge: SipMessage) -> Target | None:
        """The branch's target again, carrying credentials for the trunk's challenge."""
        target = branch.target
        assert target.credentials is not None
        key, header = (
            ("www-authenticate", "authorization")
            if challenge.status == 401
            else ("proxy-authenticate", "proxy-authorization")
        )
        values = challenge.get_all(key)
        if not values:
            return None
        try:
            parsed = auth.parse_challenge(values[0])
            user, password = target.credentials
            method = branch.request.method
            value = auth.build_credentials(
                parsed, user, password, method, target.uri.decode("latin-1"), random_hex(8).decode()
            )
        except (auth.AuthHeaderError, ValueError):
            self.element.metrics.errors("trunk_challenge_unusable").inc()
            return None
        self.element.metrics.errors("trunk_auth").inc()
        return target.with_authorization((header, value))

    def _redirect(self, call: ProxyCall, msg: SipMessage, uri: str) -> None:
        """302 to ``uri`` (RFC 3261 21.3.3): the caller's phone calls there itself."""
        call.answered = True
        element = self.element
        element.metrics.errors("route_302").inc()
        headers = (("contact", f"<{uri}>".encode()),)
        element.reply(call.server_tx, make_response(msg, 302, to_tag=element.tag(msg), headers=headers))

    def _assert_identity(self, msg: SipMessage, account: Account) -> None:
        """The From must be the authenticated user's own address (403 otherwise: a caller may
        not present itself as someone else); the farm asserts it downstream (RFC 3325 9.1)."""
        caller = msg.name_addr_uri("from")
        if not (
            isinstance(caller, SipURI)
            and (caller.user_unescaped or "") == account.user
            and caller.host.lower() == account.domain
        ):
            self.element.metrics.auth_failures("from_mismatch").inc()
            raise Forbidden("From does not match the authenticated user", partial=msg)
        msg.prepend("p-asserted-identity", f"<sip:{account.user}@{account.domain}>".encode())

    def _offered(self, call: ProxyCall, msg: SipMessage, error: SipError | None) -> None:
        if call.cancelled or call.answered:
            # CANCELled (and answered 487) while the relay was asked: nothing will end the
            # session it may have opened but this (``msg``: the call's messages may be released)
            self.media.release(msg.call_id, msg.from_tag)
            return
        if error is not None:
            self.element.fail(call.server_tx, error)
            return
        try:
            self._start_group(call, self.element.now())
        except SipError as exc:
            self.element.fail(call.server_tx, exc)

    def _binding_target(self, binding: Binding, call_id: bytes, *, initial: bool = False) -> Target | None:
        """The branch toward ``binding``; ``initial``: of an initial request, whose 430 removes
        the binding (in dialog, a 430 says nothing about the registration)."""
        contact = binding.contact.encode("latin-1")
        route = tuple(p.encode("latin-1") for p in binding.path)
        client_flow = False
        try:
            if contact.find(b"?") >= 0 or contact.lower().find(b"method=") >= 0:
                contact = _as_request_uri(contact)
            if route:
                hop = parse_name_addr(route[0]).uri
                dest = self._destination(hop)
                trusted = self._farm_uri(hop, b"")
                if trusted and isinstance(hop, SipURI) and hop.user:
                    # a farm flow token: sealed for this Call-ID, so the element holding the flow
                    # knows a farm node routed this request (a copied Path opens nothing)
                    seal = self.flow_tokens.seal(hop.host, hop.port or default_port(hop.transport), call_id)
                    route = (add_uri_param(route[0], b";sf=" + seal.encode()), *route[1:])
            elif binding.received and (binding.reg_id is not None or not binding.received.startswith("udp:")):
                # the flow the REGISTER came over: RFC 5626 5.3 for outbound contacts, and the
                # connection a TCP/TLS/WS client registered on (its Contact port may not listen)
                dest = Address.parse(binding.received)
                trusted = True  # where the phone itself is
                client_flow = dest.reliable
            else:
                dest = self._destination(parse_uri(contact))
                trusted = False
            if not trusted and not self.destinations.permits(dest):
                # a Contact (or a Path the phone wrote itself) naming loopback, an internal
                # network or one of our own listeners: never a phone of ours
                self.element.metrics.errors("destination_refused").inc()
                log.info("event=binding_destination_refused contact=%s dest=%s", binding.contact, dest)
                return None
        except Unresolved as pending:
            self.resolver.resolve(pending.host, _ignore)
            log.info("event=binding_host_resolving host=%s", pending.host)
            return None
        except (HeaderError, URIError, ValueError):
            log.info("event=bad_binding contact=%s", binding.contact)
            return None
        return Target(
            uri=contact,
            destination=dest,
            route=route,
            q=binding.q,
            client_flow=client_flow,
            binding=binding if initial else None,
        )

    # -- in-dialog and pre-routed requests -------------------------------------------------------

    def _forward_along_route(self, stx: ServerTransaction, msg: SipMessage, local: Address, now: float) -> None:
        """RFC 3261 16.12: the next hop is the top Route, else the Request-URI. No state needed."""
        gruu = self._gruu_request_uri(msg) if msg.uri.find(b";gr") >= 0 else None
        if gruu is not None:
            # a dialog whose remote target is a GRUU (RFC 5627 4.4): to the instance's binding
            self.state.lookup(gruu.aor, self.element.wall(), partial(self._gruu_in_dialog, stx, msg, local, gruu))
            return
        try:
            dest = self._next_hop(msg)
        except Unresolved as pending:
            self.resolver.resolve(pending.host, partial(self._resolved, stx, msg, local, pending))
            return
        if self._in_dialog_media(stx, msg, partial(self._offered_in_dialog, stx, msg, local, dest)):
            return
        self._forward_to(stx, msg, local, dest, now)

    def _in_dialog_media(self, stx: ServerTransaction, msg: SipMessage, then: Done) -> bool:
        """What an in-dialog request does to the call's media before it goes on: a BYE ends the
        session; a re-INVITE or UPDATE with SDP (hold, resume, codec change) is an offer,
        anchored on the call's relay first (its answer comes back in the 2xx), as is a PRACK
        answering an offer in a reliable 18x.  True: the relay was asked, ``then`` goes on."""
        if msg.method == b"BYE":
            self.media.release(msg.call_id, msg.from_tag)
        elif self.anchoring and msg.method in _IN_DIALOG_MEDIA and (msg.body or msg.method == b"INVITE"):
            sender = self.element.client(msg, stx.remote).host
            # a call the relay does not know any more (ended by a BYE, its dialog's route
            # still sealed) is made again by this offer: owned by its sender, so re-INVITEs
            # cannot hold ports past max_ports_per_owner (red team, 2026-12-03)
            owner = None if self._trusted_source(msg, stx) else sender
            self.media.offer(msg, then, sender=sender, owner=owner)
            return True
        return False

    def _offered_in_dialog(
        self, stx: ServerTransaction, msg: SipMessage, local: Address, dest: Address, error: SipError | None
    ) -> None:
        if stx.terminated:
            return
        if error is not None:
            self.element.fail(stx, error)  # RFC 3261 14.2: a failed re-INVITE leaves the session as is
            return
        try:
            self._forward_to(stx, msg, local, dest, self.element.now())
        except SipError as exc:
            self.element.fail(stx, exc)

    def _gruu_request_uri(self, msg: SipMessage) -> GruuTarget | None:
        """The GRUU of ours the Request-URI of a request with no Route left is (RFC 5627 6.1),
        or None; NotFound for a ``gr`` URI that is not one of ours."""
        if msg.has("route"):
            return None
        uri = msg.request_uri
        if not isinstance(uri, SipURI) or uri.host not in self.element.identity.domains:
            return None
        try:
            return read_gruu(uri, self.temp_gruus)
        except GruuError:
            self.element.metrics.errors("gruu_invalid").inc()
            raise NotFound("no such user", partial=msg) from None

    def _gruu_binding(self, msg: SipMessage, gruu: GruuTarget, found: list[Binding] | StoreError) -> Target | None:
        if isinstance(found, StoreError):
            return None
        for binding in gruu.select(found):
            return self._binding_target(binding, msg.call_id)
        return None

    def _routeless_to_gruu(self, stx: ServerTransaction, msg: SipMessage, local: Address, gruu: GruuTarget) -> None:
        """An in-dialog request with no Route to a GRUU of ours (RFC 5627 6.1, RFC 3261 16.5:
        the domain's proxy delivers it to that instance): a UA that ignored the dialog's
        Record-Route (Twinkle reads no ``Record-route:`` spelling) sends its re-INVITE, BYE
        or INFO to the remote target alone. No seal vouches that the dialog went through the
        farm, so it is authenticated as an initial request to that user would be (a trusted
        peer's is not): a made-up To tag opens no more than a call to the user does."""
        element = self.element
        if not self.auth_requests or msg.method in UNAUTHENTICATED or self._trusted_peer(msg, stx):
            self.state.lookup(gruu.aor, element.wall(), partial(self._gruu_in_dialog, stx, msg, local, gruu))
            return
        uri = msg.request_uri
        assert isinstance(uri, SipURI)  # a GRUU of a served domain
        client = element.client(msg, stx.source)
        realm = self.auth.caller_realm(msg, uri)
        creds = self.auth.credentials(msg, "proxy-authorization", realm)
        if creds is None:
            refused = self.auth.banned(client)
            element.reply(stx, self.auth.refusal(msg) if refused else self.auth.challenge(msg, 407, realm, client))
            return
        done = partial(self._routeless_authenticated, stx, msg, local, gruu, realm)
        self.auth.authenticate(creds, msg, client, realm, done)

    def _routeless_authenticated(
        self, stx: ServerTransaction, msg: SipMessage, local: Address, gruu: GruuTarget, realm: str, answer: AuthAnswer
    ) -> None:
        if stx.terminated:
            return
        try:
            if self._auth_refused(stx, msg, realm, answer):
                return
        except SipError as exc:
            self.element.fail(stx, exc)
            return
        self.state.lookup(gruu.aor, self.element.wall(), partial(self._gruu_in_dialog, stx, msg, local, gruu))

    def _gruu_in_dialog(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        local: Address,
        gruu: GruuTarget,
        found: list[Binding] | StoreError,
    ) -> None:
        if stx.terminated:
            return
        if isinstance(found, StoreError):
            self.element.store_failed(stx, msg, found)
            return
        target = self._gruu_binding(msg, gruu, found)
        if target is None:
            self.element.fail(stx, TemporarilyUnavailable("GRUU not registered", partial=msg))
            return
        if self._in_dialog_media(stx, msg, partial(self._gruu_offered, stx, msg, local, target)):
            return
        self._gruu_offered(stx, msg, local, target, None)

    def _gruu_offered(
        self, stx: ServerTransaction, msg: SipMessage, local: Address, target: Target, error: SipError | None
    ) -> None:
        """The in-dialog request to a GRUU goes to its instance's binding (its SDP anchored)."""
        if stx.terminated:
            return
        if error is not None:
            self.element.fail(stx, error)  # RFC 3261 14.2: a failed re-INVITE leaves the session as is
            return
        now = self.element.now()
        call = ProxyCall(server_tx=stx, request=msg, started=now)
        call.inbound = local.transport
        stx.context = call
        call.set_targets([target])
        try:
            self._start_group(call, now)
        except SipError as exc:
            self.element.fail(stx, exc)

    def _resolved(
        self, stx: ServerTransaction, msg: SipMessage, local: Address, hop: Unresolved, ip: str | None
    ) -> None:
        if stx.terminated:
            return
        dest = Address(hop.transport, ip or "", hop.port)
        if ip is None:
            self.element.fail(stx, BadGateway(f"cannot resolve {hop.host}", partial=msg))
        elif not self.destinations.permits(dest):
            self.element.metrics.errors("destination_refused").inc()
            self.element.fail(stx, Forbidden("destination not allowed", partial=msg))
        else:
            self._forward_to(stx, msg, local, dest, self.element.now())

    def _forward_to(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        local: Address,
        dest: Address,
        now: float,
        *,
        record_route_flow: Address | None = None,
        client_flow: bool = False,
    ) -> None:
        call = ProxyCall(server_tx=stx, request=msg, started=now)
        call.inbound = local.transport
        if record_route_flow is not None and msg.to_tag is None and msg.method in DIALOG_CREATING:
            call.record_route = True
            call.record_route_flow = record_route_flow
        stx.context = call
        # an in-dialog request waits for its answer (a re-INVITE as long as a call, Timer C;
        # others Timer F, 32 s): its bytes are charged to its sender's share, as a call's are
        # to its account's, so one subscriber's dialogs cannot fill the node's transaction
        # memory with requests its own phone never answers (red team, 2026-12-03: re-INVITEs,
        # then 60 KB MESSAGEs: 256 MiB, then 503s for everyone)
        if msg.to_tag is not None and self.pending_invites.enabled and not self._trusted_source(msg, stx):
            try:
                self.pending_invites.admit("src:" + source_subject(self.element.client(msg, stx.source).host), call)
            except SipError as exc:
                self.element.fail(stx, exc)
                return
        call.set_targets([Target(uri=msg.uri, destination=dest, client_flow=client_flow)])
        self._start_group(call, now)

    def _next_hop(self, msg: SipMessage) -> Address:
        """Where a request goes by its Route set or Request-URI (raises Unresolved, BadMessage,
        Forbidden for a destination the farm does not send to)."""
        routes = msg.values("route")
        try:
            uri = parse_name_addr(routes[0]).uri if routes else msg.request_uri
            dest = self._destination(uri)
        except (HeaderError, URIError) as exc:
            raise BadMessage(f"bad Route: {exc}", partial=msg) from None
        if not (routes and self._farm_uri(uri, msg.call_id)) and not self.destinations.permits(dest):
            self.element.metrics.errors("destination_refused").inc()
            raise Forbidden("destination not allowed", partial=msg)
        return dest

    def _party(self, target: Target, call_id: bytes) -> str | None:
        """The IP of the party a branch went to, as its media relay should know it: the flow a
        farm flow token in its route names (a phone behind a balancer), else where the branch
        was sent (the phone itself, a gateway); None behind a Path of someone else's."""
        if not target.route:
            return target.destination.host
        return self._token_flow_host(target.route[0], call_id)

    def binding_client(self, binding: Binding) -> str | None:
        """The host of the client ``binding`` was registered from: the flow a farm flow token
        at the top of its Path names (a phone behind a balancer), else where its REGISTER came
        from; None behind a Path of someone else's (the authenticator's known clients)."""
        if binding.path:
            return self._token_flow_host(binding.path[0].encode("latin-1"))
        try:
            return Address.parse(binding.received).host
        except ValueError:
            return None

    def _token_flow_host(self, entry: bytes, call_id: bytes = b"") -> str | None:
        """The host of the flow a farm flow token in the Route/Path ``entry`` names (valid at its
        host and port, no ``maddr``: what :meth:`_farm_uri` accepts of a token); None for any
        other entry."""
        try:
            hop = parse_name_addr(entry).uri
        except (HeaderError, URIError):
            return None
        if not (isinstance(hop, SipURI) and hop.user and hop.param("maddr") is None):
            return None
        try:
            port = hop.port or default_port(hop.transport)
            return self.flow_tokens.decode(hop.user, hop.host, port, call_id=call_id).host
        except FlowTokenError:
            return None

    def _farm_uri(self, uri: object, call_id: bytes) -> bool:
        """``uri`` was written by the farm: a flow token valid at its host and port, or a seal
        of its host and port (an element's, or a node's Record-Route for this Call-ID), and no
        ``maddr`` (the farm writes none; it would send elsewhere than the host the token or
        seal vouches for). Its destination is then a farm element, never a stranger's choice."""
        if not isinstance(uri, SipURI) or uri.param("maddr") is not None:
            return False
        tokens = self.flow_tokens
        if uri.user:
            try:
                tokens.decode(uri.user, uri.host, uri.port or default_port(uri.transport), call_id=call_id)
            except FlowTokenError:
                return False
            return True
        if uri.param("sf") is None:
            return False
        return tokens.sealed(uri) or (bool(call_id) and tokens.sealed(uri, call_id))

    def _destination(self, uri: object) -> Address:
        return uri_destination(uri, self.resolver, self.element.identity.domains)

    # -- forking ---------------------------------------------------------------------------------

    def _start_group(self, call: ProxyCall, now: float) -> None:
        group = call.next_group()
        layer = self.element.layer
        refused: ServiceUnavailable | None = None
        for target in group:
            request = self._branch_request(call, target)
            branch = Branch(call=call, target=target, request=request)
            try:
                ctx = layer.start_client(request, target.destination, now)
            except ServiceUnavailable as exc:
                refused = exc
                continue
            ctx.context = branch
            branch.client_tx = ctx
            held_by = call.held_by
            if held_by is not None:
                held_by.held += ctx.size  # charged to the caller's share (sipfarm.proxy.pending)
            if target.client_flow:
                self.flow_sends.add(target.destination)
            call.branches.append(branch)
            if call.is_invite:
                branch.started = now
                self._arm_timer_c(branch, self._timer_c_deadline(branch, now))
        if not call.active():
            if refused is not None and not call.branches and not call.groups:
                # the node's own transaction limits refused every branch: 503, as for a request
                # the layer could not take (a 480 would blame the callee)
                self.element.fail(call.server_tx, refused)
                return
            self._maybe_finish(call, now)

    def _branch_request(self, call: ProxyCall, target: Target) -> SipMessage:
        identity = self.element.identity
        req = call.request.copy()
        if target.uri != req.uri:
            req.set_uri(target.uri)
        req.set("max-forwards", str(max_forwards(req) - 1).encode())
        out_transport = target.destination.transport
        if call.record_route:
            flow = call.record_route_flow
            # RFC 5658 double Record-Route when the transport changes on the way through
            if call.inbound != out_transport:
                req.prepend("record-route", self._record_route(call.inbound, req.call_id))
            if flow is not None:
                # toward a client on our connection: the entry carries its flow token
                host, port = identity.route_address(flow.transport)
                seal = self.flow_tokens.seal(host, port, req.call_id)
                entry = flow_uri(self.flow_tokens, flow, host, port, seal=seal, call_id=req.call_id)
                req.prepend("record-route", entry)
            else:
                req.prepend("record-route", self._record_route(out_transport, req.call_id))
        for route in reversed(target.route):
            req.prepend("route", route)
        if target.authorization is not None:
            req.append(*target.authorization)  # a trunk's challenge answered (RFC 3261 22.2)
        branch = MAGIC_COOKIE + self._loop_hash(call.request) + b"." + random_hex(6)
        req.prepend("via", identity.via(out_transport, branch))
        return req

    def _record_route(self, transport: str, call_id: bytes) -> bytes:
        """Our Record-Route entry, sealed for this dialog's Call-ID: any node of the farm takes
        it as its own, and only requests of this dialog carry it."""
        host, port = self.element.identity.route_address(transport)
        return self.element.identity.record_route(transport, self.flow_tokens.seal(host, port, call_id))

    def _loop_hash(self, msg: SipMessage) -> bytes:
        """RFC 3261 16.6 step 8: a branch part that is the same for the same request here."""
        # one call over the concatenation (what four update() calls hashed): the same value
        data = b"%s%s%s%d" % (msg.uri, msg.from_tag or b"", msg.call_id, msg.cseq[0])
        hasher = self._loop_hasher.copy()
        hasher.update(data)
        return hasher.hexdigest().encode()

    def _check_loop(self, msg: SipMessage) -> None:
        """RFC 3261 16.3 step 4: our own Via with this request's hash means a loop (482)."""
        vias = msg.values("via")
        if len(vias) < 2:
            return
        marker = MAGIC_COOKIE + self._loop_hash(msg) + b"."
        for value in vias[1:]:
            branch = via_branch(value)
            if branch is not None and branch.startswith(marker):
                raise LoopDetected("request looped back to this node", partial=msg)

    # -- responses -------------------------------------------------------------------------------

    def on_response(self, msg: SipMessage, source: Address, now: float) -> None:
        ctx = self.element.layer.receive_response(msg, source, now)
        if ctx is None:
            return
        branch = ctx.context
        if not isinstance(branch, Branch):
            return  # e.g. the answer to a CANCEL we sent
        self._on_branch_response(branch, ctx, msg, now)
        if msg.status >= 200:
            branch.call.release_messages()

    def _on_branch_response(self, branch: Branch, ctx: ClientTransaction, msg: SipMessage, now: float) -> None:
        call = branch.call
        status = msg.status
        if status >= 300 and branch.target.client_flow:
            self.flow_sends.add(ctx.remote)  # the layer's ACK (RFC 3261 17.1.1.3) goes back the same way
        table = self.router.table
        if not (table.trusted and table.trusts(ctx.remote.host)):
            # RFC 3325 5: an identity only the farm or a trusted peer asserts; a callee's phone
            # showed its caller "Bob" as the connected party (red team, 2026-12-03). One pass
            # over the headers, which rebuilds them only when one is there
            _strip_identity(msg)
        if len(msg.values("via")) < 2:
            # RFC 3261 16.7 step 3: with our Via gone nothing would route it upstream. A peer
            # that echoed only our Via (e.g. answering with a CANCEL's Via set) still answered
            # this branch: give the response the Via set the branch's request carried.
            self.element.metrics.errors("response_via_missing").inc()
            if branch.request is RELEASED:
                # a 2xx again after the call was done (its first one was mended and forwarded):
                # the Via set is gone with the request, dropped
                return
            msg = msg.copy()
            msg.remove("via")
            for value in reversed(branch.request.get_all("via")):
                msg.prepend("via", value)
        if status < 200:
            if branch in self._timer_c:
                self._arm_timer_c(branch, self._timer_c_deadline(branch, now))
            if branch.state is BranchState.STARTED:
                branch.state = BranchState.PROCEEDING
            if branch.cancel_wanted and not branch.cancelled:
                self._send_cancel(branch, now)  # the CANCEL held back until now (RFC 3261 9.1)
            if status > 100 and not call.answered:
                self._send_upstream(call, _upstream(msg), branch)
            return
        self._timer_c.pop(branch, None)
        if status == 430 and branch.state is not BranchState.COMPLETED:
            self._flow_failed(branch)
        if 200 <= status < 300:
            first = branch.state is not BranchState.COMPLETED
            branch.state = BranchState.COMPLETED
            call.answered = True
            self._send_upstream(call, _upstream(msg), branch)
            if first and call.is_invite:
                call.groups.clear()
                # RFC 3326: the other phones show "answered elsewhere", not a missed call
                call.cancel_reason = _ANSWERED_ELSEWHERE
                for other in call.active():
                    self._cancel_branch(other, now)
            return
        if branch.state is BranchState.COMPLETED:
            return
        branch.state = BranchState.COMPLETED
        if status in (401, 407) and branch.target.credentials is not None and branch.target.authorization is None:
            retry = self._trunk_retry(branch, msg)
            if retry is not None:
                # the trunk's challenge, answered once with the farm's account there (RFC 3261
                # 22.2; same Call-ID and CSeq, a new branch); not a final to forward upstream
                call.groups.insert(0, [retry])
                self._maybe_finish(call, now)
                return
        if call.failover and status not in (408, 503):
            call.groups.clear()  # the server answered: no other address of it is tried
        call.record_final(msg)
        if status >= 600 and call.is_invite:
            # RFC 3261 16.7 step 5: no more branches, cancel the others
            call.groups.clear()
            call.cancel_reason = b'SIP;cause=%d;text="Declined elsewhere"' % status
            self._end_branches(call, call.active(), now)
        self._maybe_finish(call, now)

    def _maybe_finish(self, call: ProxyCall, now: float) -> None:
        if call.answered or call.active():
            return
        if call.groups and not call.cancelled:
            self._start_group(call, now)
            return
        best = call.final_to_forward()
        if best is None:
            tag = self.element.tag(call.request)
            response = make_response(call.request, 408 if call.branches else 480, to_tag=tag)
        elif best.status == 408 and not call.is_invite and call.best_is_local:
            # RFC 4320 4.1: a proxy never sends a 408 for a non-INVITE request; the client's
            # own Timer F has fired by now. The transaction ends without an answer.
            call.answered = True
            self.element.metrics.errors("non_invite_timeout").inc()
            self.element.layer.abandon(call.server_tx)
            return
        else:
            response = _upstream(best)
        call.answered = True
        if call.is_invite and call.request.to_tag is None:
            # an initial INVITE failed: its media session goes (a failed re-INVITE leaves the
            # call's session as it was, RFC 3261 14.1)
            self.media.release(call.request.call_id, call.request.from_tag)
        self._send_upstream(call, response)

    def _send_upstream(self, call: ProxyCall, response: SipMessage, branch: Branch | None = None) -> None:
        """``branch``: the one ``response`` came on (None: made here)."""
        stx = call.server_tx
        if (
            response.body
            and response.status < 300
            and (call.is_invite or (self.anchoring and call.method in _MEDIA_RESPONSES))
        ):
            sender = None if branch is None or not self.anchoring else self._party(branch.target, response.call_id)
            self.media.answer(response, partial(self._answered, stx, response), sender=sender)
            return
        self.element.reply(stx, response)

    def _answered(self, stx: ServerTransaction, response: SipMessage, error: SipError | None) -> None:
        if error is not None:
            log.warning(
                "event=media_answer_failed call_id=%s error=%s",
                response.call_id.decode("latin-1"),
                str(error).replace(" ", "_"),
            )
        self.element.reply(stx, response)

    def _local_response(self, call: ProxyCall, branch: Branch, status: int) -> SipMessage:
        """A final response this proxy makes for a branch (RFC 3261 16.7 step 2 timeouts, 16.9
        transport errors, 16.10 CANCEL): built on the branch's request, so it goes upstream like
        a received one, with our To tag (RFC 3261 8.2.6.2)."""
        return make_response(branch.request, status, to_tag=self.element.tag(call.request))

    # -- Timer C ---------------------------------------------------------------------------------

    def _timer_c_deadline(self, branch: Branch, now: float) -> float:
        """Timer C (reset by each provisional); while lower-q groups wait, a group rings for at
        most ``serial_fork`` seconds (RFC 3261 16.6 leaves serial timing to the proxy)."""
        deadline = now + self.timer_c
        call = branch.call
        if call.groups:
            if not call.failover:
                deadline = min(deadline, branch.started + self.serial_fork)
            elif branch.state is BranchState.STARTED:
                # RFC 3263 4.3: a server that answers nothing (not even 100) within this is
                # taken for dead and its next address tried (Timer B's 32 s would be too late)
                deadline = min(deadline, now + FAILOVER_SECONDS)
        return deadline

    def _arm_timer_c(self, branch: Branch, deadline: float) -> None:
        self._timer_c[branch] = deadline
        self._timer_seq += 1
        heap = self._timer_heap
        heapq.heappush(heap, (deadline, self._timer_seq, branch))
        if len(heap) > 1024 and len(heap) > 3 * len(self._timer_c):
            # re-armed and ended branches leave stale entries (lazy deletion): drop them before
            # they outnumber the live ones, so memory follows the calls, not their history
            live = self._timer_c
            self._timer_heap = [e for e in heap if live.get(e[2]) == e[0]]
            heapq.heapify(self._timer_heap)

    def next_deadline(self) -> float | None:
        heap = self._timer_heap
        while heap:
            deadline, _, branch = heap[0]
            if self._timer_c.get(branch) == deadline:
                return deadline
            heapq.heappop(heap)  # re-armed or disarmed since (lazy deletion)
        return None

    def handle_timer(self, now: float) -> None:
        """Timer C (RFC 3261 16.8): a branch ringing too long is CANCELled and counts as 408;
        if even the CANCEL gets no answer, its transaction is abandoned so memory stays bounded."""
        heap = self._timer_heap
        while heap and heap[0][0] <= now:
            deadline, _, branch = heapq.heappop(heap)
            if self._timer_c.get(branch) != deadline:
                continue
            del self._timer_c[branch]
            tx = branch.client_tx
            if branch.cancelled or branch.state is BranchState.COMPLETED:
                if isinstance(tx, ClientTransaction) and not tx.terminated:
                    self.element.layer.transport_error(tx, now)
                continue
            if branch.state is BranchState.PROCEEDING:
                self._cancel_branch(branch, now)
                branch.state = BranchState.COMPLETED
                branch.call.record_final(self._local_response(branch.call, branch, 408), local=True)
                self._arm_timer_c(branch, now + 64 * self.element.layer.timers.t1)
                self._maybe_finish(branch.call, now)
            elif branch.call.failover and isinstance(tx, ClientTransaction) and not tx.terminated:
                # a gateway address that answered nothing: a transport error, then its next one
                self.element.metrics.errors("failover_no_answer").inc()
                self.element.layer.transport_error(tx, now)
            # no provisional yet: Timer B ends it

    # -- CANCEL ----------------------------------------------------------------------------------

    def _on_cancel(self, stx: ServerTransaction, msg: SipMessage, now: float) -> None:
        element = self.element
        invite = element.layer.find_invite_for_cancel(msg)
        if invite is None:
            raise CallDoesNotExist("no INVITE transaction to cancel", partial=msg)
        element.reply(stx, make_response(msg, 200, to_tag=element.tag(msg)))
        call = invite.context
        if not isinstance(call, ProxyCall) or call.answered:
            return
        call.cancelled = True
        call.groups.clear()
        reason = msg.get("reason")
        if reason is not None and len(reason) <= MAX_REASON:
            call.cancel_reason = reason  # the caller's (RFC 3326 3: a proxy passes it on)
        active = call.active()
        if not active:
            # still waiting on Redis (or nothing forked): answer the INVITE ourselves
            call.answered = True
            element.reply(invite, make_response(call.request, 487, to_tag=element.tag(call.request)))
            return
        self._end_branches(call, active, now)
        self._maybe_finish(call, now)

    def _end_branches(self, call: ProxyCall, branches: list[Branch], now: float) -> None:
        """CANCEL ``branches``. One that has not answered yet cannot be CANCELled before its
        provisional (RFC 3261 9.1), which may never come: it ends here as a 487, so the caller
        is answered now, not at Timer B, and its CANCEL leaves when the provisional comes."""
        for branch in branches:
            self._cancel_branch(branch, now)
            if branch.state is BranchState.STARTED:
                branch.state = BranchState.COMPLETED
                call.record_final(self._local_response(call, branch, 487), local=True)

    def _cancel_branch(self, branch: Branch, now: float) -> None:
        """RFC 3261 9.1: CANCEL only after a provisional; until then, remember to."""
        if branch.cancelled or branch.state is BranchState.COMPLETED:
            return
        if branch.state is BranchState.STARTED:
            branch.cancel_wanted = True
            return
        self._send_cancel(branch, now)

    def _send_cancel(self, branch: Branch, now: float) -> None:
        branch.cancelled = True
        req = branch.request
        cancel = SipMessage(method=b"CANCEL", uri=req.uri, cseq=(req.cseq[0], b"CANCEL"))
        cancel.append("via", req.top_via_value)
        for route in req.get_all("route"):
            cancel.append("route", route)
        cancel.append("max-forwards", b"70")
        for key in ("from", "to", "call-id"):
            cancel.append(key, req.get(key) or b"")
        cancel.append("cseq", b"%d CANCEL" % req.cseq[0])
        reason = branch.call.cancel_reason
        if reason is not None:
            cancel.append("reason", reason)
        cancel.set_body(b"", None)
        ctx = branch.client_tx
        assert isinstance(ctx, ClientTransaction)
        try:
            self.element.layer.start_client(cancel, ctx.remote, now)
        except (ServiceUnavailable, ValueError):
            log.debug("event=cancel_not_sent call_id=%s", req.call_id.decode("latin-1"))
            return
        if branch.target.client_flow:
            self.flow_sends.add(ctx.remote)

    # -- transaction events ----------------------------------------------------------------------

    def on_event(self, event: object) -> None:
        if isinstance(event, TransactionTerminated):
            # the commonest event by far (every transaction ends with one): tested first
            context = event.tx.context
            event.tx.context = None
            if isinstance(context, Branch):
                self._timer_c.pop(context, None)
                _release_call(context.call)
            elif isinstance(context, ProxyCall):
                _release_call(context)
            return
        now = self.element.now()
        if isinstance(event, (TransactionTimeout, TransportFailure)):
            tx = event.tx
            branch = tx.context
            if isinstance(branch, Branch) and branch.state is not BranchState.COMPLETED:
                # RFC 3261 16.7 step 2 / 16.9: a timeout is a 408, a transport error a 503; a
                # client's connection that is gone is a 430 (RFC 5626 5.3), at once: only this
                # branch's answer, the others of a forked request go on
                if isinstance(event, TransactionTimeout):
                    status = 408
                elif branch.target.client_flow:
                    status = 430
                    self.element.metrics.errors("flow_failed").inc()
                    self._flow_failed(branch)
                else:
                    status = 503
                branch.state = BranchState.COMPLETED
                branch.call.record_final(self._local_response(branch.call, branch, status), local=True)
                self._maybe_finish(branch.call, now)
        elif isinstance(event, AckFor2xx):
            self._forward_ack(event.request, event.source)
        elif isinstance(event, StrayResponse):
            # RFC 3261 16.7 / RFC 6026: a response matching no client transaction of ours is
            # not ours to route. Its Via below ours was written by whoever sent it, so it names
            # no destination we chose: dropped, counted (the 2xx retransmissions of a call we
            # forwarded match our client transaction in Accepted for 32 s)
            self.element.metrics.errors("stray_response_dropped").inc()

    def _flow_failed(self, branch: Branch) -> None:
        """A 430 on a branch to a registered binding (RFC 5626 5.3: the flow it was registered
        over is gone, told by the edge or found here): every later call would fork to it again
        until it expires, so it is removed (RFC 5626 11), unless it has been registered anew
        meanwhile. Nothing waits for Redis: the 430 goes upstream as any answer would."""
        binding = branch.target.binding
        call = branch.call
        if binding is None or not call.aor:
            return  # in dialog, or a hop the request named: no binding of ours
        done = partial(self._binding_removed, call.aor, binding, call.request.call_id)
        self.state.remove_binding(call.aor, binding, done)

    def _binding_removed(self, aor: str, binding: Binding, call_id: bytes, removed: bool | StoreError) -> None:
        metrics = self.element.metrics
        cid = call_id.decode("latin-1")
        if isinstance(removed, StoreError):
            metrics.errors("binding_remove_failed").inc()
            error = str(removed).replace(" ", "_")
            log.warning("event=binding_remove_failed aor=%s call_id=%s error=%s", aor, cid, error)
        elif removed:
            metrics.errors("binding_flow_failed").inc()
            log.info("event=binding_removed reason=flow_failed aor=%s contact=%s call_id=%s", aor, binding.contact, cid)
        else:
            log.debug(
                "event=binding_kept reason=registered_again aor=%s contact=%s call_id=%s", aor, binding.contact, cid
            )

    def _forward_ack(self, msg: SipMessage, source: Address) -> None:
        """ACK for 2xx: forwarded statelessly along its Route set (RFC 3261 16.11), only when
        our sealed Record-Route entry is on top (anything else is not a dialog of ours: dropped,
        counted); onto the client flow when our entry names one."""
        if not msg.has("route"):
            # the ACK of a 2xx from a UA that ignored the Record-Route, to a GRUU of ours (RFC
            # 5627 6.1, as _routeless_to_gruu); else the ACK of a stateless 407 or a stranger's
            self._routeless_ack(msg, source)
            return
        try:
            routes = self.own_routes(msg)
            if not routes.sealed or max_forwards(msg) <= 0:
                self.element.metrics.errors("ack_dropped").inc()
                return
            flow = routes.flow
            gruu = self._gruu_request_uri(msg) if flow is None and msg.uri.find(b";gr") >= 0 else None
            if gruu is not None:
                self.state.lookup(gruu.aor, self.element.wall(), partial(self._ack_to_gruu, msg, gruu))
                return
            if flow is not None and flow != source:
                dest = flow
                if flow.reliable:
                    self.flow_sends.add(flow)  # over the client's connection only (RFC 5626 5.3)
            else:
                dest = self._next_hop(msg)
        except Unresolved as pending:
            # the next ACK (the UAS retransmits its 2xx until one arrives) finds the name cached
            self.resolver.resolve(pending.host, _ignore)
            return
        except SipError:
            self.element.metrics.errors("ack_dropped").inc()
            return
        self._send_ack(msg, dest, source)

    def _routeless_ack(self, msg: SipMessage, source: Address) -> None:
        """An ACK with no Route: to its GRUU's binding when the Request-URI is a GRUU of ours,
        else dropped. ACK cannot be challenged (RFC 3261 22.1): it reaches only what the
        re-INVITE or BYE of that dialog would (one instance of a registered user), and a UA
        drops an ACK that matches no dialog of its own (RFC 3261 12.2.2)."""
        if msg.uri.find(b";gr") < 0 or max_forwards(msg) <= 0:
            return
        element = self.element
        if element.challenge_tags.matches(msg.to_tag, element.client(msg, source), msg.call_id, msg.cseq[0]):
            return  # the ACK of our stateless 407 to a call to a GRUU: it ends here
        try:
            gruu = self._gruu_request_uri(msg)
        except SipError:
            gruu = None
        if gruu is None:
            element.metrics.errors("ack_dropped").inc()
            return
        self.state.lookup(gruu.aor, element.wall(), partial(self._ack_to_gruu, msg, gruu))

    def _ack_to_gruu(self, msg: SipMessage, gruu: GruuTarget, found: list[Binding] | StoreError) -> None:
        """The ACK of a 2xx whose dialog's remote target is a GRUU, once its bindings are read."""
        target = self._gruu_binding(msg, gruu, found)
        if target is None:
            self.element.metrics.errors("ack_dropped").inc()
            return
        msg.set_uri(target.uri)
        for route in reversed(target.route):
            msg.prepend("route", route)
        if target.client_flow:
            self.flow_sends.add(target.destination)
        self._send_ack(msg, target.destination)

    def _send_ack(self, msg: SipMessage, dest: Address, source: Address | None = None) -> None:
        """``source``: where the ACK came from (None: not known here)."""
        if self.anchoring and msg.body:
            # the answer to an offer a 2xx carried (RFC 3261 13.2.1): rewritten by the relay
            sender = None if source is None else self.element.client(msg, source).host
            self.media.offer(msg, partial(self._ack_anchored, msg, dest), sender=sender)
            return
        self._send_ack_now(msg, dest)

    def _ack_anchored(self, msg: SipMessage, dest: Address, error: SipError | None) -> None:
        if error is not None:
            self.element.metrics.errors("ack_media_failed").inc()
        self._send_ack_now(msg, dest)

    def _send_ack_now(self, msg: SipMessage, dest: Address) -> None:
        _strip_identity(msg)
        msg.set("max-forwards", str(min(max_forwards(msg), MAX_FORWARDS) - 1).encode())
        # deterministic branch: a retransmitted ACK leaves with the same one (RFC 3261 16.11)
        digest = hashlib.blake2b(msg.top_via_value, digest_size=8).hexdigest().encode()
        msg.prepend("via", self.element.identity.via(dest.transport, MAGIC_COOKIE + b"a" + digest))
        self.element.layer.send_stateless(msg, dest)

    # -- helpers ---------------------------------------------------------------------------------

    def is_us(self, msg: SipMessage) -> bool:
        """The Request-URI names this node (or a served domain with no user part)."""
        try:
            uri = msg.request_uri
        except SipError:
            return False
        if not isinstance(uri, SipURI):
            return False
        if uri.user is None and uri.host in self.element.identity.domains:
            return True
        return self.element.identity.names(uri)


MAX_LOCATED = 8  # addresses of one gateway tried in turn


class ServerLocation(Protocol):
    """RFC 3263 server location (:class:`sipfarm.transport.rfc3263.ServerLocator`): the
    callback gets the targets in order (``transport``, ``ip``, ``port`` each) or an error."""

    def locate_uri(self, uri: SipURI, callback: Callable[[Any], None]) -> None: ...


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _websocket_uri(uri: bytes) -> bool:
    """A Contact reached over WebSocket (RFC 7118 5.2: ``;transport=ws`` or ``wss``)."""
    at = uri.lower().find(b";transport=ws")
    return at >= 0 and uri[at + 13 : at + 14] in (b"", b";", b"s", b">")


def _ignore(_ip: str | None) -> None:
    return None


def _release_call(call: ProxyCall) -> None:
    """Once the last transaction of a proxied request has terminated, drop the call's list of
    branches: each branch refers back to its call, a cycle that would otherwise wait for the
    cyclic GC with both messages of every branch."""
    if not call.server_tx.terminated:
        return
    for branch in call.branches:
        tx = branch.client_tx
        if tx is not None and not tx.terminated:
            return
    call.branches.clear()


class _Join:
    """Waits for ``needed`` named results (the Redis answers an initial request needs), then
    calls ``then`` with them. An object, not closures: no reference cycle per request (see
    farmstate.py)."""

    __slots__ = ("needed", "results", "then")

    def __init__(self, needed: int, then: Callable[[dict[str, object]], None]) -> None:
        self.needed = needed
        self.then = then
        self.results: dict[str, object] = {}

    def done(self, name: str, value: object) -> None:
        self.results[name] = value
        if len(self.results) == self.needed:
            self.then(self.results)


def _upstream(response: SipMessage) -> SipMessage:
    """The response as forwarded upstream: our Via removed (RFC 3261 16.7 step 3)."""
    out = response.copy()
    out.pop_first_value("via")
    return out


def _strip_identity(msg: SipMessage) -> None:
    """Remove the identity headers only the farm may write (RFC 3325 5)."""
    # one pass over the headers (was one per name); the list is rebuilt only when one is there,
    # keeping the others in order: what remove() per name left
    headers = msg.headers
    for key, _, _ in headers:
        if key in IDENTITY_HEADERS:
            msg.headers = [h for h in headers if h[0] not in IDENTITY_HEADERS]
            return


def _as_request_uri(contact: bytes) -> bytes:
    """A registered Contact as the Request-URI of a request to it: without the URI headers and
    ``method`` a Contact of a REGISTER may carry (RFC 3261 19.1.1 Table 1: neither is allowed in
    a Request-URI; a phone answered such an INVITE 400). The headers are not applied either:
    a Contact's ``?Route=...`` is the phone's wish, never the farm's routing."""
    uri = parse_uri(contact)
    if isinstance(uri, SipURI) and (uri.headers or uri.has_param("method")):
        return str(uri.without_param("method").replace(headers="")).encode("latin-1")
    return contact
