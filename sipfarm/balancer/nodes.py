"""The balancer's view of the back-end nodes: membership plus its own health probes.

Sans-IO: fed member snapshots (from Redis, read in the background) and probe results, asked
``pick(key)`` on the hot path.  A node is a destination when it is in the membership, active
(not draining) and not marked down by probes.  Probes are OPTIONS every ``probe_interval``; a
node that misses ``down_after`` probes in a row, with no other response from it meanwhile (an
overloaded node answers its queue in order, the probe after the calls), is down (so within
about ``down_after * probe_interval``), as is one the balancer cannot send to at all; one
answer brings it back (ICMP port-unreachable is not used: unconnected UDP sockets do not report it).
The consistent hash ring is rebuilt only when the set of usable nodes changes, so a node's
death moves only its own keys.

Static cluster: a node may announce a group (``[node] group``).  Each group with a usable node
has a ring of its own (``pick(key, group)``, for the accounts the balancer's rules pin to it);
requests pinned to no group go to the ring of the ungrouped nodes, or, when none of those is
usable, to the ring of every usable node (a grouped node is kept for its group while there is
a dynamic pool, and still better than a 503 when there is none).

Every change of a node's state in this view (joined, left, down, up, draining, active again,
moved to another address or group) is recorded once, as a :class:`NodeTransition`, for the
process to log and count (:meth:`NodeSet.take_transitions`): this module does no I/O.  Their
rate is bounded by the inputs that make them: membership polls (the farm's own records) and
probes (a node goes down at most once per ``down_after`` probe intervals, comes back at most
once per answer); the queue is bounded anyway (``MAX_TRANSITIONS``, the rest counted).

Who is a node: a message is the farm's (a node's request goes to the client its flow token
names, its response marks it alive, the front door lets it by) only when its source is a node's
address *and* it came in on the balancer's socket facing the nodes (:meth:`NodeSet.sender`),
when that socket is a socket of its own (``facing``, the balancer's ``--internal``).  A
datagram's source address is whatever its sender wrote: on a socket the Internet reaches, a
node's address proves nothing.  Without ``facing`` (one socket faces clients and nodes) the
source address alone decides, as it must.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from sipfarm.cluster.membership import Member, MemberState
from sipfarm.cluster.ring import HashRing
from sipfarm.sip.address import Address

MAX_DEPARTED = 1024  # addresses of departed nodes remembered (FIFO)
MAX_TRANSITIONS = 1024  # transitions kept until taken (more are counted in transitions_dropped)


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"


class NodeEvent(enum.Enum):
    """A change of a node's state in the balancer's view (logged as ``event=node_<value>``)."""

    JOINED = "joined"  # in the membership: usable unless draining (DRAINING follows then)
    LEFT = "left"  # gone from the membership (heartbeats expired, or stopped)
    DOWN = "down"  # probes missed, or the balancer cannot send to it
    UP = "up"  # down, then answered (a probe, or any response)
    DRAINING = "draining"  # takes no new requests (its dialogs still reach it)
    ACTIVE = "active"  # draining no more
    MOVED = "moved"  # another address or group under the same id


@dataclass(frozen=True, slots=True)
class NodeTransition:
    event: NodeEvent
    node: str
    address: Address
    group: str | None
    #: why: "membership", "probes_missed", "send_failed", "probe_answered", "heard"
    reason: str


@dataclass(slots=True)
class NodeEntry:
    id: str
    address: Address  # where the balancer sends SIP (UDP preferred)
    draining: bool = False
    health: Health = Health.UP
    missed: int = 0
    probe_sent: float | None = None  # loop time of the outstanding probe
    last_probe: float = float("-inf")  # loop time the last probe went out
    probe_branch: bytes = b""
    rtt: float = 0.0  # smoothed probe round trip (seconds)
    aliases: set[tuple[str, int]] = field(default_factory=set)
    group: str | None = None  # static cluster group (None: the dynamic pool)
    # a response came from the node since its last probe went out: it is alive even when the
    # probe's answer is late (a node busy at its admission limit answers calls, not probes, first)
    heard: bool = False

    @property
    def usable(self) -> bool:
        return self.health is Health.UP and not self.draining


def node_address(member: Member) -> Address | None:
    """The member's UDP SIP address (else its first address)."""
    parsed: list[Address] = []
    for text in member.addresses:
        try:
            parsed.append(Address.parse(text))
        except ValueError:
            continue
    for addr in parsed:
        if addr.transport == "udp":
            return addr
    return parsed[0] if parsed else None


