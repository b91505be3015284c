"""`sipfarm up` (what `make run` starts): the whole local farm comes up, prints READY with its
processes (a media relay among them, answering ng), serves a registration through the balancer,
shows in `sipfarm status`, and Ctrl-C (SIGINT) stops every process it started."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fixtures.farm import SipClient, sip_options
from fixtures.startup import START_TIMEOUT_S, process_state, wait_started

from sipfarm.up import busy_ports, ng_ping

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 90)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_block() -> tuple[int, int]:
    """SIP and metrics base ports for `up` (the relay's ng port is SIP + 5), below the kernel's
    ephemeral range (32768+) so that no client socket or Redis started meanwhile can take one."""
    rng = random.Random()
    for _ in range(200):
        sip = rng.randrange(20000, 30000, 20)
        metrics = sip + 15
        others = [sip + 1, sip + 2, metrics, metrics + 1, metrics + 2, metrics + 3]
        if not busy_ports("127.0.0.1", [sip, sip + 10, sip + 11], others, [sip + 5]):
            return sip, metrics
    raise RuntimeError("no free port block")


def read_ready(proc: subprocess.Popen[str], lines: list[str], within: float = START_TIMEOUT_S) -> dict[str, Any]:
    """`sipfarm up`'s READY line, parsed; the lines before it are kept in ``lines``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("READY "):
            ready: dict[str, Any] = json.loads(line[len("READY ") :])
            return ready
    raise AssertionError(
        f"sipfarm up printed no READY line within {within:g} s ({process_state(proc)}); its output:\n{''.join(lines)}"
    )


def wait_registers(
    proc: subprocess.Popen[str], address: tuple[str, int], lines: list[str], *, source: str = "127.0.0.1",
    **register: Any,
) -> None:  # fmt: skip
    """Until alice's REGISTER (from ``source``, ``register``: SipClient.register's options) through
    the farm's balancer at ``address`` gets 200: after READY, the balancer's first membership poll
    and probes (about a second; until then it answers 503). The farm's start: the start-up
    allowance, stopping early if `sipfarm up` exits."""
    client = SipClient(source)
    answers: list[int | None] = []

    def registered() -> bool:
        reply = client.register(address, "alice", "alice-secret", **register)
        answers.append(reply.status if reply is not None else None)
        return answers[-1] == 200

    try:
        wait_started(
            "sipfarm up", proc, registered, f"alice's REGISTER through {address[0]}:{address[1]} gets 200",
            log=lambda: f"answers so far {answers[-10:]}; output before READY:\n{''.join(lines)}", interval=0.3,
        )  # fmt: skip
    finally:
        client.close()


def test_up_refuses_ports_in_use(tmp_path: Path):
    port, metrics = free_block()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", port + 10))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sipfarm",
                "up",
                "--sip-port",
                str(port),
                "--dir",
                str(tmp_path / "run"),
                "--metrics-port",
                str(metrics),
                "--ng-port",
                str(port + 5),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"udp:{port + 10}" in done.stderr and "in use" in done.stderr


def test_up_starts_a_usable_farm_and_stops_it(tmp_path: Path):
    port, metrics = free_block()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sipfarm",
            "up",
            "--sip-port",
            str(port),
            "--dir",
            str(tmp_path / "run"),
            "--metrics-port",
            str(metrics),
            "--ng-port",
            str(port + 5),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = None
    lines: list[str] = []
    try:
        ready = read_ready(proc, lines)
        roles = sorted(p["role"] for p in ready["processes"])
        assert roles == ["balancer", "node", "node", "redis", "relay"]
        text = "".join(lines)
        assert "alice@farm.test" in text and f"127.0.0.1:{port}" in text
        (relay,) = [p for p in ready["processes"] if p["role"] == "relay"]
        assert relay["id"] == "relay1" and relay["ng"] == f"udp:127.0.0.1:{port + 5}"
        assert ng_ping("127.0.0.1", port + 5)

        wait_registers(proc, ("127.0.0.1", port), lines)
        # the nodes take requests from the balancer, the routing peers and the farm's host only:
        # a phone on another address talking straight to a node gets nothing
        assert sip_options("127.0.0.1", port + 10, source="127.0.0.5") is None
        assert sip_options("127.0.0.1", port + 10) is not None
        status = subprocess.run(
            [sys.executable, "-m", "sipfarm", "status", "--redis", ready["redis"]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "node1" in status.stdout and "lb1" in status.stdout
        assert any(line.split()[:2] == ["relay1", "relay"] for line in status.stdout.splitlines()), status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    pids = [p["pid"] for p in (ready or {"processes": []})["processes"]]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)]
    assert proc.returncode == 0


def test_up_binds_the_relays_ng_port_to_loopback_not_the_farms_host(tmp_path: Path):
    """ng has no authentication: on a farm whose --host is (here stands for) a public address,
    the relays' control ports listen on loopback, where this machine's nodes reach them."""
    port, metrics = free_block()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sipfarm", "up", "--host", "127.0.0.2", "--nodes", "1",
            "--sip-port", str(port), "--dir", str(tmp_path / "run"), "--metrics-port", str(metrics),
            "--ng-port", str(port + 5),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        ready = read_ready(proc, lines)
        (relay,) = [p for p in ready["processes"] if p["role"] == "relay"]
        assert relay["ng"] == f"udp:127.0.0.1:{port + 5}"
        assert ng_ping("127.0.0.1", port + 5)
        assert not ng_ping("127.0.0.2", port + 5)  # nothing on the farm's host
        wait_registers(proc, ("127.0.0.2", port), lines, source="127.0.0.2")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 0
