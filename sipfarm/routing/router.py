"""The proxy's single routing step: Request-URI in, decision out.

Every lookup that decides where an initial request goes happens here, behind one callback-style
method, so rules that need I/O (an LDAP directory, an external helper program or HTTP service,
a static cluster table) plug in without touching the proxy: :meth:`Router.route` calls ``done``
with a :class:`Decision`, now or later.  Today's router serves the node's own domains: a
request for one of them is looked up in the location service; anything else is refused (403).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from sipfarm.sip.message import SipMessage
from sipfarm.sip.uri import URI, SipURI


class Action(enum.Enum):
    LOCAL = "local"  # a user of a served domain: location lookup (404 / 480 when absent)
    REJECT = "reject"  # answer ``status`` with ``reason``
    FORWARD = "forward"  # send to ``uri`` (a gateway, voicemail, another group): future rules


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    aor: str = ""  # LOCAL: user@domain
    user: str = ""
    domain: str = ""
    status: int = 0  # REJECT
    reason: str = ""
    uri: str = ""  # FORWARD


class Router:
    """Serves ``domains``; everything else is refused until routing rules say otherwise."""

    def __init__(self, domains: frozenset[str]) -> None:
        self.domains = domains

    def route(self, request: SipMessage, uri: URI, done: Callable[[Decision], None]) -> None:
        done(self.decide(uri))

    def decide(self, uri: URI) -> Decision:
        if not isinstance(uri, SipURI) or uri.host not in self.domains:
            return Decision(Action.REJECT, status=403, reason="not a local domain")
        if uri.user is None:
            return Decision(Action.REJECT, status=404, reason="no user in Request-URI")
        user = uri.user_unescaped or ""
        return Decision(Action.LOCAL, aor=uri.aor, user=user, domain=uri.host)