class NodeSet:
    def __init__(self, *, down_after: int = 2, probe_interval: float = 0.3, vnodes: int = 128) -> None:
        self.nodes: dict[str, NodeEntry] = {}
        self.down_after = down_after
        self.probe_interval = probe_interval
        self._vnodes = vnodes
        self._ring = HashRing((), vnodes)  # unpinned requests: the ungrouped nodes, else all
        self._group_rings: dict[str, HashRing] = {}  # group -> ring of its usable nodes
        self._usable: tuple[tuple[str, str], ...] = ()  # (id, group or '') of the usable nodes
        self._by_address: dict[tuple[str, int], NodeEntry] = {}
        # address -> group ('' for none) of a node gone from membership
        self._departed: dict[tuple[str, int], str] = {}
        self.changes = 0
        self._transitions: list[NodeTransition] = []
        self.transitions_dropped = 0
        # the balancer's socket facing the nodes when it faces nothing else (``--internal``):
        # only what arrives there can be a node's (see the module docstring); None: any socket
        self.facing: Address | None = None

    # -- membership --------------------------------------------------------------------------

    def update_members(self, members: Iterable[Member]) -> None:
        seen: set[str] = set()
        for member in members:
            addr = node_address(member)
            if addr is None:
                continue
            seen.add(member.id)
            entry = self.nodes.get(member.id)
            draining = member.state is MemberState.DRAINING
            aliases = set()
            for text in member.addresses:
                try:
                    a = Address.parse(text)
                except ValueError:
                    continue
                aliases.add((a.host, a.port))
            if entry is None:
                entry = NodeEntry(member.id, addr, draining=draining, aliases=aliases, group=member.group)
                self.nodes[member.id] = entry
                self._record(NodeEvent.JOINED, entry, "membership")
                if draining:
                    self._record(NodeEvent.DRAINING, entry, "membership")
            else:
                moved = entry.address != addr or entry.group != member.group
                entry.address = addr
                entry.aliases = aliases
                entry.group = member.group
                if moved:
                    self._record(NodeEvent.MOVED, entry, "membership")
                if entry.draining != draining:
                    entry.draining = draining
                    self._record(NodeEvent.DRAINING if draining else NodeEvent.ACTIVE, entry, "membership")
        for gone in sorted(set(self.nodes) - seen):
            entry = self.nodes.pop(gone)
            self._record(NodeEvent.LEFT, entry, "membership")
            # its Record-Route stays in the route sets of its dialogs: remember it was a node
            for alias in entry.aliases | {(entry.address.host, entry.address.port)}:
                self._departed.pop(alias, None)
                self._departed[alias] = entry.group or ""
        while len(self._departed) > MAX_DEPARTED:
            del self._departed[next(iter(self._departed))]
        self._rebuild()

    def _rebuild(self) -> None:
        usable = tuple(sorted((n.id, n.group or "") for n in self.nodes.values() if n.usable))
        if usable != self._usable:
            self._usable = usable
            groups: dict[str, list[str]] = {}
            for node_id, group in usable:
                groups.setdefault(group, []).append(node_id)
            ungrouped = groups.pop("", None)
            self._ring = HashRing(ungrouped or [node_id for node_id, _ in usable], self._vnodes)
            self._group_rings = {group: HashRing(ids, self._vnodes) for group, ids in groups.items()}
            self.changes += 1
        self._by_address = {}
        for entry in self.nodes.values():
            for alias in entry.aliases | {(entry.address.host, entry.address.port)}:
                self._by_address[alias] = entry
                self._departed.pop(alias, None)  # back (or another node on its address)

    # -- hot path ----------------------------------------------------------------------------

    def pick(self, key: bytes) -> NodeEntry | None:
        """The node for ``key`` (Call-ID, AOR) on the ring of usable nodes for unpinned
        requests; None when none."""
        if not self._ring:
            return None
        return self.nodes.get(self._ring.lookup(key))

    def pick_in(self, group: str, key: bytes) -> NodeEntry | None:
        """The node for ``key`` among the usable nodes of ``group``; None when it has none."""
        ring = self._group_rings.get(group)
        if ring is None:
            return None
        return self.nodes.get(ring.lookup(key))

    def pool(self, group: str | None) -> tuple[str, ...]:
        """Ids of the usable nodes a request of ``group`` may go to (None: the unpinned pool,
        as ``pick``): where a new request goes when its hashed node is overloaded."""
        ring = self._ring if group is None else self._group_rings.get(group)
        return () if ring is None else ring.members

    def by_address(self, host: str, port: int) -> NodeEntry | None:
        """The node listening at ``host:port``: for a destination (a Route's, a Contact's).
        For the source of a received message, :meth:`sender`."""
        return self._by_address.get((host, port))

    def sender(self, source: Address, local: Address) -> NodeEntry | None:
        """The node a message from ``source``, received on our socket ``local``, comes from;
        None for a client's, and for one claiming a node's address on a socket other than
        ``facing`` (when set: a forgery, see the module docstring).  One dict look-up, and a
        comparison for a node's address only."""
        entry = self._by_address.get((source.host, source.port))
        if entry is not None and self.facing is not None and local != self.facing:
            return None
        return entry

    def forged(self, source: Address, local: Address) -> bool:
        """Whether a message claims a node's address ``source`` but came in on ``local``, not
        on the socket facing the nodes (never without ``facing``)."""
        return (
            self.facing is not None
            and local != self.facing
            and self._by_address.get((source.host, source.port)) is not None
        )

    def departed(self, host: str, port: int) -> bool:
        """Whether ``host:port`` was a node's address until it left the membership."""
        return (host, port) in self._departed

    def departed_group(self, host: str, port: int) -> str | None:
        """The group of the node that had ``host:port`` until it left (None: none, or no such node)."""
        return self._departed.get((host, port)) or None

    def usable_in(self, group: str) -> int:
        """Usable nodes of ``group``."""
        ring = self._group_rings.get(group)
        return 0 if ring is None else len(ring)

    @property
    def usable_count(self) -> int:
        return len(self._usable)

    # -- probes ------------------------------------------------------------------------------

    def due_probes(self, now: float) -> list[NodeEntry]:
        """Nodes to probe now; an unanswered probe older than the interval counts as missed."""
        due: list[NodeEntry] = []
        for entry in self.nodes.values():
            if entry.probe_sent is None:
                if now - entry.last_probe >= self.probe_interval:
                    due.append(entry)
                continue
            if now - entry.probe_sent >= self.probe_interval:
                if entry.heard:
                    self.probe_answered(entry, now, measured=False)
                else:
                    self.probe_missed(entry)
                due.append(entry)
        return due

    def probe_sent(self, entry: NodeEntry, now: float, branch: bytes) -> None:
        entry.probe_sent = now
        entry.last_probe = now
        entry.probe_branch = branch
        entry.heard = False

    def probe_answered(self, entry: NodeEntry, now: float, *, measured: bool = True) -> None:
        """The probe's answer (or, ``measured`` False, other responses from the node)."""
        if entry.probe_sent is not None and measured:
            sample = now - entry.probe_sent
            entry.rtt = sample if entry.rtt == 0 else 0.8 * entry.rtt + 0.2 * sample
        entry.probe_sent = None
        entry.missed = 0
        if entry.health is Health.DOWN:
            entry.health = Health.UP
            self._record(NodeEvent.UP, entry, "probe_answered" if measured else "heard")
            self._rebuild()

    def probe_missed(self, entry: NodeEntry) -> None:
        entry.probe_sent = None
        entry.missed += 1
        if entry.missed >= self.down_after and entry.health is Health.UP:
            entry.health = Health.DOWN
            self._record(NodeEvent.DOWN, entry, "probes_missed")
            self._rebuild()

    def mark_down(self, entry: NodeEntry) -> None:
        """Hard evidence (the probe could not even be sent): down now."""
        entry.missed = self.down_after
        if entry.health is Health.UP:
            entry.health = Health.DOWN
            self._record(NodeEvent.DOWN, entry, "send_failed")
            self._rebuild()

    # -- transitions -------------------------------------------------------------------------

    def _record(self, event: NodeEvent, entry: NodeEntry, reason: str) -> None:
        if len(self._transitions) >= MAX_TRANSITIONS:
            self.transitions_dropped += 1
            return
        self._transitions.append(NodeTransition(event, entry.id, entry.address, entry.group, reason))

    def take_transitions(self) -> list[NodeTransition]:
        """The transitions since the last call, oldest first (each is reported once)."""
        taken, self._transitions = self._transitions, []
        return taken

    def find_probe(self, branch: bytes) -> NodeEntry | None:
        for entry in self.nodes.values():
            if entry.probe_branch == branch:
                return entry
        return None
