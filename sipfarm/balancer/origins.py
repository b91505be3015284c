"""Which web pages may open a SIP WebSocket to the balancer: the ``Origin`` check.

Browsers send the origin of the page that opens a WebSocket (RFC 6455 4.1, 10.2), and a page
anywhere on the web can open one to any address: without a check, any site a user visits
can make the user's browser talk SIP to the farm (cross-site WebSocket hijacking).  The
check only means something for browsers; other clients choose their Origin, or send none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class OriginPolicy:
    """Which ``Origin`` values may open a WebSocket: exact origins (scheme://host[:port],
    compared case-insensitively, RFC 6454 6.2) or ``scheme://*.domain`` for any subdomain."""

    def __init__(self, origins: Sequence[str] = (), *, require: bool = False) -> None:
        self.require = require
        patterns: list[str] = []
        exact: set[str] = set()
        for origin in origins:
            value = origin.strip().rstrip("/").lower()
            scheme, sep, host = value.partition("://")
            if not sep or not scheme or not host or "/" in host:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
            if "*" in host:
                if not host.startswith("*.") or "*" in host[2:]:
                    raise ValueError(f"{origin!r}: a wildcard may only start the host (*.example.net)")
                patterns.append(re.escape(f"{scheme}://") + r"[^/:.]+(?:\.[^/:.]+)*" + re.escape(host[1:]))
            else:
                exact.add(value)
        self.exact = frozenset(exact)
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    @property
    def any_origin(self) -> bool:
        return not self.exact and self._pattern is None

    def allows(self, origin: str | None) -> bool:
        if origin is None:
            return not self.require
        if self.any_origin:
            return True
        value = origin.strip().lower()
        return value in self.exact or (self._pattern is not None and self._pattern.fullmatch(value) is not None)
