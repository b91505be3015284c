"""Counters of the transport layer, read by the Prometheus collector (which owns the metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")


def _per_transport() -> dict[str, int]:
    return dict.fromkeys(TRANSPORTS, 0)


@dataclass(slots=True)
class TransportStats:
    """Monotonic integer counters; dict fields are counters keyed by a label value."""

    # messages parsed and handed to the callback / sent (or queued on a connecting flow)
    received: dict[str, int] = field(default_factory=_per_transport)
    sent: dict[str, int] = field(default_factory=_per_transport)
    # parse and framing errors by SipError.counter ("bad_message", "too_large", "dropped", ...)
    parse_errors: dict[str, int] = field(default_factory=dict)
    error_responses: int = 0  # answers sent for parse errors and rejected messages
    rejected: dict[str, int] = field(default_factory=dict)  # SipErrors raised by the callback
    callback_errors: int = 0  # unexpected exceptions raised by the callback
    internal_errors: int = 0  # unexpected exceptions in parsing (a parser bug)
    dropped: int = 0  # outbound messages not sent: no route, buffer full, connect failed
    no_flow: int = 0  # subset: sent with connect=False (responses) and no open connection
    send_errors: int = 0  # errors the OS reported on sending (ICMP unreachable, ...)
    keepalive_pings: int = 0  # RFC 5626 CRLFCRLF on streams (one pong a read), CRLF and STUN on UDP
    stun_answered: int = 0  # subset: STUN Binding requests answered on UDP (RFC 5626 4.4.2)
    stun_dropped: dict[str, int] = field(default_factory=dict)  # other STUN-shaped datagrams, by reason
    connections_opened: int = 0  # inbound and outbound, once established
    connections_closed: int = 0  # every close of an established connection, for any reason
    connections_closed_abuse: int = 0  # subset: framing error, oversize, stalled, slow reader, ping flood
    abuse: dict[str, int] = field(default_factory=dict)  # the same, by reason
    connections_idle_closed: int = 0  # subset: idle timeout
    # TCP connections whose peer shut down its write side while answers were owed to it: kept
    # open for writing them (closed when done, or at half_closed_timeout: the subset below)
    half_closed: int = 0
    half_closed_timeouts: int = 0
    connections_refused: int = 0  # over max_connections (inbound or outbound) or a per-source limit
    # inbound connections refused, or closed before their first message, by reason: total
    # and per_source (the limits; also in connections_refused), origin (a WebSocket Origin
    # not allowed, answered 403), handshake_timeout (TLS handshake or WebSocket upgrade not
    # completed in time), handshake_failed (a TLS error), silent (no message within
    # first_message_timeout), evicted (no message yet, closed for a new source at
    # max_connections)
    refused: dict[str, int] = field(default_factory=dict)
    connect_failures: int = 0  # outbound connect / TLS handshake failures and timeouts

    def flat(self) -> dict[str, int]:
        """Every counter as ``name`` or ``name_label`` -> value (for logs and tests)."""
        out: dict[str, int] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, dict):
                for label, count in value.items():
                    out[f"{name}_{label}"] = count
            else:
                out[name] = value
        return out


def bump(counters: dict[str, int], key: str) -> None:
    counters[key] = counters.get(key, 0) + 1
