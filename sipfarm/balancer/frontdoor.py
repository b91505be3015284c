"""The balancer's front door: per-source rate limits, scanners, unserved domains and bans, no I/O.

Theory of operation
-------------------
Every message from a client (never from a node) passes two checks:

1. :meth:`FrontDoor.screen`, on the raw bytes before they are parsed: a source in the local copy
   of the farm's bans is dropped (one dict look-up); otherwise a request's method (the first
   token of the first line) is counted against the source's budget for its class
   (:mod:`sipfarm.protect.pike`): a request over budget is dropped, and a source over budget
   for ``ban_after`` seconds with no quiet window between its excesses (a flood, not the burst
   of phones behind one NAT reconnecting at once) is banned.  Responses are not counted (a
   phone answers what the farm sends it).
2. :meth:`FrontDoor.inspect`, on the parsed request: a User-Agent containing one of the scanner
   names (case-insensitive) bans the source at once; an out-of-dialog request whose
   Request-URI names neither a domain the farm serves nor the balancer itself is dropped and
   counted against the source's SUSPECT budget (a few a window), so a source probing domains
   ends banned.  Nothing is answered: a scanner learns nothing, not even that SIP is here.

A ban starts in the local copy at once and is queued (:meth:`take_new_bans`) for the asyncio
layer to write to Redis in the background, under the key the nodes' brute-force guard uses
(:func:`sipfarm.protect.guard.ban_key`): every balancer and node refuses the source, and
``sipfarm ban list`` shows it.  The asyncio layer also re-reads every ban from Redis
periodically and hands them to :meth:`replace_bans`, so bans started elsewhere (another
balancer, a node, ``sipfarm ban add``) apply here, and lifted ones stop applying.  Nothing here
waits on Redis.

Only evidence from a source that proved its address starts a ban (``proven``: a TCP, TLS or
WebSocket peer, whose handshake did), and a source's forgeable UDP requests spend a budget of
their own, so forged datagrams can neither make its proven requests the excess nor get it
banned.  A UDP datagram's source address is whatever its sender
wrote: one spoofed datagram with a scanner's User-Agent, or a burst of REGISTERs over the
budget, banned the address it named, farm-wide, on every transport, for ``ban_time`` (a
victim's phones cut off for 10 minutes; red team D, 2026-12-02).  Over UDP the evidence drops
that message only: a scanner's request, an unserved domain's, and every request over the
budget while the source stays over it (the sliding window lets a real phone in again as soon
as a forger stops), counted ``not_banned_udp``.  Bans already in force (started on proven
evidence, by a node's guard, by ``sipfarm ban add``) apply to every transport.

A source is budgeted and banned as its subject (:mod:`sipfarm.transport.subject`): an IPv4
address itself, an IPv6 address as its /64, so a host picking new addresses in its /64 keeps
its one budget and its ban.

Sources in ``exempt`` networks are never limited, inspected or dropped.  Every decision is
counted by reason in ``stats`` (``sipfarm_balancer_protect_total{reason}``).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sipfarm.balancer.nodes import NodeSet
from sipfarm.protect.pike import Rate, RateBudgets, RequestClass, SourceRates, request_class
from sipfarm.sip.address import Address
from sipfarm.sip.errors import SipError
from sipfarm.sip.memo import MAX_CACHED_KEY
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import SipURI, URIError
from sipfarm.transport.subject import source_subject

__all__ = ["DEFAULT_SCANNER_AGENTS", "ClientScreen", "FrontDoor", "FrontDoorPolicy", "NewBan"]

DEFAULT_SCANNER_AGENTS = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "vaxsipuseragent",
    "sip-scan",
    "sipsak",
    "iWar",
    "sundayddr",
    "pplsip",
    "smap",
)
_EXEMPT_CACHE_LIMIT = 65_536
_AGENT_CACHE_LIMIT = 4096  # User-Agent values judged (a phone model's recurs on every request)
_RATE_REASONS = {
    RequestClass.REGISTER: "rate_register",
    RequestClass.INVITE: "rate_invite",
    RequestClass.OTHER: "rate_other",
    RequestClass.SUSPECT: "rate_suspect",
}


@dataclass(frozen=True, slots=True)
class FrontDoorPolicy:
    budgets: RateBudgets = field(default_factory=RateBudgets)
    ban_time: float = 600.0
    scanner_agents: tuple[str, ...] = DEFAULT_SCANNER_AGENTS
    exempt: tuple[str, ...] = ()  # networks (CIDR) never limited nor dropped
    domains: tuple[str, ...] = ()  # served domains; empty: no domain check
    max_sources: int = 100_000
    # seconds a proven source stays over its REGISTER, INVITE or other budget before it is
    # banned (its excess dropped meanwhile); 0: banned at its first excess
    ban_after: float = 3.0
    # stream connections (TCP, TLS, WebSocket) of one source closed for abuse (floods of pings or
    # frames, garbage framing, slow reading...) more than ``abuse_limit`` times within
    # ``abuse_window`` seconds: the source is banned (each new connection started its abuse over)
    abuse_limit: int = 5
    abuse_window: float = 60.0


@dataclass(frozen=True, slots=True)
class NewBan:
    source: str
    seconds: float
    reason: str  # "rate_register", "scanner"... as counted


class FrontDoor:
    def __init__(self, policy: FrontDoorPolicy) -> None:
        self.policy = policy
        self.rates = SourceRates(policy.budgets, max_sources=policy.max_sources)
        self._exempt_nets = [ipaddress.ip_network(n, strict=False) for n in policy.exempt]
        self._exempt: dict[str, bool] = {}  # source -> in an exempt network (cache)
        self._agents = [a.lower().encode() for a in policy.scanner_agents if a]
        self._agent_verdicts: dict[bytes, bool] = {}  # User-Agent value -> names a scanner
        self._domains = frozenset(d.lower() for d in policy.domains)
        self._bans: dict[str, float] = {}  # source -> banned until (clock); the farm's, as last read
        self._own: dict[str, float] = {}  # source -> when this balancer banned it (not yet read back)
        self._new: list[NewBan] = []
        self.stats: dict[str, int] = {}
        # sources over a budget: [since when, their last excess] (at most max_sources)
        self._over: dict[str, list[float]] = {}
        # sources whose connections were closed for abuse: [window start, count] (at most max_sources)
        self._abuse: dict[str, list[float]] = {}

    # -- the two checks ---------------------------------------------------------------------------

    def screen(self, data: bytes, source: str, now: float, proven: bool = True) -> bool:
        """Before parsing: whether to go on with a message from ``source`` (False: drop it).
        ``proven``: its transport proved the address (not UDP): only then may it start a ban."""
        exempt = self._exempt.get(source)
        if exempt is None:
            exempt = self._learn_exempt(source)
        if exempt:
            return True
        source = source_subject(source)  # budgets and bans: an IPv6 source's /64
        until = self._bans.get(source)
        if until is not None:
            if until > now:
                self.count("banned")
                return False
            del self._bans[source]
        if data.startswith(b"SIP/"):
            return True
        space = data.find(b" ", 0, 32)
        cls = request_class(data[:space] if space > 0 else data[:32])
        # a forgeable datagram spends a budget of its own: forged UDP from a victim's address
        # kept the one shared budget full, the victim's own TCP requests became the excess, and
        # being proven they got the victim banned (red team, 2026-12-03)
        if self.rates.hit(source if proven else _UDP_PREFIX + source, cls, now) is Rate.EXCEEDED:
            self.count(_RATE_REASONS[cls])
            if not proven or self._sustained(source, now):
                self._ban(source, _RATE_REASONS[cls], now, proven)
            return False
        return True

    def abused(self, source: str, now: float) -> None:
        """A stream connection from ``source`` was closed for abuse (its transport proved the
        address): over ``abuse_limit`` such closes within ``abuse_window`` seconds, banned."""
        limit = self.policy.abuse_limit
        if limit <= 0:
            return
        exempt = self._exempt.get(source)
        if exempt if exempt is not None else self._learn_exempt(source):
            return
        source = source_subject(source)
        table = self._abuse
        entry = table.get(source)
        if entry is None or now - entry[0] > self.policy.abuse_window:
            if entry is None and len(table) >= self.policy.max_sources:
                del table[next(iter(table))]  # the oldest forgotten first
            table[source] = entry = [now, 0.0]
        entry[1] += 1
        if entry[1] > limit:
            del table[source]
            self._ban(source, "stream_abuse", now, proven=True)

    def _sustained(self, source: str, now: float) -> bool:
        """``source`` has been over its budget for ``ban_after`` seconds, without a quiet
        window between its excesses. A burst is not a flood: phones behind one NAT address
        reconnecting at once (a balancer restarted or failed over) send one or two REGISTERs
        each within a second or two, then wait for their answers (over TCP, a dropped request
        is not retransmitted: Timer F, 32 s); banned at their first excess, the whole office
        was cut off for ``ban_time``. A flood keeps on."""
        after = self.policy.ban_after
        if after <= 0:
            return True
        over = self._over
        span = over.get(source)
        if span is None or now - span[1] > self.policy.budgets.window:
            if span is None and len(over) >= self.policy.max_sources:
                del over[next(iter(over))]  # the oldest excess forgotten first
            over[source] = [now, now]
            return False
        span[1] = now
        return now - span[0] >= after

    def inspect(
        self, msg: SipMessage, source: str, names_us: Callable[[SipURI], bool], now: float, proven: bool = True
    ) -> bool:
        """After parsing, a request from a client: whether to forward it (False: drop it)."""
        if self._exempt.get(source):
            return True
        source = source_subject(source)
        if self._agents and not self._agent_allowed(msg.get("user-agent"), source, now, proven):
            return False
        if self._domains and msg.to_tag is None and msg.method not in (b"ACK", b"CANCEL"):
            try:
                uri = msg.request_uri
            except (SipError, URIError):
                return True  # the core answers a bad Request-URI
            if isinstance(uri, SipURI) and uri.host.lower() not in self._domains and not names_us(uri):
                self.count("unknown_domain")
                key = source if proven else _UDP_PREFIX + source  # as in screen
                if self.rates.hit(key, RequestClass.SUSPECT, now) is Rate.EXCEEDED:
                    self.count(_RATE_REASONS[RequestClass.SUSPECT])
                    self._ban(source, _RATE_REASONS[RequestClass.SUSPECT], now, proven)
                return False
        return True

    def inspect_in_dialog(self, agent: bytes | None, source: str, now: float, proven: bool = True) -> bool:
        """:meth:`inspect` of a request with a To tag, whose User-Agent is ``agent`` (the
        domain check is for requests without one): the balancer's request fast path."""
        if self._exempt.get(source):
            return True
        return not self._agents or self._agent_allowed(agent, source_subject(source), now, proven)

    def _agent_allowed(self, agent: bytes | None, source: str, now: float, proven: bool) -> bool:
        if agent is not None and self._is_scanner(agent):
            self.count("scanner")
            self._ban(source, "scanner", now, proven)  # no second chance: a tool, not a phone
            return False
        return True

    # -- bans ---------------------------------------------------------------------------------------

    def banned(self, source: str, now: float) -> bool:
        until = self._bans.get(source_subject(source))
        return until is not None and until > now

    def take_new_bans(self) -> list[NewBan]:
        """The bans started here since the last call, to be written to Redis."""
        new, self._new = self._new, []
        return new

    def replace_bans(self, remote: Mapping[str, float], now: float, read_started: float) -> None:
        """The farm's bans as read from Redis (source -> seconds left, ``math.inf``: no end),
        read from ``read_started`` on: they replace the local copy, except the bans this
        balancer started since (their write may not have been read back yet)."""
        bans = {source: now + left for source, left in remote.items() if left > 0}
        limit = self.policy.max_sources
        if len(bans) > limit:  # the ones that last longest (a manual ban has no end)
            self.count("ban_table_full")
            bans = dict(sorted(bans.items(), key=lambda item: item[1], reverse=True)[:limit])
        for source, started in list(self._own.items()):
            if source in remote or started < read_started:
                del self._own[source]  # written before the read began: Redis has the last word
            else:
                bans[source] = max(bans.get(source, 0.0), self._bans.get(source, 0.0))
        self._bans = bans

    def update_bans(self, changed: Mapping[str, float | None], now: float, read_started: float) -> None:
        """Changes to the farm's bans as read from Redis's ban log (source -> seconds left,
        ``math.inf``: no end; None: no ban any more), read from ``read_started`` on: applied to
        the local copy, except the lift of a ban this balancer started since (its write may not
        have been read back yet). Between two :meth:`replace_bans`, so that a refresh costs the
        changes, not every ban."""
        bans, own = self._bans, self._own
        for source, left in changed.items():
            if left is None or left <= 0:
                started = own.get(source)
                if started is not None and started >= read_started:
                    continue
                bans.pop(source, None)
            elif source in bans or len(bans) < self.policy.max_sources:
                bans[source] = now + left
            else:
                self.count("ban_table_full")
            own.pop(source, None)

    def _ban(self, source: str, reason: str, now: float, proven: bool) -> None:
        if not proven:
            self.count("not_banned_udp")  # a forgeable address: this message only (module doc)
            return
        seconds = self.policy.ban_time
        if self.banned(source, now):
            return
        if len(self._bans) >= self.policy.max_sources:
            # a bounded table (an IPv6 attacker holds /64s by the thousand, each a ban here and
            # in Redis: red team, 2026-12-03): past it no new ban starts here; its excess is
            # still dropped by the budgets
            self.count("ban_table_full")
            return
        self._bans[source] = now + seconds if seconds > 0 else math.inf
        self._own[source] = now
        self._new.append(NewBan(source, seconds, reason))
        self.rates.forget(source)
        self._over.pop(source, None)
        self.count("ban_started")

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def bans_known(self) -> int:
        return len(self._bans)

    def count(self, reason: str) -> None:
        """Count a decision taken elsewhere (the asyncio layer: ban_write_failed...)."""
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def _is_scanner(self, agent: bytes) -> bool:
        """Whether a User-Agent value contains a scanner's name (case-insensitive); the verdict
        is remembered per value (bounded: cleared when full)."""
        verdict = self._agent_verdicts.get(agent)
        if verdict is None:
            lower = agent.lower()
            verdict = any(name in lower for name in self._agents)
            if len(agent) <= MAX_CACHED_KEY:  # a long value is judged every time, not kept
                if len(self._agent_verdicts) >= _AGENT_CACHE_LIMIT:
                    self._agent_verdicts.clear()
                self._agent_verdicts[agent] = verdict
        return verdict

    def _learn_exempt(self, source: str) -> bool:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            exempt = False
        else:
            exempt = any(address in net for net in self._exempt_nets)
        if len(self._exempt) >= _EXEMPT_CACHE_LIMIT:
            self._exempt.clear()
        self._exempt[source] = exempt
        return exempt


