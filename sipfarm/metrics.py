"""Prometheus metrics, named ``sipfarm_<component>_<what>_<unit>``.

Each process builds its metrics in its own registry (two nodes in one test process do not
collide).  A node with several workers runs prometheus-client's multiprocess mode: the workers
write to files under ``PROMETHEUS_MULTIPROC_DIR`` and the parent serves the aggregate.
Label children are cached so the hot path pays one dict look-up and one increment.

The metrics a node bumps on every message (requests, responses, the REGISTER, INVITE and Redis
timings) count in plain compiled counters (:mod:`sipfarm.counters`) instead, which a collector
turns into the same samples (names, types, labels, values, ``_created``) at scrape time.  In a
worker of a multi-process node (``--workers``) nothing is scraped from the worker itself:
:meth:`NodeMetrics.flush`, called once a second and at shutdown, copies the increments into
prometheus-client's multiprocess files, so the supervisor's figures for those metrics lag by at
most a second there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from sipfarm.counters import FixedHistogram, LabelledCounter

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


def _label(key: object) -> str:
    """The label value of a native counter's key, as ``LabelCache`` made it (bytes off the
    wire decoded as latin-1, anything else ``str``)."""
    return key.decode("latin-1") if isinstance(key, bytes) else str(key)


def _created_series() -> bool:
    # prometheus-client's own switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics)
    return bool(getattr(prometheus_metrics, "_use_created", True))


class NativeCounter:
    """A :class:`LabelledCounter` exposed as a prometheus-client ``Counter`` with one label
    would be: the same samples, made at scrape time.  In multiprocess mode (``mirror``) it is
    not registered; :meth:`flush` copies its increments into a real ``Counter`` instead."""

    def __init__(
        self, name: str, doc: str, label: str, registry: CollectorRegistry, *, limit: int, mirror: bool
    ) -> None:
        self.counter = LabelledCounter(limit, "other")
        self.name, self.doc, self.label = name, doc, label
        self._mirror: Counter | None = None
        self._flushed: dict[object, int] = {}
        if mirror:
            self._mirror = Counter(name, doc, [label], registry=registry)
        else:
            registry.register(self)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.doc, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        values: dict[str, tuple[float, float]] = {}
        for key, count, created in self.counter.snapshot():
            label = _label(key)  # "other" (the overflow) may also come off the wire: one sample
            before = values.get(label)
            values[label] = (before[0] + count, before[1]) if before else (float(count), created)
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        with_created = _created_series()
        for label, (value, created) in values.items():
            family.add_metric([label], value, created=created if with_created else None)
        yield family

    def flush(self) -> None:
        if self._mirror is None:
            return
        flushed = self._flushed
        for key, count, _created in self.counter.snapshot():
            delta = count - flushed.get(key, 0)
            if delta > 0:
                self._mirror.labels(_label(key)).inc(delta)
                flushed[key] = count


class NativeHistogram:
    """A :class:`FixedHistogram` exposed as a prometheus-client ``Histogram`` without labels
    would be (buckets, count, sum, created); mirrored like :class:`NativeCounter`."""

    def __init__(
        self, name: str, doc: str, registry: CollectorRegistry, *, buckets: tuple[float, ...], mirror: bool
    ) -> None:
        self.histogram = FixedHistogram(buckets)
        self.name, self.doc = name, doc
        self._les: list[str] = [floatToGoString(b) for b in self.histogram.bounds]  # type: ignore[no-untyped-call]
        self._mirror: Histogram | None = None
        self._flushed = ([0] * len(self._les), 0.0)
        if mirror:
            self._mirror = Histogram(name, doc, buckets=buckets, registry=registry)
        else:
            registry.register(self)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.doc)]

    def collect(self) -> Iterator[Metric]:
        counts, total = self.histogram.snapshot()
        cumulative: list[tuple[str, float]] = []
        acc = 0.0
        for le, count in zip(self._les, counts, strict=True):
            acc += count
            cumulative.append((le, acc))
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], cumulative, total)
        if _created_series():
            family.samples.append(Sample(self.name + "_created", {}, self.histogram.created, None, None))
        yield family

    def flush(self) -> None:
        if self._mirror is None:
            return
        counts, total = self.histogram.snapshot()
        before, before_total = self._flushed
        # prometheus-client has no bulk observe: add to its bucket and sum values directly
        buckets = self._mirror._buckets
        for i, (now, then) in enumerate(zip(counts, before, strict=True)):
            if now > then:
                buckets[i].inc(now - then)
        if total != before_total:
            self._mirror._sum.inc(total - before_total)
        self._flushed = (counts, total)


class NodeMetrics:
    """A node's metrics.  ``multiprocess``: a worker of a multi-process node, whose registry is
    never scraped (the supervisor reads the multiprocess files): call :meth:`flush` often."""

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._native: list[NativeCounter | NativeHistogram] = []

        def counter(name: str, doc: str, label: str, limit: int) -> LabelledCounter:
            export = NativeCounter(name, doc, label, r, limit=limit, mirror=multiprocess)
            self._native.append(export)
            return export.counter

        def histogram(name: str, doc: str) -> FixedHistogram:
            export = NativeHistogram(name, doc, r, buckets=LATENCY_BUCKETS, mirror=multiprocess)
            self._native.append(export)
            return export.histogram

        # per message: compiled counters (call sites pass the method's bytes, the status's int);
        # a request's method is any token off the wire: past 64 distinct ones, "other"
        self.requests = counter("sipfarm_node_requests_total", "SIP requests received, by method", "method", 64)
        self.responses = counter(
            "sipfarm_node_responses_total",
            "SIP responses sent by the node (its own and forwarded), by status",
            "status",
            1000,  # a status is 100-699
        )
        self.registrations = _gauge("sipfarm_node_registrations", "Registered bindings in the farm", r)
        self.registered_aors = _gauge("sipfarm_node_registered_aors", "AORs with a live binding", r)
        self.register_seconds = histogram(
            "sipfarm_node_register_seconds", "REGISTER handling time, receipt to final response"
        )
        self.invite_seconds = histogram(
            "sipfarm_node_invite_seconds", "INVITE routing time, receipt to forwarded (or rejected)"
        )
        self.transactions = _gauge("sipfarm_node_transactions", "Transactions in flight", r)
        self.transaction_bytes = _gauge(
            "sipfarm_node_transaction_bytes", "Message bytes the transactions in flight hold (max_transaction_bytes)", r
        )
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
        self.redis_seconds = histogram("sipfarm_node_redis_seconds", "Redis round-trip time")
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
        # the transaction layer's TransactionStats: rejected_full / rejected_memory are the 503s
        # a full table or byte budget (max_transactions, max_transaction_bytes) answered
        self.transaction_events = LabelCache(
            Counter(
                "sipfarm_node_transaction_events_total",
                "Transaction layer events (created, absorbed retransmissions, timeouts, stray responses, "
                "requests refused for a full table or byte budget), by event",
                ["event"],
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

    def flush(self) -> None:
        """Multiprocess mode: copy what the compiled counters counted since the last call into
        prometheus-client's files (the supervisor's figures lag by at most the period between
        calls: a second in ``sipfarm node``).  Nothing to do otherwise (scraped live)."""
        for export in self._native:
            export.flush()


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
        # changes of a node's state in the balancer's view (logged as event=node_<event>): joined,
        # left, down, up, draining, active, moved; a flapping node shows as down and up growing
        self.node_transitions = LabelCache(
            Counter(
                "sipfarm_balancer_node_transitions_total",
                "Changes of a node's state in the balancer's view, by event",
                ["event"],
                registry=r,
            )
        )
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
        # unregistered for not answering), flows_learnt, registrations_ended, dropped_full, too_long
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
        # (unexpected exceptions, answered "internal error"), refused (from a source [relay]
        # accept_from does not name: not executed, not answered)
        self.ng_errors = LabelCache(
            Counter("sipfarm_relay_ng_errors_total", "ng messages not executed, by kind", ["kind"], registry=r)
        )
