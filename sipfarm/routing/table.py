"""The router table: the ``[routing]`` section of the farm's TOML file, parsed and checked.

One documented order of steps decides where an initial request goes (see
:mod:`sipfarm.routing.router`): the ``[[routing.rules]]`` in file order, first match wins; then
the node's own domains (a location lookup); then the ``[routing.unknown]`` rule for a user of a
served domain that has no account.  Anything else is refused (403).

    [[routing.rules]]
    name = "us-gateway"            # for logs and metrics (default "rule<N>")
    domain = "farm.test"           # optional: any domain when absent
    user_prefix = "+1555"          # or user = "sales", or user_regex = "^9[0-9]{3}$"
    action = "forward"             # local | alias | forward | redirect | reject
    uri = "sip:127.0.0.1:15090"    # forward/redirect: no user part -> the Request-URI's user
    username = "farm"              # forward to a trunk that challenges: the farm's account
    password = "secret"            #   there, answering its 401/407 once (RFC 3261 22.2)

    [[routing.rules]]
    domain = "farm.test"
    user = "sales"
    action = "alias"
    targets = ["sip:alice@farm.test", "sip:bob@farm.test"]   # parallel fork

    [routing]
    trusted = ["192.0.2.10"]       # gateways whose calls to the farm's users need no digest

    [routing.unknown]              # a user of a served domain with no account
    action = "forward"             # reject (status 404 or 604) | forward | redirect
    uri = "sip:vm@127.0.0.1:15091"

A bad table is refused as a whole with a message naming the rule and its line in the file
(:class:`RoutingError`); whoever loads it keeps the table it had.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipfarm.sip.errors import SipError
from sipfarm.sip.uri import SipURI, parse_uri

__all__ = ["Action", "RoutingError", "RoutingTable", "Rule", "UnknownRule", "compile_user_regex", "load_routing"]

MAX_RULES = 10_000
MAX_TARGETS = 32
MAX_REGEX = 256  # characters of a user_regex (patterns are the operator's, bounded anyway)


class Action(enum.Enum):
    LOCAL = "local"  # a user of a served domain: location lookup (404 / 480 when absent)
    ALIAS = "alias"  # fork to ``targets`` (users of the farm or outside URIs), in parallel
    FORWARD = "forward"  # proxy to ``uri`` (a gateway, a voicemail, another farm)
    REDIRECT = "redirect"  # 302 with ``uri`` as the Contact
    REJECT = "reject"  # answer ``status`` with ``reason``
    HELPER = "helper"  # ask the external helper ([routing.helper]); its answer is one of the above


class RoutingError(ValueError):
    """A routing table that cannot be used: the message names the rule and its line."""


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: Action
    domain: str | None = None
    user: str | None = None
    user_prefix: str | None = None
    user_regex: re.Pattern[str] | None = None
    uri: str = ""
    targets: tuple[str, ...] = ()
    status: int = 0
    reason: str = ""
    #: forward to a trunk that challenges: the farm's account there (RFC 3261 22.2 digest)
    credentials: tuple[str, str] | None = None

    def matches(self, user: str, domain: str) -> bool:
        if self.domain is not None and domain != self.domain:
            return False
        if self.user is not None and user != self.user:
            return False
        if self.user_prefix is not None and not user.startswith(self.user_prefix):
            return False
        return self.user_regex is None or self.user_regex.fullmatch(user) is not None


@dataclass(frozen=True, slots=True)
class UnknownRule:
    """What a user of a served domain that has no account gets (after authentication: an
    outsider cannot tell existing from missing users). By default the answer of a user who is
    not registered, 480: a subscriber cannot tell either (``status = 404`` tells them apart)."""

    action: Action = Action.REJECT
    status: int = 480
    reason: str = ""
    uri: str = ""


@dataclass(frozen=True, slots=True)
class RoutingTable:
    rules: tuple[Rule, ...] = ()
    unknown: UnknownRule = field(default_factory=UnknownRule)
    #: gateways and trunks by address (``trusted = ["192.0.2.10", "198.51.100.0/24"]``): their
    #: calls to the farm's users need no digest authentication; everyone else's do
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: DNS servers for RFC 3263 location of gateways by name (``["IP:PORT"]``); empty: the
    #: system's (/etc/resolv.conf). Read when the node starts (a reload keeps them)
    nameservers: tuple[tuple[str, int], ...] = ()
    #: the external helper ([routing.helper], see sipfarm.routing.helpers.HelperConfig) asked
    #: by ``action = "helper"`` rules; ``helper_headers``: request headers put in its query.
    #: Started with the node (a reload keeps the running helper)
    helper: dict[str, Any] | None = None
    helper_headers: tuple[str, ...] = ()

    def trusts(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    @classmethod
    def from_dict(cls, data: dict[str, Any], text: str = "") -> RoutingTable:
        """The ``[routing]`` table of a TOML file (``text``: the file, for line numbers)."""
        unknown_keys = set(data) - {"rules", "unknown", "trusted", "nameservers", "helper"}
        if unknown_keys:
            raise RoutingError(f"routing: unknown setting {sorted(unknown_keys)[0]!r}")
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
            raise RoutingError("routing.rules: expected [[routing.rules]] tables")
        if len(raw_rules) > MAX_RULES:
            raise RoutingError(f"routing.rules: {len(raw_rules)} rules, at most {MAX_RULES}")
        lines = _rule_lines(text)
        rules = []
        for index, raw in enumerate(raw_rules):
            where = f"routing.rules[{index + 1}]" + (f" (line {lines[index]})" if index < len(lines) else "")
            try:
                rules.append(_rule(raw, index))
            except RoutingError as exc:
                raise RoutingError(f"{where}: {exc}") from None
        raw_unknown = data.get("unknown", {})
        if not isinstance(raw_unknown, dict):
            raise RoutingError("routing.unknown: expected a table")
        where = "routing.unknown" + (f" (line {_table_line(text, 'routing.unknown')})" if text else "")
        try:
            unknown = _unknown(raw_unknown)
        except RoutingError as exc:
            raise RoutingError(f"{where}: {exc}") from None
        raw_trusted = data.get("trusted", [])
        if not isinstance(raw_trusted, list) or not all(isinstance(t, str) for t in raw_trusted):
            raise RoutingError("routing.trusted: expected a list of addresses or networks")
        trusted = []
        for entry in raw_trusted:
            try:
                trusted.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise RoutingError(f"routing.trusted: not an IP address or network: {entry!r}") from None
        raw_servers = data.get("nameservers", [])
        if not isinstance(raw_servers, list) or not all(isinstance(t, str) for t in raw_servers):
            raise RoutingError("routing.nameservers: expected a list of IP:PORT")
        servers = []
        for entry in raw_servers:
            host, _, port = entry.rpartition(":")
            try:
                servers.append((str(ipaddress.ip_address(host.strip("[]"))), int(port)))
            except ValueError:
                raise RoutingError(f"routing.nameservers: expected IP:PORT, got {entry!r}") from None
        helper, headers = _helper(data.get("helper"), text)
        if helper is None and any(rule.action is Action.HELPER for rule in rules):
            raise RoutingError("routing: a rule asks the helper, and there is no [routing.helper]")
        return cls(tuple(rules), unknown, tuple(trusted), tuple(servers), helper, headers)


def load_routing(path: str | Path) -> RoutingTable:
    """The ``[routing]`` section of the TOML file at ``path`` (an empty table when absent)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutingError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutingError(f"{path}: {exc}") from None  # names the line and column
    routing = data.get("routing", {})
    if not isinstance(routing, dict):
        raise RoutingError(f"{path}: [routing] must be a table")
    try:
        return RoutingTable.from_dict(routing, text)
    except RoutingError as exc:
        raise RoutingError(f"{path}: {exc}") from None


