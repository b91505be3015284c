"""Farm-wide brute-force and replay protection: the policy, the answers and the guard interface.

Theory of operation
-------------------
Digest authentication (RFC 3261 22, RFC 7616 for SHA-256, RFC 8760 for SIP) leaves two doors
open that a single node cannot close on its own, because any node of the farm may see any
request:

* **Replay.** A captured ``Authorization`` is valid for as long as its nonce is. RFC 7616 3.3
  (nonce-count) lets a server refuse a repeated ``(nonce, nc)`` pair; here every pair is recorded
  farm-wide with ``SET NX`` and the nonce's remaining lifetime as expiry, so a pair is accepted
  exactly once by the whole farm. A client that sends no ``qop`` sends no ``nc`` either
  (RFC 2617 3.2.2, RFC 3261 22.4 for RFC 2069 clients): its nonce is recorded as ``"<nonce>:"``
  and is thus one-time.
* **Guessing.** Failed authentications are counted per source address and, for a user name an
  account has, per account (``user@domain``). A user name no account has gets no counter of
  its own: one per made-up name would be Redis keys an attacker mints at will. The answer is the
  same for both and goes before any counting, so neither it nor its timing tells them apart.
  Credentials whose nonce the farm did not issue to the client's address are not counted and
  write nothing at all (:class:`~sipfarm.protect.authenticator.Authenticator`): no response
  can match such a nonce, so it is no guess, and a spoofed source cannot get its victim banned.
  ``max_failures`` failures from one source within ``window`` seconds ban the source for
  ``ban_time`` seconds, farm-wide; ``max_failures_working`` when the failure is against an
  account that authenticated from that source within ``working_time`` (:meth:`Guard.succeeded`
  marks the pair): a phone whose password changed, retrying every 30 s, must not cut off an
  office behind one NAT address. The mark is the account's, not the source's: an attacker who
  logs in with an account of its own earns no larger budget against anyone else's.
  An account crossing ``account_alert`` failures in the window is logged and counted as under
  attack.  Guessing spread over many sources (each under
  ``max_failures``) is bounded per account: past ``account_lock`` failures in its window the
  account is *locked to its known clients* until the window ends: only the hosts its current
  bindings were registered from, and the sources it authenticated from within
  ``working_time`` (its mark there, :meth:`Guard.works`, asked only for a locked account), may
  still authenticate as it, so its phones keep working (a rebooted one, one whose
  registration lapsed) while guesses from anywhere else fail whatever the password
  (:class:`~sipfarm.protect.authenticator.Authenticator` keeps the lock and the hosts per
  process, learnt from the counts these failures return: no I/O on any request's path).

A ban *consumes* the failures that caused it (the source's counter is cleared when the ban
starts), so once a ban ends the source starts again from zero. Counters use a fixed window
opened by the first failure (the counter's expiry is set on its first increment).

The node asks the guard twice per authenticated request at most: :meth:`Guard.admit` in the same
pipeline as the lookups the request already makes (is the source banned? is this ``(nonce,
nc)`` new?) and :meth:`Guard.failed` when the credentials do not verify. A REGISTER whose
credentials verified before any I/O (its account cached) has the same two questions asked by
the script that writes its bindings, on one Redis: ``admit.lua`` of :mod:`sipfarm.store` reads
and writes the keys below exactly as admit does, writes no binding unless both answers let it,
and :meth:`Guard.admission` turns what it found into admit's answer. Before any I/O it asks
:meth:`Guard.banned_locally`, which answers from what this process already learnt, so a banned
flood costs no Redis round trip. A locally cached ban is trusted for at most
``local_ban_recheck`` seconds (never past the ban's end), so ``sipfarm ban del`` reaches every
node within that time.

Two implementations: :class:`sipfarm.protect.redis_guard.RedisGuard` (the farm's, over the
pipelined Redis client) and :class:`sipfarm.protect.memory_guard.MemoryGuard` (the in-memory
test tier). What they decide from their store's answers lives once, in :class:`GuardRules`.

Redis keys (all under ``sipfarm:protect:``)::

    ban:{<ip>}                 string: why (failure count, or "manual"); expiry = end of the ban
    fail:src:{<ip>}            counter of failures from a source; expiry = end of its window
                               (<ip>: the source's subject, an IPv6 address's /64: subject.py)
    fail:acct:<user@domain>    counter of failures against an account; expiry = end of its window
    working:{<ip>}:<user@dom>  "1" while the account authenticates from the source; expiry =
                               working_time after the last mark (written once per
                               working_time / 4 per process)
    nonce:<nonce>:<nc>         "1"; expiry = end of the nonce's lifetime
    bans                       zset: banned source -> end of its ban (see BAN_INDEX)
    bans:log                   zset: source -> when its ban last changed (see BAN_LOG)

The ``{<ip>}`` hash tag puts a source's ban, failure counter and working mark in one Redis
Cluster slot, the keys ``failure.lua`` touches; the account's counter and the ban index are written by
commands of their own, so every command and script stays within one slot.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final, Protocol

from sipfarm.sip.memo import MAX_CACHED_KEY
from sipfarm.store.errors import StoreError
from sipfarm.transport.subject import source_subject

from .local_bans import LocalBans

__all__ = [
    "BAN_INDEX",
    "BAN_LOG",
    "BAN_LOG_KEEP",
    "DEFAULT_POLICY",
    "KEY_PREFIX",
    "Admission",
    "FailureOutcome",
    "Guard",
    "GuardPolicy",
    "GuardRules",
    "WorkingMarks",
    "account_failures_key",
    "ban_key",
    "ban_source",
    "milliseconds",
    "nonce_key",
    "source_failures_key",
    "working_key",
]

log = logging.getLogger("sipfarm.protect")

KEY_PREFIX: Final = "sipfarm:protect:"
BAN_PREFIX: Final = KEY_PREFIX + "ban:"
#: zset of banned sources -> when the ban ends (unix ms; +inf: until lifted): what lists the
#: bans (`sipfarm ban list`, the balancers' refresh each half second) reads instead of a SCAN
#: of the whole keyspace; the ban keys stay the truth (an index entry outliving its key is skipped)
BAN_INDEX: Final = KEY_PREFIX + "bans"
#: zset of sources whose ban started, changed or was lifted -> when (unix ms): what a balancer
#: reads between its full reads of the index, so a refresh costs the changes since the last one,
#: not every ban (an attacker with many proven addresses made each refresh read them all).
#: Entries older than BAN_LOG_KEEP are trimmed by its writers and readers
BAN_LOG: Final = KEY_PREFIX + "bans:log"
BAN_LOG_KEEP: Final = 60.0  # seconds
SOURCE_FAILURES_PREFIX: Final = KEY_PREFIX + "fail:src:"
#: a source that authenticated lately (its phones work): more failures before it is banned
WORKING_PREFIX: Final = KEY_PREFIX + "working:"
ACCOUNT_FAILURES_PREFIX: Final = KEY_PREFIX + "fail:acct:"
NONCE_PREFIX: Final = KEY_PREFIX + "nonce:"


def milliseconds(seconds: float) -> int:
    """An expiry as Redis keeps it (PX, PEXPIRE): whole milliseconds, at least 1."""
    return max(1, math.ceil(seconds * 1000))


def ban_key(source_ip: str) -> str:
    """The ban of ``source_ip``'s subject (an IPv6 address's /64: :mod:`~sipfarm.transport.subject`)."""
    return BAN_PREFIX + "{" + source_subject(source_ip) + "}"


def ban_source(key: str) -> str:
    """The subject a ban key names (``ban_key``'s inverse: an IPv4 address, an IPv6 /64)."""
    return key[len(BAN_PREFIX) :].strip("{}")


def source_failures_key(source_ip: str) -> str:
    return SOURCE_FAILURES_PREFIX + "{" + source_subject(source_ip) + "}"


def working_key(source_ip: str, account: str) -> str:
    """The mark of ``account`` (``user@domain``) authenticated lately from a source (same hash
    slot as the source's counter and ban)."""
    return WORKING_PREFIX + "{" + source_subject(source_ip) + "}:" + account


def account_failures_key(account: str) -> str:
    return ACCOUNT_FAILURES_PREFIX + _bounded_name(account)


def nonce_key(nonce_use: str) -> str:
    """``nonce_use`` is ``"<nonce>:<nc>"``, or ``"<nonce>:"`` for a client that sends no qop."""
    return NONCE_PREFIX + _bounded_name(nonce_use)


def _bounded_name(name: str) -> str:
    """``name`` (a user name, a nonce: off the wire, recorded before any verification) itself
    when at most MAX_CACHED_KEY characters, else "~" and its SHA-256: the same key on every
    node (these keys are shared in Redis), each costing bounded bytes whatever was sent."""
    if len(name) <= MAX_CACHED_KEY:
        return name
    return "~" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """How many failures ban a source, for how long; validated when made (names the bad field)."""

    max_failures: int = 10  # failed authentications from one source address ...
    window: float = 300.0  # ... within this many seconds ban that source
    ban_time: float = 900.0
    #: failures against one account in the window that log/count it as under attack (no lockout:
    #: the real user elsewhere must still register)
    account_alert: int = 100
    #: failures against one account in the window past which only its known clients (the hosts
    #: of its bindings) may authenticate as it, until the window ends
    account_lock: int = 50
    local_cache_size: int = 10_000  # bound on the in-process ban cache
    #: failures in the window that ban a source with working phones: one that authenticated
    #: within ``working_time`` (an office whose one phone has a stale password must not be cut
    #: off with all its others)
    max_failures_working: int = 100
    working_time: float = 3600.0
    #: a ban learnt from Redis is trusted locally this long at most (so an unban spreads)
    local_ban_recheck: float = 10.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"guard policy: {field.name} must be a positive number, not {value!r}")
        for name in ("max_failures", "account_alert", "account_lock", "local_cache_size", "max_failures_working"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"guard policy: {name} must be a whole number, not {getattr(self, name)!r}")


