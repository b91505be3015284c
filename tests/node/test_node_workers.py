"""`sipfarm node --workers 2`: two processes share the SIP port (SO_REUSEPORT), each answers at
its own Via port, and the supervisor's metrics add both workers up."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
from fixtures.farm import SipClient, free_udp_tcp_port
from fixtures.startup import START_TIMEOUT_S, udp_sockets, wait_started

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


def total(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as page:
        text = page.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_two_workers_serve_one_port_and_metrics_add_up(redis_url, accounts, start_node):
    metrics_port = free_udp_tcp_port()
    node = start_node(redis_url, extra=["--workers", "2", "--metrics", f"127.0.0.1:{metrics_port}"])
    # the second worker binds a moment after the first answers (a 1 s sleep was a guess)
    wait_started("node --workers 2", node.process, lambda: udp_sockets(*node.address) >= 2,
                 f"both workers bind UDP {node.address[0]}:{node.address[1]}", log=node.log_path)  # fmt: skip
    clients = [SipClient() for _ in range(16)]  # distinct source ports spread over the workers
    try:
        for client in clients:
            reply = client.register(node.address, "alice", accounts["alice"], contact="<sip:alice@127.0.0.1:5999>")
            assert reply is not None and reply.status == 200
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + 5
    requests = 0.0
    while time.monotonic() < deadline:
        requests = total(metrics_port, "sipfarm_node_requests_total")
        if requests >= 32:
            break
        time.sleep(0.2)
    assert requests >= 32  # 16 x (REGISTER -> 401 -> REGISTER), summed over both workers
    assert node.process.poll() is None


def _worker_pids(supervisor: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == supervisor:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def test_workers_exit_when_the_supervisor_is_killed(redis_url, start_node):
    node = start_node(redis_url, extra=["--workers", "2"])
    deadline = time.monotonic() + 10
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = _worker_pids(node.process.pid)
        time.sleep(0.1)
    assert len(workers) == 2
    node.process.send_signal(signal.SIGKILL)  # no chance to stop its workers itself
    node.process.wait(5)
    deadline = time.monotonic() + 10
    alive = workers
    while time.monotonic() < deadline and alive:
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and _not_zombie(pid)]
        time.sleep(0.1)
    assert not alive, f"orphaned workers: {alive}"


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
