"""The node's per-message metrics count in compiled counters (sipfarm.counters) and are exported
at scrape time: a scrape must read exactly as prometheus-client's own Counter and Histogram
did (names, types, help, labels, values, ``_created``), the label values off the wire stay
bounded, and a worker's counts reach the multiprocess files its supervisor serves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sipfarm.metrics import LATENCY_BUCKETS, LabelCache, NodeMetrics

# what the node recorded before, for the same figures, and how it recorded them
DURATIONS = [0.0001, 0.0005, 0.0007, 0.001, 0.003, 0.02, 0.2, 0.5, 2.5, 2.6, 30.0, 0.0]
METHODS = [b"REGISTER", b"INVITE", b"ACK", b"REGISTER", b"BYE", b"x-Custom.method!", b"REGISTER", b"\xe9T\xe9"]
STATUSES = [401, 200, 100, 180, 200, 487, 200, 503, 699]
NATIVE_NAMES = (
    "sipfarm_node_requests",
    "sipfarm_node_responses",
    "sipfarm_node_register_seconds",
    "sipfarm_node_invite_seconds",
    "sipfarm_node_redis_seconds",
)


class PrometheusClientNode:
    """The five metrics as prometheus-client objects, fed as the call sites fed them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
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
        self.redis_seconds = Histogram(
            "sipfarm_node_redis_seconds", "Redis round-trip time", buckets=LATENCY_BUCKETS, registry=r
        )


def feed_old(old: PrometheusClientNode) -> None:
    for method in METHODS:
        old.requests(method.decode("latin-1")).inc()
    for status in STATUSES:
        old.responses(status).inc()
    for i, seconds in enumerate(DURATIONS):
        old.register_seconds.observe(seconds)
        old.redis_seconds.observe(seconds / 3)
        if i % 2:
            old.invite_seconds.observe(seconds * 7)


def feed_new(new: NodeMetrics) -> None:
    for method in METHODS:
        new.requests.inc(method)
    for status in STATUSES:
        new.responses.inc(status)
    for i, seconds in enumerate(DURATIONS):
        new.register_seconds.observe(seconds)
        new.redis_seconds.observe(seconds / 3)
        if i % 2:
            new.invite_seconds.observe(seconds * 7)


def native_families(text: str) -> list[str]:
    """The exposition lines of the five metrics, each _created value checked and blanked."""
    lines = []
    now = time.time()
    for line in text.splitlines():
        if line == "# EOF":
            continue
        name = line.split(" ")[2] if line.startswith("#") else re.split(r"[{ ]", line, maxsplit=1)[0]
        if not name.startswith(NATIVE_NAMES):
            continue
        if "_created" in line and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            assert now - 60 < float(value) <= now + 1, line
            line = head + " <created>"
        lines.append(line)
    return lines


@pytest.mark.parametrize("render", [generate_latest, generate_openmetrics], ids=["text", "openmetrics"])
def test_a_scrape_reads_as_prometheus_client_made_it(render):
    old, new = PrometheusClientNode(), NodeMetrics()
    feed_old(old)
    feed_new(new)
    expected = native_families(render(old.registry).decode())
    got = native_families(render(new.registry).decode())
    assert len(expected) > 80  # every family, label and bucket of the five is in the comparison
    assert got == expected


def test_nothing_counted_reads_as_nothing_counted():
    old, new = PrometheusClientNode(), NodeMetrics()
    assert native_families(generate_latest(new.registry).decode()) == native_families(
        generate_latest(old.registry).decode()
    )


def test_the_families_keep_their_place_among_the_others():
    text = generate_latest(NodeMetrics().registry).decode()
    names = [name for name in re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE) if not name.endswith("_created")]
    # registered where the prometheus-client objects were (a scrape lists them in that order)
    assert names[:7] == [
        "sipfarm_node_requests_total",
        "sipfarm_node_responses_total",
        "sipfarm_node_registrations",
        "sipfarm_node_registered_aors",
        "sipfarm_node_register_seconds",
        "sipfarm_node_invite_seconds",
        "sipfarm_node_transactions",
    ]
    assert "sipfarm_node_redis_seconds" in names


def test_methods_off_the_wire_stay_bounded():
    metrics = NodeMetrics()
    for i in range(5000):  # a flood of distinct extension methods
        metrics.requests.inc(b"X%d" % i)
    metrics.requests.inc(b"other")  # a method that happens to be named like the overflow
    samples = [
        line
        for line in generate_latest(metrics.registry).decode().splitlines()
        if line.startswith("sipfarm_node_requests_total{")
    ]
    assert len(samples) <= 65
    assert sum(float(line.rpartition(" ")[2]) for line in samples) == 5001
    assert len(metrics.requests.counts) <= 65


MULTIPROCESS_WORKER = textwrap.dedent(
    """
    import json, sys
    from prometheus_client import CollectorRegistry, generate_latest
    from sipfarm.metrics import NodeMetrics, multiprocess_registry

    def feed(m, rounds):
        for r in range(rounds):
            for method in (b"REGISTER", b"INVITE", b"REGISTER"):
                m.requests.inc(method)
            m.responses.inc(200 + r % 2)
            m.register_seconds.observe(0.0007 * (r + 1))
            m.redis_seconds.observe(0.3 * r)
            m.invite_seconds.observe(0.01)

    worker = NodeMetrics(multiprocess=True)
    reference = NodeMetrics(registry=CollectorRegistry())  # scraped live, as a one-process node
    feed(worker, 3)
    worker.flush()
    feed(worker, 4)  # counted since the last flush: not in the files until the next one
    before = generate_latest(multiprocess_registry()).decode()
    worker.flush()
    worker.flush()  # nothing new: nothing added twice
    feed(reference, 3)
    feed(reference, 4)
    json.dump({
        "before": before,
        "after": generate_latest(multiprocess_registry()).decode(),
        "reference": generate_latest(reference.registry).decode(),
    }, sys.stdout)
    """
)


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(NATIVE_NAMES) and "_created" not in line:
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_a_workers_counts_reach_the_multiprocess_files_at_each_flush(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_WORKER], env=env, capture_output=True, timeout=60, check=True
    )
    pages = json.loads(run.stdout)
    reference = samples(pages["reference"])
    assert reference['sipfarm_node_requests_total{method="REGISTER"}'] == 14
    assert samples(pages["after"]) == reference  # the supervisor's sums, to the last bucket
    before = samples(pages["before"])
    assert before['sipfarm_node_requests_total{method="REGISTER"}'] == 6  # the first flush only
    assert before["sipfarm_node_register_seconds_count"] == 3