DEFAULT_POLICY: Final = GuardPolicy()


@dataclass(frozen=True, slots=True)
class Admission:
    banned: bool  # the source is banned now
    replay: bool  # this (nonce, nc) was already used somewhere in the farm


# The four possible answers, made once (admit is on the path of every authenticated request).
_ADMISSIONS: Final = {(b, r): Admission(b, r) for b in (False, True) for r in (False, True)}


class WorkingMarks:
    """The sources this process marked working lately (:meth:`Guard.succeeded`), so a source
    whose phones authenticate all day costs one Redis write per quarter of ``working_time``,
    not one per request. At most ``size`` sources (the oldest mark forgotten first: it is then
    written again, never missed)."""

    __slots__ = ("_marked", "refresh", "size")

    def __init__(self, working_time: float, size: int = 65_536) -> None:
        self.refresh = working_time / 4
        self.size = size
        self._marked: dict[str, float] = {}  # subject -> when this process last wrote its mark

    def due(self, source_ip: str, account: str, now: float) -> bool:
        """Whether ``account``'s mark at ``source_ip`` is to be written now (and note that it is)."""
        subject = source_subject(source_ip) + " " + account
        marked = self._marked
        last = marked.get(subject)
        if last is not None and now - last < self.refresh:
            return False
        if last is None and len(marked) >= self.size:
            del marked[next(iter(marked))]
        marked.pop(subject, None)
        marked[subject] = now
        return True

    def forget(self, source_ip: str, account: str) -> None:
        """The mark's write failed: write it again at the next success."""
        self._marked.pop(source_subject(source_ip) + " " + account, None)


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    source_failures: int
    account_failures: int
    banned: bool  # this failure started a ban of the source
    account_alert: bool  # the account crossed account_alert with this failure
    account_locked: bool = False  # the account is past account_lock failures in its window


