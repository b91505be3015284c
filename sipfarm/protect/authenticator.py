"""Digest authentication for the whole node, in one place: challenge, verify, replay, brute force.

Theory of operation
-------------------
The registrar (401, RFC 3261 22.2) and the proxy (407, 22.3) both ask this module three things:

* :meth:`Authenticator.challenge`: the 401/407 to send.  The nonce is stateless (any node with
  the farm's secret verifies it, :class:`~sipfarm.sip.auth.NonceFactory`).  One challenge per
  configured algorithm; the default is MD5 alone, the one challenge every client in the field
  reads (baresip fails on a second WWW-Authenticate, JsSIP and SIP.js keep only the last one
  and know only MD5, SIPp reads the first).  Operators turn on SHA-256 (RFC 8760) with
  ``digest_algorithms``.
* :meth:`Authenticator.credentials`: our realm's credentials in a request, if any.
* :meth:`Authenticator.authenticate`: the verdict, given to a callback.  In one pipelined
  Redis round trip it fetches the account *and* asks the farm-wide guard
  (:mod:`sipfarm.protect.guard`) whether the source is banned and whether this (nonce, nc) was
  used before anywhere in the farm (RFC 7616 3.4.5 / RFC 3261 22.4: the nonce-count defeats
  replays; a client sending no qop gets a one-time nonce).  A wrong password and an unknown
  user take the same path, the same Redis commands and the same digest computation (a dummy
  HA1), so neither the answer nor its timing tells them apart.  Each failure is counted per
  source and per account in Redis; past the guard's threshold the source is banned farm-wide
  (the real user elsewhere still registers).
* :meth:`Authenticator.verified_without_io`: the registrar's short cut. When the account is
  already in the node's cache, the digest is verified before Redis is asked anything; if it
  verifies, the two guard questions are asked by the script that writes the bindings (one
  round trip, :meth:`FarmState.register_admitted`), which writes nothing unless the source is
  not banned and the nonce use is new; :meth:`Authenticator.admitted` then gives the verdict
  from what it found, with the same metrics, logs and local ban cache as ``authenticate``.
  Anything else (no cached account, an unknown user, a wrong password, a stale nonce, a
  source banned here) goes through ``authenticate`` as before: the same answers, counters and
  bans, and the same work for an unknown user as for a wrong password (both are verified once
  here, with the account's HA1 or the dummy one, then again by ``authenticate``).

* **Accounts locked to their known clients.**  When a failure's count shows its account past
  the guard's ``account_lock`` (guessing spread over many sources, each under the per-source
  ban), this process locks the account until the failure window ends and fetches, once, the
  hosts its bindings were registered from (:data:`BindingClient` turns a binding into its
  client's host: the flow its Path's farm flow token names, else where the REGISTER came
  from).  While locked, credentials from any other host fail whatever the password: verified
  all the same, counted as a failure (``auth_failures{reason="account_locked"}``) and answered
  with a fresh challenge, exactly as a wrong password, before any stale or replay answer could
  tell a right password from a wrong one.  No request waits for I/O: the hosts are fetched
  when the lock is learnt (and again every :data:`KNOWN_CLIENTS_REFRESH` seconds while it
  lasts); until they first arrive, no one is let in.  An unknown user name is never
  locked (it has no counter), and answers the same as a locked account does to a stranger.

Nothing here does I/O itself: Redis is reached through the node's ``FarmState`` and the guard,
both callback-style, so the in-memory test tier runs the same code.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from functools import partial
from typing import Final, Protocol

from sipfarm.element import Element
from sipfarm.protect.guard import Admission, FailureOutcome, Guard
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, Forbidden
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.uri import SipURI
from sipfarm.store.accounts import Account, CacheMiss
from sipfarm.store.errors import StoreError
from sipfarm.store.location import Binding
from sipfarm.transport.subject import source_subject

log = logging.getLogger("sipfarm.auth")

DEFAULT_ALGORITHMS = ("MD5",)
#: accounts this process holds locked to their known clients at most (oldest dropped first)
MAX_LOCKED_ACCOUNTS = 10_000
#: a locked account's known clients are fetched again after this many seconds
KNOWN_CLIENTS_REFRESH = 30.0
#: the host of the client a binding was registered from (None: not known)
BindingClient = Callable[[Binding], str | None]
#: (realm, stale) pairs whose challenge templates an Authenticator keeps (realms are served domains)
MAX_CHALLENGE_TEMPLATES = 64


class Verdict(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # wrong or unusable credentials: a fresh challenge (counted)
    STALE = "stale"  # an authentic but expired nonce, or a nonce-count seen before: stale=true
    BANNED = "banned"  # the source is banned: 403, whatever the password


class AuthAnswer:
    """The verdict on one request's credentials (immutable: Final attributes, which a compiled
    build enforces; a plain class, not a frozen dataclass, whose generated __init__ costs ~15x
    a native one: one of these per authenticated request)."""

    def __init__(self, verdict: Verdict, account: Account | None = None, error: StoreError | None = None) -> None:
        self.verdict: Final = verdict
        self.account: Final = account
        self.error: Final = error  # Redis failed: answer 503/500 instead

    # value semantics, as the frozen dataclass had
    def __eq__(self, other: object) -> bool:
        return isinstance(other, AuthAnswer) and (self.verdict, self.account, self.error) == (
            other.verdict,
            other.account,
            other.error,
        )

    def __hash__(self) -> int:
        return hash((self.verdict, self.account, self.error))

    def __repr__(self) -> str:
        return f"AuthAnswer({self.verdict}, account={self.account!r}, error={self.error!r})"


class AccountSource(Protocol):
    def get_account(self, user: str, domain: str, callback: Callable[[Account | StoreError | None], None]) -> None: ...

    def cached_account(self, user: str, domain: str) -> Account | CacheMiss | None:
        """What ``get_account`` would answer without I/O (None: no such account), or NOT_CACHED."""
        ...


class BindingSource(Protocol):
    def lookup(self, aor: str, now: float, callback: Callable[[list[Binding] | StoreError], None]) -> None: ...


class _Lock:
    """One account locked to its known clients (see the module)."""

    __slots__ = ("fetched", "known", "until")

    def __init__(self, until: float) -> None:
        self.until = until  # on the element's clock
        self.known: frozenset[str] = frozenset()  # client hosts of its bindings, once fetched
        self.fetched = -KNOWN_CLIENTS_REFRESH  # when they were last asked for


class Authenticator:
    def __init__(
        self,
        element: Element,
        nonces: auth.NonceFactory,
        accounts: AccountSource,
        guard: Guard | None,
        *,
        algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
        bindings: BindingSource | None = None,
        binding_client: BindingClient | None = None,
    ) -> None:
        for name in algorithms:
            if name.upper().removesuffix("-SESS") not in ("MD5", "SHA-256"):
                raise ValueError(f"unsupported digest algorithm {name!r} (MD5, SHA-256, their -sess)")
        self.element = element
        self.nonces = nonces
        self.accounts = accounts
        self.guard = guard
        self.algorithms = algorithms
        # as configured: MD5 does not let in MD5-sess (list "MD5-sess" to take it)
        self._accepted = frozenset(a.upper() for a in algorithms)
        # (realm, stale) -> the challenge values cut around the nonce (auth.challenge_templates);
        # realms are served domains, the count is bounded all the same
        self._templates: dict[tuple[str, bool], list[tuple[bytes, bytes]]] = {}
        # accounts locked to their known clients ("user@realm" -> lock), insertion-ordered
        self.bindings = bindings
        self.binding_client = binding_client
        self._locks: dict[str, _Lock] = {}

    # -- challenges ------------------------------------------------------------------------------

    def challenge(
        self,
        msg: SipMessage,
        status: int,
        realm: str,
        client: Address,
        *,
        stale: bool = False,
        tag: bytes | None = None,
    ) -> SipMessage:
        """A 401/407 with a fresh nonce, good from ``client``'s address only (behind a balancer:
        the hop its branch names, ``Element.client``). ``tag``: its To tag when not
        :meth:`Element.tag`'s (a challenge tag, for an answer sent with no transaction:
        ``Element.stateless_tag``)."""
        nonce = self.nonces.issue(self.element.wall(), realm, client.host).encode("ascii")
        key = "www-authenticate" if status == 401 else "proxy-authenticate"
        templates = self._templates.get((realm, stale))
        if templates is None:
            templates = auth.challenge_templates(realm, self.algorithms, stale=stale)
            if len(self._templates) >= MAX_CHALLENGE_TEMPLATES:
                self._templates.clear()
            self._templates[(realm, stale)] = templates
        headers = [(key, before + nonce + after) for before, after in templates]
        return make_response(msg, status, to_tag=tag or self.element.tag(msg), headers=headers)

    def refusal(self, msg: SipMessage, *, tag: bytes | None = None) -> SipMessage:
        """What a banned source gets, whatever it sends (``tag``: as :meth:`challenge`)."""
        return make_response(msg, 403, to_tag=tag or self.element.tag(msg))

    def banned(self, source: Address) -> bool:
        """The source is known banned here (no I/O)."""
        return self.guard is not None and self.guard.banned_locally(source.host, self.element.now())

    # -- credentials -----------------------------------------------------------------------------

    def credentials(self, msg: SipMessage, header: str, realm: str) -> auth.Credentials | None:
        """Our realm's credentials in ``header`` (None: none, challenge)."""
        for value in msg.get_all(header):
            try:
                creds = auth.parse_credentials(value)
            except auth.UnsupportedSchemeError:
                continue
            except auth.AuthHeaderError as exc:
                self.element.metrics.auth_failures("malformed").inc()
                raise BadMessage(f"{header}: {exc}", partial=msg) from None
            if creds.realm == realm:
                if not auth.same_resource(creds.uri, msg.uri):
                    self.element.metrics.auth_failures("uri_mismatch").inc()
                    raise BadMessage(f"{header}: digest uri names another user than the Request-URI", partial=msg)
                return creds
        return None

    def register_realm(self, msg: SipMessage) -> str:
        """The served domain a REGISTER is for (its realm), or Forbidden."""
        domains = self.element.identity.domains
        uri = msg.request_uri
        if isinstance(uri, SipURI) and uri.host in domains:
            return uri.host
        # a phone configured with the farm's address as registrar (sip:IP:port): the
        # address-of-record's domain, in To, decides (step 1 leaves it to the registrar)
        to_uri = msg.name_addr_uri("to")
        if not isinstance(to_uri, SipURI) or to_uri.host not in domains:
            raise Forbidden("not a domain of this registrar", partial=msg)
        return to_uri.host

    def caller_realm(self, msg: SipMessage, uri: SipURI) -> str:
        caller = msg.name_addr_uri("from")
        domains = self.element.identity.domains
        if isinstance(caller, SipURI) and caller.host in domains:
            return caller.host
        if uri.host in domains:
            return uri.host
        return next(iter(sorted(domains)))

    # -- verification ----------------------------------------------------------------------------

    def authenticate(
        self,
        creds: auth.Credentials,
        msg: SipMessage,
        source: Address,
        realm: str,
        done: Callable[[AuthAnswer], None],
    ) -> None:
        """Verify ``creds`` (account + guard in one pipeline); ``done`` gets the verdict."""
        if self.banned(source):
            self._refused(msg, source, creds.username, "banned")
            done(AuthAnswer(Verdict.BANNED))
            return
        wall = self.element.wall()
        nonce_status = self.nonces.check(creds.nonce, wall, realm, source.host)
        if nonce_status is auth.NonceStatus.INVALID:
            # a nonce this farm did not issue to this address (made up, issued to another one,
            # or signed with a retired secret): no response can match it, so it is no password
            # guess to count, and nothing of it goes to Redis (a nonce use, a failure counter:
            # keys an attacker could mint at line rate, or a ban of the address it spoofs). A
            # fresh one, stale=true: a phone whose address or the farm's secret changed since
            # its nonce retries without asking its user.
            self.element.metrics.auth_failures("invalid_nonce").inc()
            done(AuthAnswer(Verdict.STALE))
            return
        check = _Check(self, creds, msg, source, realm, wall, done)
        check.nonce_status = nonce_status
        guard = self.guard
        needed = 2 if guard is not None else 1
        locked = guard is not None and self._locked_out(creds.username, realm, source.host)
        if locked:
            needed += 1  # does the account work from here (its phone, its bindings gone)?
        check.needed = needed
        if guard is not None:
            guard.admit(source.host, nonce_use(creds), self.nonce_use_ttl, check.admitted)
            if locked:
                guard.works(source.host, f"{creds.username}@{realm}", check.works_here)
        self.accounts.get_account(creds.username, realm, check.account_found)

    @property
    def nonce_use_ttl(self) -> float:
        """How long a nonce use is remembered: as long as the nonce could be accepted."""
        return self.nonces.lifetime + 60.0

    def verified_without_io(
        self, creds: auth.Credentials, msg: SipMessage, source: Address, realm: str
    ) -> Account | None:
        """The account, when ``creds`` are verified here and now with no I/O: a guard, no ban of
        ``source`` known here, the account in the cache, enabled, the digest right, the nonce
        fresh. The caller must then have the guard's admission established (see
        :class:`~sipfarm.protect.guard.Guard`) before it acts, and give the facts to
        :meth:`admitted`. None: ask :meth:`authenticate` (nothing was counted or logged)."""
        if self.guard is None or self.banned(source) or self._locked_out(creds.username, realm, source.host):
            return None
        account = self.accounts.cached_account(creds.username, realm)
        if isinstance(account, CacheMiss):
            return None
        result = auth.verify(
            creds,
            msg.method,
            self._ha1(account, creds),
            self.nonces,
            self.element.wall(),
            realm,
            allow_rfc2069=True,
            client=source.host,
        )
        # a cached "no such account" is verified with the dummy HA1, as authenticate does: the
        # same work as a known account's wrong password before both go to authenticate
        return account if result.ok and account is not None else None

    def admitted(
        self, creds: auth.Credentials, msg: SipMessage, source: Address, ban_left: float | None, first_use: bool
    ) -> Verdict:
        """The verdict on credentials :meth:`verified_without_io` accepted, from the admission's
        facts a store established with them (OK, BANNED or STALE, as :meth:`authenticate`)."""
        guard = self.guard
        assert guard is not None  # verified_without_io accepts nothing without one
        admission = guard.admission(source.host, ban_left, first_use)
        if admission.banned:
            self._refused(msg, source, creds.username, "banned")
            return Verdict.BANNED
        if admission.replay:
            self._replayed(msg, source, creds.username)
            return Verdict.STALE
        guard.succeeded(source.host, f"{creds.username}@{creds.realm}")
        return Verdict.OK

    def _ha1(self, account: Account | None, creds: auth.Credentials) -> dict[str, str] | None:
        """The HA1s to verify ``creds`` with (None: verify against the dummy HA1, which fails)."""
        if account is None or not account.enabled:
            return None
        if creds.algorithm.upper() not in self._accepted:
            return None  # an algorithm we do not offer: the same failure as a wrong password
        return account.ha1_by_algorithm

    def _decide(self, check: _Check) -> AuthAnswer:
        creds, msg = check.creds, check.msg
        admission = check.admission
        if isinstance(check.account, StoreError):
            return AuthAnswer(Verdict.CHALLENGE, error=check.account)
        if isinstance(admission, StoreError):
            return AuthAnswer(Verdict.CHALLENGE, error=admission)
        if admission is not None and admission.banned:
            self._refused(msg, check.source, creds.username, "banned")
            return AuthAnswer(Verdict.BANNED)
        account = check.account
        ha1 = self._ha1(account, creds)
        result = auth.verify(
            creds,
            msg.method,
            ha1,
            self.nonces,
            check.wall,
            check.realm,
            allow_rfc2069=True,
            client=check.source.host,
            nonce_status=check.nonce_status,  # checked by authenticate: one MAC, not two
        )
        if (
            account is not None
            and check.works is not True
            and self._locked_out(creds.username, check.realm, check.source.host)
        ):
            # before the stale and replay answers, which only a right password gets
            self._failed(check, "account_locked")
            return AuthAnswer(Verdict.CHALLENGE)
        if result.outcome is auth.AuthOutcome.STALE:
            self.element.metrics.auth_failures("stale").inc()
            return AuthAnswer(Verdict.STALE)
        if result.ok and admission is not None and admission.replay:
            # authentic, but this nonce-count was used already: a replay, or a client that
            # lost count. A fresh nonce (stale=true) lets an honest client retry at once.
            self._replayed(msg, check.source, creds.username)
            return AuthAnswer(Verdict.STALE)
        if not result.ok or account is None:
            self._failed(check)
            return AuthAnswer(Verdict.CHALLENGE)
        if self.guard is not None:
            # its phones work: a stale password on one of them does not soon ban them all
            self.guard.succeeded(check.source.host, f"{creds.username}@{check.realm}")
        return AuthAnswer(Verdict.OK, account)

    def _failed(self, check: _Check, reason: str = "failed") -> None:
        creds = check.creds
        self.element.metrics.auth_failures(reason).inc()
        # the same line for an unknown user and a wrong password (fail2ban-ready)
        log.info(
            "event=auth_failed source=%s user=%s realm=%s method=%s call_id=%s reason=%s",
            check.source.host,
            creds.username,
            check.realm,
            check.msg.method.decode("latin-1"),
            check.msg.call_id.decode("latin-1"),
            reason,
        )
        if self.guard is not None:
            # an account's own counter only for an account that exists: a counter per made-up
            # user name would be Redis keys an attacker mints (the source's counts either way)
            account = check.account if isinstance(check.account, Account) else None
            if account is None:
                self.guard.failed(check.source.host, None, self._counted)
            else:
                aor = f"{creds.username}@{check.realm}"
                self.guard.failed(check.source.host, aor, partial(self._account_counted, aor))

    def _counted(self, outcome: FailureOutcome | StoreError) -> None:
        if isinstance(outcome, StoreError):
            self.element.metrics.redis_errors.inc()  # the failure went uncounted: seen in metrics
            return
        if outcome.banned:
            self.element.metrics.bans.inc()
        if outcome.account_alert:
            self.element.metrics.account_alerts.inc()

    def _account_counted(self, aor: str, outcome: FailureOutcome | StoreError) -> None:
        self._counted(outcome)
        if not isinstance(outcome, StoreError) and outcome.account_locked and self.guard is not None:
            self.lock(aor, self.guard.policy.window)

    # -- accounts locked to their known clients --------------------------------------------------

    def lock(self, aor: str, window: float) -> None:
        """Lock ``aor`` (``user@realm``) to its known clients for the failure ``window`` from
        now (the window's own end is Redis's), fetching their hosts when due."""
        now = self.element.now()
        locks = self._locks
        entry = locks.get(aor)
        if entry is None or entry.until <= now:
            if entry is None:
                if len(locks) >= MAX_LOCKED_ACCOUNTS:
                    del locks[next(iter(locks))]
                log.warning("event=account_locked account=%s window_seconds=%g", aor, window)
            entry = locks[aor] = _Lock(now + window)
        else:
            entry.until = now + window
        if self.bindings is None or self.binding_client is None or now - entry.fetched < KNOWN_CLIENTS_REFRESH:
            return
        entry.fetched = now
        self.bindings.lookup(aor, self.element.wall(), partial(self._known_fetched, entry))

    def _known_fetched(self, entry: _Lock, bindings: list[Binding] | StoreError) -> None:
        if isinstance(bindings, StoreError):
            entry.fetched = -KNOWN_CLIENTS_REFRESH  # asked again by the next failure
            return
        client = self.binding_client
        assert client is not None
        # by subject: a phone on IPv6 may register from one address of its /64 and try from another
        entry.known = frozenset(source_subject(host) for host in map(client, bindings) if host is not None)

    def _locked_out(self, user: str, realm: str, host: str) -> bool:
        """``host`` may not authenticate as ``user@realm`` now (no I/O)."""
        locks = self._locks
        if not locks:
            return False
        aor = f"{user}@{realm}"
        entry = locks.get(aor)
        if entry is None:
            return False
        if entry.until <= self.element.now():
            del locks[aor]
            return False
        return source_subject(host) not in entry.known

    def _replayed(self, msg: SipMessage, source: Address, user: str) -> None:
        self.element.metrics.auth_failures("replay").inc()
        log.info("event=auth_replay source=%s user=%s call_id=%s", source.host, user, msg.call_id.decode("latin-1"))

    def _refused(self, msg: SipMessage, source: Address, user: str, why: str) -> None:
        self.element.metrics.auth_failures(why).inc()
        log.info(
            "event=auth_refused reason=%s source=%s user=%s call_id=%s",
            why,
            source.host,
            user,
            msg.call_id.decode("latin-1"),
        )