# -- parsing -------------------------------------------------------------------------------------

_RULE_KEYS = {
    "name", "action", "domain", "user", "user_prefix", "user_regex", "uri", "targets", "status", "reason",
    "username", "password",
}  # fmt: skip


def _rule(raw: dict[str, Any], index: int) -> Rule:
    extra = set(raw) - _RULE_KEYS
    if extra:
        raise RoutingError(f"unknown key {sorted(extra)[0]!r}")
    action = _action(raw.get("action"))
    name = _string(raw, "name") or f"rule{index + 1}"
    domain = _string(raw, "domain")
    user, prefix = _string(raw, "user"), _string(raw, "user_prefix")
    pattern = _string(raw, "user_regex")
    regex = None
    if pattern is not None:
        try:
            regex = compile_user_regex(pattern, MAX_REGEX)
        except ValueError as exc:
            raise RoutingError(str(exc)) from None
    if domain is None and user is None and prefix is None and regex is None:
        raise RoutingError("matches everything: give a domain, user, user_prefix or user_regex")
    uri, status, reason = "", 0, _string(raw, "reason") or ""
    targets: tuple[str, ...] = ()
    if action in (Action.FORWARD, Action.REDIRECT):
        uri = _sip_uri(_string(raw, "uri"), "uri")
    elif action is Action.ALIAS:
        values = raw.get("targets")
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise RoutingError("alias: targets must be a non-empty list of SIP URIs")
        if len(values) > MAX_TARGETS:
            raise RoutingError(f"alias: at most {MAX_TARGETS} targets")
        targets = tuple(_sip_uri(v, "targets") for v in values)
    elif action is Action.REJECT:
        status = _status(raw.get("status", 403), 400)
    username, password = _string(raw, "username"), raw.get("password")
    credentials = None
    if username is not None or password is not None:
        if action is not Action.FORWARD:
            raise RoutingError("username/password: only for a forward to a trunk")
        if username is None or not isinstance(password, str):
            raise RoutingError("username and password go together (strings)")
        credentials = (username, password)
    return Rule(
        name, action, domain.lower() if domain else None, user, prefix, regex, uri, targets, status, reason, credentials
    )


