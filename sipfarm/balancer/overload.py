"""Overload shedding at the balancer: an adaptive concurrency limit per node (sans-IO).

Theory of operation
-------------------
A node that is offered more than it can serve does not fail fast: its UDP receive queue
grows, every answer comes later, phones retransmit (RFC 3261 17.1.1.2: T1 = 500 ms), which
adds more work, and at some point nearly every call fails (measured: 2,379 of 2,400 calls
failed at twice the farm's capacity).  The cure is to refuse the excess where it is cheap,
before it reaches the node: the balancer answers new INVITEs and REGISTERs itself with 503
and a Retry-After, so that the calls it admits still complete.

What the balancer sees of a node's load is the delay of its first answer to a new request:
a node answers an INVITE with 100 Trying (or 407; with its ``trying_delay`` > 0, the callee's
180 or, that long after, its 100) and a REGISTER with 401 or 200 at once, in
about a millisecond when healthy; under overload that delay is the node's queue.  So, per
node:

- every new out-of-dialog INVITE or REGISTER forwarded to it is *pending* until the node's
  first response to it (keyed by Call-ID and CSeq number; a retransmission is not counted
  again); a pending entry older than ``late_after`` seconds is dropped and counts as *late*
  (the request or its answer was lost, or the node is drowning);
- the node is *overloaded* while its pending requests reach its ``limit``, or while its
  last heartbeat reports more transactions in flight than ``node_load`` (0: not used);
- the limit adapts (AIMD with a gradient, as Netflix's concurrency-limits): an answer within
  ``target`` seconds, while the node is at least half busy, raises it by 1/limit (one per
  limit's worth of answers, as TCP's congestion avoidance); an answer
  later than ``target`` (or a late entry) cuts it to ``limit * target / delay`` (at most
  ``backoff``, at least ``min_limit``), at most once per ``target`` seconds, so one burst
  of slow answers is one cut;
- and the limit is never below what the node has shown it answers within ``target``: its
  first answers per second, measured over ``RATE_WINDOW`` seconds by the periodic tick
  (``expire``), times ``target`` (Little's law: a queue of ``rate * target`` is served in
  ``target``).  Without it a node that answers fast is never "half busy", so its limit
  never grows past the initial one, and a pause shorter than ``target`` (a burst, a
  scheduler's hiccup on a shared machine) filled it: measured, 2% of REGISTERs shed at
  3,250/s with the node at 65% of a core and its answers' p95 at 64 ms.
  The queue a node is allowed to hold is therefore about what
  it can serve within ``target``: with a node that answers 1,000 requests a second and
  ``target`` 0.1 s, at most ~100 pending; with one that answers 50, ~5.  A call crosses
  its node about four times before it is answered (two INVITEs, the INVITE to the callee
  and its 200), so its setup stays within about ``4 * target`` at any offered load.

The balancer prefers a node that is not overloaded (new INVITEs and REGISTERs may go to any
node of their pool: nodes keep no state of their own), and sheds (503 + Retry-After) only
when every node it may use is overloaded.  In-dialog requests, ACK, CANCEL, BYE and
responses are never shed: they finish work already admitted.  A request with credentials
(the second INVITE of a challenged call, the second REGISTER) finishes work already begun:
when its Call-ID was admitted in the last ``ADMITTED_TTL`` seconds it goes to the node that
admitted it and is never shed (at most ``ADMITTED_RETRIES`` times a Call-ID, so a reused
Call-ID is no way around shedding); otherwise it is shed only above twice the limit.

No clock of its own: ``now`` is passed in (the balancer's monotonic clock); ``expire(now)``
is called from the balancer's periodic tick.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from sipfarm.sip.memo import bounded_key

PENDING_LIMIT = 100_000  # entries over all nodes; beyond, the oldest are dropped as late
ADMITTED_LIMIT = 100_000  # Call-IDs of admitted new requests remembered; beyond, the oldest go
ADMITTED_TTL = 32.0  # seconds a challenged request's credentialed retry may take (Timer B)
ADMITTED_RETRIES = 2  # credentialed follow-ups per admitted Call-ID never shed
RATE_WINDOW = 0.5  # seconds over which a node's first answers per second are counted


@dataclass(frozen=True, slots=True)
class OverloadPolicy:
    """The settings of :class:`AdmissionControl` (``[balancer] shed_*``)."""

    target: float = 0.1  # seconds: a node's first answer later than this means it queues
    initial_limit: int = 200  # pending new requests per node before the first measurement
    min_limit: int = 4
    max_limit: int = 2000
    backoff: float = 0.9  # the smallest cut of the limit on a slow answer
    late_after: float = 2.0  # seconds: a pending request with no answer by then is late
    node_load: float = 0.0  # shed when a node's heartbeat load (transactions in flight) exceeds it; 0: unused


@dataclass(slots=True)
class NodeLoad:
    """One node's admission state."""

    node_id: str
    limit: float
    pending: OrderedDict[bytes, float] = field(default_factory=OrderedDict)  # key -> sent at
    delay: float = 0.0  # smoothed first-answer delay (seconds), for the metrics and logs
    last_cut: float = float("-inf")
    heartbeat_load: float = 0.0
    answers: int = 0  # first answers since ``counted_since``
    counted_since: float | None = None
    throughput: float = 0.0  # first answers per second (smoothed over windows)

    def overloaded(self, policy: OverloadPolicy, factor: float = 1.0) -> bool:
        if len(self.pending) >= self.limit * factor:
            return True
        return policy.node_load > 0 and self.heartbeat_load > policy.node_load * factor


