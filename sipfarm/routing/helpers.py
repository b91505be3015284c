"""External routing helpers: a program or an HTTP service asked where a request goes.

Theory of operation
-------------------
The proxy builds a *query*, a ``dict[str, str]`` of its choosing (method, caller URI, callee
Request-URI, source address, selected header values), and calls :meth:`RoutingHelper.ask`
with a callback.  The helper answers one :class:`HelperAnswer`: ``local`` (location lookup),
``alias`` (these SIP URIs instead), ``forward`` (send to ``uri``), ``redirect`` (3xx with
``uri`` as Contact) or ``reject`` (``status`` and ``reason``).  Between the question and the
helper stand three guards, all in this module and all driven by the loop's clock:

* an answer cache (:class:`AnswerCache`) keyed by the query fields the configuration names,
  with a TTL and a bound (least recently used out first); only real answers are cached, never
  the default given after a failure;
* a circuit breaker (:class:`CircuitBreaker`): after ``failures`` consecutive failures
  (timeouts, crashes, garbage, HTTP errors) the helper is not asked for ``open_seconds``; then
  one trial query decides whether it closes again.  A full wait queue is counted
  (``overloaded``) but not held against the helper: if it is slow, the queries ahead time out;
* a hard timeout per query: past it the caller gets the configured default answer.

Two backends speak to the helper, each a small pool of workers with one outstanding query
each and a bounded wait queue (a query beyond the bound gets the default at once):

* :class:`ProgramPool`: ``pool`` long-lived child processes running the configured argv; one
  JSON object a line on the child's stdin per query, one JSON object a line on its stdout per
  answer, in order.  A child that exits is restarted with backoff (its outstanding query gets
  the default); a child whose query timed out, that writes a line longer than 64 KiB or a
  line nobody asked for is killed and restarted, never reused half-read.  The child's stderr
  is the node's.  ``examples/route_helper.py`` is a complete helper program.
* :class:`HttpPool`: ``POST`` of the query as a JSON body to an ``http://host:port/path`` URL
  over ``pool`` HTTP/1.1 keep-alive connections; the answer is the JSON body of a 200, anything
  else is a failure.  A connection whose exchange failed or timed out is dropped.

Callback contract of :meth:`RoutingHelper.ask`: the callback is called exactly once and
:meth:`~RoutingHelper.ask` never raises.  It is called synchronously, inside ``ask``, only for
a cache hit and when the circuit is open (the default answer, also while the half-open trial is
outstanding); every other answer (the helper's, the default after a timeout, a failure, a full
queue or a closed helper) comes later from the event loop.  An exception raised by the callback
is logged (``event=routing_helper_callback_error``) and counted, not propagated.

Configuration (a TOML table, see :meth:`HelperConfig.from_dict`)::

    [routing.helper]
    program = ["python3", "examples/route_helper.py"]   # or: url = "http://127.0.0.1:8080/route"
    pool = 2             # children / connections
    queue = 256          # queries waiting for a free worker
    timeout = 0.5        # seconds per query
    cache_ttl = 30       # seconds; 0 disables the cache
    cache_size = 10000
    cache_key = ["callee"]   # query fields; absent: the whole query
    failures = 5         # consecutive failures that open the circuit
    open_seconds = 10
    default = { action = "local" }   # the answer when the helper cannot give one
    restart_min = 0.1    # program restart backoff, doubled up to restart_max
    restart_max = 5.0

A child whose query timed out is killed and restarted (redis-py's rule for a connection that
timed out mid-command: drop it, never read the stale answer as the next one's), so a helper that
is merely slow past ``timeout`` pays a restart per late answer: set ``timeout`` above its worst case.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from sipfarm.sip.memo import MAX_CACHED_KEY, key_size
from sipfarm.sip.uri import SipURI, parse_uri

log = logging.getLogger("sipfarm.routing.helpers")

MAX_LINE = 64 * 1024  # longest answer line (or HTTP head / body) read from a helper
MAX_FIELD = 512  # longest string in an answer
MAX_TARGETS = 16  # most alias targets in an answer


# --- answers -------------------------------------------------------------------------------


class HelperAction(enum.StrEnum):
    LOCAL = "local"  # look the Request-URI up in the location service
    ALIAS = "alias"  # route to ``targets`` instead (each a SIP URI)
    FORWARD = "forward"  # send the request to ``uri``
    REDIRECT = "redirect"  # answer ``status`` (3xx, default 302) with ``uri`` as Contact
    REJECT = "reject"  # answer ``status`` (4xx-6xx) with ``reason``


class HelperAnswerError(ValueError):
    """A helper's answer that is not a valid routing action: the helper printed garbage."""


