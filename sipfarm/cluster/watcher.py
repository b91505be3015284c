"""An in-memory view of the farm for the balancer and the proxy: :class:`MemberWatcher`.

The forwarding path must never wait on Redis, so it never asks Redis: a background task
polls :meth:`MembershipStore.members` every ``interval`` and swaps in a new immutable
snapshot, which the hot path reads with :meth:`MemberWatcher.snapshot` (no ``await``, no lock:
one attribute read). Consumers that derive structures from the membership (a hash ring, a
list of active nodes) rebuild them from change callbacks or when ``generation`` moves.

When Redis fails the watcher keeps its last snapshot: the balancer keeps forwarding to the
nodes it knew, which is almost always right (nodes do not die because Redis did). After
``stale_after`` seconds without a successful poll the snapshot is marked ``stale`` (for
status, metrics and logs; it is still served).

Redis coming back empty (restarted without persistence) or a replica promoted with a lag
would show a farm with few members for up to one heartbeat interval, until every member has
beaten again. Acting on that would empty the balancer's destination set, so for
``recovery_grace`` seconds after an outage members missing from a poll are kept, not removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from sipfarm.store.errors import StoreError

from .membership import Member, MembershipStore, MemberState, Role

__all__ = ["ChangeKind", "MemberWatcher", "MembershipChange"]

log = logging.getLogger("sipfarm.cluster")

DEFAULT_POLL_INTERVAL = 0.25
DEFAULT_STALE_AFTER = 2.0
DEFAULT_POLL_TIMEOUT = 1.0


class ChangeKind(enum.Enum):
    JOINED = "joined"
    LEFT = "left"
    STATE_CHANGED = "state changed"  # active <-> draining
    #: same id, new addresses or a new process (restarted: other ``started_at``/``pid``)
    UPDATED = "updated"


@dataclass(frozen=True, slots=True)
class MembershipChange:
    kind: ChangeKind
    #: the member now (for ``LEFT``: as last seen)
    member: Member
    #: the member before the change (``None`` for ``JOINED``)
    previous: Member | None


Listener = Callable[[MembershipChange], None]


class MemberWatcher:
    """Polls the members of ``role`` (all roles if ``None``) into an in-memory snapshot."""

    def __init__(
        self,
        store: MembershipStore,
        role: Role | None = None,
        *,
        interval: float = DEFAULT_POLL_INTERVAL,
        stale_after: float = DEFAULT_STALE_AFTER,
        timeout: float = DEFAULT_POLL_TIMEOUT,
        recovery_grace: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval}")
        self._store = store
        self.role = role
        self.interval = interval
        self.stale_after = stale_after
        self.timeout = timeout
        self.recovery_grace = store.ttl if recovery_grace is None else recovery_grace
        self._clock = clock
        self._members: dict[str, Member] = {}
        self._snapshot: tuple[Member, ...] = ()
        self._active: tuple[Member, ...] = ()
        #: incremented with every change reported to listeners (not for mere load figures)
        self.generation = 0
        self._listeners: list[Listener] = []
        self._last_ok: float | None = None
        self._failing_since: float | None = None
        self._stale_logged = False
        self._grace_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    # -- what the hot path reads (no await) ---------------------------------------------

    def snapshot(self) -> tuple[Member, ...]:
        """The members as of the last successful poll, sorted by id."""
        return self._snapshot

    def active(self) -> tuple[Member, ...]:
        """The snapshot's ``active`` members (those that take new work), sorted by id."""
        return self._active

    def get(self, member_id: str) -> Member | None:
        return self._members.get(member_id)

    @property
    def stale(self) -> bool:
        """No successful poll in the last ``stale_after`` seconds (or none yet)."""
        return self._last_ok is None or self._clock() - self._last_ok > self.stale_after

    @property
    def age(self) -> float | None:
        """Seconds since the last successful poll, ``None`` before the first."""
        return None if self._last_ok is None else self._clock() - self._last_ok

    # -- change notifications -------------------------------------------------------------

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` (in the watcher's task) for each change; returns its remover."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling in the running loop; the first poll happens at once. A caller that
        needs a view before serving awaits :meth:`poll` first."""
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sipfarm-member-watcher")

    async def stop(self) -> None:
        """Stop polling: the poll in flight finishes (bounded by ``timeout``) rather than being
        cancelled.  A cancellation inside redis-py's asyncio client at the wrong moment (a
        reconnect after an outage) can be swallowed, and awaiting the cancelled task then never
        returns (a test hung 60 s in this stop); past the bound the task is cancelled and left."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=self.timeout + 0.5)
        if not done:
            task.cancel()  # not awaited: see above
            log.warning("event=cluster_watch_stop_timeout")
        elif not task.cancelled() and task.exception() is not None:
            log.error("event=cluster_watch_task_failed error=%r", task.exception())

    async def __aenter__(self) -> MemberWatcher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def poll(self) -> bool:
        """Read the members once and apply the changes; return whether Redis answered.
        Never raises (but ``CancelledError``)."""
        try:
            async with asyncio.timeout(self.timeout):
                members = await self._store.members(self.role)
        except (StoreError, TimeoutError) as e:
            self._poll_failed(e)
            return False
        now = self._clock()
        if self._failing_since is not None:
            log.warning(
                "event=cluster_watch_recovered outage=%.2fs members=%d",
                now - self._failing_since,
                len(members),
            )
            self._failing_since = None
            self._stale_logged = False
            self._grace_until = now + self.recovery_grace
        self._last_ok = now
        self._apply({m.id: m for m in members}, keep_missing=now < self._grace_until)
        return True

    def _poll_failed(self, error: BaseException) -> None:
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("event=cluster_watch_failed error=%r keeping=%d members", error, len(self._snapshot))
        if not self._stale_logged and self.stale:
            self._stale_logged = True
            log.warning(
                "event=cluster_watch_stale age=%s members=%d",
                "never" if self._last_ok is None else f"{now - self._last_ok:.2f}s",
                len(self._snapshot),
            )

    def _apply(self, fresh: dict[str, Member], *, keep_missing: bool) -> None:
        old = self._members
        changes: list[MembershipChange] = []
        changed = False
        for mid, member in fresh.items():
            before = old.get(mid)
            if before is None:
                changes.append(MembershipChange(ChangeKind.JOINED, member, None))
                changed = True
                continue
            if before.state is not member.state:
                changes.append(MembershipChange(ChangeKind.STATE_CHANGED, member, before))
                changed = True
            elif (
                before.addresses != member.addresses
                or before.control_address != member.control_address
                or before.started_at != member.started_at
                or before.pid != member.pid
            ):
                changes.append(MembershipChange(ChangeKind.UPDATED, member, before))
                changed = True
        for mid, before in old.items():
            if mid in fresh:
                continue
            if keep_missing:
                fresh[mid] = before
            else:
                changes.append(MembershipChange(ChangeKind.LEFT, before, before))
                changed = True
        self._members = fresh
        self._snapshot = tuple(fresh[k] for k in sorted(fresh))
        self._active = tuple(m for m in self._snapshot if m.state is MemberState.ACTIVE)
        if changed:
            self.generation += 1
        for change in changes:
            log.info(
                "event=cluster_member_%s member=%s role=%s state=%s",
                change.kind.name.lower(),
                change.member.id,
                change.member.role,
                change.member.state,
            )
            for listener in tuple(self._listeners):
                try:
                    listener(change)
                except Exception:
                    log.exception("event=cluster_listener_failed change=%s member=%s", change.kind, change.member.id)

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self.poll()
            if self.stopping:  # stop() waits for the poll in flight, then for this
                return
            # Jitter, so the balancers of a farm do not poll Redis in lockstep.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval * random.uniform(0.9, 1.1)):
                    await self._wake.wait()