@dataclass(slots=True)
class OverloadStats:
    admitted: int = 0  # new requests recorded as pending
    answered: int = 0  # first answers measured
    slow: int = 0  # of which later than the target
    late: int = 0  # pending requests that never got an answer within late_after
    diverted: int = 0  # sent to another node than their hash's, which was overloaded
    cuts: int = 0  # limit decreases

    def flat(self) -> dict[str, int]:
        return {
            "admitted": self.admitted,
            "answered": self.answered,
            "slow": self.slow,
            "late": self.late,
            "diverted": self.diverted,
            "cuts": self.cuts,
        }


@dataclass(slots=True)
class Admitted:
    """Where a new request's Call-ID was admitted, when, and how many credentialed follow-ups
    may still pass unshed."""

    node_id: str
    when: float
    left: int


class AdmissionControl:
    """Per-node pending new requests and adaptive limits (see the module docstring)."""

    def __init__(self, policy: OverloadPolicy | None = None) -> None:
        self.policy = policy if policy is not None else OverloadPolicy()
        self.nodes: dict[str, NodeLoad] = {}
        self._pending: dict[bytes, NodeLoad] = {}  # key -> its node, for the answer
        # Call-ID of an admitted new request -> where and when (oldest first)
        self._admitted: OrderedDict[bytes, Admitted] = OrderedDict()
        self.stats = OverloadStats()

    def admitted(self, call_id: bytes, node_id: str, now: float) -> None:
        """A new request of ``call_id`` was admitted to ``node_id`` (see :meth:`follow_up`)."""
        admitted = self._admitted
        call_id = bounded_key(call_id)  # off the wire: a long one is held as 17 bytes
        if call_id in admitted:
            return
        admitted[call_id] = Admitted(node_id, now, ADMITTED_RETRIES)
        if len(admitted) > ADMITTED_LIMIT:
            admitted.popitem(last=False)

    def follow_up(self, call_id: bytes, now: float) -> str | None:
        """The node that admitted ``call_id`` when a credentialed follow-up of it may pass
        unshed (and counts it); None otherwise."""
        call_id = bounded_key(call_id)
        entry = self._admitted.get(call_id)
        if entry is None:
            return None
        if now - entry.when > ADMITTED_TTL or entry.left <= 0:
            del self._admitted[call_id]
            return None
        entry.left -= 1
        return entry.node_id

    def node(self, node_id: str) -> NodeLoad:
        load = self.nodes.get(node_id)
        if load is None:
            load = self.nodes[node_id] = NodeLoad(node_id, float(self.policy.initial_limit))
        return load

    def overloaded(self, node_id: str, *, credentials: bool = False) -> bool:
        """Whether a new request for ``node_id`` should go elsewhere (or be shed)."""
        load = self.nodes.get(node_id)
        return load is not None and load.overloaded(self.policy, 2.0 if credentials else 1.0)

    def is_pending(self, key: bytes) -> bool:
        """A request already forwarded and not answered (its retransmission passes)."""
        return bounded_key(key) in self._pending

    def pending_node(self, key: bytes) -> str | None:
        """The node a pending request went to (its retransmission goes there too, even when it
        was diverted from its hashed node); None when not pending."""
        load = self._pending.get(bounded_key(key))
        return None if load is None else load.node_id

    def sent(self, key: bytes, node_id: str, now: float) -> None:
        """A new INVITE/REGISTER went to ``node_id`` (a retransmission is not counted again)."""
        key = bounded_key(key)  # Call-ID and CSeq off the wire: a long one is held as 17 bytes
        if key in self._pending:
            return
        load = self.node(node_id)
        load.pending[key] = now
        self._pending[key] = load
        self.stats.admitted += 1
        if len(self._pending) > PENDING_LIMIT:
            self.expire(now, force=len(self._pending) - PENDING_LIMIT)

    def answered(self, key: bytes, now: float) -> None:
        """The first response to a pending request (later ones find nothing: one dict miss)."""
        key = bounded_key(key)
        load = self._pending.pop(key, None)
        if load is None:
            return
        sent = load.pending.pop(key, None)
        if sent is None:
            return
        self.stats.answered += 1
        load.answers += 1
        delay = now - sent
        load.delay = delay if load.delay == 0.0 else 0.8 * load.delay + 0.2 * delay
        policy = self.policy
        if delay > policy.target:
            self.stats.slow += 1
            self._cut(load, delay, now)
        elif (len(load.pending) + 1) * 2 >= load.limit:
            # +1 per limit's worth of fast answers (TCP congestion avoidance): a node freed by
            # a cut does not climb straight back into its queue
            load.limit = min(float(policy.max_limit), load.limit + 1.0 / load.limit)

    def _cut(self, load: NodeLoad, delay: float, now: float) -> None:
        policy = self.policy
        if now - load.last_cut < policy.target:
            return  # one burst of slow answers: one cut
        load.last_cut = now
        load.limit = max(float(policy.min_limit), load.limit * min(policy.backoff, policy.target / delay))
        self.stats.cuts += 1

    def expire(self, now: float, *, force: int = 0) -> None:
        """Drop pending requests older than ``late_after`` (late: a cut of their node's limit);
        ``force``: also drop that many of the oldest whatever their age (the table is full)."""
        self.expire_admitted(now)
        late_after = self.policy.late_after
        for load in self.nodes.values():
            self._measure(load, now)
            pending = load.pending
            late = 0
            while pending:
                key, sent = next(iter(pending.items()))
                if now - sent < late_after and force <= 0:
                    break
                del pending[key]
                self._pending.pop(key, None)
                late += 1
                force -= 1
            if late:
                self.stats.late += late
                self._cut(load, late_after * 2, now)

    def _measure(self, load: NodeLoad, now: float) -> None:
        """Close ``load``'s counting window once ``RATE_WINDOW`` has passed: its throughput,
        and the limit raised to what that throughput serves within ``target``."""
        since = load.counted_since
        if since is None:
            load.counted_since = now
            load.answers = 0
            return
        elapsed = now - since
        if elapsed < RATE_WINDOW:
            return
        rate = load.answers / elapsed
        load.throughput = rate if load.throughput == 0.0 else 0.5 * load.throughput + 0.5 * rate
        load.answers = 0
        load.counted_since = now
        policy = self.policy
        load.limit = max(load.limit, min(float(policy.max_limit), load.throughput * policy.target))

    def heartbeat(self, node_id: str, load: float) -> None:
        """The node's own figure (transactions in flight) from its last heartbeat."""
        self.node(node_id).heartbeat_load = load

    def expire_admitted(self, now: float) -> None:
        """Forget admitted Call-IDs older than ``ADMITTED_TTL`` (from the periodic tick)."""
        admitted = self._admitted
        while admitted:
            if now - next(iter(admitted.values())).when <= ADMITTED_TTL:
                break
            admitted.popitem(last=False)

    def forget(self, present: set[str]) -> None:
        """Drop the state of nodes gone from the membership."""
        for node_id in [n for n in self.nodes if n not in present]:
            load = self.nodes.pop(node_id)
            for key in load.pending:
                self._pending.pop(key, None)

    def overloaded_count(self) -> int:
        policy = self.policy
        return sum(1 for load in self.nodes.values() if load.overloaded(policy))
