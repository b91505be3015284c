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
from dataclasses import dataclass, field

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.sip.transaction import ClientTransaction, ServerTransaction
from sipfarm.store.location import Binding


@dataclass(frozen=True, slots=True)
class Target:
    """Where one branch goes: the new Request-URI, the first hop and a pre-loaded route set."""

    uri: bytes
    destination: Address
    route: tuple[bytes, ...] = ()  # Route values to add (RFC 3327 Path of the binding)
    q: float = 1.0
    # ``destination`` is a client's connection held here (TCP, TLS, WebSocket): requests go over
    # it only, never over a new one, and its loss answers the branch 430 (RFC 5626 5.3)
    client_flow: bool = False
    # the binding this target was built from, for an initial request: a 430 on its branch says
    # the flow it was registered over is gone, and it is removed (RFC 5626 5.3, 11)
    binding: Binding | None = None
    # a trunk's account (user, password): a 401/407 from it is answered once with them
    credentials: tuple[str, str] | None = None
    # the header the branch's request carries for that (name, value): set on the retry
    authorization: tuple[str, bytes] | None = None


class BranchState(enum.Enum):
    STARTED = "started"  # request sent, nothing heard
    PROCEEDING = "proceeding"  # a provisional response came
    COMPLETED = "completed"  # a final response (or a timeout) came


@dataclass(slots=True, eq=False)
class Branch:
    call: ProxyCall
    target: Target
    request: SipMessage  # the request as sent on this branch
    client_tx: ClientTransaction | None = None
    state: BranchState = BranchState.STARTED
    cancel_wanted: bool = False  # CANCEL as soon as a provisional arrives (RFC 3261 9.1)
    cancelled: bool = False
    started: float = 0.0  # when the request left (serial forking bounds a group's ringing)


def response_rank(status: int) -> tuple[int, int]:
    """Lower is better for RFC 3261 16.7 step 6 (6xx wins; else lowest class; favoured 4xx)."""
    if status >= 600:
        return (0, status)
    klass = status // 100
    favoured = 0 if status in (401, 407, 415, 420, 484) else 1
    return (klass, favoured)


@dataclass(slots=True, eq=False)
class ProxyCall:
    """One request the proxy is forwarding (server transaction + its client branches)."""

    server_tx: ServerTransaction
    request: SipMessage  # as received (Route processing done)
    started: float
    groups: list[list[Target]] = field(default_factory=list)  # remaining serial groups
    branches: list[Branch] = field(default_factory=list)
    best: SipMessage | None = None
    best_is_local: bool = False  # the best final so far was made here (a timeout, a CANCEL)
    challenges: list[tuple[str, bytes]] = field(default_factory=list)  # 16.7 step 7
    answered: bool = False  # a 2xx or a final was sent upstream
    cancelled: bool = False
    record_route: bool = False  # a dialog-creating initial request (RFC 3261 16.6 step 4)
    inbound: str = "udp"  # transport the request came in on (double Record-Route, RFC 5658)
    record_route_flow: Address | None = None  # Record-Route with this client flow's token
    aor: str = ""  # whose bindings the targets are (an initial request to a user)
    # the groups are one server's addresses in RFC 3263 order: the next is tried only when the
    # current one fails (503, 408, a transport error: RFC 3263 4.3), never after ringing a while
    failover: bool = False

    @property
    def is_invite(self) -> bool:
        return self.request.method == b"INVITE"

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
        if best.status in (401, 407) and self.challenges:
            best = best.copy()
            best.remove("www-authenticate")
            best.remove("proxy-authenticate")
            for key, value in self.challenges:
                best.append(key, value)
        return best
