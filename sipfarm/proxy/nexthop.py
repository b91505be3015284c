"""Next hops of a proxied request (RFC 3263 as far as a farm needs it), without blocking.

IP literals, cached names (A/AAAA through the injected resolver), ``maddr``, the URI's
transport and port or the transport's default.  An unknown name raises :class:`Unresolved`
once its resolution has started; the proxy retries when the answer comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sipfarm.edge import is_ip_literal
from sipfarm.sip.address import Address
from sipfarm.sip.uri import SipURI, URIError
from sipfarm.sip.via import default_port


class NameResolver(Protocol):
    def cached(self, host: str) -> str | None: ...

    def resolve(self, host: str, done: Callable[[str | None], None]) -> None: ...


class Unresolved(Exception):
    """A next hop names a host not resolved yet (its resolution has to be started)."""

    def __init__(self, host: str, transport: str, port: int) -> None:
        super().__init__(host)
        self.host = host
        self.transport = transport
        self.port = port


def uri_destination(uri: object, resolver: NameResolver, domains: frozenset[str]) -> Address:
    """The address ``uri`` sends to (raises Unresolved, or URIError for a known-bad one)."""
    if not isinstance(uri, SipURI):
        raise URIError("next hop is not a SIP URI")
    transport = uri.transport
    host = uri.param("maddr") or uri.host
    host = host.strip("[]")
    port = uri.port or default_port(transport)
    if not is_ip_literal(host):
        if host in domains:
            # a served domain names the farm's users, never a next hop (e.g. the ACK of a
            # stateless 407 has the callee's AOR as Request-URI): nothing to look up
            raise URIError(f"{host} is a served domain, not a next hop")
        ip = resolver.cached(host)
        if ip is None:
            raise Unresolved(host, transport, port)
        if not ip:
            raise URIError(f"cannot resolve {host!r}")
        host = ip
    return Address(transport, host, port)
