"""The background task that keeps a process in the farm: :class:`Heartbeater`.

A process (node, relay, balancer) builds its :class:`Member` from live figures in a provider
callable; the heartbeater writes it every ``interval`` and feeds back the effective state (an
operator's drain flag). Redis being down is a normal condition here, not an error of the
process: the heartbeater logs one line when an outage starts and one when it ends, keeps
retrying at its own pace, and never lets an exception out of its task. On ``stop`` it
removes the member at once, so the balancer stops sending it work without waiting for TTLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

from sipfarm.store.errors import StoreError

from .membership import HEARTBEAT_INTERVAL, Member, MembershipStore, MemberState

__all__ = ["Heartbeater"]

log = logging.getLogger("sipfarm.cluster")

#: bound of ``leave`` at stop: Redis may be down, and the record expires by itself anyway
LEAVE_TIMEOUT = 1.0


class Heartbeater:
    """Heartbeat ``provider()`` into ``store`` every ``interval`` seconds until :meth:`stop`.

    ``state`` is the effective state confirmed by the last successful heartbeat (``None``
    before the first); ``on_state`` is called, in the heartbeater's task, when it changes.
    ``beat_now()`` sends the next heartbeat without waiting for the interval (e.g. right
    after the process decided to drain itself, so the balancer learns it sooner).
    """

    def __init__(
        self,
        store: MembershipStore,
        provider: Callable[[], Member],
        *,
        interval: float = HEARTBEAT_INTERVAL,
        timeout: float | None = None,
        on_state: Callable[[MemberState], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval}")
        self._store = store
        self._provider = provider
        self.interval = interval
        # A heartbeat that takes longer than the TTL is worthless: the record expired meanwhile.
        self.timeout = timeout if timeout is not None else min(max(interval, 0.5), store.ttl)
        self._on_state = on_state
        self.state: MemberState | None = None
        #: id of the last member heartbeated (what ``stop`` removes)
        self.member_id: str | None = None
        #: False from the first failed heartbeat until the next successful one
        self.connected = False
        self.beats = 0
        self.failures = 0
        self._outage_since: float | None = None
        self._provider_failing = False
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background task (in the running loop); the first beat goes out at once."""
        if self.running:
            return
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sipfarm-heartbeat")

    @property
    def stopping(self) -> bool:
        """stop() was called: the beat in flight is the last."""
        return self._stopping

    def beat_now(self) -> None:
        self._wake.set()

    async def stop(self, *, leave: bool = True) -> None:
        """Stop beating and, if ``leave``, remove the member now (best effort, bounded)."""
        task, self._task = self._task, None
        if task is not None:
            # Let a beat in flight finish (bounded by its timeout) rather than cancel it: a
            # cancellation inside redis-py's asyncio client at the wrong moment (the first
            # beat's connect) can be swallowed, and awaiting the cancelled task then never
            # returns (a node stopped right after it started hung in its shutdown).
            self._stopping = True
            self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=self.timeout + 0.5)
            if not done:
                task.cancel()  # not awaited: see above
                log.warning("event=cluster_heartbeat_stop_timeout member=%s", self.member_id)
            elif not task.cancelled() and task.exception() is not None:
                log.error("event=cluster_heartbeat_task_failed error=%r", task.exception())
        if leave and self.member_id is not None:
            try:
                async with asyncio.timeout(LEAVE_TIMEOUT):
                    await self._store.leave(self.member_id)
            except (StoreError, TimeoutError) as e:
                log.info("event=cluster_leave_failed member=%s error=%r; it expires by TTL", self.member_id, e)

    async def __aenter__(self) -> Heartbeater:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def beat(self) -> bool:
        """Send one heartbeat now; return whether it was stored. Never raises (but
        ``CancelledError``)."""
        try:
            member = self._provider()
        except Exception:
            # The provider is the process's own code: a bug there must not take the process
            # out of the farm silently, nor crash it. Logged once per failing streak.
            if not self._provider_failing:
                log.exception("event=cluster_heartbeat_provider_failed")
                self._provider_failing = True
            self.failures += 1
            return False
        self._provider_failing = False
        self.member_id = member.id
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                state = await self._store.heartbeat(member)
        except (StoreError, TimeoutError) as e:
            self.failures += 1
            if self._outage_since is None:
                self._outage_since = loop.time()
                log.warning(
                    "event=cluster_heartbeat_failed member=%s error=%r retry_every=%.2fs",
                    member.id,
                    e,
                    self.interval,
                )
            self.connected = False
            return False
        self.beats += 1
        self.connected = True
        if self._outage_since is not None:
            log.warning(
                "event=cluster_heartbeat_recovered member=%s outage=%.2fs",
                member.id,
                loop.time() - self._outage_since,
            )
            self._outage_since = None
        if state is not self.state:
            self.state = state
            if self._on_state is not None:
                try:
                    self._on_state(state)
                except Exception:
                    log.exception("event=cluster_on_state_failed member=%s state=%s", member.id, state)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping:
            self._wake.clear()
            await self.beat()
            if self.stopping:
                return
            # Fixed cadence from the start, not "interval after the last beat": a slow Redis
            # must not stretch the period towards the TTL. Missed slots are skipped.
            next_at = max(next_at + self.interval, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_at):
                    await self._wake.wait()


def start_heartbeat(
    store: MembershipStore, provider: Callable[[], Member], *, interval: float, leader: bool
) -> Heartbeater | None:
    """The heartbeater of a process that represents its member (one per member: the only
    process, or worker 0 of several), started; None for the other workers."""
    if not leader:
        return None
    heartbeater = Heartbeater(store, provider, interval=interval)
    heartbeater.start()
    return heartbeater
