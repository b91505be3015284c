"""Prometheus metrics, named ``sipfarm_<component>_<what>_<unit>``.

Each process builds its metrics in its own registry (two nodes in one test process do not
collide).  A node with several workers runs prometheus-client's multiprocess mode: the workers
write to files under ``PROMETHEUS_MULTIPROC_DIR`` and the parent serves the aggregate.
Label children are cached so the hot path pays one dict look-up and one increment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LabelCache:
    """``metric.labels(x)`` is slow-ish; keep the children."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[object, Any] = {}

    def __call__(self, *labels: object) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._metric.labels(*[str(v) for v in labels])
            if len(self._children) < 1024:  # bounded: hostile methods must not grow it
                self._children[labels] = child
        return child


def _gauge(name: str, doc: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()) -> Gauge:
    # In multiprocess mode the parent sums the live workers' values.
    return Gauge(name, doc, labels, registry=registry, multiprocess_mode="livesum")


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = LabelCache(
            Counter("sipfarm_node_requests_total", "SIP requests received, by method", ["method"], registry=r)
        )
        self.responses = LabelCache(
            Counter(
                "sipfarm_node_responses_total",
                "SIP responses sent by the node (its own and forwarded), by status",
                ["status"],
                registry=r,
            )
        )
        self.registrations = _gauge("sipfarm_node_registrations", "Registered bindings in the farm", r)
        self.registered_aors = _gauge("sipfarm_node_registered_aors", "AORs with a live binding", r)
        self.register_seconds = Histogram(
            "sipfarm_node_register_seconds",
            "REGISTER handling time, receipt to final response",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.invite_seconds = Histogram(
            "sipfarm_node_invite_seconds",
            "INVITE routing time, receipt to forwarded (or rejected)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transactions = _gauge("sipfarm_node_transactions", "Transactions in flight", r)
        self.auth_failures = LabelCache(
            Counter("sipfarm_node_auth_failures_total", "Failed digest authentications", ["reason"], registry=r)
        )
        self.bans = Counter(
            "sipfarm_node_auth_bans_total", "Source addresses banned for failed authentications", registry=r
        )
        self.account_alerts = Counter(
            "sipfarm_node_auth_account_alerts_total", "Accounts crossing the failure alert threshold", registry=r
        )
        self.parse_errors = LabelCache(
            Counter("sipfarm_node_parse_errors_total", "Malformed messages, by kind", ["kind"], registry=r)
        )
        self.redis_seconds = Histogram(
            "sipfarm_node_redis_seconds", "Redis round-trip time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.redis_errors = Counter("sipfarm_node_redis_errors_total", "Failed Redis commands", registry=r)
        # unacked_writes: REGISTER writes answered 503 because fewer than [node] replicas_ack
        # replicas confirmed them in time; cluster_redirects: MOVED/ASK followed;
        # cluster_map_refreshes: CLUSTER SLOTS read again (start, MOVED, a master lost);
        # redis+sentinel://: sentinel_master_changes (a new master found on reconnect),
        # sentinel_switch_master (+switch-master heard), sentinel_failures (a sentinel that did
        # not answer or know the service), sentinel_not_master (a named master that was not)
        self.redis_events = LabelCache(
            Counter(
                "sipfarm_node_redis_events_total",
                "Redis client events: unacked_writes, cluster_redirects, cluster_map_refreshes, "
                "sentinel_master_changes, sentinel_switch_master, sentinel_failures, sentinel_not_master",
                ["kind"],
                registry=r,
            )
        )
        self.errors = LabelCache(
            Counter("sipfarm_node_errors_total", "Requests failed with a SIP error, by kind", ["kind"], registry=r)
        )
        self.internal_errors = Counter(
            "sipfarm_node_internal_errors_total", "Unexpected exceptions in message handling", registry=r
        )
        self.media = LabelCache(
            Counter(
                "sipfarm_node_media_total",
                "SDP offers and answers through the media relays, by outcome (anchored, "
                "unanchored_webrtc, failed_503, failed_forward, answer_failed, relay_timeout, relay_refused)",
                ["outcome"],
                registry=r,
            )
        )
        # messages dropped unanswered before parsing: unknown_source (a request, connection or
        # keep-alive from a source [node] accept_from does not name)
        self.dropped = LabelCache(
            Counter(
                "sipfarm_node_dropped_total",
                "Messages and connections dropped unanswered before parsing, by reason",
                ["reason"],
                registry=r,
            )
        )
        self.transport_events = LabelCache(
            Counter(
                "sipfarm_node_transport_events_total",
                "Transport events (messages, parse errors, connections), by kind",
                ["kind"],
                registry=r,
            )
        )


def serve_metrics(address: str, registry: CollectorRegistry) -> bool:
    """Serve ``/metrics`` on HOST:PORT from a background thread; False (logged) if it cannot
    bind: a busy metrics port must not stop a SIP process."""
    host, _, port = address.rpartition(":")
    try:
        start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    except OSError as exc:
        logging.getLogger("sipfarm.metrics").error(
            "event=metrics_unavailable address=%s error=%s", address, str(exc).replace(" ", "_")
        )
        return False
    return True


def multiprocess_registry() -> CollectorRegistry:
    """The parent's registry that sums its workers (needs PROMETHEUS_MULTIPROC_DIR)."""
    from prometheus_client import multiprocess  # noqa: PLC0415 - only in multiprocess mode

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def sync_counters(read: Callable[[], dict[str, int]], sink: LabelCache) -> Callable[[], None]:
    """Copy monotonically growing integer stats (e.g. a transport's) into a labelled Counter."""
    last: dict[str, int] = {}

    def sync() -> None:
        for key, value in read().items():
            delta = value - last.get(key, 0)
            if delta > 0:
                sink(key).inc(delta)
                last[key] = value

    return sync


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class BalancerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = LabelCache(
            Counter(
                "sipfarm_balancer_events_total",
                "Forwarded messages, failures and transport events, by kind",
                ["kind"],
                registry=r,
            )
        )
        self.nodes_usable = Gauge("sipfarm_balancer_nodes_usable", "Nodes the balancer dispatches to", registry=r)
        self.nodes_known = Gauge("sipfarm_balancer_nodes_known", "Nodes in the membership", registry=r)
        # static cluster ([balancer] groups): requests answered 503 for want of a node of their
        # group, and the usable nodes of each group the rules name
        self.group_unavailable = LabelCache(
            Counter(
                "sipfarm_balancer_group_unavailable_total",
                "Requests pinned to a node group with no usable node (answered 503), by group",
                ["group"],
                registry=r,
            )
        )
        self.group_nodes_usable = LabelCache(
            _gauge("sipfarm_balancer_group_nodes_usable", "Usable nodes of each group the rules name", r, ("group",))
        )
        # RFC 5626 keepalives of registered UDP phones: sent, answered, flows_expired (phones
        # unregistered for not answering), flows_learnt, registrations_ended, dropped_full
        self.keepalives = LabelCache(
            Counter(
                "sipfarm_balancer_keepalive_events_total",
                "OPTIONS keepalives to registered UDP phones and their outcomes, by kind",
                ["kind"],
                registry=r,
            )
        )
        self.keepalive_flows = _gauge("sipfarm_balancer_keepalive_flows", "Registered UDP flows watched", r)
        # front-end protection (sipfarm/balancer/frontdoor.py): banned (dropped, source banned),
        # rate_register/rate_invite/rate_other/rate_suspect (a budget exceeded: banned),
        # scanner (User-Agent: dropped, banned), unknown_domain (dropped), ban_started,
        # ban_write_failed, ban_read_failed
        self.protect = LabelCache(
            Counter(
                "sipfarm_balancer_protect_total",
                "Front-end protection decisions (drops, bans) by reason",
                ["reason"],
                registry=r,
            )
        )
        # connection limits and handshakes (sipfarm/transport/manager.py, balancer/websocket.py):
        # per_source and total (over max_connections_per_source / max_connections: closed at
        # accept, WebSocket answered 503), origin (WebSocket Origin not allowed: 403),
        # handshake_timeout (TLS handshake or WebSocket upgrade not done in time),
        # handshake_failed (TLS error), silent (no byte within first_message_timeout)
        self.connections_refused = LabelCache(
            Counter(
                "sipfarm_balancer_connections_refused_total",
                "Client connections refused or closed before their first message, by reason",
                ["reason"],
                registry=r,
            )
        )
        self.connections_open = _gauge(
            "sipfarm_balancer_connections_open", "Open client connections (TCP, TLS, WebSocket)", r
        )
        # overload shedding (sipfarm/balancer/overload.py): new requests answered 503 here,
        # by method; the admission control's events (admitted, answered, slow, late, diverted,
        # cuts); nodes at their limit now
        self.shed = LabelCache(
            Counter(
                "sipfarm_balancer_shed_total",
                "New INVITE/REGISTER answered 503 by the balancer: every node overloaded, by method",
                ["method"],
                registry=r,
            )
        )
        self.overload = LabelCache(
            Counter(
                "sipfarm_balancer_overload_events_total",
                "Admission control of new requests: admitted, answered, slow, late, diverted, cuts",
                ["kind"],
                registry=r,
            )
        )
        self.nodes_overloaded = _gauge("sipfarm_balancer_nodes_overloaded", "Nodes at their admission limit", r)
        self.bans_known = _gauge("sipfarm_balancer_bans_known", "Banned sources in the local copy of the bans", r)
        self.probe_rtt = Histogram(
            "sipfarm_balancer_probe_rtt_seconds",
            "OPTIONS probe round trip to nodes",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )


class RelayMetrics:
    """A media relay (``sipfarm relay``). Packet counters are synced from the relay's own
    totals once a second (never touched per packet)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("sipfarm_relay_sessions", "Calls (Call-IDs) holding media ports", registry=r)
        self.free_ports = Gauge("sipfarm_relay_free_ports", "Media ports of the range not in use", registry=r)
        self.open_ports = Gauge("sipfarm_relay_open_ports", "Media ports bound now", registry=r)
        self.packets = Counter(
            "sipfarm_relay_forwarded_packets_total", "RTP/RTCP packets received and forwarded", registry=r
        )
        self.bytes = Counter("sipfarm_relay_forwarded_bytes_total", "Bytes of the packets forwarded", registry=r)
        # reasons: no_destination (the other party has no address yet), unexpected_source
        # (after latching), malformed (not RTP/RTCP, or not the kind the port expects)
        self.drops = LabelCache(
            Counter("sipfarm_relay_dropped_packets_total", "Packets dropped, by reason", ["reason"], registry=r)
        )
        self.expired = Counter(
            "sipfarm_relay_expired_sessions_total", "Calls freed by the media timeout (no delete)", registry=r
        )
        self.ng_commands = LabelCache(
            Counter(
                "sipfarm_relay_ng_commands_total",
                "ng control messages answered, by command and result (ok, pong, error)",
                ["command", "result"],
                registry=r,
            )
        )
        # kinds: dropped (no cookie, duplicate in execution, too many in flight), internal
        # (unexpected exceptions, answered "internal error")
        self.ng_errors = LabelCache(
            Counter("sipfarm_relay_ng_errors_total", "ng messages not executed, by kind", ["kind"], registry=r)
        )
