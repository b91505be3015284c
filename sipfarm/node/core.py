"""A registrar/proxy node's SIP logic: messages in, messages out, state in Redis.

Theory of operation
-------------------
The transport hands every parsed message to :meth:`NodeCore.on_message` (synchronously, no task
per message).  Requests go through the transaction layer first, which absorbs retransmissions;
what is new is dispatched:

* REGISTER -> digest challenge (no Redis), or account + ``register.lua`` (two pipelined round
  trips at most; the account is cached for a second or two), then 200 with every binding.
* initial INVITE/MESSAGE/... -> 407 challenge, or caller account + callee bindings + callee
  account in **one** pipeline; then parallel/serial forking over the bindings (RFC 3261 16).
* in-dialog requests (To tag) and ACK for 2xx -> loose routing by the Route set alone (RFC 3261
  16.12), so any node continues any dialog: nodes hold no dialog state.
* CANCEL -> 200, and CANCEL of every branch that has heard a provisional (RFC 3261 16.10).

Redis answers come back as callbacks from :class:`~sipfarm.store.resp.RedisPipe`; each one
ends with :meth:`flush`, which sends what the transaction layer queued, handles its events and
re-arms the one timer.  Every failure becomes a :class:`~sipfarm.sip.errors.SipError` answered
in one place (:meth:`_fail`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from sipfarm.edge import DIALOG_CREATING, FlowTokens, is_ip_literal, pop_own_routes
from sipfarm.metrics import NodeMetrics
from sipfarm.node.farmstate import FarmState
from sipfarm.proxy.forking import Branch, BranchState, ProxyCall, Target
from sipfarm.proxy.media import MediaHook, NoMedia
from sipfarm.registrar.bindings import ExpiresPolicy, RegisterRequest, read_register, register_ok
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
    AckFor2xx,
    ClientTransaction,
    InvalidTransition,
    ServerTransaction,
    StrayResponse,
    TimerConfig,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
    TxState,
)
from sipfarm.sip.uri import SipURI, URIError, parse_uri
from sipfarm.sip.via import default_port, response_target, via_value_target
from sipfarm.store.accounts import Account
from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.location import Binding, RegisterOutcome, RegisterResult
from sipfarm.transport.resolver import Resolver

log = logging.getLogger("sipfarm.node")

ALLOW = b"INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, INFO, UPDATE, PRACK, SUBSCRIBE, NOTIFY, REFER"
# Out-of-dialog requests a caller must authenticate for (407); others are let through.
AUTHENTICATED = frozenset({b"INVITE", b"MESSAGE", b"SUBSCRIBE", b"REFER", b"PUBLISH", b"NOTIFY", b"INFO"})

SendFn = Callable[[bytes, Address], bool]


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """How the node names itself on the wire."""

    node_id: str
    domains: frozenset[str]
    # transport -> (host, port) for our Via sent-by and Record-Route
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    # every host:port that means "this node" in a Route or Request-URI
    aliases: frozenset[tuple[str, int]] = frozenset()

    def record_route(self, transport: str) -> bytes:
        host, port = self.addresses.get(transport) or self.addresses["udp"]
        suffix = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{host}:{port};lr{suffix}>".encode()

    def via(self, transport: str, branch: bytes) -> bytes:
        host, port = self.addresses.get(transport) or self.addresses["udp"]
        return f"SIP/2.0/{transport.upper()} {host}:{port};branch=".encode() + branch


class NodeCore:
    """The registrar and proxy of one node worker."""

    def __init__(
        self,
        identity: NodeIdentity,
        state: FarmState,
        nonces: auth.NonceFactory,
        *,
        metrics: NodeMetrics | None = None,
        timers: TimerConfig | None = None,
        max_transactions: int = 200_000,
        policy: ExpiresPolicy | None = None,
        auth_requests: bool = True,
        digest_algorithms: tuple[str, ...] = ("MD5", "SHA-256"),
        timer_c: float = 180.0,
        flow_tokens: FlowTokens | None = None,
        router: Router | None = None,
        media: MediaHook | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.state = state
        self.nonces = nonces
        self.metrics = metrics or NodeMetrics()
        self.layer = TransactionLayer(timers=timers, max_transactions=max_transactions)
        self.policy = policy or ExpiresPolicy()
        self.auth_requests = auth_requests
        self.digest_algorithms = digest_algorithms
        # RFC 3261 16.6 step 11 / 16.8: Timer C per INVITE branch (> 3 min), reset by provisionals
        self.timer_c = timer_c
        # RFC 5626 edge-proxy role for clients connected straight to this node over TCP/TLS/WS:
        # their connection lives here, so other nodes reach them through our Path entry
        self.flow_tokens = flow_tokens or FlowTokens(secrets.token_bytes(32))
        self.router = router or Router(identity.domains)  # the one routing step
        self.media = media or NoMedia()  # the RTP relay hook
        self.resolver = Resolver()
        self._domain_bytes = frozenset(d.encode() for d in identity.domains)
        self._timer_c: dict[Branch, float] = {}
        self.wall = wall_clock
        self.send: SendFn = lambda data, dest: False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_key = hashlib.blake2b(identity.node_id.encode(), digest_size=8).digest()

    def attach(self, send: SendFn, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.send = send
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    # -- entry points ----------------------------------------------------------------------------

    def on_message(self, msg: SipMessage, source: Address, local: Address) -> None:
        """Transport callback. SipErrors raised before a transaction exists are answered by the
        transport (statelessly); after that they are answered here through the transaction."""
        now = self.now()
        try:
            if msg.status:
                self._on_response(msg, source, now)
            else:
                self._on_request(msg, source, local, now)
        finally:
            self.flush()

    def flush(self) -> None:
        """Send what the transaction layer queued, handle its events, re-arm the timer."""
        layer = self.layer
        for _ in range(8):  # events may queue more output; bounded
            for data, dest in layer.datagrams_to_send():
                if not self.send(data, dest):
                    log.debug("event=send_failed dest=%s", dest)
            events = layer.events()
            if not events:
                break
            for event in events:
                self._on_event(event)
        self._rearm()

    def _rearm(self) -> None:
        deadline = self.layer.next_deadline()
        if deadline is None or self._loop is None:
            return  # an armed timer may fire for nothing; cheaper than cancelling it here
        if self._timer_at is not None and self._timer_at <= deadline:
            return  # armed early enough: when it fires, handle_timer re-arms for what is left
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.layer.handle_timer(self.now())
        self.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- requests --------------------------------------------------------------------------------

    def _on_request(self, msg: SipMessage, source: Address, local: Address, now: float) -> None:
        self.metrics.requests(msg.method.decode("latin-1")).inc()
        if msg.method == b"REGISTER" and not msg.has("authorization"):
            # RFC 3261 8.2.7: a challenge may be sent by a stateless UAS. No transaction to keep
            # for 32 s: a lost 401 just gets a fresh challenge on the retransmission.
            self._challenge_stateless(msg, source)
            return
        if self._stateless_407(msg):
            # the same for an unauthenticated call to a local user (its ACK, matching nothing,
            # is dropped as an ACK whose Request-URI no hop serves)
            realm = self._caller_realm(msg, msg.request_uri)  # type: ignore[arg-type]
            response = self._challenge_response(msg, 407, realm, stale=False)
            self.layer.send_stateless(response, response_target(response, source))
            self.metrics.responses(407).inc()
            return
        if not source.reliable:
            # RFC 3261 18.2.2: UDP responses go to the Via (received, rport, else sent-by port),
            # not blindly to the source port: a balancer or node worker sending from a shared
            # socket names its own port in Via and must get the answer there
            source = self._reply_address(msg, source)
        stx = self.layer.receive_request(msg, source, now)
        if stx is None:
            return  # retransmission absorbed, or an ACK (AckFor2xx event)
        try:
            self._dispatch(stx, msg, source, local, now)
        except SipError as exc:
            self._fail(stx, exc)

    @staticmethod
    def _reply_address(msg: SipMessage, source: Address) -> Address:
        top = msg.top_via_value
        if top.find(b";rport=") >= 0:
            return source  # stamped by the transport: the source port is the answer port
        try:
            target = via_value_target(top)
        except SipError:
            return source
        return target if target.transport == source.transport else source

    def _dispatch(self, stx: ServerTransaction, msg: SipMessage, source: Address, local: Address, now: float) -> None:
        method = msg.method
        flow = self._pop_own_routes(msg)
        if flow is not None and flow != source and method not in (b"CANCEL", b"REGISTER"):
            # our own Path/Record-Route entry naming a client's connection held here: the
            # request was routed and authenticated by a node before us; deliver it on the flow
            if max_forwards(msg) <= 0:
                raise TooManyHops("Max-Forwards reached 0", partial=msg)
            self._forward_to(stx, msg, local, flow, now, record_route_flow=flow)
            return
        if method == b"CANCEL":
            self._on_cancel(stx, msg, now)
            return
        in_dialog = msg.to_tag is not None
        if max_forwards(msg) <= 0:
            if method == b"OPTIONS" and self._is_us(msg):
                self._answer_options(stx, msg)
                return
            raise TooManyHops("Max-Forwards reached 0", partial=msg)
        if in_dialog:
            self._forward_along_route(stx, msg, local, now)
            return
        if method == b"REGISTER":
            self._on_register(stx, msg, source, now)
            return
        if method == b"OPTIONS" and self._is_us(msg):
            self._answer_options(stx, msg)
            return
        self._check_loop(msg)
        self._on_initial(stx, msg, local, now)

    def _answer_options(self, stx: ServerTransaction, msg: SipMessage) -> None:
        self._reply(
            stx,
            make_response(
                msg,
                200,
                to_tag=self._tag(msg),
                headers=(
                    ("allow", ALLOW),
                    ("accept", b"application/sdp"),
                    ("supported", b"path, outbound"),
                ),
            ),
        )

    # -- registrar -------------------------------------------------------------------------------

    def _on_register(self, stx: ServerTransaction, msg: SipMessage, source: Address, now: float) -> None:
        # RFC 3261 10.3 step 2 comes before the Contacts are read: challenge first, cheaply
        realm = self._register_realm(msg)
        creds = self._credentials(msg, "authorization", realm)
        if creds is None:
            self._challenge(stx, msg, 401, realm, stale=False)
            return
        reg = read_register(msg, self.identity.domains, self.policy)
        if reg.domain != realm:
            raise Forbidden("To and Request-URI name different domains", partial=msg)
        if creds.username != reg.user:
            self.metrics.auth_failures("user_mismatch").inc()
            raise Forbidden("credentials do not match the address-of-record", partial=msg)
        # partials of methods, not closures: no reference cycle per request (see farmstate.py)
        done = partial(self._register_with_account, stx, msg, source, creds, reg, now, self.wall())
        self.state.get_account(reg.user, reg.domain, done)

    def _register_with_account(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        source: Address,
        creds: auth.Credentials,
        reg: RegisterRequest,
        started: float,
        wall: float,
        account: Account | StoreError | None,
    ) -> None:
        if isinstance(account, StoreError):
            self._store_failed(stx, msg, account)
            return
        result = self._verify(creds, msg, account, reg.domain, wall)
        if result is not None:
            self._auth_failed(stx, msg, 401, reg.domain, result)
            return
        assert account is not None
        try:
            self.state.register(
                reg.aor,
                reg.updates,
                partial(self._register_applied, stx, msg, reg, started),
                call_id=msg.call_id.decode("latin-1"),
                cseq=msg.cseq[0],
                now=wall,
                max_contacts=account.max_contacts,
                remove_all=reg.remove_all,
                path=self._register_path(reg.path, reg.outbound, source),
                received=str(source),
                user_agent=(msg.get("user-agent") or b"").decode("utf-8", "replace")[:100],
                node=self.identity.node_id,
            )
        except ValueError as exc:
            self._fail(stx, BadMessage(str(exc), partial=msg))
        self.flush()

    def _register_applied(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        reg: RegisterRequest,
        started: float,
        res: RegisterResult | StoreError,
    ) -> None:
        if isinstance(res, StoreError):
            self._store_failed(stx, msg, res)
            return
        if res.outcome is RegisterOutcome.OK:
            response = register_ok(msg, res.bindings, self.wall(), self._tag(msg), outbound=reg.outbound)
        else:
            response = make_response(msg, res.outcome.sip_status, res.outcome.sip_reason, to_tag=self._tag(msg))
        self.metrics.register_seconds.observe(self.now() - started)
        self._reply(stx, response)
        self.flush()

    def _register_path(self, path: tuple[str, ...], outbound: bool, source: Address) -> tuple[str, ...]:
        """The Path to store: the request's, or (a client connected straight to this node over a
        connection, or an outbound client) our own entry naming its flow, so any node reaches it
        through us (RFC 3327 / RFC 5626 5.1, the node acting as its own edge proxy)."""
        if path or (source.transport == "udp" and not outbound):
            return path
        return (self._flow_uri(source, outbound=True).decode("latin-1"),)

    # -- authentication --------------------------------------------------------------------------

    def _credentials(self, msg: SipMessage, header: str, realm: str) -> auth.Credentials | None:
        """Our realm's credentials in ``header`` (None: none, challenge)."""
        for value in msg.get_all(header):
            try:
                creds = auth.parse_credentials(value)
            except auth.UnsupportedSchemeError:
                continue
            except auth.AuthHeaderError as exc:
                self.metrics.auth_failures("malformed").inc()
                raise BadMessage(f"{header}: {exc}", partial=msg) from None
            if creds.realm == realm:
                return creds
        return None

    def _verify(
        self, creds: auth.Credentials, msg: SipMessage, account: Account | None, realm: str, wall: float
    ) -> auth.AuthResult | None:
        """None when authenticated; else the failed result. Unknown user == wrong password."""
        ha1 = account.ha1_by_algorithm if account is not None and account.enabled else None
        result = auth.verify(creds, msg.method, ha1, self.nonces, wall, realm)
        return None if result.ok else result

    def _register_realm(self, msg: SipMessage) -> str:
        """The served domain a REGISTER is for (its realm), or Forbidden."""
        uri = msg.request_uri
        if isinstance(uri, SipURI) and uri.host in self.identity.domains:
            return uri.host
        # a phone configured with the farm's address as registrar (sip:IP:port): the
        # address-of-record's domain, in To, decides (step 1 leaves it to the registrar)
        to_uri = msg.to.uri
        if not isinstance(to_uri, SipURI) or to_uri.host not in self.identity.domains:
            raise Forbidden("not a domain of this registrar", partial=msg)
        return to_uri.host

    def _challenge_response(self, msg: SipMessage, status: int, realm: str, *, stale: bool) -> SipMessage:
        nonce = self.nonces.issue(self.wall(), realm)
        key = "www-authenticate" if status == 401 else "proxy-authenticate"
        headers = [(key, value) for value in auth.build_challenges(realm, nonce, self.digest_algorithms, stale=stale)]
        return make_response(msg, status, to_tag=self._tag(msg), headers=headers)

    def _challenge(self, stx: ServerTransaction, msg: SipMessage, status: int, realm: str, *, stale: bool) -> None:
        self._reply(stx, self._challenge_response(msg, status, realm, stale=stale))

    def _caller_realm(self, msg: SipMessage, uri: SipURI) -> str:
        caller = msg.from_.uri
        return caller.host if isinstance(caller, SipURI) and caller.host in self.identity.domains else uri.host

    def _stateless_407(self, msg: SipMessage) -> bool:
        """An initial request a caller must authenticate for, with no credentials, to a user of
        a served domain, not routed anywhere else: it gets its 407 without a transaction."""
        if not self.auth_requests or msg.method not in AUTHENTICATED or msg.has("proxy-authorization"):
            return False
        if msg.has("route") or msg.to_tag is not None or max_forwards(msg) <= 0:
            return False
        uri = msg.request_uri
        return isinstance(uri, SipURI) and uri.user is not None and uri.host in self.identity.domains

    def _challenge_stateless(self, msg: SipMessage, source: Address) -> None:
        response = self._challenge_response(msg, 401, self._register_realm(msg), stale=False)
        self.layer.send_stateless(response, response_target(response, source))
        self.metrics.responses(401).inc()

    def _auth_failed(
        self, stx: ServerTransaction, msg: SipMessage, status: int, realm: str, result: auth.AuthResult
    ) -> None:
        stale = result.outcome is auth.AuthOutcome.STALE
        self.metrics.auth_failures("stale" if stale else "failed").inc()
        if not stale:
            log.info(
                "event=auth_failed call_id=%s reason=%s", msg.call_id.decode("latin-1"), result.reason.replace(" ", "_")
            )
        self._challenge(stx, msg, status, realm, stale=stale)
        self.flush()

    # -- proxy: initial requests -----------------------------------------------------------------

    def _on_initial(self, stx: ServerTransaction, msg: SipMessage, local: Address, now: float) -> None:
        uri = msg.request_uri
        call = ProxyCall(server_tx=stx, request=msg, started=now)
        stx.context = call

        self.router.route(msg, uri, partial(self._decided, call, msg, local))

    def _decided(self, call: ProxyCall, msg: SipMessage, local: Address, decision: Decision) -> None:
        try:
            self._on_decision(call, msg, local, decision)
        except SipError as exc:
            self._fail(call.server_tx, exc)
        self.flush()

    def _on_decision(self, call: ProxyCall, msg: SipMessage, local: Address, decision: Decision) -> None:
        stx = call.server_tx
        assert isinstance(stx, ServerTransaction)
        if call.cancelled or call.answered:
            return
        if decision.action is Action.REJECT:
            self.metrics.errors(f"route_{decision.status}").inc()
            call.answered = True
            self._reply(stx, make_response(msg, decision.status, decision.reason or None, to_tag=self._tag(msg)))
            return
        if decision.action is not Action.LOCAL:
            raise ServerInternalError(f"routing action {decision.action.value} is not available", partial=msg)
        uri = msg.request_uri
        assert isinstance(uri, SipURI)
        callee_user = decision.user
        method = msg.method
        creds: auth.Credentials | None = None
        realm = ""
        if self.auth_requests and method in AUTHENTICATED:
            realm = self._caller_realm(msg, uri)
            creds = self._credentials(msg, "proxy-authorization", realm)
            if creds is None:
                self._challenge(stx, msg, 407, realm, stale=False)
                return
        wall = self.wall()
        route = partial(self._route_with, call, msg, local, creds, realm, uri, wall)
        join = _Join(3 if creds is not None else 2, route, self.flush)
        if creds is not None:
            self.state.get_account(creds.username, realm, partial(join.done, "caller"))
        self.state.lookup(decision.aor, wall, partial(join.done, "bindings"))
        self.state.get_account(callee_user, decision.domain, partial(join.done, "callee"))

    def _route_with(
        self,
        call: ProxyCall,
        msg: SipMessage,
        local: Address,
        creds: auth.Credentials | None,
        realm: str,
        uri: SipURI,
        wall: float,
        results: dict[str, object],
    ) -> None:
        """Routing goes on once the lookups of :meth:`_on_decision` are all answered."""
        stx = call.server_tx
        assert isinstance(stx, ServerTransaction)
        try:
            for value in results.values():
                if isinstance(value, StoreError):
                    self._store_failed(stx, msg, value)
                    return
            if call.cancelled:
                return
            if creds is not None:
                caller = results["caller"]
                assert caller is None or isinstance(caller, Account)
                failed = self._verify(creds, msg, caller, realm, wall)
                if failed is not None:
                    self._auth_failed(stx, msg, 407, realm, failed)
                    return
                msg.remove("proxy-authorization")  # ours, consumed (RFC 3261 22.3)
            bindings = results["bindings"]
            assert isinstance(bindings, list)
            if not bindings:
                if results["callee"] is None:
                    raise NotFound("no such user", partial=msg)
                raise TemporarilyUnavailable("user not registered", partial=msg)
            targets = [self._binding_target(b) for b in bindings]
            call.set_targets(t for t in targets if t is not None)
            call.record_route = msg.method in DIALOG_CREATING
            call.inbound = local.transport
            self.metrics.invite_seconds.observe(self.now() - call.started)
            if msg.method == b"INVITE" and msg.body:
                self.media.offer(msg, partial(self._offered, call))
            else:
                self._start_group(call, self.now())
        except SipError as exc:
            self._fail(stx, exc)

    def _offered(self, call: ProxyCall, error: SipError | None) -> None:
        if error is not None:
            self._fail(call.server_tx, error)
        elif not call.cancelled:
            self._start_group(call, self.now())
        self.flush()

    def _binding_target(self, binding: Binding) -> Target | None:
        contact = binding.contact.encode("latin-1")
        route = tuple(p.encode("latin-1") for p in binding.path)
        try:
            if route:
                dest = self._uri_destination(parse_name_addr(route[0]).uri)
            elif binding.received and (binding.reg_id is not None or not binding.received.startswith("udp:")):
                # the flow the REGISTER came over: RFC 5626 5.3 for outbound contacts, and the
                # connection a TCP/TLS/WS client registered on (its Contact port may not listen)
                dest = Address.parse(binding.received)
            else:
                dest = self._uri_destination(parse_uri(contact))
        except Unresolved as pending:
            self.resolver.resolve(pending.host, lambda _ip: None)
            log.info("event=binding_host_resolving host=%s", pending.host)
            return None
        except (HeaderError, URIError, ValueError):
            log.info("event=bad_binding contact=%s", binding.contact)
            return None
        return Target(uri=contact, destination=dest, route=route, q=binding.q)

    # -- proxy: in-dialog and pre-routed requests ------------------------------------------------

    def _forward_along_route(self, stx: ServerTransaction, msg: SipMessage, local: Address, now: float) -> None:
        """RFC 3261 16.12: the next hop is the top Route, else the Request-URI. No state needed."""
        if msg.method == b"BYE":
            self.media.release(msg.call_id, msg.from_tag)
        try:
            dest = self._next_hop(msg)
        except Unresolved as pending:
            hop = pending  # the except name is unbound after the block; the callback needs it

            def resolved(ip: str | None) -> None:
                if stx.terminated:
                    return
                if ip is None:
                    self._fail(stx, BadGateway(f"cannot resolve {hop.host}", partial=msg))
                else:
                    self._forward_to(stx, msg, local, Address(hop.transport, ip, hop.port), self.now())
                self.flush()

            self.resolver.resolve(hop.host, resolved)
            return
        self._forward_to(stx, msg, local, dest, now)

    def _forward_to(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        local: Address,
        dest: Address,
        now: float,
        *,
        record_route_flow: Address | None = None,
    ) -> None:
        call = ProxyCall(server_tx=stx, request=msg, started=now)
        call.inbound = local.transport
        if record_route_flow is not None and msg.to_tag is None and msg.method in DIALOG_CREATING:
            call.record_route = True
            call.record_route_flow = record_route_flow
        stx.context = call
        call.set_targets([Target(uri=msg.uri, destination=dest)])
        self._start_group(call, now)

    def _next_hop(self, msg: SipMessage) -> Address:
        """Where a request goes by its Route set or Request-URI (raises Unresolved, BadMessage)."""
        routes = msg.values("route")
        try:
            if routes:
                return self._uri_destination(parse_name_addr(routes[0]).uri)
            return self._uri_destination(msg.request_uri)
        except (HeaderError, URIError) as exc:
            raise BadMessage(f"bad Route: {exc}", partial=msg) from None

    def _uri_destination(self, uri: object) -> Address:
        """RFC 3263 as far as a farm needs it: IP literals, cached names (A/AAAA), maddr, the
        URI's transport and port or the transport's default. An unknown name raises
        :class:`Unresolved` after starting its resolution; a known-bad one URIError."""
        if not isinstance(uri, SipURI):
            raise URIError("next hop is not a SIP URI")
        transport = uri.transport
        host = uri.param("maddr") or uri.host
        host = host.strip("[]")
        port = uri.port or default_port(transport)
        if not is_ip_literal(host):
            if host in self.identity.domains:
                # a served domain names the farm's users, never a next hop (e.g. the ACK of a
                # stateless 407 has the callee's AOR as Request-URI): nothing to look up
                raise URIError(f"{host} is a served domain, not a next hop")
            ip = self.resolver.cached(host)
            if ip is None:
                raise Unresolved(host, transport, port)
            if not ip:
                raise URIError(f"cannot resolve {host!r}")
            host = ip
        return Address(transport, host, port)

    # -- forking ---------------------------------------------------------------------------------

    def _start_group(self, call: ProxyCall, now: float) -> None:
        stx = call.server_tx
        assert isinstance(stx, ServerTransaction)
        group = call.next_group()
        for target in group:
            request = self._branch_request(call, target)
            branch = Branch(call=call, target=target, request=request)
            try:
                ctx = self.layer.start_client(request, target.destination, now)
            except ServiceUnavailable:
                continue
            ctx.context = branch
            branch.client_tx = ctx
            call.branches.append(branch)
            if call.is_invite:
                self._timer_c[branch] = now + self.timer_c
        if not call.active():
            self._maybe_finish(call, now)

    def _branch_request(self, call: ProxyCall, target: Target) -> SipMessage:
        req = call.request.copy()
        if target.uri != req.uri:
            req.set_uri(target.uri)
        req.set("max-forwards", str(max_forwards(req) - 1).encode())
        out_transport = target.destination.transport
        if call.record_route:
            flow = call.record_route_flow
            if flow is not None:
                # toward a client on our connection: the entry carries its flow token
                if call.inbound != out_transport:
                    req.prepend("record-route", self.identity.record_route(call.inbound))
                req.prepend("record-route", self._flow_uri(flow))
            else:
                # RFC 5658 double Record-Route when the transport changes on the way through
                if call.inbound != out_transport:
                    req.prepend("record-route", self.identity.record_route(call.inbound))
                req.prepend("record-route", self.identity.record_route(out_transport))
        for route in reversed(target.route):
            req.prepend("route", route)
        branch = MAGIC_COOKIE + self._loop_hash(call.request) + b"." + random_hex(6)
        req.prepend("via", self.identity.via(out_transport, branch))
        return req

    def _loop_hash(self, msg: SipMessage) -> bytes:
        """RFC 3261 16.6 step 8: a branch part that is the same for the same request here."""
        h = hashlib.blake2b(key=self._loop_key, digest_size=6)
        h.update(msg.uri)
        h.update(msg.from_tag or b"")
        h.update(msg.call_id)
        h.update(str(msg.cseq[0]).encode())
        return h.hexdigest().encode()

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

    def _on_response(self, msg: SipMessage, source: Address, now: float) -> None:
        ctx = self.layer.receive_response(msg, source, now)
        if ctx is None:
            return
        branch = ctx.context
        if not isinstance(branch, Branch):
            return  # e.g. the answer to a CANCEL we sent
        call = branch.call
        status = msg.status
        if len(msg.values("via")) < 2:
            # RFC 3261 16.7 step 3: with our Via gone nothing would route it upstream. A peer
            # that echoed only our Via (e.g. answering with a CANCEL's Via set) still answered
            # this branch: give the response the Via set the branch's request carried.
            self.metrics.errors("response_via_missing").inc()
            msg = msg.copy()
            msg.remove("via")
            for value in reversed(branch.request.get_all("via")):
                msg.prepend("via", value)
        if status < 200:
            if branch in self._timer_c:
                self._timer_c[branch] = now + self.timer_c
            if branch.state is BranchState.STARTED:
                branch.state = BranchState.PROCEEDING
            if branch.cancel_wanted and not branch.cancelled:
                self._send_cancel(branch, now)  # the CANCEL held back until now (RFC 3261 9.1)
            if status > 100 and not call.answered:
                self._send_upstream(call, _upstream(msg))
            return
        self._timer_c.pop(branch, None)
        if 200 <= status < 300:
            first = branch.state is not BranchState.COMPLETED
            branch.state = BranchState.COMPLETED
            call.answered = True
            self._send_upstream(call, _upstream(msg))
            if first and call.is_invite:
                call.groups.clear()
                for other in call.active():
                    self._cancel_branch(other, now)
            return
        if branch.state is BranchState.COMPLETED:
            return
        branch.state = BranchState.COMPLETED
        call.record_final(msg)
        if status >= 600 and call.is_invite:
            call.groups.clear()  # RFC 3261 16.7 step 5: no more branches, cancel the others
            for other in call.active():
                self._cancel_branch(other, now)
        self._maybe_finish(call, now)

    def _maybe_finish(self, call: ProxyCall, now: float) -> None:
        if call.answered or call.active():
            return
        if call.groups and not call.cancelled:
            self._start_group(call, now)
            return
        best = call.final_to_forward()
        if best is None:
            response = make_response(call.request, 408 if call.branches else 480, to_tag=self._tag(call.request))
        else:
            response = _upstream(best)
        call.answered = True
        if call.is_invite:
            self.media.release(call.request.call_id, call.request.from_tag)
        self._send_upstream(call, response)

    def _send_upstream(self, call: ProxyCall, response: SipMessage) -> None:
        stx = call.server_tx
        assert isinstance(stx, ServerTransaction)
        if call.is_invite and response.body and response.status < 300:
            self.media.answer(response, partial(self._answered, stx, response))
            return
        self._reply(stx, response)

    def _answered(self, stx: ServerTransaction, response: SipMessage, error: SipError | None) -> None:
        if error is not None:
            log.warning(
                "event=media_answer_failed call_id=%s error=%s",
                response.call_id.decode("latin-1"),
                str(error).replace(" ", "_"),
            )
        self._reply(stx, response)
        self.flush()

    def sweep(self, now: float) -> None:
        """Timer C (RFC 3261 16.8): a branch ringing too long is CANCELled and counts as 408;
        if even the CANCEL gets no answer, its transaction is abandoned so memory stays bounded."""
        for branch, deadline in list(self._timer_c.items()):
            if deadline > now:
                continue
            tx = branch.client_tx
            if branch.cancelled or branch.state is BranchState.COMPLETED:
                del self._timer_c[branch]
                if isinstance(tx, ClientTransaction) and not tx.terminated:
                    self.layer.transport_error(tx, now)
                continue
            if branch.state is BranchState.PROCEEDING:
                self._cancel_branch(branch, now)
                branch.state = BranchState.COMPLETED
                branch.call.record_final(make_response(branch.request, 408))
                self._timer_c[branch] = now + 64 * self.layer.timers.t1
                self._maybe_finish(branch.call, now)
            else:
                del self._timer_c[branch]  # no provisional yet: Timer B ends it
        self.flush()

    # -- CANCEL ----------------------------------------------------------------------------------

    def _on_cancel(self, stx: ServerTransaction, msg: SipMessage, now: float) -> None:
        invite = self.layer.find_invite_for_cancel(msg)
        if invite is None:
            raise CallDoesNotExist("no INVITE transaction to cancel", partial=msg)
        self._reply(stx, make_response(msg, 200, to_tag=self._tag(msg)))
        call = invite.context
        if not isinstance(call, ProxyCall) or call.answered:
            return
        call.cancelled = True
        call.groups.clear()
        active = call.active()
        if not active:
            # still waiting on Redis (or nothing forked): answer the INVITE ourselves
            call.answered = True
            self._reply(invite, make_response(call.request, 487, to_tag=self._tag(call.request)))
            return
        for branch in active:
            self._cancel_branch(branch, now)
            if branch.state is BranchState.STARTED:
                # Its CANCEL waits for a provisional (RFC 3261 9.1) that may never come: the
                # branch ends here as a 487 so the caller is answered now, not at Timer B.
                branch.state = BranchState.COMPLETED
                call.record_final(make_response(branch.request, 487, to_tag=self._tag(call.request)))
        self._maybe_finish(call, now)

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
        cancel.set_body(b"", None)
        ctx = branch.client_tx
        assert isinstance(ctx, ClientTransaction)
        try:
            self.layer.start_client(cancel, ctx.remote, now)
        except (ServiceUnavailable, ValueError):
            log.debug("event=cancel_not_sent call_id=%s", req.call_id.decode("latin-1"))

    # -- transaction events ----------------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        now = self.now()
        if isinstance(event, TransactionTimeout | TransportFailure):
            tx = event.tx
            branch = tx.context
            if isinstance(branch, Branch) and branch.state is not BranchState.COMPLETED:
                # RFC 3261 16.7 step 2 / 16.9: a timeout is a 408, a transport error a 503
                status = 408 if isinstance(event, TransactionTimeout) else 503
                branch.state = BranchState.COMPLETED
                branch.call.record_final(make_response(branch.request, status))
                self._maybe_finish(branch.call, now)
        elif isinstance(event, AckFor2xx):
            self._forward_ack(event.request)
        elif isinstance(event, StrayResponse):
            self._forward_stray(event.response)
        elif isinstance(event, TransactionTerminated):
            context = event.tx.context
            event.tx.context = None
            if isinstance(context, Branch):
                self._timer_c.pop(context, None)
                _release_call(context.call)
            elif isinstance(context, ProxyCall):
                _release_call(context)

    def _forward_ack(self, msg: SipMessage) -> None:
        """ACK for 2xx: forwarded statelessly along its Route set (RFC 3261 16.11)."""
        if not msg.has("route") and msg.uri.partition(b"@")[2].split(b";", 1)[0] in self._domain_bytes:
            return  # the ACK of a stateless 407 (Request-URI: a user of ours, no route): ends here
        try:
            self._pop_own_routes(msg)
            if max_forwards(msg) <= 0:
                return
            dest = self._next_hop(msg)
        except Unresolved as pending:
            # the next ACK (the UAS retransmits its 2xx until one arrives) finds the name cached
            self.resolver.resolve(pending.host, lambda _ip: None)
            return
        except SipError:
            return
        msg.set("max-forwards", str(max_forwards(msg) - 1).encode())
        # deterministic branch: a retransmitted ACK leaves with the same one (RFC 3261 16.11)
        digest = hashlib.blake2b(msg.top_via_value, digest_size=8).hexdigest().encode()
        msg.prepend("via", self.identity.via(dest.transport, MAGIC_COOKIE + b"a" + digest))
        self.layer.send_stateless(msg, dest)

    def _forward_stray(self, response: SipMessage) -> None:
        """A 2xx retransmission after our transaction is gone: forward it by its Via."""
        if not (200 <= response.status < 300 and response.cseq[1] == b"INVITE"):
            return
        upstream = _upstream(response)
        try:
            dest = via_value_target(upstream.top_via_value)
        except SipError:
            return
        self.layer.send_stateless(upstream, dest)

    # -- helpers ---------------------------------------------------------------------------------

    def _reply(self, stx: ServerTransaction, response: SipMessage) -> None:
        if 200 <= response.status < 300 and stx.state in _AFTER_NON_2XX and response.cseq[1] == b"INVITE":
            # RFC 3261 16.7 step 5, RFC 6026 7.2: a 2xx is forwarded even after the caller got a
            # non-2xx final (a callee answering as our 487 for a CANCEL went up): statelessly,
            # so the caller can ACK and hang up the call it did not want
            self.layer.send_stateless(response, response_target(response, stx.source))
            self.metrics.responses(response.status).inc()
            self.metrics.errors("late_2xx_forwarded").inc()
            return
        try:
            self.layer.send_response(stx, response, self.now())
        except InvalidTransition:
            return  # the transaction ended meanwhile (client gave up): nothing to answer
        self.metrics.responses(response.status).inc()

    def _fail(self, stx: ServerTransaction, exc: SipError) -> None:
        """The one place a SipError on a transaction becomes its answer."""
        self.metrics.errors(exc.counter).inc()
        call = stx.context
        if isinstance(call, ProxyCall):
            if call.answered:
                return
            call.answered = True
        response = error_response(stx.request, exc, self._tag(stx.request))
        if response is not None:
            self._reply(stx, response)

    def _store_failed(self, stx: ServerTransaction, msg: SipMessage, exc: StoreError) -> None:
        self.metrics.redis_errors.inc()
        if isinstance(exc, StoreUnavailable):
            error: SipError = ServiceUnavailable("Redis unavailable", retry_after=exc.retry_after, partial=msg)
        else:
            log.warning("event=store_error call_id=%s error=%s", msg.call_id.decode("latin-1"), exc)
            error = ServerInternalError("store error", partial=msg)
        self._fail(stx, error)
        self.flush()

    def _tag(self, msg: SipMessage) -> bytes:
        # a To tag that is stable for retransmissions of the same request
        h = hashlib.blake2b(msg.call_id + msg.top_via_value, digest_size=5, key=self._loop_key)
        return h.hexdigest().encode()

    def _is_us(self, msg: SipMessage) -> bool:
        """The Request-URI names this node (or a served domain with no user part)."""
        try:
            uri = msg.request_uri
        except SipError:
            return False
        if not isinstance(uri, SipURI):
            return False
        if uri.user is None and uri.host in self.identity.domains:
            return True
        return self._names_us(uri)

    def _names_us(self, uri: SipURI) -> bool:
        port = uri.port or default_port(uri.transport)
        return (uri.host.strip("[]"), port) in self.identity.aliases

    def _pop_own_routes(self, msg: SipMessage) -> Address | None:
        """RFC 3261 16.4: remove the Route entries that name us (two with double RR); the
        client flow named by a token in one of them, if any."""
        return pop_own_routes(msg, self._names_us, self.flow_tokens)

    def _flow_uri(self, flow: Address, *, outbound: bool = False) -> bytes:
        """Our URI naming ``flow``, for Path (``ob``) and Record-Route (RFC 5626 5.1)."""
        host, port = self.identity.addresses.get(flow.transport) or self.identity.addresses["udp"]
        params = ";lr" + ("" if flow.transport == "udp" else f";transport={flow.transport}")
        if outbound:
            params += ";ob"
        return f"<sip:{self.flow_tokens.encode(flow)}@{host}:{port}{params}>".encode()


# INVITE server transaction states that take no more final responses (a non-2xx was sent).
_AFTER_NON_2XX = frozenset({TxState.COMPLETED, TxState.CONFIRMED, TxState.TERMINATED})


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
    calls ``then`` with them, then ``after``. An object, not closures: no reference cycle per request (see
    farmstate.py)."""

    __slots__ = ("after", "needed", "results", "then")

    def __init__(self, needed: int, then: Callable[[dict[str, object]], None], after: Callable[[], None]) -> None:
        self.needed = needed
        self.then = then
        self.after = after  # the node's flush: what `then` queued goes out now
        self.results: dict[str, object] = {}

    def done(self, name: str, value: object) -> None:
        self.results[name] = value
        if len(self.results) == self.needed:
            self.then(self.results)
            self.after()


class Unresolved(Exception):
    """A next hop names a host not resolved yet (its resolution has to be started)."""

    def __init__(self, host: str, transport: str, port: int) -> None:
        super().__init__(host)
        self.host = host
        self.transport = transport
        self.port = port


def _upstream(response: SipMessage) -> SipMessage:
    """The response as forwarded upstream: our Via removed (RFC 3261 16.7 step 3)."""
    out = response.copy()
    out.pop_first_value("via")
    return out
