"""`sipfarm drain NODE`: the balancer stops giving that node new work; undo brings it back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from fixtures.farm import DOMAIN, BalancerProcess, SipClient, wait_balancer_view, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S

from sipfarm.store import LocationStore, create_redis

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)

USERS = [f"user{i:02d}" for i in range(12)]


async def _provision(url: str) -> None:
    from sipfarm.store import AccountStore  # noqa: PLC0415

    redis = create_redis(url)
    try:
        store = AccountStore(redis)
        for user in USERS:
            await store.add(user, DOMAIN, "pw-" + user)
    finally:
        await redis.aclose()


def _nodes_of(url: str) -> set[str]:
    async def run() -> set[str]:
        redis = create_redis(url)
        try:
            found = await LocationStore(redis).lookup_many([f"{u}@{DOMAIN}" for u in USERS], time.time())
        finally:
            await redis.aclose()
        return {b.node for bindings in found.values() for b in bindings}

    return asyncio.run(run())


def _register_all(client: SipClient, lb_address: tuple[str, int]) -> None:
    """(Re-)register every user with the same Contact, so each round replaces the binding."""
    for user in USERS:
        reply = client.register(lb_address, user, "pw-" + user)
        assert reply is not None and reply.status == 200


def sipfarm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sipfarm", *args], capture_output=True, text=True, timeout=30)


def test_drained_node_gets_no_new_registrations(redis_url, start_node, start_balancer):
    asyncio.run(_provision(redis_url))
    start_node(redis_url, "node1")
    start_node(redis_url, "node2")
    lb = start_balancer(redis_url)
    wait_nodes_usable(lb, 2)
    client = SipClient()
    try:
        _drain_and_undo(redis_url, client, lb)
    finally:
        client.close()


def _drain_and_undo(redis_url: str, client: SipClient, lb: BalancerProcess) -> None:
    lb_address = lb.address
    _register_all(client, lb_address)
    assert _nodes_of(redis_url) == {"node1", "node2"}  # 12 AORs hash over both

    drained = sipfarm("drain", "node1", "--redis", redis_url)
    assert drained.returncode == 0, drained.stderr
    # node1's next heartbeat (0.5 s) says draining, the balancer's poll (0.25 s) reads it
    wait_balancer_view(lb, lambda view: "node1" in view.draining, "node1 draining")
    deadline = time.monotonic() + 5  # (later on a loaded machine)
    while "draining" not in (status := sipfarm("status", "--redis", redis_url)).stdout and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "draining" in status.stdout
    # refreshes: all land on node2 now
    assert _register_until(client, lb_address, redis_url, {"node2"}) == {"node2"}

    undone = sipfarm("drain", "node1", "--undo", "--redis", redis_url)
    assert undone.returncode == 0
    wait_balancer_view(lb, lambda view: {"node1", "node2"} <= view.usable, "node1 active again")
    assert _register_until(client, lb_address, redis_url, {"node1", "node2"}) == {"node1", "node2"}


def _register_until(
    client: SipClient, lb_address: tuple[str, int], redis_url: str, nodes: set[str], within: float = 8.0
) -> set[str]:
    """Re-register everyone until the bindings are on ``nodes`` (or ``within`` s passed): the
    nodes holding them at the last round."""
    deadline = time.monotonic() + within
    while True:
        _register_all(client, lb_address)
        found = _nodes_of(redis_url)
        if found == nodes or time.monotonic() > deadline:
            return found
        time.sleep(0.3)
