"""Micro-benchmark of the node's per-message metrics: prometheus-client's ``Counter.labels(x).inc()``
(through the node's ``LabelCache``) and ``Histogram.observe()`` against the compiled counters of
sipfarm.counters that replaced them.  CPU time (time.process_time), best of --repeat runs, in ns per
call, the empty loop subtracted.  Run it against the compiled build:

    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled:. .venv/bin/python -m benchmarks.metrics_bench
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, Histogram

import sipfarm.counters
from sipfarm.metrics import LATENCY_BUCKETS, LabelCache, NodeMetrics

METHODS = [b"REGISTER", b"REGISTER", b"INVITE", b"ACK", b"BYE", b"OPTIONS", b"REGISTER", b"INVITE"]
STATUSES = [401, 200, 100, 180, 200, 200, 407, 200]
SECONDS = [0.0004, 0.0008, 0.0012, 0.003, 0.0006, 0.02, 0.0009, 0.0002]


def best_ns(run: Callable[[int], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run(n)
        best = min(best, time.process_time() - start)
    return best / (n * len(METHODS)) * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50_000, help="loop turns per run (x8 calls)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    r = CollectorRegistry()
    requests = LabelCache(Counter("bench_requests_total", "d", ["method"], registry=r))
    responses = LabelCache(Counter("bench_responses_total", "d", ["status"], registry=r))
    histogram = Histogram("bench_seconds", "d", buckets=LATENCY_BUCKETS, registry=r)
    native = NodeMetrics()

    def empty(n: int) -> None:
        for _ in range(n):
            for _m in METHODS:
                pass

    def old_request(n: int) -> None:
        for _ in range(n):
            for m in METHODS:
                requests(m.decode("latin-1")).inc()

    def new_request(n: int) -> None:
        inc = native.requests.inc
        for _ in range(n):
            for m in METHODS:
                inc(m)

    def old_response(n: int) -> None:
        for _ in range(n):
            for s in STATUSES:
                responses(s).inc()

    def new_response(n: int) -> None:
        inc = native.responses.inc
        for _ in range(n):
            for s in STATUSES:
                inc(s)

    def old_observe(n: int) -> None:
        observe = histogram.observe
        for _ in range(n):
            for v in SECONDS:
                observe(v)

    def new_observe(n: int) -> None:
        observe = native.register_seconds.observe
        for _ in range(n):
            for v in SECONDS:
                observe(v)

    compiled = (sipfarm.counters.__file__ or "").endswith(".so")
    print(f"sipfarm.counters compiled: {compiled}; ns per call (CPU), best of {args.repeat}, empty loop subtracted")
    base = best_ns(empty, args.calls, args.repeat)
    for what, old, new in (
        ("requests(method).inc()", old_request, new_request),
        ("responses(status).inc()", old_response, new_response),
        ("histogram.observe()", old_observe, new_observe),
    ):
        old_ns = best_ns(old, args.calls, args.repeat) - base
        new_ns = best_ns(new, args.calls, args.repeat) - base
        print(f"  {what:26s} prometheus-client {old_ns:7.0f}  compiled {new_ns:6.0f}  ratio {old_ns / new_ns:5.1f}x")


if __name__ == "__main__":
    main()
