"""The node's hot-path access to shared state: accounts and bindings over the pipelined client.

Same keys, scripts and encodings as :mod:`sipfarm.store` (which the CLI and tests use through
redis-py); here every operation takes a callback and costs no task or future.  Everything a
burst of SIP messages asks for in one event-loop iteration goes to Redis as one pipeline.
Results are values or a :class:`~sipfarm.store.errors.StoreError` (503 for StoreUnavailable).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import hiredis

from sipfarm.protect.guard import ban_key, milliseconds, nonce_key
from sipfarm.protect.redis_guard import UNAVAILABLE_REPLIES
from sipfarm.sip.memo import MAX_CACHED_KEY, key_size
from sipfarm.store import location as loc
from sipfarm.store.accounts import NOT_CACHED, Account, CacheMiss, account_key
from sipfarm.store.errors import StoreError, StoreUnavailable
from sipfarm.store.media import call_relay_key, recorded, recorded_relay
from sipfarm.store.resp import RedisPipe, Reply

_ACCOUNT_FIELDS = (b"user", b"domain", b"ha1_md5", b"ha1_sha256", b"enabled", b"max_contacts", b"created")


class FarmState:
    def __init__(
        self,
        pipe: RedisPipe,
        *,
        account_cache_ttl: float = 2.0,
        account_cache_size: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[float], None] | None = None,
        cluster: bool = False,
    ) -> None:
        """``cluster``: the Redis Cluster key layout (:mod:`sipfarm.store.location`). A REGISTER's
        write waits for the pipe's ``replicas_ack`` replicas (``RedisPipe.call_acked``) when set."""
        self.pipe = pipe
        self._cluster = cluster
        self._ttl = account_cache_ttl
        self._cache_size = account_cache_size
        self._cache: OrderedDict[tuple[str, str], tuple[float, Account | None]] = OrderedDict()
        self._clock = clock
        self._observe = observe  # Redis round-trip histogram
        self._register_sha = hashlib.sha1(loc.REGISTER_SCRIPT.encode()).hexdigest()  # noqa: S324
        self._admitted_sha = hashlib.sha1(loc.ADMITTED_REGISTER_SCRIPT.encode()).hexdigest()  # noqa: S324
        self._remove_binding_sha = hashlib.sha1(loc.REMOVE_BINDING_SCRIPT.encode()).hexdigest()  # noqa: S324

    @property
    def admits(self) -> bool:
        """``register_admitted`` may be used: the guard's keys (the node's RedisGuard, on this same
        pipe) and the bindings on one Redis, one script. Not on a Redis Cluster: a source's ban
        key lives in the source's slot, the AOR's hash in its shard's. Nor with ``replicas_ack``:
        the script's WAIT would turn a refusal (403, or 401 to a replay, answered on the other
        path without waiting) into a 503 whenever replicas lag. Two round trips there."""
        return not self._cluster and self.pipe.replicas_ack <= 0

    # -- accounts --------------------------------------------------------------------------------
    #
    # Callbacks are ``functools.partial`` of bound methods, not closures: a closure compiled by
    # mypyc lives in an environment object that refers back to it, a reference cycle per call
    # that only the cyclic GC frees (it cost ~14% of a node's CPU under REGISTER load).

    def get_account(self, user: str, domain: str, callback: Callable[[Account | StoreError | None], None]) -> None:
        """The account (cached for ``account_cache_ttl``: the only staleness allowed) or None."""
        key = (user, domain)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            callback(hit[1])
            return
        self.pipe.call(
            partial(self._account_done, key, now, callback), "HMGET", account_key(user, domain), *_ACCOUNT_FIELDS
        )

    def cached_account(self, user: str, domain: str) -> Account | CacheMiss | None:
        """The account as ``get_account`` would answer it from the cache (None: cached as none),
        or NOT_CACHED; no I/O."""
        hit = self._cache.get((user, domain))
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        return NOT_CACHED

    def _account_done(
        self,
        key: tuple[str, str],
        started: float,
        callback: Callable[[Account | StoreError | None], None],
        reply: Reply,
    ) -> None:
        error = self._settle(started, "account lookup", reply)
        if error is not None:
            callback(error)
            return
        account: Account | None = None
        if reply and reply[0] is not None:
            try:
                account = Account.from_fields(dict(zip(_ACCOUNT_FIELDS, reply, strict=True)))
            except StoreError as exc:
                callback(exc)
                return
        if key_size(key) <= MAX_CACHED_KEY:  # a user name off the wire: a long one is not kept
            self._cache[key] = (self._clock() + self._ttl, account)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        callback(account)

    # -- bindings --------------------------------------------------------------------------------

    def lookup(self, aor: str, now: float, callback: Callable[[list[loc.Binding] | StoreError], None]) -> None:
        self.pipe.call(
            partial(self._lookup_done, now, self._clock(), callback), "HVALS", loc.location_key(aor, self._cluster)
        )

    def _lookup_done(
        self, now: float, started: float, callback: Callable[[list[loc.Binding] | StoreError], None], reply: Reply
    ) -> None:
        result: list[loc.Binding] | StoreError | None = self._settle(started, "lookup", reply)
        if result is None:
            try:
                result = loc.live_bindings(reply, now)
            except StoreError as exc:
                result = exc
        callback(result)  # outside the try: a StoreError from the callback is not answered twice

    def register(
        self,
        aor: str,
        contacts: Sequence[loc.ContactUpdate],
        callback: Callable[[loc.RegisterResult | StoreError], None],
        **kwargs: object,
    ) -> None:
        """``LocationStore.apply_register`` (same script, same arguments) over the pipe."""
        keys, args = loc.register_arguments(aor, contacts, cluster=self._cluster, **kwargs)  # type: ignore[arg-type]
        done = partial(self._register_done, self._clock(), callback)
        self._script(loc.REGISTER_SCRIPT, self._register_sha, keys, args, done, acked=True)

    def _register_done(
        self, started: float, callback: Callable[[loc.RegisterResult | StoreError], None], reply: Reply
    ) -> None:
        result: loc.RegisterResult | StoreError | None = self._settle(started, "register", reply)
        if result is None:
            try:
                result = loc.register_result(reply)
            except StoreError as exc:
                result = exc
        callback(result)

    def register_admitted(
        self,
        aor: str,
        contacts: Sequence[loc.ContactUpdate],
        source_ip: str,
        nonce_use: str,
        nonce_ttl: float,
        callback: Callable[[loc.AdmittedRegister | StoreError], None],
        **kwargs: object,
    ) -> None:
        """``register`` behind the guard's admit (``source_ip`` not banned, ``nonce_use`` new: see
        :class:`~sipfarm.protect.guard.Guard`), in one script and one round trip; only when
        ``admits``. ``callback`` gets the admission's facts and, if they let it through, the
        result."""
        keys, args = loc.admitted_register_arguments(
            aor, contacts, ban_key(source_ip), nonce_key(nonce_use), milliseconds(nonce_ttl), kwargs
        )
        done = partial(self._admitted_done, self._clock(), callback)
        self._script(loc.ADMITTED_REGISTER_SCRIPT, self._admitted_sha, keys, args, done)

    def _admitted_done(
        self, started: float, callback: Callable[[loc.AdmittedRegister | StoreError], None], reply: Reply
    ) -> None:
        result: loc.AdmittedRegister | StoreError | None = self._settle(started, "register", reply)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith(UNAVAILABLE_REPLIES):
            # what the guard's admit answers for these (503), asked first on the other path
            result = StoreUnavailable(f"register failed: {reply}")
        if result is None:
            try:
                result = loc.admitted_register_result(reply)
            except StoreError as exc:
                result = exc
        callback(result)

    def remove_binding(self, aor: str, binding: loc.Binding, callback: Callable[[bool | StoreError], None]) -> None:
        """``LocationStore.remove_binding`` over the pipe: ``binding`` goes if it is still
        stored unchanged (contact, Path, flow); ``callback`` gets whether it went."""
        keys, args = loc.remove_binding_arguments(aor, binding, cluster=self._cluster)
        done = partial(self._remove_binding_done, self._clock(), callback)
        self._script(loc.REMOVE_BINDING_SCRIPT, self._remove_binding_sha, keys, args, done)

    def _remove_binding_done(self, started: float, callback: Callable[[bool | StoreError], None], reply: Reply) -> None:
        error = self._settle(started, "remove binding", reply)
        callback(error if error is not None else reply == 1)

    # -- media relays of calls (sipfarm.proxy.relay_media.CallRelays) ------------------------------

    def record_relay(self, call_id: bytes, tag: bytes, relay: str, ttl: int) -> None:
        key = call_relay_key(call_id)
        self.pipe.call(_ignore, "HSET", key, recorded(tag), relay)
        self.pipe.call(_ignore, "EXPIRE", key, ttl)

    def find_relay(self, call_id: bytes, callback: Callable[[str | None], None]) -> None:
        """The relay recorded for the call; None when there is none or Redis failed (the caller
        then anchors anew or leaves the session to the relay's media timeout)."""
        self.pipe.call(partial(self._relay_found, self._clock(), callback), "HVALS", call_relay_key(call_id))

    def _relay_found(self, started: float, callback: Callable[[str | None], None], reply: Reply) -> None:
        error = self._settle(started, "find relay", reply)
        callback(None if error is not None else recorded_relay(reply))

    def forget_relay(self, call_id: bytes) -> None:
        self.pipe.call(_ignore, "DEL", call_relay_key(call_id))

    def _script(
        self,
        body: str,
        sha: str,
        keys: Sequence[str],
        args: Sequence[str | int | float],
        done: Callable[[Reply], None],
        *,
        acked: bool = False,
    ) -> None:
        """Run a Lua script by its SHA; on NOSCRIPT (its first use on this Redis, or after
        SCRIPT FLUSH) send the body once. ``acked``: a write that waits for ``replicas_ack``."""
        call = self.pipe.call_acked if acked else self.pipe.call
        call(partial(self._script_done, body, keys, args, done, acked), "EVALSHA", sha, len(keys), *keys, *args)

    def _script_done(
        self,
        body: str,
        keys: Sequence[str],
        args: Sequence[str | int | float],
        done: Callable[[Reply], None],
        acked: bool,
        reply: Reply,
    ) -> None:
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            call = self.pipe.call_acked if acked else self.pipe.call
            call(done, "EVAL", body, len(keys), *keys, *args)
            return
        done(reply)

    def _settle(self, started: float, what: str, reply: Reply) -> StoreError | None:
        """Time the round trip; the StoreError a failed reply stands for (None: a reply)."""
        self._timed(started)
        if isinstance(reply, StoreError):
            return reply
        if isinstance(reply, Exception):
            return StoreError(f"{what} failed: {reply}")
        return None

    def _timed(self, started: float) -> None:
        if self._observe is not None:
            self._observe(self._clock() - started)


def _ignore(_reply: Reply) -> None:
    return None
