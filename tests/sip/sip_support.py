"""Shared by the property tests and the fuzz target: every accessor a handler might call on a
parsed message; only SipError may come out of any of them."""

from __future__ import annotations

from collections.abc import Callable

from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage, error_response, make_response
from sipfarm.sip.parser import validate_request


def exercise(msg: SipMessage) -> None:
    accessors: list[Callable[[], object]] = [
        lambda: msg.top_via,
        lambda: msg.top_via_value,
        lambda: msg.vias,
        lambda: msg.from_,
        lambda: msg.to,
        lambda: msg.from_tag,
        lambda: msg.to_tag,
        lambda: msg.call_id,
        lambda: msg.values("contact"),
        lambda: msg.name_addrs("contact"),
        lambda: msg.values("route"),
        lambda: msg.name_addrs("route"),
        lambda: msg.name_addrs("record-route"),
        lambda: msg.top_via.response_address(),
        lambda: repr(msg),
    ]
    if msg.is_request:
        accessors += [
            lambda: msg.request_uri,
            lambda: validate_request(msg),
            lambda: make_response(msg, 200, to_tag=b"t").to_bytes(),
            lambda: error_response(msg, SipError("x"), b"t"),
        ]
    for access in accessors:
        try:
            access()
        except SipError:
            pass
