"""REGISTER semantics without I/O: what a REGISTER asks (RFC 3261 10.3) and the 200 OK it gets.

``read_register`` turns a request into the updates the location store applies atomically;
``register_ok`` builds the answer listing every live binding with its remaining expiry.
Policy violations raise the SipError the registrar answers with (400, 403, 423).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sipfarm.sip.errors import BadMessage, Forbidden, IntervalTooBrief, UnsupportedURIScheme
from sipfarm.sip.headers import get_param, parse_uint, unquote_string
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.uri import SipURI
from sipfarm.store.location import Binding, ContactUpdate

#: the longest +sip.instance a REGISTER may set, in UTF-8 bytes (a temporary GRUU carries it)
MAX_INSTANCE_BYTES = 255
# a binding's Path (RFC 3327), at most: the farm's own edge writes one or two entries of ~100
# bytes (a proxy of the operator's in front adds a few); each request to the binding carries
# it as its Route, per branch, so an attacker's 57 KB Path came back ~3,800-fold (red team,
# 2026-12-03)
MAX_PATH_ENTRIES: Final = 8
MAX_PATH_BYTES: Final = 2048


@dataclass(frozen=True, slots=True)
class ExpiresPolicy:
    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600


class RegisterRequest:
    """What a REGISTER asks for (immutable: Final attributes; a plain class, not a frozen
    dataclass, whose generated __init__ costs ~15x a compiled one: one per REGISTER)."""

    def __init__(
        self,
        aor: str,
        user: str,
        domain: str,
        updates: tuple[ContactUpdate, ...],
        remove_all: bool,
        path: tuple[str, ...],
        outbound: bool,
    ) -> None:
        self.aor: Final = aor  # user@domain, escapes resolved
        self.user: Final = user
        self.domain: Final = domain
        self.updates: Final = updates
        self.remove_all: Final = remove_all  # Contact: * with Expires: 0
        self.path: Final = path  # RFC 3327 Path values, top first
        self.outbound: Final = outbound  # any contact carries +sip.instance and reg-id (RFC 5626)

    # value semantics, as the frozen dataclass had
    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegisterRequest) and (
            self.aor,
            self.user,
            self.domain,
            self.updates,
            self.remove_all,
            self.path,
            self.outbound,
        ) == (other.aor, other.user, other.domain, other.updates, other.remove_all, other.path, other.outbound)

    def __hash__(self) -> int:
        return hash((self.aor, self.user, self.domain, self.updates, self.remove_all, self.path, self.outbound))

    def __repr__(self) -> str:
        return f"RegisterRequest({self.aor!r}, updates={self.updates!r}, remove_all={self.remove_all})"

    @property
    def is_query(self) -> bool:
        return not self.updates and not self.remove_all


def read_register(request: SipMessage, domains: frozenset[str], policy: ExpiresPolicy) -> RegisterRequest:
    """RFC 3261 10.3 steps 1-7 as far as they need no state: AOR, Contacts, expiries."""
    to_uri = request.name_addr_uri("to")
    if not isinstance(to_uri, SipURI):
        raise UnsupportedURIScheme("To of a REGISTER must be a SIP URI", partial=request)
    if to_uri.user is None:
        raise BadMessage("To of a REGISTER has no user", partial=request)
    if to_uri.host not in domains:
        # step 3: the registrar is not responsible for this domain
        raise Forbidden("not a domain of this registrar", partial=request)
    user = to_uri.user_unescaped or ""
    header_expires: int | None = None
    raw_expires = request.get("expires")
    if raw_expires is not None:
        header_expires = parse_uint(raw_expires, "Expires", 2**32 - 1)
    contacts = request.values("contact")
    path = tuple(v.decode("latin-1") for v in request.values("path"))
    if len(path) > MAX_PATH_ENTRIES or sum(len(v) for v in path) > MAX_PATH_BYTES:
        raise Forbidden("Path too long", partial=request)
    if contacts == [b"*"] or b"*" in contacts:
        # step 6: "*" only alone and only with Expires: 0
        if len(contacts) != 1 or header_expires != 0:
            raise BadMessage("Contact * needs Expires: 0 and no other Contact", partial=request)
        return RegisterRequest(to_uri.aor, user, to_uri.host, (), True, path, False)
    updates: list[ContactUpdate] = []
    outbound = False
    for na in request.name_addrs("contact"):
        expires_param = na.param("expires")
        if expires_param is not None:
            try:
                expires = parse_uint(expires_param.encode(), "expires", 2**32 - 1)
            except ValueError:
                expires = policy.default_expires  # RFC 3261 20.19: malformed -> default
        elif header_expires is not None:
            expires = header_expires
        else:
            expires = policy.default_expires
        if 0 < expires < policy.min_expires:
            # RFC 3261 10.3 step 7: reject with 423 and Min-Expires
            raise IntervalTooBrief(
                "expiry below the minimum",
                partial=request,
                headers=(("min-expires", str(policy.min_expires).encode()),),
            )
        expires = min(expires, policy.max_expires)
        q = 1.0
        q_param = na.param("q")
        if q_param:
            try:
                q = float(q_param)
            except ValueError:
                raise BadMessage("bad q value in Contact", partial=request) from None
            if not 0.0 <= q <= 1.0:
                raise BadMessage("q value out of range in Contact", partial=request)
        uri = na.uri
        if isinstance(uri, SipURI) and uri.host in domains and uri.param("gr") is not None:
            # RFC 5627 5.1: a GRUU of ours is not a contact (it would route back to the farm)
            raise Forbidden("a GRUU cannot be registered as a Contact", partial=request)
        instance = get_param(na.params, "+sip.instance")
        if instance is not None:
            instance = unquote_string(instance) or None
            if instance is not None and len(instance.encode("utf-8")) > MAX_INSTANCE_BYTES:
                # a URN of a few dozen characters (RFC 5626 4.1): a longer one is stored in
                # every binding and encrypted into every temporary GRUU
                raise BadMessage("+sip.instance too long", partial=request)
        reg_id: int | None = None
        reg_id_param = na.param("reg-id")
        if reg_id_param:
            if not reg_id_param.isdigit():
                raise BadMessage("bad reg-id in Contact", partial=request)
            reg_id = int(reg_id_param)
        if instance and reg_id is not None:
            outbound = True
        updates.append(ContactUpdate(str(na.uri), expires, q, instance, reg_id))
    return RegisterRequest(to_uri.aor, user, to_uri.host, tuple(updates), False, path, outbound)


def register_ok(
    request: SipMessage,
    bindings: tuple[Binding, ...] | list[Binding],
    now: float,
    to_tag: bytes,
    *,
    outbound: bool = False,
    gruu: Callable[[Binding], str] | None = None,
    flow_timer: int | None = None,
) -> SipMessage:
    """200 OK listing every current binding with its remaining expiry (RFC 3261 10.3 step 8).

    ``gruu``: the ``;pub-gruu=...;temp-gruu=...`` of a binding (RFC 5627 5.2), given when the
    UA supports GRUU. ``flow_timer``: the keepalive interval of an outbound flow (RFC 5626 5.4).
    """
    headers: list[tuple[str, bytes | str]] = []
    for b in bindings:
        value = f"<{b.contact}>;expires={b.expires_in(now)}"
        if b.q != 1.0:
            value += f";q={b.q:g}"
        if b.instance:
            value += f';+sip.instance="{b.instance}"'
        if b.reg_id is not None:
            value += f";reg-id={b.reg_id}"
        if gruu is not None and b.instance:
            value += gruu(b)
        headers.append(("contact", value))
    # RFC 3327 5.3: the registrar echoes Path when the UA supports it.
    supported = b",".join(request.get_all("supported")).lower()
    if supported.find(b"path") >= 0:
        headers.extend(("path", p) for p in request.values("path"))
    if outbound:
        headers.append(("require", b"outbound"))  # RFC 5626 6
        if flow_timer is not None:
            headers.append(("flow-timer", str(flow_timer).encode()))  # RFC 5626 5.4
    return make_response(request, 200, to_tag=to_tag, headers=headers)