def _helper(raw: object, text: str) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    if raw is None:
        return None, ()
    where = "routing.helper" + (f" (line {_table_line(text, 'routing.helper')})" if text else "")
    if not isinstance(raw, dict):
        raise RoutingError(f"{where}: expected a table")
    config = dict(raw)
    headers = config.pop("headers", [])
    if not isinstance(headers, list) or not all(isinstance(h, str) and h for h in headers) or len(headers) > 16:
        raise RoutingError(f"{where}: headers must be a list of at most 16 header names")
    from sipfarm.routing.helpers import HelperConfig  # noqa: PLC0415 - only with a helper

    try:
        HelperConfig.from_dict(config)
    except ValueError as exc:
        raise RoutingError(f"{where}: {exc}") from None
    return config, tuple(h.lower() for h in headers)


def compile_user_regex(pattern: str, limit: int) -> re.Pattern[str]:
    """An operator's ``user_regex`` (router table, balancer groups), bounded in length; a
    ``ValueError`` naming it otherwise."""
    if len(pattern) > limit:
        raise ValueError(f"user_regex is longer than {limit} characters")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"user_regex {pattern!r}: {exc}") from None


def _unknown(raw: dict[str, Any]) -> UnknownRule:
    extra = set(raw) - {"action", "status", "reason", "uri"}
    if extra:
        raise RoutingError(f"unknown key {sorted(extra)[0]!r}")
    action = _action(raw.get("action", "reject"))
    if action is Action.REJECT:
        status = _status(raw.get("status", 480), 400)
        if status not in (404, 480, 603, 604):
            raise RoutingError("reject: status 404, 480, 603 or 604 (any other tells an unknown user apart)")
        return UnknownRule(action, status, _string(raw, "reason") or "")
    if action in (Action.FORWARD, Action.REDIRECT):
        return UnknownRule(action, uri=_sip_uri(_string(raw, "uri"), "uri"))
    raise RoutingError(f"action must be reject, forward or redirect, not {action.value!r}")


def _action(value: object) -> Action:
    try:
        return Action(value)
    except ValueError:
        names = ", ".join(a.value for a in Action)
        raise RoutingError(f"action must be one of {names}, not {value!r}") from None


def _string(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RoutingError(f"{key} must be a non-empty string")
    return value


def _status(value: object, lowest: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= 699:
        raise RoutingError(f"status must be a SIP status {lowest}-699, not {value!r}")
    return value


def _sip_uri(value: str | None, key: str) -> str:
    if value is None:
        raise RoutingError(f"{key}: a SIP URI is required")
    try:
        uri = parse_uri(value.encode())
    except (SipError, ValueError) as exc:
        raise RoutingError(f"{key}: not a SIP URI: {value!r} ({exc})") from None
    if not isinstance(uri, SipURI):
        raise RoutingError(f"{key}: not a sip: or sips: URI: {value!r}")
    return value


def _rule_lines(text: str) -> list[int]:
    """The line of each ``[[routing.rules]]`` header, in order."""
    return [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*routing\.rules\s*\]\]", line)]


def _table_line(text: str, name: str) -> int | str:
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"\s*\[\s*" + re.escape(name) + r"\s*\]", line):
            return n
    return "?"
