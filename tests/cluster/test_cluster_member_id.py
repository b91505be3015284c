"""Processes started without an id get distinct ones, even alike in containers on the host's network.

Such containers share the host's name and each process is pid 1 of its own PID namespace: the
old default (``host-pid``) gave two of them one membership record. ``unshare --pid --fork`` puts
each process in a PID namespace of its own, as Docker does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.startup import START_TIMEOUT_S, process_state

from sipfarm.cluster import Member, MembershipStore, Role, default_member_id
from sipfarm.store import create_redis
from sipfarm.store.redis_server import free_port


def test_default_ids_differ_and_name_host_and_pid() -> None:
    ids = {default_member_id("relay-") for _ in range(50)}
    assert len(ids) == 50
    assert all(i.startswith(f"relay-{socket.gethostname()}-{os.getpid()}-") for i in ids)


def _pid_namespaces_work() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "sh", "-c", "echo $$"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0 and probe.stdout.strip() == "1"


@pytest.mark.skipif(not _pid_namespaces_work(), reason="needs root and unshare --pid (util-linux)")
def test_two_nodes_each_pid_1_without_node_id_are_two_members(redis_url: str, tmp_path: Path) -> None:
    procs = []
    try:
        for i in range(2):
            port = free_port()
            argv = [
                "unshare", "--pid", "--fork", "--kill-child",
                sys.executable, "-m", "sipfarm", "node", "--listen", f"udp:127.0.0.1:{port}",
                "--redis", redis_url, "--domain", "farm.test",
            ]  # fmt: skip
            log = (tmp_path / f"node{i}.log").open("wb")
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        # both nodes' start: the start-up allowance, ending early if one exits
        members = asyncio.run(_node_members(redis_url, 2, START_TIMEOUT_S, procs))
        logs = "".join((tmp_path / f"node{i}.log").read_text(errors="replace")[-1500:] for i in range(2))
        states = [process_state(proc) for proc in procs]
        assert len(members) == 2, f"members {members}; nodes {states}; logs:\n{logs}"
        hosts_pids = {(m.host, m.pid) for m in members}
        assert hosts_pids == {(socket.gethostname(), 1)}  # what containers look like
    finally:
        for proc in procs:
            proc.kill()  # unshare ignores SIGTERM while it waits; --kill-child ends the node with it
        for proc in procs:
            proc.wait(timeout=15)


async def _node_members(redis_url: str, want: int, within: float, procs: list[subprocess.Popen[bytes]]) -> list[Member]:
    redis = create_redis(redis_url)
    try:
        store = MembershipStore(redis)
        deadline = time.monotonic() + within
        while True:
            nodes = [m for m in await store.members() if m.role is Role.NODE]
            exited = any(proc.poll() is not None for proc in procs)
            if len(nodes) >= want or exited or time.monotonic() > deadline:
                # a second look after the heartbeats of both: a shared id would show one member
                await asyncio.sleep(1.0)
                return [m for m in await store.members() if m.role is Role.NODE]
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