_UDP_PREFIX = "udp "  # a source's budget for its datagrams (forgeable): another key


#: the drop reason of a message claiming a node's address on a socket the nodes do not use
FORGED_NODE_SOURCE = "forged_node_source"


class ClientScreen:
    """The balancer's ``TransportManager.screen``, before parsing: a node's message passes
    (:meth:`NodeSet.sender`: its address, on the socket facing the nodes when there is one of
    its own); one claiming a node's address on another socket is dropped and counted
    (``forged(reason)``, :data:`FORGED_NODE_SOURCE`): a forgery, which must not be taken as
    the farm's nor spend a client's budget; a client's goes through ``admit`` (the allow/deny
    lists) and :meth:`FrontDoor.screen`.  A compiled class, not a closure in the entry point:
    it runs for every datagram (one dict look-up to tell a node, as before)."""

    def __init__(
        self,
        front: FrontDoor | None,
        nodes: NodeSet,
        clock: Callable[[], float],
        *,
        admit: Callable[[Address], bool] | None = None,
        forged: Callable[[str], None] | None = None,
    ) -> None:
        self.front = front
        self.nodes = nodes
        self.clock = clock
        self.admit = admit
        self.forged = forged

    def __call__(self, data: bytes, source: Address, local: Address) -> bool:
        nodes = self.nodes
        if nodes.by_address(source.host, source.port) is not None:
            # NodeSet.sender, inline: the look-up is the one a client's message needs anyway
            facing = nodes.facing
            if facing is None or local == facing:
                return True
            if self.forged is not None:
                self.forged(FORGED_NODE_SOURCE)
            return False
        admit = self.admit
        if admit is not None and not admit(source):
            return False
        front = self.front
        return front is None or front.screen(data, source.host, self.clock(), source.transport != "udp")
