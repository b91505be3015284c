"""The proxy's single routing step: Request-URI in, decision out.

Every lookup that decides where an initial request goes happens here, behind one callback-style
method, so rules that need I/O (an LDAP directory, an external helper program or HTTP service)
plug in without touching the proxy: :meth:`Router.route` calls ``done`` with a
:class:`Decision`, now or later.

The order of steps (one, documented; README "Routing"):

1. the router table's rules (``[[routing.rules]]``), first match on domain and user: local
   account, alias (fork), forward to a gateway/trunk/voicemail URI, redirect (302), reject;
2. the node's own domains: a location lookup (``LOCAL``);
3. for a served domain's user with no account, the ``[routing.unknown]`` rule (reject 480/404/604,
   forward to a catch-all, redirect), applied by the proxy after authentication so an outsider
   cannot tell existing from missing users;
4. anything else: 403.

Forwarding and redirect decisions are taken after the caller authenticated, like calls to
local users: a gateway is where toll fraud happens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Final, Protocol

from sipfarm.routing.table import Action, RoutingError, RoutingTable, Rule, load_routing
from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import URI, SipURI, parse_uri

__all__ = ["Action", "Decision", "Router", "forward_uri"]


_DECISION_FIELDS: Final = (
    "action",
    "aor",
    "user",
    "domain",
    "status",
    "reason",
    "uri",
    "targets",
    "rule",
    "credentials",
)


class Decision:
    """Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        action: Action,
        aor: str = "",
        user: str = "",
        domain: str = "",
        status: int = 0,
        reason: str = "",
        uri: str = "",
        targets: tuple[str, ...] = (),
        rule: str = "",
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.action: Final = action
        self.aor: Final = aor  # LOCAL: user@domain
        self.user: Final = user
        self.domain: Final = domain
        self.status: Final = status  # REJECT
        self.reason: Final = reason
        self.uri: Final = uri  # FORWARD, REDIRECT: the new Request-URI / Contact
        self.targets: Final = targets  # ALIAS
        self.rule: Final = rule  # the rule that decided (logs, metrics); "" for the built-in steps
        self.credentials: Final = credentials  # FORWARD to a trunk: its account

    def _fields(self) -> tuple[object, ...]:
        return (
            self.action,
            self.aor,
            self.user,
            self.domain,
            self.status,
            self.reason,
            self.uri,
            self.targets,
            self.rule,
            self.credentials,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            "Decision(" + ", ".join(f"{n}={v!r}" for n, v in zip(_DECISION_FIELDS, self._fields(), strict=True)) + ")"
        )


def forward_uri(rule_uri: str, user: str) -> str:
    """The Request-URI of a forward or redirect: the rule's URI, with the request's user (as
    written, escaped) put in when the rule's URI has none (a gateway: ``sip:gw:5060`` +
    ``+15551234``)."""
    uri = parse_uri(rule_uri)
    if isinstance(uri, SipURI) and uri.user is None and user:
        return str(uri.replace(user=user))
    return rule_uri


class Router:
    """The router table over the node's ``domains`` (see the module docstring)."""

    def __init__(self, domains: frozenset[str], table: RoutingTable | None = None) -> None:
        self.domains = domains
        self.table = table or RoutingTable()
        self.helper: Asker | None = None  # the external helper of ``helper`` rules (started by the node)
        self.aliases: AliasStep | None = None  # the directory's aliases of the farm's users (LDAP)
        self.after: Callable[[], None] | None = None  # called after a decision that came later

    def reload(self, path: str) -> str | None:
        """Read the table again from ``path``: None when it took effect, else the reason it did
        not (the table in use stays). Requests in progress keep the decision they had."""
        try:
            self.table = load_routing(path)
        except RoutingError as exc:
            return str(exc)
        return None

    def route(self, request: SipMessage, uri: URI, done: Callable[[Decision], None]) -> None:
        decision = self.decide(uri)
        if decision.action is Action.LOCAL and self.aliases is not None and not decision.rule:
            # step 2 with a directory: a user whose entry lists aliases is forked to them
            self.aliases.aliases(decision.user, decision.domain, partial(_aliased, decision, done))
            return
        if decision.action is not Action.HELPER:
            done(decision)
            return
        helper = self.helper
        if helper is None:
            done(Decision(Action.REJECT, status=503, reason="routing helper not running", rule=decision.rule))
            return
        query = {
            "method": request.method.decode("latin-1"),
            "caller": str(request.name_addr_uri("from")),
            "callee": request.uri.decode("latin-1"),
            "source": _source(request),
        }
        for name in self.table.helper_headers:
            value = request.get(name)
            if value is not None:
                query[name] = value.decode("latin-1")[:512]
        pending = _Pending(self, uri, decision.rule, done)
        helper.ask(query, pending.answered)
        pending.synchronous = False

    def decide(self, uri: URI) -> Decision:
        """The table's decision for ``uri`` (``HELPER``: the helper has to be asked)."""
        return self._decide(uri, helper=True)

    def _decide(self, uri: URI, *, helper: bool) -> Decision:
        if not isinstance(uri, SipURI):
            return Decision(Action.REJECT, status=403, reason="not a local domain")
        user = uri.user_unescaped or ""
        domain = uri.host
        for rule in self.table.rules:
            if rule.matches(user, domain) and (helper or rule.action is not Action.HELPER):
                return _decision(rule, uri, user, domain)
        if domain not in self.domains:
            return Decision(Action.REJECT, status=403, reason="not a local domain")
        if uri.user is None:
            return Decision(Action.REJECT, status=404, reason="no user in Request-URI")
        return Decision(Action.LOCAL, aor=uri.aor, user=user, domain=domain)

    def unknown(self, user: str, domain: str, *, gruu: bool = False) -> Decision:
        """What a served domain's user with no account gets (step 3); for a GRUU (one device,
        not a catch-all's business): the rule's reject, or 404 when the rule forwards."""
        rule = self.table.unknown
        if gruu and rule.action is not Action.REJECT:
            return Decision(Action.REJECT, user=user, domain=domain, status=404)
        if rule.action is Action.REJECT:
            return Decision(Action.REJECT, user=user, domain=domain, status=rule.status, reason=rule.reason)
        return Decision(rule.action, user=user, domain=domain, uri=rule.uri, rule="unknown")


