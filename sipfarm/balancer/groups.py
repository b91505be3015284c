"""The static cluster: rules that pin accounts to a group of nodes (``[balancer] groups``).

Theory of operation
-------------------
By default the farm is one dynamic cluster: any node serves any account, since every node
reads the same Redis.  An operator may instead pin a domain, or the accounts of a domain whose
user part starts with a prefix or matches a pattern, to a named group of nodes (nodes announce
their group in their membership record: ``[node] group``).  The balancer then sends those
accounts' REGISTERs and calls only to that group's live nodes, and answers 503 itself when the
group has none.

A rule is matched against the request's target account: the To URI for a REGISTER (the
address-of-record, RFC 3261 10.2), the Request-URI for any other request (user@host); the user
part unescaped, as the registrar keys an AOR (RFC 3261 10.3 step 5); the domain compared
without case, the user part with case (RFC 3261 19.1.4).  Rules are tried in the order written
and the first match wins; no match leaves the request to the dynamic pool.

Rules are parsed once, at start: patterns compiled, their length bounded, and a user part
longer than :data:`MAX_USER` matches no pattern (a hostile user part must not make a regex
backtrack on every message).  Matching looks only at the rules of the request's domain (and
the rules naming no domain), so many domain rules cost one dict look-up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from sipfarm.routing.table import compile_user_regex
from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import URI, SipURI, URIError, parse_uri

__all__ = ["MAX_RULES", "MAX_USER", "GroupRule", "GroupRules", "parse_rules", "target_account", "valid_group_name"]

#: rules a balancer takes (each request looks only at its own domain's)
MAX_RULES: Final = 10_000
#: characters of a ``user_regex``
MAX_PATTERN: Final = 256
#: characters of a user part a ``user_regex`` is tried on; a longer one matches none
MAX_USER: Final = 256
RULE_KEYS: Final = ("domain", "user_prefix", "user_regex", "group")

_GROUP_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def valid_group_name(name: str) -> bool:
    """A group name: letters, digits, ``_``, ``-``, ``.``; 1 to 64 characters, not starting
    with punctuation (it is a metric label and a word in logs)."""
    return _GROUP_NAME.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class GroupRule:
    """One rule: accounts of ``domain`` (any domain when None) whose user part starts with
    ``user_prefix`` or wholly matches ``user_regex`` (any user when both are None)."""

    group: str
    domain: str | None = None  # lower case
    user_prefix: str | None = None
    user_regex: re.Pattern[str] | None = None

    def user_matches(self, user: str) -> bool:
        if self.user_prefix is not None:
            return user.startswith(self.user_prefix)
        if self.user_regex is not None:
            return len(user) <= MAX_USER and self.user_regex.fullmatch(user) is not None
        return True


class GroupRules:
    """Rules in the order written; :meth:`match` gives the group of the first that matches."""

    __slots__ = ("_any", "_by_domain", "groups", "rules")

    def __init__(self, rules: Iterable[GroupRule] = ()) -> None:
        self.rules = tuple(rules)
        self.groups = frozenset(rule.group for rule in self.rules)
        # per domain, the rules that may match it, still in order: its own and the domainless
        self._any = tuple(rule for rule in self.rules if rule.domain is None)
        domains = {rule.domain for rule in self.rules if rule.domain is not None}
        self._by_domain = {
            domain: tuple(rule for rule in self.rules if rule.domain in (None, domain)) for domain in domains
        }

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, user: str, domain: str) -> str | None:
        """The group the account ``user@domain`` is pinned to (``domain`` in lower case), or
        None: the dynamic pool."""
        for rule in self._by_domain.get(domain, self._any):
            if rule.user_matches(user):
                return rule.group
        return None

    def group_of(self, msg: SipMessage) -> str | None:
        """The group the request's target account is pinned to, or None."""
        account = target_account(msg)
        return None if account is None else self.match(*account)


def target_account(msg: SipMessage) -> tuple[str, str] | None:
    """``(user, domain)`` of a request's target account: the To URI of a REGISTER, the
    Request-URI of anything else; the user unescaped ('' when none), the domain in lower case
    (a tel: URI's number with domain '').  None when the URI is not readable (the node answers
    the request as it deserves)."""
    try:
        uri = _to_uri(msg) if msg.method == b"REGISTER" else msg.request_uri
    except (SipError, URIError):
        return None
    if isinstance(uri, SipURI):
        return uri.user_unescaped or "", uri.host
    return uri.number, ""  # tel: (RFC 3966): a number, no domain


def _to_uri(msg: SipMessage) -> URI:
    to = msg.get("to") or b""
    lt, gt = to.find(b"<"), to.find(b">")
    return parse_uri(to[lt + 1 : gt] if 0 <= lt < gt else to.partition(b";")[0].strip())


def parse_rules(raw: Iterable[Mapping[str, object]]) -> GroupRules:
    """Rules from the configuration (TOML tables); ``ValueError`` naming the rule (from 1)
    and the key at fault."""
    rules: list[GroupRule] = []
    for index, table in enumerate(raw, start=1):
        if index > MAX_RULES:
            raise ValueError(f"more than {MAX_RULES} rules")
        rules.append(_parse_rule(index, table))
    return GroupRules(rules)


def _parse_rule(index: int, table: Mapping[str, object]) -> GroupRule:
    where = f"rule {index}"
    if not isinstance(table, Mapping):
        raise ValueError(f'{where}: expected a table such as {{domain = "a.test", group = "A"}}, got {table!r}')
    for key, value in table.items():
        if key not in RULE_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (expected one of {', '.join(RULE_KEYS)})")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {value!r}")
    values: dict[str, str] = {str(k): str(v) for k, v in table.items()}
    group = values.get("group")
    if group is None:
        raise ValueError(f"{where}: group is required")
    if not valid_group_name(group):
        raise ValueError(f"{where}: group {group!r} is not a group name (letters, digits, '_', '-', '.'; at most 64)")
    domain = values.get("domain")
    if domain is not None:
        domain = domain.lower()
        # as a URI's host reads: no user, no port (an IPv6 literal in brackets)
        if "@" in domain or (":" in domain and not domain.startswith("[")) or any(c.isspace() for c in domain):
            raise ValueError(f"{where}: domain {domain!r} is not a host name (no user, port or spaces)")
    prefix = values.get("user_prefix")
    pattern = values.get("user_regex")
    if prefix is not None and pattern is not None:
        raise ValueError(f"{where}: user_prefix and user_regex exclude each other (write two rules)")
    if domain is None and prefix is None and pattern is None:
        raise ValueError(f"{where}: needs a domain, a user_prefix or a user_regex")
    regex = None
    if pattern is not None:
        try:
            regex = compile_user_regex(pattern, MAX_PATTERN)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return GroupRule(group, domain, prefix, regex)
