"""What the balancer learns about registered client flows, and the OPTIONS keepalives of UDP
ones (RFC 5626 3.5, 4.4, 5.3), without I/O.

Theory of operation
-------------------
Requests for a phone reach it only over the flow it registered from: its TCP/TLS/WS
connection, or its NAT binding on UDP (the Path the balancer adds names that flow).  So the
balancer, the element holding the flow, keeps that flow usable while the registration lasts:

* it notes the Contacts of every REGISTER it forwards from a client (:meth:`on_register`,
  keyed by flow and Call-ID, bounded);
* when a 2xx to that REGISTER goes back to the client, the Contacts of the 200 OK that the
  client itself sent give the registration's remaining lifetime (:func:`registration`):
  ``on_register_ok`` returns it.  A connection flow is then held open that long (the glue
  tells the transport); a UDP flow enters the keepalive table, or leaves it when nothing of
  the client's is registered any more (a de-REGISTER, expires 0);
* every UDP flow in the table is looked at once per ``interval``: a flow from which nothing
  was heard since (SIP, a STUN Binding request, a CRLF: :meth:`heard` is a dict look-up on
  receipt) gets an OPTIONS (:class:`Probe`); after ``failures`` OPTIONS in a row with still
  nothing heard, the phone is gone (:class:`FlowGone`): its bindings are removed from the
  location store and the flow forgotten.  A registration that expired leaves the table.

The table is ordered by the next time each flow is looked at (always ``interval`` after the
last look, so appending keeps it sorted): :meth:`handle_timer` only touches the flows that are
due.  It holds at most ``limit`` flows (the soonest due is dropped first), so a flood of
REGISTERs cannot grow the balancer's memory.  Responses to the OPTIONS carry a branch with
:data:`KEEPALIVE_PREFIX`; any response, whatever its status, means the phone is there.

Stream flows never get OPTIONS: they have CRLF pings (RFC 5626 4.4.1) and their connection.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.headers import HeaderError, parse_uint
from sipfarm.sip.memo import MAX_CACHED_KEY, bounded_key, key_size
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import SipURI, URIError

# "z9hG4bK" (RFC 3261 8.1.1.7) + "lb" + "keep": neither a node probe's branch (PROBE_PREFIX)
# nor a hop branch ("lb-")
KEEPALIVE_PREFIX = b"z9hG4bKlbkeep"
FLOW_LIMIT = 200_000
# the most bytes (characters) of AOR and Contacts one pending REGISTER or flow holds: a phone's
# are a few hundred; a table entry thus costs at most about this (and a bounded Call-ID)
MAX_REGISTRATION = 2 * MAX_CACHED_KEY
PENDING_LIMIT = 20_000  # REGISTERs forwarded and not answered yet
HOLD_MARGIN = 32.0  # a refresh may come late by up to Timer F (64*T1)

__all__ = [
    "FLOW_LIMIT",
    "HOLD_MARGIN",
    "KEEPALIVE_PREFIX",
    "FlowGone",
    "FlowState",
    "KeepaliveStats",
    "Probe",
    "RegisteredFlows",
    "Registration",
    "register_contacts",
    "registration",
]


@dataclass(frozen=True, slots=True)
class Registration:
    """What a REGISTER's 2xx says about the client's own bindings."""

    aor: str  # user@domain, as the location store keys it
    contacts: tuple[str, ...]  # the client's contact URIs still registered
    expires: int  # seconds left of the longest of them; 0: none left (de-registered)


@dataclass(frozen=True, slots=True)
class Probe:
    """Send an OPTIONS to ``contact`` over UDP ``flow`` with Via branch ``branch``."""

    flow: Address
    aor: str
    contact: str
    branch: bytes


@dataclass(frozen=True, slots=True)
class FlowGone:
    """The phone at ``flow`` stopped answering: remove ``contacts`` of ``aor``."""

    flow: Address
    aor: str
    contacts: tuple[str, ...]


@dataclass(slots=True)
class KeepaliveStats:
    sent: int = 0  # OPTIONS keepalives
    answered: int = 0  # responses to them
    flows_expired: int = 0  # phones that stopped answering (bindings removed)
    flows_learnt: int = 0  # UDP flows entering the table
    registrations_ended: int = 0  # flows leaving it: de-REGISTER or registration expired
    dropped_full: int = 0  # flows dropped because the table was full
    too_long: int = 0  # REGISTERs whose AOR and Contacts were too long to remember

    def flat(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "answered": self.answered,
            "flows_expired": self.flows_expired,
            "flows_learnt": self.flows_learnt,
            "registrations_ended": self.registrations_ended,
            "dropped_full": self.dropped_full,
            "too_long": self.too_long,
        }  # named one by one: a compiled (mypyc) class has no __slots__ to walk


@dataclass(slots=True)
class FlowState:
    """One registered UDP flow in the table (the balancer sets ``heard`` on receipt)."""

    aor: str
    contacts: tuple[str, ...]
    expires_at: float
    due: float  # next look at it
    heard: bool = False  # anything received from the flow since the last look
    misses: int = 0  # OPTIONS sent in a row with nothing heard
    branch: bytes = b""  # of the last OPTIONS


def register_contacts(request: SipMessage) -> tuple[str, tuple[str, ...]] | None:
    """(AOR, contact URIs) a REGISTER binds, as the registrar stores them; None for a query,
    ``Contact: *`` or one the registrar will reject anyway (unparseable To or Contact)."""
    try:
        to_uri = request.name_addr_uri("to")
        if not isinstance(to_uri, SipURI) or to_uri.user is None:
            return None
        contacts = tuple(str(na.uri) for na in request.name_addrs("contact") if isinstance(na.uri, SipURI))
    except (SipError, HeaderError, URIError, ValueError):
        return None
    if not contacts:
        return None
    return to_uri.aor, contacts


def registration(response: SipMessage, aor: str, contacts: tuple[str, ...]) -> Registration:
    """What a 2xx to a REGISTER of ``contacts`` grants them (RFC 3261 10.3 step 8: the 200 OK
    lists every binding of the AOR with its ``expires``).  A registrar that lists no Contact
    at all is read by its Expires header."""
    mine = frozenset(contacts)
    header = _uint(response.get("expires"))
    try:
        listed = response.name_addrs("contact")
    except SipError:
        listed = []
    if not listed:
        return Registration(aor, contacts if header else (), header)
    kept: list[str] = []
    longest = 0
    for na in listed:
        uri = str(na.uri)
        if uri not in mine:
            continue  # another device of the AOR
        expires = _uint(na.param("expires")) if na.param("expires") is not None else header
        if expires > 0:
            kept.append(uri)
            longest = max(longest, expires)
    return Registration(aor, tuple(kept), longest)


def _uint(value: bytes | str | None) -> int:
    if value is None:
        return 0
    try:
        return parse_uint(value.encode("latin-1") if isinstance(value, str) else value, "expires", 2**32 - 1)
    except HeaderError:
        return 0


@dataclass(slots=True)
class RegisteredFlows:
    """Registered client flows and the keepalive decisions; see the module docstring."""

    interval: float = 30.0  # 0: no keepalives (the table stays empty)
    failures: int = 3
    limit: int = FLOW_LIMIT
    stats: KeepaliveStats = field(default_factory=KeepaliveStats)
    # UDP flows, ordered by ``due``; the balancer reads it on every received message
    flows: OrderedDict[Address, FlowState] = field(default_factory=OrderedDict)
    _pending: OrderedDict[tuple[Address, bytes], tuple[str, tuple[str, ...]]] = field(default_factory=OrderedDict)
    _probes: dict[bytes, Address] = field(default_factory=dict)

    # -- registrations ---------------------------------------------------------------------------

    def on_register(self, flow: Address, request: SipMessage) -> None:
        """A client's REGISTER is forwarded to a node: remember what it binds."""
        bound = register_contacts(request)
        if bound is None:
            return
        if key_size(bound) > MAX_REGISTRATION:
            # off the wire, as long as a message: not remembered (that client's flow is not
            # held or kept alive by the balancer; its REGISTER still goes to the registrar)
            self.stats.too_long += 1
            return
        key = (flow, bounded_key(request.call_id))
        pending = self._pending
        pending[key] = bound
        pending.move_to_end(key)
        while len(pending) > PENDING_LIMIT:
            pending.popitem(last=False)

    def on_register_ok(self, flow: Address, response: SipMessage, now: float) -> Registration | None:
        """A 2xx to a REGISTER goes back to ``flow``: what it grants the client (None: not a
        REGISTER we saw, or a query).  Updates the UDP keepalive table."""
        bound = self._pending.pop((flow, bounded_key(response.call_id)), None)
        if bound is None:
            return None
        reg = registration(response, *bound)
        if flow.transport == "udp" and self.interval > 0:
            self._learn(flow, reg, now)
        return reg

    def _learn(self, flow: Address, reg: Registration, now: float) -> None:
        flows = self.flows
        entry = flows.get(flow)
        if reg.expires <= 0:
            if entry is not None:
                self._forget(flow, entry)
                self.stats.registrations_ended += 1
            return
        expires_at = now + reg.expires
        if entry is not None:
            entry.aor, entry.contacts, entry.expires_at = reg.aor, reg.contacts, expires_at
            entry.heard = True  # the REGISTER came from it
            return
        flows[flow] = FlowState(reg.aor, reg.contacts, expires_at, now + self.interval)
        self.stats.flows_learnt += 1
        while len(flows) > self.limit:
            _, old = flows.popitem(last=False)
            self._probes.pop(old.branch, None)
            self.stats.dropped_full += 1

    def _forget(self, flow: Address, entry: FlowState) -> None:
        del self.flows[flow]
        if entry.branch:
            self._probes.pop(entry.branch, None)

    # -- liveness --------------------------------------------------------------------------------

    def heard(self, flow: Address) -> None:
        """Something arrived from ``flow`` (one dict look-up: call it for every message)."""
        entry = self.flows.get(flow)
        if entry is not None:
            entry.heard = True

    def on_probe_response(self, branch: bytes) -> None:
        """A response to one of our OPTIONS (any status: the phone is there)."""
        self.stats.answered += 1
        flow = self._probes.pop(branch, None)
        if flow is not None:
            self.heard(flow)  # it may answer from another port than its flow (no NAT)

    def next_deadline(self) -> float | None:
        for entry in self.flows.values():
            return entry.due
        return None

    def handle_timer(self, now: float) -> list[Probe | FlowGone]:
        """Look at the flows that are due: OPTIONS to the silent ones, the dead ones removed."""
        out: list[Probe | FlowGone] = []
        flows = self.flows
        while flows:
            flow, entry = next(iter(flows.items()))
            if entry.due > now:
                break
            if now >= entry.expires_at:
                self._forget(flow, entry)  # not refreshed: the registrar has let it expire too
                self.stats.registrations_ended += 1
                continue
            if entry.branch:
                self._probes.pop(entry.branch, None)
                entry.branch = b""
            if entry.heard:
                entry.heard = False
                entry.misses = 0
            elif entry.misses >= self.failures:
                self._forget(flow, entry)
                self.stats.flows_expired += 1
                out.append(FlowGone(flow, entry.aor, entry.contacts))
                continue
            else:
                entry.misses += 1
                entry.branch = KEEPALIVE_PREFIX + secrets.token_hex(8).encode()
                self._probes[entry.branch] = flow
                self.stats.sent += 1
                out.append(Probe(flow, entry.aor, entry.contacts[0], entry.branch))
            entry.due = now + self.interval
            flows.move_to_end(flow)
        return out
