"""Accounts and aliases from a shared directory (LDAP) beside the farm's own (Redis).

:class:`DirectoryState` is the node's shared state with one change: an account that is not in
Redis (``sipfarm user add``) is looked up in the directory
(:class:`sipfarm.routing.ldap_directory.LdapDirectory`: pooled, cached in Redis for every node,
stale answers while LDAP is down, else 503).  Bindings stay in Redis whoever the account is.

:class:`DirectoryAliases` is the router's alias step for the farm's users: a served domain's
user whose directory entry lists aliases (``sales`` -> alice and bob) is forked to them.

Both are callback-style and never block: a directory answer that comes later from the event
loop calls ``after`` (the node's drain) once the caller has been answered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sipfarm.proxy.proxy import LocationSource
from sipfarm.registrar.registrar import BindingStore
from sipfarm.store.accounts import Account, CacheMiss
from sipfarm.store.errors import StoreError
from sipfarm.store.location import AdmittedRegister, Binding, ContactUpdate, RegisterResult

__all__ = ["AccountDirectory", "DirectoryAliases", "DirectoryState"]

AccountAnswer = Callable[[Account | StoreError | None], None]
AliasAnswer = Callable[[tuple[str, ...] | StoreError], None]


class AccountDirectory(Protocol):
    def get_account(self, user: str, domain: str, callback: AccountAnswer) -> None: ...

    def aliases(self, user: str, domain: str, callback: AliasAnswer) -> None: ...


class FarmAccounts(LocationSource, BindingStore, Protocol):
    """What the node's state offers (FarmState over Redis; the in-memory twin in tests)."""


class _Later:
    """Calls ``after`` when the answer came from the event loop, not inside the request."""

    __slots__ = ("after", "callback", "synchronous")

    def __init__(self, callback: Callable[[object], None], after: Callable[[], None] | None) -> None:
        self.callback, self.after = callback, after
        self.synchronous = True

    def answered(self, value: object) -> None:
        self.callback(value)
        if not self.synchronous and self.after is not None:
            self.after()


class DirectoryState:
    """The node's state, with accounts also from the directory (Redis first)."""

    def __init__(self, state: FarmAccounts, directory: AccountDirectory) -> None:
        self.state = state
        self.directory = directory
        self.after: Callable[[], None] | None = None
        self.directory_lookups = 0

    def get_account(self, user: str, domain: str, callback: AccountAnswer) -> None:
        self.state.get_account(user, domain, lambda found: self._farm_answered(user, domain, callback, found))

    def _farm_answered(
        self, user: str, domain: str, callback: AccountAnswer, found: Account | StoreError | None
    ) -> None:
        if found is not None:
            callback(found)  # a farm account (or Redis down: 503 either way)
            return
        self.directory_lookups += 1
        later = _Later(callback, self.after)  # type: ignore[arg-type]
        self.directory.get_account(user, domain, later.answered)
        later.synchronous = False

    def cached_account(self, user: str, domain: str) -> Account | CacheMiss | None:
        """The farm's cache as it is: its "no such account" (the directory's to answer) fails the
        verification without I/O, as a wrong password does, and goes to ``get_account``."""
        return self.state.cached_account(user, domain)

    def lookup(self, aor: str, now: float, callback: Callable[[list[Binding] | StoreError], None]) -> None:
        self.state.lookup(aor, now, callback)

    def remove_binding(self, aor: str, binding: Binding, callback: Callable[[bool | StoreError], None]) -> None:
        self.state.remove_binding(aor, binding, callback)

    def register(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        callback: Callable[[RegisterResult | StoreError], None],
        **kwargs: object,
    ) -> None:
        self.state.register(aor, contacts, callback, **kwargs)

    @property
    def admits(self) -> bool:
        return self.state.admits

    def register_admitted(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        source_ip: str,
        nonce_use: str,
        nonce_ttl: float,
        callback: Callable[[AdmittedRegister | StoreError], None],
        **kwargs: object,
    ) -> None:
        self.state.register_admitted(aor, contacts, source_ip, nonce_use, nonce_ttl, callback, **kwargs)


class DirectoryAliases:
    """The router's alias step: ``aliases(user, domain, done)`` with the directory's targets
    (an empty tuple: no alias; a directory failure counts as none, the account lookup that
    follows answers 503 if the directory is really down)."""

    def __init__(self, directory: AccountDirectory) -> None:
        self.directory = directory
        self.after: Callable[[], None] | None = None

    def aliases(self, user: str, domain: str, done: Callable[[tuple[str, ...]], None]) -> None:
        later = _Later(lambda found: done(found if isinstance(found, tuple) else ()), self.after)
        self.directory.aliases(user, domain, later.answered)
        later.synchronous = False
