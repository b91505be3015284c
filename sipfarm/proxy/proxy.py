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
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol

from sipfarm.edge import DIALOG_CREATING, FlowTokens, flow_uri, pop_own_routes
from sipfarm.element import Element
from sipfarm.protect.authenticator import AccountSource, AuthAnswer, Authenticator, Verdict
from sipfarm.proxy.forking import Branch, BranchState, ProxyCall, Target
from sipfarm.proxy.media import MediaHook, NoMedia
from sipfarm.proxy.nexthop import NameResolver, Unresolved, uri_destination
from sipfarm.routing.router import Action, Decision, Router
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import (
    BadGateway,
    BadMessage,
    CallDoesNotExist,
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
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import max_forwards
from sipfarm.sip.transaction import (
    MAGIC_COOKIE,
    AckFor2xx,
    ClientTransaction,
    ServerTransaction,
    StrayResponse,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
)
from sipfarm.sip.uri import SipURI, URIError, parse_uri
from sipfarm.sip.via import via_value_target
from sipfarm.store.accounts import Account
from sipfarm.store.errors import StoreError
from sipfarm.store.location import Binding

log = logging.getLogger("sipfarm.proxy")

ALLOW = b"INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, MESSAGE, INFO, UPDATE, PRACK, SUBSCRIBE, NOTIFY, REFER"
# Out-of-dialog requests a caller must authenticate for (407); others are let through.
AUTHENTICATED = frozenset({b"INVITE", b"MESSAGE", b"SUBSCRIBE", b"REFER", b"PUBLISH", b"NOTIFY", b"INFO"})


class LocationSource(AccountSource, Protocol):
    def lookup(self, aor: str, now: float, callback: Callable[[list[Binding] | StoreError], None]) -> None: ...


class Proxy:
    def __init__(
        self,
        element: Element,
        authenticator: Authenticator,
        state: LocationSource,
        resolver: NameResolver,
        *,
        flow_tokens: FlowTokens,
        router: Router | None = None,
        media: MediaHook | None = None,
        auth_requests: bool = True,
        timer_c: float = 180.0,
    ) -> None:
        self.element = element
        self.auth = authenticator
        self.state = state
        self.resolver = resolver
        self.flow_tokens = flow_tokens
        self.router = router or Router(element.identity.domains)  # the one routing step
        self.media = media or NoMedia()  # the RTP relay hook
        self.auth_requests = auth_requests
        # RFC 3261 16.6 step 11 / 16.8: Timer C per INVITE branch (> 3 min), reset by provisionals
        self.timer_c = timer_c
        self._timer_c: dict[Branch, float] = {}
        self._timer_heap: list[tuple[float, int, Branch]] = []
        self._timer_seq = 0
        identity = element.identity
        self._domain_bytes = frozenset(d.encode() for d in identity.domains)
        self._loop_key = hashlib.blake2b(identity.node_id.encode(), digest_size=8).digest()

    # -- entry points ----------------------------------------------------------------------------

    def stateless_407(self, msg: SipMessage, source: Address) -> bool:
        """An initial request a caller must authenticate for, with no credentials, to a user of
        a served domain, not routed anywhere else: its 407 goes without a transaction (its ACK,
        matching nothing, is dropped as an ACK whose Request-URI no hop serves)."""
        if not self.auth_requests or msg.method not in AUTHENTICATED or msg.has("proxy-authorization"):
            return False
        if msg.has("route") or msg.to_tag is not None or max_forwards(msg) <= 0:
            return False
        uri = msg.request_uri
        if not (isinstance(uri, SipURI) and uri.user is not None and uri.host in self.element.identity.domains):
            return False
        realm = self.auth.caller_realm(msg, uri)
        self.element.send_stateless(msg, self.auth.challenge(msg, 407, realm), source)
        return True

    def own_routes(self, msg: SipMessage) -> Address | None:
        """RFC 3261 16.4: remove the Route entries that name us (two with double RR); the
        client flow named by a token in one of them, if any."""
        return pop_own_routes(msg, self.element.identity.names, self.flow_tokens)

    def on_request(self, stx: ServerTransaction, msg: SipMessage, local: Address, flow: Address | None) -> None:
        """Every request but REGISTER, its own Route entries already removed (``flow``: the
        client flow one of them named)."""
        method = msg.method
        now = self.element.now()
        if flow is not None and method != b"CANCEL":
            # our own Path/Record-Route entry naming a client's connection held here: the
            # request was routed and authenticated by a node before us; deliver it on the flow
            if max_forwards(msg) <= 0:
                raise TooManyHops("Max-Forwards reached 0", partial=msg)
            self._forward_to(stx, msg, local, flow, now, record_route_flow=flow)
            return
        if method == b"CANCEL":
            self._on_cancel(stx, msg, now)
            return
        if max_forwards(msg) <= 0:
            if method == b"OPTIONS" and self._is_us(msg):
                self._answer_options(stx, msg)
                return
            raise TooManyHops("Max-Forwards reached 0", partial=msg)
        if msg.to_tag is not None:
            self._forward_along_route(stx, msg, local, now)
            return
        if method == b"OPTIONS" and self._is_us(msg):
            self._answer_options(stx, msg)
            return
        self._check_loop(msg)
        self._on_initial(stx, msg, local, now)

    def _answer_options(self, stx: ServerTransaction, msg: SipMessage) -> None:
        headers = (("allow", ALLOW), ("accept", b"application/sdp"), ("supported", b"path, outbound"))
        self.element.reply(stx, make_response(msg, 200, to_tag=self.element.tag(msg), headers=headers))

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
        if decision.action is not Action.LOCAL:
            raise ServerInternalError(f"routing action {decision.action.value} is not available", partial=msg)
        uri = msg.request_uri
        assert isinstance(uri, SipURI)
        realm = ""
        creds: auth.Credentials | None = None
        if self.auth_requests and msg.method in AUTHENTICATED:
            realm = self.auth.caller_realm(msg, uri)
            creds = self.auth.credentials(msg, "proxy-authorization", realm)
            if creds is None:
                call.answered = True
                element.reply(stx, self.auth.challenge(msg, 407, realm))
                return
        # authentication (account + guard) and the callee's bindings and account: one pipeline
        join = _Join(3 if creds is not None else 2, partial(self._route_with, call, msg, local, realm))
        if creds is not None:
            self.auth.authenticate(creds, msg, stx.source, realm, partial(join.done, "auth"))
        self.state.lookup(decision.aor, element.wall(), partial(join.done, "bindings"))
        self.state.get_account(decision.user, decision.domain, partial(join.done, "callee"))

    def _route_with(
        self, call: ProxyCall, msg: SipMessage, local: Address, realm: str, results: dict[str, object]
    ) -> None:
        """Routing goes on once the lookups of :meth:`_on_decision` are all answered."""
        stx = call.server_tx
        element = self.element
        try:
            if call.cancelled or call.answered:
                return
            answer = results.get("auth")
            if isinstance(answer, AuthAnswer):
                if answer.error is not None:
                    element.store_failed(stx, msg, answer.error)
                    return
                if answer.verdict is not Verdict.OK:
                    call.answered = True
                    if answer.verdict is Verdict.BANNED:
                        element.reply(stx, self.auth.refusal(msg))
                    else:
                        stale = answer.verdict is Verdict.STALE
                        element.reply(stx, self.auth.challenge(msg, 407, realm, stale=stale))
                    return
                msg.remove("proxy-authorization")  # ours, consumed (RFC 3261 22.3)
            for value in results.values():
                if isinstance(value, StoreError):
                    element.store_failed(stx, msg, value)
                    return
            bindings = results["bindings"]
            assert isinstance(bindings, list)
            if not bindings:
                callee = results["callee"]
                if callee is None:
                    raise NotFound("no such user", partial=msg)
                assert isinstance(callee, Account)
                raise TemporarilyUnavailable("user not registered", partial=msg)
            targets = [self._binding_target(b) for b in bindings]
            call.set_targets(t for t in targets if t is not None)
            call.record_route = msg.method in DIALOG_CREATING
            call.inbound = local.transport
            element.metrics.invite_seconds.observe(element.now() - call.started)
            if msg.method == b"INVITE" and msg.body:
                self.media.offer(msg, partial(self._offered, call))
            else:
                self._start_group(call, element.now())
        except SipError as exc:
            element.fail(stx, exc)

    def _offered(self, call: ProxyCall, error: SipError | None) -> None:
        if error is not None:
            self.element.fail(call.server_tx, error)
        elif not call.cancelled:
            self._start_group(call, self.element.now())

    def _binding_target(self, binding: Binding) -> Target | None:
        contact = binding.contact.encode("latin-1")
        route = tuple(p.encode("latin-1") for p in binding.path)
        try:
            if route:
                dest = self._destination(parse_name_addr(route[0]).uri)
            elif binding.received and (binding.reg_id is not None or not binding.received.startswith("udp:")):
                # the flow the REGISTER came over: RFC 5626 5.3 for outbound contacts, and the
                # connection a TCP/TLS/WS client registered on (its Contact port may not listen)
                dest = Address.parse(binding.received)
            else:
                dest = self._destination(parse_uri(contact))
        except Unresolved as pending:
            self.resolver.resolve(pending.host, _ignore)
            log.info("event=binding_host_resolving host=%s", pending.host)
            return None
        except (HeaderError, URIError, ValueError):
            log.info("event=bad_binding contact=%s", binding.contact)
            return None
        return Target(uri=contact, destination=dest, route=route, q=binding.q)

    # -- in-dialog and pre-routed requests -------------------------------------------------------

    def _forward_along_route(self, stx: ServerTransaction, msg: SipMessage, local: Address, now: float) -> None:
        """RFC 3261 16.12: the next hop is the top Route, else the Request-URI. No state needed."""
        if msg.method == b"BYE":
            self.media.release(msg.call_id, msg.from_tag)
        try:
            dest = self._next_hop(msg)
        except Unresolved as pending:
            self.resolver.resolve(pending.host, partial(self._resolved, stx, msg, local, pending))
            return
        self._forward_to(stx, msg, local, dest, now)

    def _resolved(
        self, stx: ServerTransaction, msg: SipMessage, local: Address, hop: Unresolved, ip: str | None
    ) -> None:
        if stx.terminated:
            return
        if ip is None:
            self.element.fail(stx, BadGateway(f"cannot resolve {hop.host}", partial=msg))
        else:
            self._forward_to(stx, msg, local, Address(hop.transport, ip, hop.port), self.element.now())

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
                return self._destination(parse_name_addr(routes[0]).uri)
            return self._destination(msg.request_uri)
        except (HeaderError, URIError) as exc:
            raise BadMessage(f"bad Route: {exc}", partial=msg) from None

    def _destination(self, uri: object) -> Address:
        return uri_destination(uri, self.resolver, self.element.identity.domains)

    # -- forking ---------------------------------------------------------------------------------

    def _start_group(self, call: ProxyCall, now: float) -> None:
        group = call.next_group()
        layer = self.element.layer
        for target in group:
            request = self._branch_request(call, target)
            branch = Branch(call=call, target=target, request=request)
            try:
                ctx = layer.start_client(request, target.destination, now)
            except ServiceUnavailable:
                continue
            ctx.context = branch
            branch.client_tx = ctx
            call.branches.append(branch)
            if call.is_invite:
                self._arm_timer_c(branch, now + self.timer_c)
        if not call.active():
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
                req.prepend("record-route", identity.record_route(call.inbound))
            if flow is not None:
                # toward a client on our connection: the entry carries its flow token
                host, port = identity.address(flow.transport)
                req.prepend("record-route", flow_uri(self.flow_tokens, flow, host, port))
            else:
                req.prepend("record-route", identity.record_route(out_transport))
        for route in reversed(target.route):
            req.prepend("route", route)
        branch = MAGIC_COOKIE + self._loop_hash(call.request) + b"." + random_hex(6)
        req.prepend("via", identity.via(out_transport, branch))
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

    def on_response(self, msg: SipMessage, source: Address, now: float) -> None:
        ctx = self.element.layer.receive_response(msg, source, now)
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
            self.element.metrics.errors("response_via_missing").inc()
            msg = msg.copy()
            msg.remove("via")
            for value in reversed(branch.request.get_all("via")):
                msg.prepend("via", value)
        if status < 200:
            if branch in self._timer_c:
                self._arm_timer_c(branch, now + self.timer_c)
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
            tag = self.element.tag(call.request)
            response = make_response(call.request, 408 if call.branches else 480, to_tag=tag)
        else:
            response = _upstream(best)
        call.answered = True
        if call.is_invite:
            self.media.release(call.request.call_id, call.request.from_tag)
        self._send_upstream(call, response)

    def _send_upstream(self, call: ProxyCall, response: SipMessage) -> None:
        stx = call.server_tx
        if call.is_invite and response.body and response.status < 300:
            self.media.answer(response, partial(self._answered, stx, response))
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

    # -- Timer C ---------------------------------------------------------------------------------

    def _arm_timer_c(self, branch: Branch, deadline: float) -> None:
        self._timer_c[branch] = deadline
        self._timer_seq += 1
        heapq.heappush(self._timer_heap, (deadline, self._timer_seq, branch))

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
                branch.call.record_final(make_response(branch.request, 408))
                self._arm_timer_c(branch, now + 64 * self.element.layer.timers.t1)
                self._maybe_finish(branch.call, now)
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
        active = call.active()
        if not active:
            # still waiting on Redis (or nothing forked): answer the INVITE ourselves
            call.answered = True
            element.reply(invite, make_response(call.request, 487, to_tag=element.tag(call.request)))
            return
        for branch in active:
            self._cancel_branch(branch, now)
            if branch.state is BranchState.STARTED:
                # Its CANCEL waits for a provisional (RFC 3261 9.1) that may never come: the
                # branch ends here as a 487 so the caller is answered now, not at Timer B.
                branch.state = BranchState.COMPLETED
                call.record_final(make_response(branch.request, 487, to_tag=element.tag(call.request)))
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
            self.element.layer.start_client(cancel, ctx.remote, now)
        except (ServiceUnavailable, ValueError):
            log.debug("event=cancel_not_sent call_id=%s", req.call_id.decode("latin-1"))

    # -- transaction events ----------------------------------------------------------------------

    def on_event(self, event: object) -> None:
        now = self.element.now()
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
            self.own_routes(msg)
            if max_forwards(msg) <= 0:
                return
            dest = self._next_hop(msg)
        except Unresolved as pending:
            # the next ACK (the UAS retransmits its 2xx until one arrives) finds the name cached
            self.resolver.resolve(pending.host, _ignore)
            return
        except SipError:
            return
        msg.set("max-forwards", str(max_forwards(msg) - 1).encode())
        # deterministic branch: a retransmitted ACK leaves with the same one (RFC 3261 16.11)
        digest = hashlib.blake2b(msg.top_via_value, digest_size=8).hexdigest().encode()
        msg.prepend("via", self.element.identity.via(dest.transport, MAGIC_COOKIE + b"a" + digest))
        self.element.layer.send_stateless(msg, dest)

    def _forward_stray(self, response: SipMessage) -> None:
        """A 2xx retransmission after our transaction is gone: forward it by its Via."""
        if not (200 <= response.status < 300 and response.cseq[1] == b"INVITE"):
            return
        upstream = _upstream(response)
        try:
            dest = via_value_target(upstream.top_via_value)
        except SipError:
            return
        self.element.layer.send_stateless(upstream, dest)

    # -- helpers ---------------------------------------------------------------------------------

    def _is_us(self, msg: SipMessage) -> bool:
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
