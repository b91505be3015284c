"""The closed farm where loopback is allowed (phones on the farm's machine, as ``sipfarm up``
runs them): a node never sends to the farm's own Redis.

A module of its own: its farm shares the worker's Redis, which it flushes, and a farm of another
module alive at the same time (``test_attacks``' module-scoped one, its nodes with the same
ids and the flow secret read before the flush) would answer for it.
"""

from __future__ import annotations

import time

import pytest
from attack_support import ACCOUNTS, Caller, Farm, request, running_farm, scrape
from fixtures.farm import DOMAIN
from fixtures.redis_server import RedisProcess
from fixtures.startup import START_TIMEOUT_S

PAYLOAD = b"SET sipfarm:pwned yes\r\nCONFIG SET dir /tmp\r\nQUIT\r\n"  # what Redis would run line by line

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def _refused(farm: Farm) -> float:
    """Destinations the farm's nodes refused so far (``errors_total{kind="destination_refused"}``)."""
    key = 'sipfarm_node_errors_total{kind="destination_refused"}'
    return sum(scrape(farm.metrics[node.node_id]).get(key, 0.0) for node in farm.nodes)


def test_where_loopback_is_allowed_no_request_reaches_the_farms_redis(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
):
    """Red team (2026-12-03): with loopback allowed (phones on the farm's machine, as ``sipfarm
    up`` runs), an in-dialog request along a subscriber's own dialog, its Request-URI naming
    the farm's Redis, was sent there over UDP or a new TCP connection (each line a command for
    a Redis without a password). A node refuses its Redis (and its relays' ng ports) by
    address, whatever the allowed networks."""
    workdir = tmp_path_factory.mktemp("redis-dest")
    config = workdir / "node.toml"
    config.write_text('[node]\nallow_destinations = ["127.0.0.0/8"]\n')
    with running_farm(redis_server, workdir, node_args=("--config", str(config))) as farm:
        alice = Caller("alice", ACCOUNTS["alice"], host="127.0.0.71")
        try:
            placed = alice.invite(farm.lb.address, "carol")
            assert placed.final is not None and placed.final.status == 200, farm.logs()
            dialog = placed.final
            # the route set up to the node's entry: the node's next hop is the Request-URI
            route_set = [v for v in reversed(dialog.values("record-route")) if b"@" not in v or b";sf=" in v]
            refused_before = _refused(farm)
            for cseq, transport in ((5, "tcp"), (6, "udp")):
                headers = (("Route", ", ".join(v.decode() for v in route_set[:2])),)
                data = request(
                    "INFO", f"sip:x@127.0.0.1:{redis_server.port};transport={transport}", alice.attacker.via(),
                    from_=f"<sip:alice@{DOMAIN}>", to=(dialog.get("to") or b"").decode(),
                    cid=dialog.call_id.decode(), cseq=cseq, headers=headers, body=PAYLOAD,
                )  # fmt: skip
                alice.attacker.send(data, farm.lb.address)
                final = alice.attacker.final(5.0, call_id=dialog.call_id.decode(), cseq=cseq)
                assert final is not None and final.status == 403, (transport, final and final.status, farm.logs())
            # refused at the node (403 above, and counted), not sent (no final then: Redis does
            # not answer SIP, and a request over UDP or TCP stayed in the node until Timer F)
            time.sleep(1.2)  # the node's metrics are read as they are; refreshed as counted
            assert _refused(farm) == refused_before + 2
        finally:
            alice.close()