# The fields each action takes; any other field in an answer is garbage.
_FIELDS: dict[HelperAction, frozenset[str]] = {
    HelperAction.LOCAL: frozenset(),
    HelperAction.ALIAS: frozenset({"targets"}),
    HelperAction.FORWARD: frozenset({"uri"}),
    HelperAction.REDIRECT: frozenset({"uri", "status", "reason"}),
    HelperAction.REJECT: frozenset({"status", "reason"}),
}


@dataclass(frozen=True, slots=True)
class HelperAnswer:
    """One routing action, validated on construction (raises :class:`HelperAnswerError`)."""

    action: HelperAction
    uri: str = ""  # forward, redirect
    targets: tuple[str, ...] = ()  # alias
    status: int = 0  # reject (400-699), redirect (300-399, 302 when absent)
    reason: str = ""  # reject, redirect (optional)

    def __post_init__(self) -> None:
        try:
            action = HelperAction(self.action)
        except ValueError:
            raise HelperAnswerError(f"unknown action {str(self.action)[:40]!r}") from None
        object.__setattr__(self, "action", action)
        if action in (HelperAction.FORWARD, HelperAction.REDIRECT):
            _check_sip_uri(self.uri, "uri")
        elif self.uri:
            raise HelperAnswerError(f"{action} takes no uri")
        if action is HelperAction.ALIAS:
            if not isinstance(self.targets, tuple) or not 1 <= len(self.targets) <= MAX_TARGETS:
                raise HelperAnswerError(f"alias needs 1 to {MAX_TARGETS} targets")
            for target in self.targets:
                _check_sip_uri(target, "target")
        elif self.targets:
            raise HelperAnswerError(f"{action} takes no targets")
        if action is HelperAction.REDIRECT and self.status == 0:
            object.__setattr__(self, "status", 302)
        if type(self.status) is not int:
            raise HelperAnswerError("status is not an integer")
        if action is HelperAction.REJECT and not 400 <= self.status <= 699:
            raise HelperAnswerError(f"reject status {self.status} is not 400-699")
        if action is HelperAction.REDIRECT and not 300 <= self.status <= 399:
            raise HelperAnswerError(f"redirect status {self.status} is not 300-399")
        if action not in (HelperAction.REJECT, HelperAction.REDIRECT) and self.status:
            raise HelperAnswerError(f"{action} takes no status")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_FIELD or not self.reason.isprintable():
            # It becomes a status line's reason phrase: no CR/LF or other control characters.
            raise HelperAnswerError(f"reason is not a printable string of at most {MAX_FIELD} characters")
        if self.reason and action not in (HelperAction.REJECT, HelperAction.REDIRECT):
            raise HelperAnswerError(f"{action} takes no reason")

    @classmethod
    def from_dict(cls, obj: object) -> HelperAnswer:
        """An answer from a decoded JSON object such as ``{"action": "forward", "uri": "sip:gw"}``."""
        if not isinstance(obj, dict):
            raise HelperAnswerError("answer is not a JSON object")
        action = obj.get("action")
        if not isinstance(action, str):
            raise HelperAnswerError("answer has no action")
        try:
            known = _FIELDS[HelperAction(action)]
        except ValueError:
            raise HelperAnswerError(f"unknown action {action[:40]!r}") from None
        extra = [str(k)[:40] for k in obj if k != "action" and k not in known]
        if extra:
            raise HelperAnswerError(f"{action} takes no field {extra[0]!r}")
        targets = obj.get("targets", ())
        if not isinstance(targets, list | tuple):
            raise HelperAnswerError("targets is not a list")
        return cls(
            action=HelperAction(action),
            uri=obj.get("uri", ""),
            targets=tuple(targets),
            status=obj.get("status", 0),
            reason=obj.get("reason", ""),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> HelperAnswer:
        """An answer from one JSON text (a helper's output line or an HTTP body)."""
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
            raise HelperAnswerError(f"answer is not JSON: {str(exc)[:80]}") from None
        return cls.from_dict(obj)

    def to_dict(self) -> dict[str, object]:
        """The JSON object this answer is parsed from (the inverse of :meth:`from_dict`)."""
        out: dict[str, object] = {"action": str(self.action)}
        if self.uri:
            out["uri"] = self.uri
        if self.targets:
            out["targets"] = list(self.targets)
        if self.status:
            out["status"] = self.status
        if self.reason:
            out["reason"] = self.reason
        return out


def _check_sip_uri(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise HelperAnswerError(f"{what} is missing or not a string")
    if len(value) > MAX_FIELD:
        raise HelperAnswerError(f"{what} is longer than {MAX_FIELD} characters")
    try:
        uri = parse_uri(value)
    except ValueError as exc:  # URIError
        raise HelperAnswerError(f"{what} is not a SIP URI: {exc}") from None
    if not isinstance(uri, SipURI):
        raise HelperAnswerError(f"{what} is not a sip: or sips: URI")


LOCAL = HelperAnswer(HelperAction.LOCAL)


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelperConfig:
    """How to reach one routing helper and how far to trust it.  Exactly one of ``program``
    (an argv) and ``url`` is set.  Values are checked on construction (``ValueError``)."""

    program: tuple[str, ...] = ()
    url: str = ""
    pool: int = 2
    queue: int = 256
    timeout: float = 0.5
    cache_ttl: float = 30.0
    cache_size: int = 10_000
    cache_key: tuple[str, ...] | None = None  # None: the whole query
    failures: int = 5
    open_seconds: float = 10.0
    default: HelperAnswer = LOCAL
    restart_min: float = 0.1  # program restart backoff: first delay, doubled up to restart_max
    restart_max: float = 5.0

    def __post_init__(self) -> None:
        if bool(self.program) == bool(self.url):
            raise ValueError("routing helper: set exactly one of 'program' and 'url'")
        if self.program and not all(isinstance(a, str) and a for a in self.program):
            raise ValueError("routing helper: 'program' must be a list of non-empty strings")
        if self.url:
            parse_http_url(self.url)
        _check_number("pool", self.pool, 1, 64, integer=True)
        _check_number("queue", self.queue, 0, 100_000, integer=True)
        _check_number("timeout", self.timeout, 0.001, 60.0)
        _check_number("cache_ttl", self.cache_ttl, 0.0, 86_400.0)
        _check_number("cache_size", self.cache_size, 0, 10_000_000, integer=True)
        _check_number("failures", self.failures, 1, 1_000_000, integer=True)
        _check_number("open_seconds", self.open_seconds, 0.001, 86_400.0)
        _check_number("restart_min", self.restart_min, 0.0, 3600.0)
        _check_number("restart_max", self.restart_max, self.restart_min, 3600.0)
        if self.cache_key is not None and (
            not self.cache_key or not all(isinstance(k, str) and k for k in self.cache_key)
        ):
            raise ValueError("routing helper: 'cache_key' must be a non-empty list of query field names")
        if not isinstance(self.default, HelperAnswer):
            raise ValueError("routing helper: 'default' must be an answer")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> HelperConfig:
        """A config from a TOML table; ``ValueError`` naming the bad key on bad input."""
        if not isinstance(d, Mapping):
            raise ValueError("routing helper: configuration must be a table")
        unknown = sorted(k for k in d if k not in _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"routing helper: unknown key {unknown[0]!r}")
        kwargs: dict[str, object] = {}
        for key, value in d.items():
            if key == "program":
                if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
                    raise ValueError("routing helper: 'program' must be a non-empty list of strings (an argv)")
                kwargs[key] = tuple(value)
            elif key == "url":
                if not isinstance(value, str):
                    raise ValueError("routing helper: 'url' must be a string")
                kwargs[key] = value
            elif key == "cache_key":
                if not isinstance(value, list | tuple):
                    raise ValueError("routing helper: 'cache_key' must be a list of query field names")
                kwargs[key] = tuple(value)
            elif key == "default":
                try:
                    kwargs[key] = HelperAnswer.from_dict(value)
                except HelperAnswerError as exc:
                    raise ValueError(f"routing helper: 'default' is not a valid answer: {exc}") from None
            else:
                kwargs[key] = value
        return cls(**kwargs)  # type: ignore[arg-type]  # each value is checked in __post_init__


_CONFIG_KEYS = frozenset(HelperConfig.__dataclass_fields__)


def _check_number(key: str, value: object, low: float, high: float, *, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = type(value) is int or (not integer and type(value) is float)
    if not ok_type or not (low <= value <= high) or (type(value) is float and not math.isfinite(value)):  # type: ignore[operator]
        raise ValueError(f"routing helper: {key!r} must be {kind} from {low:g} to {high:g}, not {value!r}")


def parse_http_url(url: str) -> tuple[str, int, str]:
    """``http://host[:port][/path][?query]`` -> (host, port, request target); ``ValueError``."""
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise ValueError(f"routing helper: bad 'url' {url!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"routing helper: 'url' must be http://host:port/path, not {url!r}")
    if parts.username or parts.fragment or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"routing helper: 'url' has parts an HTTP request cannot carry: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target


# --- cache and circuit breaker (no I/O, time passed in) ------------------------------------


class AnswerCache:
    """Answers by key for ``ttl`` seconds, at most ``size`` of them (least recently used out)."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[float, HelperAnswer]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.size > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float) -> HelperAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Hashable, answer: HelperAnswer, now: float) -> None:
        if not self.enabled or key_size(key) > MAX_CACHED_KEY:
            return  # a query off the wire as long as a message is asked every time, not kept
        self._entries[key] = (now + self.ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class BreakerState(enum.Enum):
    CLOSED = "closed"  # the helper is asked
    OPEN = "open"  # the helper is not asked: every query gets the default at once
    HALF_OPEN = "half_open"  # one trial query is out; the others get the default at once


class BreakerInput(enum.Enum):
    SUCCESS = "success"  # an answer (closed: from any query; half-open: from the trial)
    FAILURE = "failure"  # a failure below the threshold, or the trial's failure
    TRIP = "trip"  # the failure that reaches the threshold
    PROBE = "probe"  # the open period is over and a query arrived: it becomes the trial


class BreakerError(RuntimeError):
    """An input the breaker's state does not accept (a bug in the caller of the breaker)."""


_BREAKER: dict[tuple[BreakerState, BreakerInput], BreakerState] = {
    (BreakerState.CLOSED, BreakerInput.SUCCESS): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerInput.FAILURE): BreakerState.CLOSED,
    (BreakerState.CLOSED, BreakerInput.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerInput.PROBE): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerInput.SUCCESS): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerInput.FAILURE): BreakerState.OPEN,
}


class Admission(enum.Enum):
    ASK = "ask"
    TRIAL = "trial"  # ask, and let the outcome decide the half-open breaker
    REFUSE = "refuse"  # answer the default without asking


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures; open for ``open_seconds``; then
    the next query is the trial: its answer closes the breaker, its failure opens it again.
    Outcomes of queries asked before the breaker opened are ignored while it is not closed."""

    def __init__(self, failures: int, open_seconds: float) -> None:
        self.failures = failures
        self.open_seconds = open_seconds
        self.state = BreakerState.CLOSED
        self.consecutive = 0  # failures in a row while closed
        self.open_until = 0.0
        self.opened = 0  # times the breaker opened (trips and failed trials)

    def _step(self, event: BreakerInput) -> BreakerState:
        try:
            self.state = _BREAKER[self.state, event]
        except KeyError:
            raise BreakerError(f"breaker in state {self.state.value} got {event.value}") from None
        return self.state

    def admit(self, now: float) -> Admission:
        if self.state is BreakerState.CLOSED:
            return Admission.ASK
        if self.state is BreakerState.OPEN and now >= self.open_until:
            self._step(BreakerInput.PROBE)
            return Admission.TRIAL
        return Admission.REFUSE

    def record(self, ok: bool, trial: bool, now: float) -> None:
        if self.state is BreakerState.CLOSED:
            if ok:
                self.consecutive = 0
                self._step(BreakerInput.SUCCESS)
                return
            self.consecutive += 1
            if self.consecutive < self.failures:
                self._step(BreakerInput.FAILURE)
                return
            self._step(BreakerInput.TRIP)
        elif not trial:
            return  # a straggler asked before the breaker opened: the trial decides
        else:
            self._step(BreakerInput.SUCCESS if ok else BreakerInput.FAILURE)
            if ok:
                self.consecutive = 0
                return
        self.open_until = now + self.open_seconds
        self.opened += 1


# --- the front -----------------------------------------------------------------------------


class Failure(enum.Enum):
    """Why a query got the default answer."""

    TIMEOUT = "timeout"
    CRASH = "crash"  # the child exited with the query outstanding
    GARBAGE = "garbage"  # an answer that is not a valid HelperAnswer
    TOO_LONG = "too_long"  # an answer line (or HTTP response) over MAX_LINE
    HTTP = "http"  # connection refused or reset, a status other than 200, a malformed response
    OVERLOAD = "overload"  # every worker busy and the wait queue full
    CLOSED = "closed"  # the helper was closed


Outcome = HelperAnswer | Failure
Callback = Callable[[HelperAnswer], None]


@dataclass(slots=True, eq=False)
class PendingQuery:
    """One question to the helper, shared by every caller that asked it while it was out."""

    line: bytes  # the query as one JSON text (no newline)
    deadline: float  # loop time
    key: Hashable | None
    trial: bool
    callbacks: list[Callback] = field(default_factory=list)
    done: bool = False


class HelperBackend(Protocol):
    """What :class:`RoutingHelper` needs from a pool: a non-blocking submit and a report."""

    def start(self, report: Callable[[PendingQuery, Outcome], None]) -> None: ...

    def submit(self, query: PendingQuery) -> bool:
        """Start or queue ``query``; False when the queue is full (the caller answers)."""
        ...

    def abandon(self, query: PendingQuery) -> None:
        """``query`` timed out: drop whatever worker is on it."""
        ...

    async def aclose(self) -> None: ...


class RoutingHelper:
    """The front every caller uses: cache, circuit breaker, timeout, default answer.

    Create and :meth:`start` it in the running loop; :meth:`aclose` it to stop its children
    or connections.  Counters are plain attributes for the metrics exporter."""

    def __init__(self, config: HelperConfig, backend: HelperBackend | None = None) -> None:
        self.config = config
        self.backend: HelperBackend = backend or _backend_for(config)
        self.cache = AnswerCache(config.cache_ttl, config.cache_size)
        self.breaker = CircuitBreaker(config.failures, config.open_seconds)
        self.asked = 0  # queries sent to the helper
        self.answered = 0  # valid answers received in time
        self.cache_hits = 0
        self.coalesced = 0  # callers that joined a query with the same key already out
        self.timeouts = 0
        self.failures = 0  # crashes, garbage, HTTP errors (timeouts and overload apart)
        self.overloaded = 0
        self.refused = 0  # defaults given because the circuit was open
        self.defaults = 0  # default answers given, for any reason
        self.circuit_open_count = 0
        self.callback_errors = 0
        self.last_failure = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[Hashable, PendingQuery] = {}
        self._deadlines: deque[PendingQuery] = deque()  # in deadline order: one timeout for all
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def state(self) -> BreakerState:
        """The breaker's state; OPEN stays OPEN past ``open_seconds`` until the next query."""
        return self.breaker.state

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.backend.start(self._finish)
        log.info("event=routing_helper_started %s pool=%d timeout=%g", _describe(self.config), self.config.pool,
                 self.config.timeout)  # fmt: skip

    def ask(self, query: dict[str, str], callback: Callback) -> None:
        """Ask where ``query`` goes; ``callback`` gets the answer exactly once (see module doc).

        ``query`` maps strings to strings; anything else is a caller's bug, answered with the
        default (later, from the loop) without asking the helper or counting against it.  Before
        :meth:`start` or after :meth:`aclose` the default comes later from the running loop (at
        once, inside ``ask``, only when called with no loop running)."""
        loop = self._loop
        if loop is None or self._closed:
            self._default_later(callback)
            return
        if not all(type(k) is str and type(v) is str for k, v in query.items()):
            log.debug("event=routing_helper_bad_query")
            self._default_later(callback)
            return
        now = loop.time()
        key: Hashable | None = None
        if self.cache.enabled:
            fields = self.config.cache_key
            key = tuple(query.get(f) for f in fields) if fields else tuple(sorted(query.items()))
            hit = self.cache.get(key, now)
            if hit is not None:
                self.cache_hits += 1
                self._call(callback, hit)
                return
            joined = self._inflight.get(key)
            if joined is not None:
                self.coalesced += 1
                joined.callbacks.append(callback)
                return
        admission = self.breaker.admit(now)
        if admission is Admission.REFUSE:
            self.refused += 1
            self.defaults += 1
            self._call(callback, self.config.default)
            return
        if admission is Admission.TRIAL:
            log.info("event=routing_helper_circuit_half_open")
        line = json.dumps(query, separators=(",", ":")).encode()  # str to str: cannot fail
        pending = PendingQuery(line, now + self.config.timeout, key, admission is Admission.TRIAL, [callback])
        self.asked += 1
        if key is not None:
            self._inflight[key] = pending
        if not self.backend.submit(pending):
            loop.call_soon(self._finish, pending, Failure.OVERLOAD)  # a trial among them decides too
            return
        self._deadlines.append(pending)
        if self._timer is None:
            self._timer = loop.call_at(pending.deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        assert self._loop is not None
        now = self._loop.time() + 0.001  # call_at may run up to the clock resolution early
        deadlines = self._deadlines
        while deadlines and (deadlines[0].done or deadlines[0].deadline <= now):
            pending = deadlines.popleft()
            if not pending.done:
                self._finish(pending, Failure.TIMEOUT)
        if deadlines and not self._closed:
            self._timer = self._loop.call_at(deadlines[0].deadline, self._on_timer)

    def _finish(self, pending: PendingQuery, outcome: Outcome) -> None:
        """The one place a query ends: counted, cached, the breaker told, the callers called."""
        if pending.done:
            return  # a late answer to a query that already timed out
        pending.done = True
        if pending.key is not None and self._inflight.get(pending.key) is pending:
            del self._inflight[pending.key]
        now = self._loop.time() if self._loop is not None else 0.0
        if isinstance(outcome, HelperAnswer):
            self.answered += 1
            self.breaker.record(True, pending.trial, now)
            if pending.key is not None:
                self.cache.put(pending.key, outcome, now)
            answer = outcome
            log.debug("event=routing_helper_answer action=%s", outcome.action)
        else:
            answer = self.config.default
            self.defaults += 1
            if outcome is Failure.CLOSED:
                pass
            elif outcome is Failure.OVERLOAD and not pending.trial:
                self.overloaded += 1
            else:
                if outcome is Failure.TIMEOUT:
                    self.timeouts += 1
                    self.backend.abandon(pending)
                elif outcome is Failure.OVERLOAD:
                    self.overloaded += 1
                else:
                    self.failures += 1
                self.last_failure = outcome.value
                log.debug("event=routing_helper_failure reason=%s", outcome.value)
                self.breaker.record(False, pending.trial, now)
        if self.breaker.opened != self.circuit_open_count:
            self.circuit_open_count = self.breaker.opened
            log.warning("event=routing_helper_circuit_open last_failure=%s open_seconds=%g %s",
                        self.last_failure, self.config.open_seconds, _describe(self.config))  # fmt: skip
        elif pending.trial and self.breaker.state is BreakerState.CLOSED:
            log.info("event=routing_helper_circuit_closed %s", _describe(self.config))
        for callback in pending.callbacks:
            self._call(callback, answer)

    def _default_later(self, callback: Callback) -> None:
        self.defaults += 1
        try:
            loop = self._loop or asyncio.get_running_loop()
        except RuntimeError:  # no loop at all: nothing to defer to
            self._call(callback, self.config.default)
            return
        loop.call_soon(self._call, callback, self.config.default)

    def _call(self, callback: Callback, answer: HelperAnswer) -> None:
        try:
            callback(answer)
        except Exception:
            self.callback_errors += 1
            log.exception("event=routing_helper_callback_error")

    async def aclose(self) -> None:
        """Answer every outstanding query with the default, then stop the pool's workers."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = list(self._deadlines)
        self._deadlines.clear()
        for query in pending:
            self._finish(query, Failure.CLOSED)
        await self.backend.aclose()
        log.info("event=routing_helper_closed %s", _describe(self.config))


def _describe(config: HelperConfig) -> str:
    if config.program:
        return f"kind=program argv0={config.program[0]}"
    return f"kind=http url={config.url}"


def _backend_for(config: HelperConfig) -> HelperBackend:
    if config.program:
        return ProgramPool(config.program, config.pool, config.queue, config.restart_min, config.restart_max)
    return HttpPool(config.url, config.pool, config.queue)


# --- the pools -----------------------------------------------------------------------------


class _Worker(Protocol):
    @property
    def idle(self) -> bool: ...

    def send(self, query: PendingQuery) -> None: ...


class _Pool:
    """Workers with one outstanding query each and one bounded FIFO of queries waiting."""

    def __init__(self, queue: int) -> None:
        self.queue_bound = queue
        self.waiting: deque[PendingQuery] = deque()
        self.workers: list[_Worker] = []
        self.closed = False
        self._report: Callable[[PendingQuery, Outcome], None] | None = None

    def submit(self, query: PendingQuery) -> bool:
        if self.closed:
            return False
        for worker in self.workers:
            if worker.idle:
                worker.send(query)
                return True
        waiting = self.waiting
        while waiting and waiting[0].done:  # timed out while waiting: deadlines are FIFO too
            waiting.popleft()
        if len(waiting) >= self.queue_bound:
            return False
        waiting.append(query)
        return True

    def next_for(self, worker: _Worker) -> None:
        """``worker`` is free: give it the oldest live waiting query, if any."""
        while worker.idle and self.waiting and not self.closed:
            query = self.waiting.popleft()
            if not query.done:
                worker.send(query)

    def report(self, query: PendingQuery, outcome: Outcome) -> None:
        if self._report is None:
            return
        try:
            self._report(query, outcome)
        except Exception:  # a bug in the front must not stop a worker: logged, the worker goes on
            log.exception("event=routing_helper_report_error")


class ProgramPool(_Pool):
    """``size`` long-lived children running ``argv``; JSON lines in and out."""

    def __init__(self, argv: tuple[str, ...], size: int, queue: int, restart_min: float, restart_max: float) -> None:
        super().__init__(queue)
        self.argv = argv
        self.restart_min = restart_min
        self.restart_max = restart_max
        self.children = [_Child(self, i) for i in range(size)]
        self.workers = list(self.children)
        self.restarts = 0  # children started after the first time

    def start(self, report: Callable[[PendingQuery, Outcome], None]) -> None:
        self._report = report
        for child in self.children:
            child.task = asyncio.get_running_loop().create_task(child.run(), name=f"routing-helper-{child.index}")

    def abandon(self, query: PendingQuery) -> None:
        for child in self.children:
            if child.query is query:
                child.kill("timeout")  # never reuse a child whose answer is still to come

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None]

    async def aclose(self) -> None:
        self.closed = True
        tasks = [c.task for c in self.children if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in self.children))


class _Child:
    """One child process and the task that starts, reads and restarts it."""

    def __init__(self, pool: ProgramPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.query: PendingQuery | None = None
        self.task: asyncio.Task[None] | None = None
        self.kill_reason = ""

    @property
    def idle(self) -> bool:
        proc = self.proc
        return proc is not None and self.query is None and not self.kill_reason and proc.returncode is None

    def send(self, query: PendingQuery) -> None:
        proc = self.proc
        assert proc is not None and proc.stdin is not None
        self.query = query
        try:
            proc.stdin.write(query.line + b"\n")
        except (OSError, RuntimeError):  # the pipe is gone: the reader sees EOF and reports
            self.kill("stdin")

    def kill(self, reason: str) -> None:
        if self.proc is not None and not self.kill_reason:
            self.kill_reason = reason
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def run(self) -> None:
        delay = 0.0
        pool = self.pool
        first = True
        while not pool.closed:
            if delay:
                await asyncio.sleep(delay)  # restart backoff, one sleep per child, not per query
            try:
                proc = await asyncio.create_subprocess_exec(
                    *pool.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE
                )
            except OSError as exc:
                log.warning("event=routing_helper_spawn_failed argv0=%s error=%s", pool.argv[0],
                            json.dumps(str(exc)))  # fmt: skip
                delay = min(max(delay * 2, pool.restart_min), pool.restart_max)
                continue
            if not first:
                pool.restarts += 1
            first = False
            self.proc, self.kill_reason = proc, ""
            log.info("event=routing_helper_child_started pid=%d index=%d", proc.pid, self.index)
            pool.next_for(self)
            answered, reason = await self._read(proc)
            self.kill(reason)
            query, self.query = self.query, None
            code = await proc.wait()
            self.proc = None
            log.warning("event=routing_helper_child_exit pid=%d code=%s reason=%s answered=%d", proc.pid, code,
                        self.kill_reason, answered)  # fmt: skip
            if query is not None:
                pool.report(query, Failure.TOO_LONG if reason == "line_too_long" else Failure.CRASH)
            # A child that answered restarts soon; one that dies at once backs off up to restart_max.
            delay = pool.restart_min if answered else min(max(delay * 2, pool.restart_min), pool.restart_max)

    async def _read(self, proc: asyncio.subprocess.Process) -> tuple[int, str]:
        """Answer queries from ``proc``'s stdout until it ends; (answers read, why it ended)."""
        assert proc.stdout is not None
        answered = 0
        while True:
            try:
                line = await proc.stdout.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return answered, "exit"
            except asyncio.LimitOverrunError:
                return answered, "line_too_long"
            query = self.query
            if query is None:
                return answered, "unsolicited_line"  # out of step with its queries: restart it
            self.query = None
            answered += 1
            outcome: Outcome
            try:
                outcome = HelperAnswer.from_json(line)
            except HelperAnswerError:
                outcome = Failure.GARBAGE
            self.pool.next_for(self)
            self.pool.report(query, outcome)

    async def stop(self) -> None:
        """Close stdin (a well-behaved helper exits on EOF), then kill what is left."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            if proc is not None:
                await proc.wait()
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 0.5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.proc = None


class HttpError(Exception):
    """A response this client cannot use (malformed, too large, not framed)."""


class HttpPool(_Pool):
    """``size`` keep-alive HTTP/1.1 connections to one URL, each carrying one query at a time."""

    def __init__(self, url: str, size: int, queue: int) -> None:
        super().__init__(queue)
        self.url = url
        self.host, self.port, self.target = parse_http_url(url)
        self.connections = [_HttpConnection(self) for _ in range(size)]
        self.workers = list(self.connections)
        self.connects = 0  # connections opened (keep-alive keeps this low)

    def start(self, report: Callable[[PendingQuery, Outcome], None]) -> None:
        self._report = report
        for conn in self.connections:
            conn.task = asyncio.get_running_loop().create_task(conn.run(), name="routing-helper-http")

    def abandon(self, query: PendingQuery) -> None:
        """Nothing to do: the connection carrying ``query`` has the same deadline and drops itself."""

    def request(self, body: bytes) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        head = (
            f"POST {self.target} HTTP/1.1\r\nHost: {host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def aclose(self) -> None:
        self.closed = True
        tasks = [c.task for c in self.connections if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in self.connections:
            conn.drop()


class _HttpConnection:
    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.query: PendingQuery | None = None
        self.task: asyncio.Task[None] | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._wake = asyncio.Event()

    @property
    def idle(self) -> bool:
        return self.query is None

    def send(self, query: PendingQuery) -> None:
        self.query = query
        self._wake.set()

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            query = self.query
            if query is None:
                continue
            try:
                outcome = Failure.TIMEOUT if query.done else await self._exchange(query)
            except Exception:  # a bug here must not leave this connection busy forever
                log.exception("event=routing_helper_http_error")
                self.drop()
                outcome = Failure.HTTP
            self.query = None
            self.pool.next_for(self)
            self.pool.report(query, outcome)

    async def _exchange(self, query: PendingQuery) -> Outcome:
        pool = self.pool
        try:
            async with asyncio.timeout_at(query.deadline):
                for attempt in (0, 1):
                    reused = self.writer is not None
                    if self.reader is None or self.writer is None:
                        self.reader, self.writer = await asyncio.open_connection(pool.host, pool.port, limit=MAX_LINE)
                        pool.connects += 1
                    self.writer.write(pool.request(query.line))
                    try:
                        status, close, body = await _read_response(self.reader)
                    except (asyncio.IncompleteReadError, ConnectionError) as exc:
                        self.drop()
                        partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                        if reused and not partial and attempt == 0:
                            continue  # the server closed an idle keep-alive connection: once more, afresh
                        raise
                    break
        except TimeoutError:
            self.drop()
            return Failure.TIMEOUT
        except (asyncio.LimitOverrunError, ValueError):  # a head or body over MAX_LINE
            self.drop()
            return Failure.TOO_LONG
        except (OSError, asyncio.IncompleteReadError, HttpError):
            self.drop()
            return Failure.HTTP
        if close or status != 200:
            self.drop()  # an error (or an interim 1xx) may leave more on the connection than was read
        if status != 200:
            return Failure.HTTP
        try:
            return HelperAnswer.from_json(body)
        except HelperAnswerError:
            return Failure.GARBAGE


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """One HTTP/1.1 response: (status, connection closes after it, body at most MAX_LINE)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = parse_response_head(head)
    close = "close" in headers.get("connection", "").lower()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError("bad chunk size") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return status, close, bytes(body)
            if len(body) + size > MAX_LINE:
                raise HttpError("chunked body too large")
            body += await reader.readexactly(size + 2)
            del body[-2:]
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > MAX_LINE:
            raise HttpError("bad or too large Content-Length")
        return status, close, await reader.readexactly(int(length))
    if status in (204, 304) or 100 <= status < 200:
        return status, close, b""
    rest = await reader.read(MAX_LINE + 1)  # framed by the end of the connection
    tail = bytearray(rest)
    while rest and len(tail) <= MAX_LINE:
        rest = await reader.read(MAX_LINE + 1 - len(tail))
        tail += rest
    if len(tail) > MAX_LINE:
        raise HttpError("body too large")
    return status, True, bytes(tail)


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Status line and header fields of an HTTP/1.1 response head (RFC 9112 4, 5)."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpError("bad status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError("bad header field")
        headers[name.lower()] = value.strip()
    return int(code), headers
