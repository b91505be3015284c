"""pjsua2 softphones register and call through the balancer in front of two nodes (UDP, TCP)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.farm import wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from peers.calls import call_with_tones
from peers.netns import skip_reason

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 90),
]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_call_through_the_balancer(redis_url, accounts, start_node, start_balancer, tmp_path: Path, transport):
    node1 = start_node(redis_url, "node1")
    node2 = start_node(redis_url, "node2")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 2)
    registrar = f"127.0.0.1:{lb.port}"
    call_with_tones(registrar, registrar, transport, accounts, tmp_path)
    assert node1.process.poll() is None and node2.process.poll() is None and lb.process.poll() is None