class Guard(Protocol):
    """Farm-wide ban and replay checks; answers go to ``done`` (values or a StoreError, never raised)."""

    policy: GuardPolicy

    def admit(self, source_ip: str, nonce_use: str, ttl: float, done: Callable[[Admission | StoreError], None]) -> None:
        """ONE pipelined round trip: is ``source_ip`` banned; and record ``nonce_use`` (``"<nonce>:<nc>"``,
        or ``"<nonce>:"`` for a client sending no qop, which makes the nonce one-time) with SET NX and
        expiry ``ttl`` (the nonce's remaining lifetime, seconds): ``replay`` when it already existed."""

    def admission(self, source_ip: str, ban_left: float | None, first_use: bool) -> Admission:
        """What ``admit`` would answer, for facts a store established atomically on this guard's
        behalf (a REGISTER's bindings written in one script with its admission, ``admit.lua`` of
        :mod:`sipfarm.store`): ``ban_left`` seconds of the source's ban (None: none, ``math.inf``:
        no end), ``first_use``: the nonce use was new. Learnt like admit's answers (no I/O)."""

    def failed(self, source_ip: str, account: str | None, done: Callable[[FailureOutcome | StoreError], None]) -> None:
        """Count one failed authentication per source and per account (``user@domain``; None for a
        user name no account has: no counter, so made-up names mint no keys), expiring after
        ``window``; at ``max_failures`` ban the source for ``ban_time`` (farm-wide)."""

    def succeeded(self, source_ip: str, account: str) -> None:
        """``account`` (``user@domain``) authenticated from ``source_ip``: mark the pair working
        for ``working_time`` (failures against that account from there then ban the source at
        ``max_failures_working``), in the background, at most once per a quarter of that time
        per process."""

    def works(self, source_ip: str, account: str, done: Callable[[bool | StoreError], None]) -> None:
        """Whether ``account`` authenticated from ``source_ip`` within ``working_time`` (its mark
        is set): a locked account's phone is let in from there (see the module)."""

    def banned_locally(self, source_ip: str, now: float) -> bool:
        """No I/O: this process already knows ``source_ip`` is banned (learnt from admit/failed answers;
        entries end with the ban or after ``local_ban_recheck``, bounded LRU; ``now`` on the guard's clock)."""


