"""Forking state of one proxied request and the choice of the response to send back.

A :class:`ProxyCall` hangs on the server transaction (its ``context``) for as long as the
transaction lives: that is the only call state a node keeps, and losing it (node crash) loses
no dialog, because in-dialog requests are routed by their Route set alone.

Targets are tried in q-value groups (RFC 3261 16.6, 8.1.3.4 / RFC 3261 16.7): every target of
the highest-q group in parallel, the next group when all of the current one failed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.sip.transaction import RELEASED, ClientTransaction, ServerTransaction
from sipfarm.store.location import Binding


class Target:
    """Where one branch goes: the new Request-URI, the first hop and a pre-loaded route set.

    Immutable (Final attributes, enforced when compiled) with value equality; a plain class,
    not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        uri: bytes,
        destination: Address,
        route: tuple[bytes, ...] = (),
        q: float = 1.0,
        client_flow: bool = False,
        binding: Binding | None = None,
        credentials: tuple[str, str] | None = None,
        authorization: tuple[str, bytes] | None = None,
    ) -> None:
        self.uri: Final = uri
        self.destination: Final = destination
        self.route: Final = route  # Route values to add (RFC 3327 Path of the binding)
        self.q: Final = q
        # ``destination`` is a client's connection held here (TCP, TLS, WebSocket): requests go
        # over it only, never over a new one, and its loss answers the branch 430 (RFC 5626 5.3)
        self.client_flow: Final = client_flow
        # the binding this target was built from, for an initial request: a 430 on its branch
        # says the flow it was registered over is gone, and it is removed (RFC 5626 5.3, 11)
        self.binding: Final = binding
        # a trunk's account (user, password): a 401/407 from it is answered once with them
        self.credentials: Final = credentials
        # the header the branch's request carries for that (name, value): set on the retry
        self.authorization: Final = authorization

    def _fields(self) -> tuple[object, ...]:
        return (
            self.uri,
            self.destination,
            self.route,
            self.q,
            self.client_flow,
            self.binding,
            self.credentials,
            self.authorization,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"Target({self.uri!r}, {self.destination!r}, q={self.q})"

    def with_credentials(self, credentials: tuple[str, str] | None) -> Target:
        return Target(
            self.uri, self.destination, self.route, self.q, self.client_flow, self.binding, credentials,
            self.authorization,
        )  # fmt: skip

    def with_authorization(self, authorization: tuple[str, bytes]) -> Target:
        return Target(
            self.uri, self.destination, self.route, self.q, self.client_flow, self.binding, self.credentials,
            authorization,
        )  # fmt: skip


class BranchState(enum.Enum):
    STARTED = "started"  # request sent, nothing heard
    PROCEEDING = "proceeding"  # a provisional response came
    COMPLETED = "completed"  # a final response (or a timeout) came


class AccountCalls:
    """One account's INVITEs in progress on this node and an upper bound of the transaction
    bytes they hold (kept by :class:`sipfarm.proxy.pending.PendingInvites`)."""

    def __init__(self) -> None:
        self.calls: list[ProxyCall] = []  # in progress, and those ended since the last prune
        self.held = 0  # bytes charged to them since the last prune (exact at the prune)
        self.prune_at = 0  # len(calls) at which the ended ones are dropped next (set by the prune)


class Branch:
    """One client branch of a :class:`ProxyCall` (a plain class, not a dataclass: compiled, its
    __init__ is native; a dataclass's generated one is interpreted, ~6x the cost)."""

    def __init__(
        self,
        call: ProxyCall,
        target: Target,
        request: SipMessage,  # the request as sent on this branch
        client_tx: ClientTransaction | None = None,
        state: BranchState = BranchState.STARTED,
        cancel_wanted: bool = False,
        cancelled: bool = False,
        started: float = 0.0,
    ) -> None:
        self.call = call
        self.target = target
        self.request = request
        self.client_tx = client_tx
        self.state = state
        self.cancel_wanted = cancel_wanted  # CANCEL as soon as a provisional arrives (RFC 3261 9.1)
        self.cancelled = cancelled
        self.started = started  # when the request left (serial forking bounds a group's ringing)

    def __repr__(self) -> str:
        return f"Branch({self.target.uri!r}, {self.state})"


def response_rank(status: int) -> tuple[int, int]:
    """Lower is better for RFC 3261 16.7 step 6 (6xx wins; else lowest class; favoured 4xx)."""
    if status >= 600:
        return (0, status)
    klass = status // 100
    favoured = 0 if status in (401, 407, 415, 420, 484) else 1
    return (klass, favoured)


class ProxyCall:
    """One request the proxy is forwarding (server transaction + its client branches). A plain
    class, not a dataclass: compiled, its __init__ is native (see :class:`Branch`)."""

    def __init__(self, server_tx: ServerTransaction, request: SipMessage, started: float) -> None:
        self.server_tx = server_tx
        self.request = request  # as received (Route processing done); RELEASED once done
        self.method = request.method
        self.started = started
        self.groups: list[list[Target]] = []  # remaining serial groups
        self.branches: list[Branch] = []
        self.best: SipMessage | None = None
        self.best_is_local = False  # the best final so far was made here (a timeout, a CANCEL)
        self.challenges: list[tuple[str, bytes]] = []  # 16.7 step 7
        self.answered = False  # a 2xx or a final was sent upstream
        self.cancelled = False
        # the Reason (RFC 3326) on the CANCELs of its branches: answered elsewhere, declined
        # everywhere, or the caller's own CANCEL's
        self.cancel_reason: bytes | None = None
        self.record_route = False  # a dialog-creating initial request (RFC 3261 16.6 step 4)
        self.inbound = "udp"  # transport the request came in on (double Record-Route, RFC 5658)
        self.record_route_flow: Address | None = None  # Record-Route with this client flow's token
        self.aor = ""  # whose bindings the targets are (an initial request to a user)
        # the groups are one server's addresses in RFC 3263 order: the next is tried only when the
        # current one fails (503, 408, a transport error: RFC 3263 4.3), never after ringing a while
        self.failover = False
        self.held_by: AccountCalls | None = None  # the caller's account share it is charged to

    def __repr__(self) -> str:
        return f"ProxyCall({self.method!r}, branches={len(self.branches)}, answered={self.answered})"

    @property
    def is_invite(self) -> bool:
        return self.method == b"INVITE"

    def release_messages(self) -> None:
        """Drop the parsed messages once the request is answered and every branch has its final
        and its transaction is past it (its own messages released by the layer): the
        transactions live on for up to 32 s (Timers J, L, M) only to absorb retransmissions and
        pass 2xx up, which needs none of them (:meth:`is_invite` reads ``method``). Called after
        each final answer upstream and each final on a branch."""
        if self.request is RELEASED or not self.answered:
            return
        server = self.server_tx
        if not (server.released or server.terminated):
            return  # answered, its response not sent yet (the relay's answer awaited)
        for branch in self.branches:
            tx = branch.client_tx
            if branch.state is not BranchState.COMPLETED or (tx is not None and not (tx.released or tx.terminated)):
                return  # a CANCEL may still be built from its request
        self.request = RELEASED
        for branch in self.branches:
            branch.request = RELEASED
        self.best = None
        self.challenges.clear()
        self.groups.clear()

    def set_targets(self, targets: Iterable[Target]) -> None:
        by_q: dict[float, list[Target]] = {}
        for target in targets:
            by_q.setdefault(target.q, []).append(target)
        self.groups = [by_q[q] for q in sorted(by_q, reverse=True)]

    def next_group(self) -> list[Target]:
        return self.groups.pop(0) if self.groups else []

    def active(self) -> list[Branch]:
        return [b for b in self.branches if b.state is not BranchState.COMPLETED]

    def record_final(self, response: SipMessage, *, local: bool = False) -> None:
        """Keep the best final response so far and collect auth challenges. ``local``: made
        by this proxy (RFC 3261 16.7 step 2 timeouts, 16.10 CANCEL), not received."""
        status = response.status
        if status in (401, 407):
            key = "www-authenticate" if status == 401 else "proxy-authenticate"
            self.challenges.extend((key, v) for v in response.get_all(key))
        if self.best is None or response_rank(status) < response_rank(self.best.status):
            self.best = response
            self.best_is_local = local

    def final_to_forward(self) -> SipMessage | None:
        """The response to send upstream once every branch is done (None: nothing came)."""
        best = self.best
        if best is None:
            return None
        if best.status == 503:
            # RFC 3261 16.7 step 6: a 503 becomes 500 upstream (the proxy itself is not down)
            best = best.copy()
            best.status, best.reason = 500, b"Server Internal Error"
        elif best.status == 430 and self.aor:
            # RFC 5626 11.5: 430 is between proxies, never for the caller. The proxy whose
            # targets were the callee's bindings answers for them: every flow failed, so the
            # callee is not reachable now (a hop that only followed a flow token's Route keeps
            # the 430, for the proxy that looked the bindings up to drop that one)
            best = best.copy()
            best.status, best.reason = 480, b"Temporarily Unavailable"
        if best.status in (401, 407) and self.challenges:
            best = best.copy()
            best.remove("www-authenticate")
            best.remove("proxy-authenticate")
            for key, value in self.challenges:
                best.append(key, value)
        return best