def _source(request: SipMessage) -> str:
    """The caller's address as the farm saw it: its own (bottom) Via, received= first."""
    try:
        via = request.vias[-1]
    except (SipError, IndexError):
        return ""
    return via.received or via.host


class AliasStep(Protocol):
    def aliases(self, user: str, domain: str, done: Callable[[tuple[str, ...]], None]) -> None: ...


def _aliased(decision: Decision, done: Callable[[Decision], None], targets: tuple[str, ...]) -> None:
    if targets:
        decision = Decision(Action.ALIAS, user=decision.user, domain=decision.domain, targets=targets, rule="directory")
    done(decision)


class Asker(Protocol):
    """The external helper (:class:`sipfarm.routing.helpers.RoutingHelper`)."""

    def ask(self, query: dict[str, str], callback: Callable[[Any], None]) -> None: ...


class _Pending:
    """One question to the helper; its answer becomes the decision (``local``: the table's
    other steps for the Request-URI, the helper's rules skipped)."""

    __slots__ = ("done", "router", "rule", "synchronous", "uri")

    def __init__(self, router: Router, uri: URI, rule: str, done: Callable[[Decision], None]) -> None:
        self.router, self.uri, self.rule, self.done = router, uri, rule, done
        self.synchronous = True

    def answered(self, answer: Any) -> None:
        action = Action(str(answer.action))
        if action is Action.LOCAL:
            decision = self.router._decide(self.uri, helper=False)
        elif action is Action.REJECT:
            decision = Decision(Action.REJECT, status=answer.status, reason=answer.reason, rule=self.rule)
        elif action is Action.ALIAS:
            decision = Decision(Action.ALIAS, targets=tuple(answer.targets), rule=self.rule)
        else:  # forward, redirect: a URI without a user part gets the request's (a gateway)
            user = self.uri.user if isinstance(self.uri, SipURI) else None
            decision = Decision(action, uri=forward_uri(answer.uri, user or ""), rule=self.rule)
        self.done(decision)
        after = self.router.after
        if not self.synchronous and after is not None:
            after()  # the answer came from the loop: what the decision queued is sent now


def _decision(rule: Rule, uri: SipURI, user: str, domain: str) -> Decision:
    action = rule.action
    if action is Action.HELPER:
        return Decision(Action.HELPER, user=user, domain=domain, rule=rule.name)
    if action is Action.LOCAL:  # e.g. a domain alias: its users looked up as accounts of it
        if uri.user is None:
            return Decision(Action.REJECT, status=404, reason="no user in Request-URI", rule=rule.name)
        return Decision(Action.LOCAL, aor=uri.aor, user=user, domain=domain, rule=rule.name)
    if action is Action.REJECT:
        return Decision(Action.REJECT, status=rule.status, reason=rule.reason, rule=rule.name)
    if action is Action.ALIAS:
        return Decision(Action.ALIAS, user=user, domain=domain, targets=rule.targets, rule=rule.name)
    # the user as the Request-URI wrote it (still escaped, RFC 3261 19.1.2)
    return Decision(
        action,
        user=user,
        domain=domain,
        uri=forward_uri(rule.uri, uri.user or ""),
        rule=rule.name,
        credentials=rule.credentials,
    )