class GuardRules:
    """What every guard decides from its store's answers, and what the process remembers of them.

    A store reports, per call, facts it established atomically: the remaining time of the source's
    ban (None: no ban; ``math.inf``: a ban without end), whether the nonce use was new, the
    counters after the increment and whether this failure started the ban. The rules turn them
    into answers, keep the local ban cache, log and count.
    """

    __slots__ = ("account_alerts", "bans_started", "local", "policy")

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self.local = LocalBans(policy.local_cache_size)
        self.bans_started = 0  # for metrics: bans this process started
        self.account_alerts = 0  # for metrics: accounts this process saw cross account_alert

    def admission(self, source_ip: str, ban_left: float | None, first_use: bool, now: float) -> Admission:
        self._learn(source_ip, ban_left, now)
        return _ADMISSIONS[(ban_left is not None, not first_use)]

    def failure(
        self,
        source_ip: str,
        account: str | None,
        source_failures: int,
        account_failures: int,
        ban_started: bool,
        ban_left: float | None,
        now: float,
    ) -> FailureOutcome:
        self._learn(source_ip, ban_left, now)
        alert = account is not None and account_failures == self.policy.account_alert
        if ban_started:
            self.bans_started += 1
            log.warning(
                "event=source_banned source=%s failures=%d ban_seconds=%g",
                _log_value(source_ip),
                source_failures,
                self.policy.ban_time,
            )
        if alert:
            self.account_alerts += 1
            log.warning(
                "event=account_under_attack account=%s failures=%d window_seconds=%g source=%s",
                _log_value(account or ""),
                account_failures,
                self.policy.window,
                _log_value(source_ip),
            )
        locked = account is not None and account_failures >= self.policy.account_lock
        return FailureOutcome(source_failures, account_failures, ban_started, alert, locked)

    def _learn(self, source_ip: str, ban_left: float | None, now: float) -> None:
        if ban_left is None:
            self.local.forget(source_ip)  # ended, or lifted by an operator
        else:
            self.local.learn(source_ip, now + min(ban_left, self.policy.local_ban_recheck))


def _log_value(text: str) -> str:
    """One key=value word: whitespace, ``=`` and unprintable characters percent-escaped."""
    if text.isprintable() and " " not in text and "=" not in text and "%" not in text:
        return text
    return "".join(c if c.isprintable() and c not in " =%" else f"%{ord(c):02X}" for c in text)
