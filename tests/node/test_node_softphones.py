"""Real softphones (pjsua2) through two real nodes sharing one real redis-server.

alice registers at node 1, bob at node 2, both with digest auth. alice calls bob through node 1,
which finds bob's binding (stored by node 2) in Redis, forks to him and Record-Routes; bob
auto-answers. Each side plays its own tone (alice 660 Hz, bob 440 Hz) and records the other, so a
recording proves audio crossed in that direction. Over UDP and over TCP; TCP also with both phones
on one node, which keeps the TCP dialog and media path covered while the two-node TCP call fails
on a node bug (``CROSS_NODE_FLOW``).

pjsip puts the default-route interface address in SDP, so these tests only run in a network
namespace where ``lo`` is the only interface (``scripts/in-netns.sh`` runs pytest in one as root).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.farm import DOMAIN
from fixtures.startup import START_TIMEOUT_S
from peers.calls import call_with_tones
from peers.netns import skip_reason
from peers.softphone import Softphone

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 60),
]

ALICE_HZ = 660
BOB_HZ = 440
TALK_S = 3.0
HZ_TOLERANCE = 5
MIN_RMS = 2000.0  # a 0.5 full-scale sine through G.711 is ~11600; silence is ~0
PHONE_LIFETIME_S = 45.0  # an agent left behind by a crashed test still exits
RING_TIMEOUT_S = 5.0  # call setup takes ~15 ms on loopback
# debug logs in the test's tmp dir (node1.log, node2.log) say where a failed call went
NODE_ARGS = ["--log-level", "debug"]

# A TCP (or any connection-oriented) callee is reachable only over the connection it registered
# on, which ends at the node it registered with (bob -> node2): node2 stores its own Path entry
# with a flow token, so node1 forks to bob through node2.


def hostport(node) -> str:
    return f"{node.address[0]}:{node.port}"


@pytest.mark.parametrize(
    ("transport", "nodes"),
    [
        pytest.param("udp", 2, id="udp-two-nodes"),
        pytest.param("tcp", 2, id="tcp-two-nodes"),
        pytest.param("tcp", 1, id="tcp-one-node"),  # TCP media and dialog path, with the flow local
    ],
)
def test_call_through_the_farm_carries_both_tones(
    redis_url, accounts, start_node, tmp_path: Path, record_property, transport: str, nodes: int
) -> None:
    node1 = start_node(redis_url, "node1", extra=NODE_ARGS)
    node2 = start_node(redis_url, "node2", extra=NODE_ARGS) if nodes == 2 else node1
    heard = call_with_tones(hostport(node1), hostport(node2), transport, accounts, tmp_path)
    record_property("heard_rms_hz", heard)
    assert node1.process.poll() is None and node2.process.poll() is None


def test_wrong_password_unregistered_and_unknown_callee(redis_url, accounts, start_node, tmp_path: Path) -> None:
    node1 = start_node(redis_url, "node1")
    node2 = start_node(redis_url, "node2")
    with (
        Softphone("alice", max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path) as alice,
        Softphone("mallory", max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path) as mallory,
    ):
        alice.start()
        mallory.start()
        assert mallory.register(hostport(node2), "bob", DOMAIN, "not-bob-secret") == 401
        assert alice.register(hostport(node1), "alice", DOMAIN, accounts["alice"]) == 200

        # carol exists but has no binding; dave does not exist at all: the same answer
        for callee, status in (("carol", 480), ("dave", 480)):
            since = alice.mark()
            call_id = alice.call(f"sip:{callee}@{DOMAIN}")
            ended = alice.wait_call_state("DISCONNECTED", call_id, since=since)
            assert ended["code"] == status, (callee, ended)
    assert alice.proc.returncode == 0 and mallory.proc.returncode == 0
