"""Which media relay holds a call: one small Redis hash per anchored call.

    sipfarm:media:{<Call-ID>}   hash: offerer's tag -> relay ng address "IP:PORT"; TTL
                                RECORD_SECONDS of sipfarm.proxy.relay_media, refreshed by each
                                in-dialog offer; deleted with the call (BYE, CANCEL, failure)

Written by the node that anchored the call (or an in-dialog offer), read by any node that
handles a later offer, answer or the end of the call (its ng goes to that relay).  The braces
make the key its own hash slot in Redis Cluster.
"""

from __future__ import annotations

PREFIX = b"sipfarm:media:{"


def call_relay_key(call_id: bytes) -> bytes:
    return PREFIX + call_id + b"}"


def recorded_relay(values: object) -> str | None:
    """The relay a call's hash names (any of its tags: one relay per call), or None."""
    if isinstance(values, list):
        for value in values:
            if isinstance(value, bytes) and value:
                return value.decode("latin-1")
    return None
