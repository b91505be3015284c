"""The proxy's single routing step: Request-URI in, decision out.

Every lookup that decides where an initial request goes happens here, behind one callback-style
method, so rules that need I/O (an LDAP directory, an external helper program or HTTP service)
plug in without touching the proxy: :meth:`Router.route` calls ``done`` with a
:class:`Decision`, now or later.

The order of steps (one, documented; README "Routing"):

1. the router table's rules (``[[routing.rules]]``), first match on domain and user: local
   account, alias (fork), forward to a gateway/trunk/voicemail URI, redirect (302), reject;
2. the node's own domains: a location lookup (``LOCAL``);
3. for a served domain's user with no account, the ``[routing.unknown]`` rule (reject 404/604,
   forward to a catch-all, redirect), applied by the proxy after authentication so an outsider
   cannot tell existing from missing users;
4. anything else: 403.

Forwarding and redirect decisions are taken after the caller authenticated, like calls to
local users: a gateway is where toll fraud happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sipfarm.routing.table import Action, RoutingError, RoutingTable, Rule, load_routing
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import URI, SipURI, parse_uri

__all__ = ["Action", "Decision", "Router", "forward_uri"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    aor: str = ""  # LOCAL: user@domain
    user: str = ""
    domain: str = ""
    status: int = 0  # REJECT
    reason: str = ""
    uri: str = ""  # FORWARD, REDIRECT: the new Request-URI / Contact
    targets: tuple[str, ...] = ()  # ALIAS
    rule: str = ""  # the rule that decided (logs, metrics); "" for the built-in steps


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

    def reload(self, path: str) -> str | None:
        """Read the table again from ``path``: None when it took effect, else the reason it did
        not (the table in use stays). Requests in progress keep the decision they had."""
        try:
            self.table = load_routing(path)
        except RoutingError as exc:
            return str(exc)
        return None

    def route(self, request: SipMessage, uri: URI, done: Callable[[Decision], None]) -> None:
        done(self.decide(uri))

    def decide(self, uri: URI) -> Decision:
        if not isinstance(uri, SipURI):
            return Decision(Action.REJECT, status=403, reason="not a local domain")
        user = uri.user_unescaped or ""
        domain = uri.host
        for rule in self.table.rules:
            if rule.matches(user, domain):
                return _decision(rule, uri, user, domain)
        if domain not in self.domains:
            return Decision(Action.REJECT, status=403, reason="not a local domain")
        if uri.user is None:
            return Decision(Action.REJECT, status=404, reason="no user in Request-URI")
        return Decision(Action.LOCAL, aor=uri.aor, user=user, domain=domain)

    def unknown(self, user: str, domain: str) -> Decision:
        """What a served domain's user with no account gets (step 3)."""
        rule = self.table.unknown
        if rule.action is Action.REJECT:
            return Decision(Action.REJECT, user=user, domain=domain, status=rule.status, reason=rule.reason)
        return Decision(rule.action, user=user, domain=domain, uri=rule.uri, rule="unknown")


def _decision(rule: Rule, uri: SipURI, user: str, domain: str) -> Decision:
    action = rule.action
    if action is Action.LOCAL:  # e.g. a domain alias: its users looked up as accounts of it
        if uri.user is None:
            return Decision(Action.REJECT, status=404, reason="no user in Request-URI", rule=rule.name)
        return Decision(Action.LOCAL, aor=uri.aor, user=user, domain=domain, rule=rule.name)
    if action is Action.REJECT:
        return Decision(Action.REJECT, status=rule.status, reason=rule.reason, rule=rule.name)
    if action is Action.ALIAS:
        return Decision(Action.ALIAS, user=user, domain=domain, targets=rule.targets, rule=rule.name)
    # the user as the Request-URI wrote it (still escaped, RFC 3261 19.1.2)
    return Decision(action, user=user, domain=domain, uri=forward_uri(rule.uri, uri.user or ""), rule=rule.name)
