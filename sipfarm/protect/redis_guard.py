"""The farm's guard: bans, failure counters and nonce uses in Redis, over the node's pipelined client.

Every call costs one command slot in the pipeline the node flushes once per event-loop iteration
(:mod:`sipfarm.store.resp`), no task or future:

* :meth:`RedisGuard.admit` queues ``PTTL ban:<ip>`` and ``SET nonce:<nonce>:<nc> 1 NX PX <ttl>``
  back to back, so they travel with the account and binding lookups of the same request and
  cost no round trip of their own. ``PTTL`` rather than ``GET``: the same one-key read, and it
  also tells how long the ban lasts, which the local cache needs (-2: no ban).
* :meth:`RedisGuard.failed` runs ``failure.lua`` (EVALSHA, EVAL once on NOSCRIPT), which
  increments the source's counter, opens its window on the first failure, and sets the ban when the
  source reaches ``max_failures``, atomically: two nodes counting the same source at the same
  instant cannot both miss (or both start) the ban. The EVAL that answers a NOSCRIPT goes out
  in a later pipeline than the commands queued after the EVALSHA, so on a Redis that has just
  lost its scripts a ``failed`` may be applied after an ``admit`` issued after it (once per
  script loss; at worst one request of a source being banned at that instant gets through).

Times go to Redis in milliseconds and expire on Redis's clock, so nodes need no clock agreement.
The script touches the two keys of one source (one hash slot: Redis Cluster-safe); the account's
counter (``SET NX PX`` + ``INCR``) and, when a ban starts, the ban index (``ZADD``) are commands
of their own, in the same pipeline.

Replies become :class:`~sipfarm.store.errors.StoreError` (StoreUnavailable, 503, when Redis
cannot serve: connection lost, loading, read-only, out of memory); nothing is raised out.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import partial
from importlib.resources import files
from typing import Final

import hiredis

from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.location import seconds_left
from sipfarm.store.resp import RedisPipe, Reply
from sipfarm.transport.subject import source_subject

from .guard import (
    BAN_INDEX,
    BAN_LOG,
    BAN_LOG_KEEP,
    DEFAULT_POLICY,
    Admission,
    FailureOutcome,
    GuardPolicy,
    GuardRules,
    WorkingMarks,
    account_failures_key,
    ban_key,
    milliseconds,
    nonce_key,
    source_failures_key,
    working_key,
)

__all__ = ["FAILURE_SCRIPT", "UNAVAILABLE_REPLIES", "RedisGuard", "ban_left"]

FAILURE_SCRIPT: Final = files(__package__).joinpath("failure.lua").read_text()

# Error replies that mean "this Redis cannot serve now" (as sipfarm.store.redis_client maps them).
UNAVAILABLE_REPLIES: Final = ("LOADING", "READONLY", "OOM", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def ban_left(pttl: int) -> float | None:
    """Seconds left of a ban from ``PTTL``: None when there is none, ``math.inf`` when it has no end."""
    return seconds_left(pttl)


class _AdmitReplies:
    """The two replies of one ``admit`` (ban, nonce), kept until both are in: on one Redis they
    come in order, on Redis Cluster from different masters, in either order."""

    __slots__ = ("ban", "done", "nonce", "source_ip", "started", "waiting")

    def __init__(self, source_ip: str, started: float, done: Callable[[Admission | StoreError], None]) -> None:
        self.source_ip = source_ip
        self.started = started
        self.done = done
        self.ban: Reply = None
        self.nonce: Reply = None
        self.waiting = 2


class _FailureReplies:
    """The two replies of one ``failed`` (source script, account counter), kept until both are in:
    on Redis Cluster they come from different masters, in either order."""

    __slots__ = ("account", "account_name", "done", "source", "source_ip", "started", "waiting")

    def __init__(
        self, source_ip: str, account: str | None, started: float, done: Callable[[FailureOutcome | StoreError], None]
    ) -> None:
        self.source_ip = source_ip
        self.account_name = account
        self.started = started
        self.done = done
        self.source: Reply = None
        self.account: Reply = 0  # no account counter (an unknown user): 0 failures
        self.waiting = 2 if account is not None else 1


def _ignore(_reply: Reply) -> None:
    return None


class RedisGuard:
    """:class:`~sipfarm.protect.guard.Guard` over a :class:`~sipfarm.store.resp.RedisPipe`."""

    def __init__(
        self,
        pipe: RedisPipe,
        policy: GuardPolicy = DEFAULT_POLICY,
        *,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.pipe = pipe
        self.policy = policy
        self.rules = GuardRules(policy)
        self._clock = clock  # the local ban cache's clock (banned_locally's ``now``)
        self._observe = observe  # Redis round-trip histogram
        self._failure_sha = hashlib.sha1(FAILURE_SCRIPT.encode()).hexdigest()  # noqa: S324
        self._failure_args = (
            milliseconds(policy.window),
            policy.max_failures,
            milliseconds(policy.ban_time),
            policy.max_failures_working,
        )
        self._working = WorkingMarks(policy.working_time)
        self._log_keep_ms = milliseconds(BAN_LOG_KEEP)

    # Callbacks are ``functools.partial`` of bound methods, not closures (see FarmState: a mypyc
    # closure is a reference cycle per call).

    def banned_locally(self, source_ip: str, now: float) -> bool:
        return self.rules.local.banned(source_ip, now)

    # -- admit -----------------------------------------------------------------------------------

    def admit(self, source_ip: str, nonce_use: str, ttl: float, done: Callable[[Admission | StoreError], None]) -> None:
        replies = _AdmitReplies(source_ip, self._clock(), done)
        # RFC 7616 3.3: one (nonce, nc) once; the key lives as long as the nonce could be accepted.
        # Both commands go out in the pipeline of this loop iteration; their replies come back in
        # order on one Redis, in either order on a Cluster (two keys, two masters).
        self.pipe.call(partial(self._ban_read, replies), "PTTL", ban_key(source_ip))
        self.pipe.call(
            partial(self._nonce_recorded, replies), "SET", nonce_key(nonce_use), b"1", "NX", "PX", milliseconds(ttl)
        )

    def _ban_read(self, replies: _AdmitReplies, reply: Reply) -> None:
        replies.ban = reply
        replies.waiting -= 1
        if replies.waiting == 0:
            self._admitted(replies)

    def _nonce_recorded(self, replies: _AdmitReplies, reply: Reply) -> None:
        replies.nonce = reply
        replies.waiting -= 1
        if replies.waiting == 0:
            self._admitted(replies)

    def _admitted(self, replies: _AdmitReplies) -> None:
        ban, reply = replies.ban, replies.nonce
        result: Admission | StoreError | None = self._settle(replies.started, "ban lookup", ban)
        if result is None:
            result = self._settle(None, "nonce record", reply)
        if result is None:
            if isinstance(ban, int) and (reply is None or reply == b"OK"):
                result = self.rules.admission(replies.source_ip, ban_left(ban), reply is not None, self._clock())
            else:
                result = StoreError(f"admit: unexpected replies {ban!r}, {reply!r}")
        replies.done(result)

    def admission(self, source_ip: str, ban_left: float | None, first_use: bool) -> Admission:
        return self.rules.admission(source_ip, ban_left, first_use, self._clock())

    # -- succeeded -------------------------------------------------------------------------------

    def succeeded(self, source_ip: str, account: str) -> None:
        if self._working.due(source_ip, account, self._clock()):
            ms = milliseconds(self.policy.working_time)
            key = working_key(source_ip, account)
            self.pipe.call(partial(self._working_written, source_ip, account), "SET", key, b"1", "PX", ms)

    def works(self, source_ip: str, account: str, done: Callable[[bool | StoreError], None]) -> None:
        self.pipe.call(partial(self._exists, done), "EXISTS", working_key(source_ip, account))

    def _exists(self, done: Callable[[bool | StoreError], None], reply: Reply) -> None:
        error = self._settle(None, "EXISTS", reply)
        done(error if error is not None else reply == 1)

    def _working_written(self, source_ip: str, account: str, reply: Reply) -> None:
        if isinstance(reply, Exception):  # Redis unavailable or an error reply: not written
            self._working.forget(source_ip, account)

    # -- failed ----------------------------------------------------------------------------------

    def failed(self, source_ip: str, account: str | None, done: Callable[[FailureOutcome | StoreError], None]) -> None:
        replies = _FailureReplies(source_ip, account, self._clock(), done)
        self._count_failure("EVALSHA", self._failure_sha, replies)
        if account is None:
            return
        # the account's counter: its window opens with its first failure (SET NX PX), INCR keeps
        # the expiry. Its own commands: another key's hash slot than the source's (guard.py)
        key = account_failures_key(account)
        self.pipe.call(_ignore, "SET", key, b"0", "NX", "PX", self._failure_args[0])
        self.pipe.call(partial(self._account_counted, replies), "INCR", key)

    def _count_failure(self, command: str, script: str, replies: _FailureReplies) -> None:
        self.pipe.call(
            partial(self._source_counted, replies),
            command,
            script,
            3,
            source_failures_key(replies.source_ip),
            ban_key(replies.source_ip),
            working_key(replies.source_ip, replies.account_name or ""),  # "": a key never set
            *self._failure_args,
        )

    def _source_counted(self, replies: _FailureReplies, reply: Reply) -> None:
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            # first use on this Redis (or after SCRIPT FLUSH / a restart): send the body once
            self._count_failure("EVAL", FAILURE_SCRIPT, replies)
            return
        replies.source = reply
        replies.waiting -= 1
        if replies.waiting == 0:
            self._failure_counted(replies)

    def _account_counted(self, replies: _FailureReplies, reply: Reply) -> None:
        replies.account = reply
        replies.waiting -= 1
        if replies.waiting == 0:
            self._failure_counted(replies)

    def _failure_counted(self, replies: _FailureReplies) -> None:
        reply, account_reply = replies.source, replies.account
        result: FailureOutcome | StoreError | None = self._settle(replies.started, "failure count", reply)
        if result is None:
            result = self._settle(None, "account failure count", account_reply)
        if result is None:
            if (
                isinstance(reply, list)
                and len(reply) == 3
                and all(isinstance(n, int) for n in reply)
                and isinstance(account_reply, int)
            ):
                source_failures, started_ban, pttl = reply
                if started_ban == 1:
                    # the ban index (another slot): what lists bans; the ban key stays the truth;
                    # and the change log the balancers read between their full reads
                    wall = int(time.time() * 1000)
                    subject = source_subject(replies.source_ip)
                    self.pipe.call(_ignore, "ZADD", BAN_INDEX, wall + self._failure_args[2], subject)
                    self.pipe.call(_ignore, "ZADD", BAN_LOG, wall, subject)
                    self.pipe.call(_ignore, "ZREMRANGEBYSCORE", BAN_LOG, "-inf", wall - self._log_keep_ms)
                result = self.rules.failure(
                    replies.source_ip,
                    replies.account_name,
                    source_failures,
                    account_reply,
                    started_ban == 1,
                    ban_left(pttl),
                    self._clock(),
                )
            else:
                result = StoreError(f"failure count: unexpected replies {reply!r}, {account_reply!r}")
        replies.done(result)

    # -- replies ---------------------------------------------------------------------------------

    def _settle(self, started: float | None, what: str, reply: Reply) -> StoreError | None:
        """Time the round trip (when ``started``); the StoreError a failed reply stands for (None: a reply)."""
        if started is not None and self._observe is not None:
            self._observe(self._clock() - started)
        if isinstance(reply, StoreError):
            return reply
        if isinstance(reply, Exception):
            if str(reply).startswith(UNAVAILABLE_REPLIES):
                return StoreUnavailable(f"{what} failed: {reply}")
            return StoreError(f"{what} failed: {reply}")
        return None
