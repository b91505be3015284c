"""Which media relay holds a call: one small Redis hash per anchored call.

    sipfarm:media:{<Call-ID>}   hash: offerer's tag -> relay ng address "IP:PORT"; TTL
                                RECORD_SECONDS of sipfarm.proxy.relay_media, refreshed by each
                                in-dialog offer; deleted with the call (BYE, CANCEL, failure)

Written by the node that anchored the call (or an in-dialog offer), read by any node that
handles a later offer, answer or the end of the call (its ng goes to that relay).  The braces
make the key its own hash slot in Redis Cluster.  A Call-ID or tag over ``MAX_RECORDED`` bytes
is written as a hash of it (:func:`recorded`).
"""

from __future__ import annotations

import hashlib

PREFIX = b"sipfarm:media:{"
#: the longest Call-ID or tag written into the record as it is; a longer one (off the wire:
#: 40 kB Call-IDs made 61 kB records kept for 4 hours, red team D 2026-12-02) is written as
#: "#" and an unkeyed BLAKE2b-128 of it, the same on every node
MAX_RECORDED = 64


def recorded(value: bytes) -> bytes:
    """``value`` (a Call-ID or tag) as the record holds it: bounded, the same on every node."""
    if len(value) <= MAX_RECORDED:
        return value
    return b"#" + hashlib.blake2b(value, digest_size=16).hexdigest().encode()


def call_relay_key(call_id: bytes) -> bytes:
    return PREFIX + recorded(call_id) + b"}"


def recorded_relay(values: object) -> str | None:
    """The relay a call's hash names (any of its tags: one relay per call), or None."""
    if isinstance(values, list):
        for value in values:
            if isinstance(value, bytes) and value:
                return value.decode("latin-1")
    return None