class _Check:
    """One verification waiting for its account and guard answers (an object, not closures:
    no reference cycle per request, see farmstate.py)."""

    __slots__ = (
        "account",
        "admission",
        "auth",
        "creds",
        "done",
        "got",
        "msg",
        "needed",
        "nonce_status",
        "realm",
        "source",
        "wall",
        "works",
    )

    def __init__(
        self,
        authenticator: Authenticator,
        creds: auth.Credentials,
        msg: SipMessage,
        source: Address,
        realm: str,
        wall: float,
        done: Callable[[AuthAnswer], None],
    ) -> None:
        self.auth = authenticator
        self.creds = creds
        self.msg = msg
        self.source = source
        self.realm = realm
        self.wall = wall
        self.done = done
        self.needed = 1
        self.got = 0
        self.account: Account | StoreError | None = None
        self.admission: Admission | StoreError | None = None
        self.nonce_status: auth.NonceStatus | None = None
        # asked only while the account is locked: it authenticated from this source lately
        self.works: bool | StoreError | None = None

    def account_found(self, account: Account | StoreError | None) -> None:
        self.account = account
        self._one()

    def admitted(self, admission: Admission | StoreError) -> None:
        self.admission = admission
        self._one()

    def works_here(self, works: bool | StoreError) -> None:
        self.works = works
        self._one()

    def _one(self) -> None:
        self.got += 1
        if self.got == self.needed:
            self.done(self.auth._decide(self))


def nonce_use(creds: auth.Credentials) -> str:
    """The guard's name of one use of a nonce: ``"<nonce>:<nc>"``, or ``"<nonce>:"`` for a client
    sending no qop (which makes its nonce one-time)."""
    return f"{creds.nonce}:{creds.nc or ''}"


__all__ = ["DEFAULT_ALGORITHMS", "AuthAnswer", "Authenticator", "Verdict", "nonce_use"]
