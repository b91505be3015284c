"""benchmarks/balancer_bench.py: the captured SIPp call still replays through the balancer."""

from __future__ import annotations

import json

from benchmarks.balancer_bench import CAPTURE, prepare, run


def test_captured_call_is_forwarded_where_the_capture_says() -> None:
    capture = json.loads(CAPTURE.read_text())
    ports = {k: int(v) for k, v in capture.items() if k != "messages"}
    incoming, expected = prepare(capture)  # exits when a datagram is not forwarded
    assert len(incoming) == len(expected) == 16
    result = run(incoming, expected, 20, ports)  # exits when one goes elsewhere than captured
    assert result["calls"] == 19
