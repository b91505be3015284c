"""Front-end protection at the balancer (issue 12), end to end: Redis, one node, two balancers.

1. SIPp floods REGISTERs over TCP from 127.0.0.2 (far past the 20/s budget) for ~8 s while a
   phone on 127.0.0.3 registers over and over through the same balancer: the flooder, over
   budget for rate_ban_after (3 s), is banned within 5 s (in Redis, under the farm's ban keys,
   and in the balancer's metrics), every REGISTER of the phone completes in under a second,
   and the second balancer, which never saw the flood, refuses the flooder within a second of
   the ban while still serving others.
2. SIPVicious svmap and svwar (scanner User-Agents, over UDP) learn nothing from the balancer;
   their sources are not banned, as a UDP source address proves nothing (a forger would ban
   its victim): their requests are dropped one by one.  A scanner over TCP is banned.

Sources on 127.0.0.1 (the test's own probes, the node) are exempt, as loopback is by default;
the sources of this test are other loopback "hosts", not exempt here.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from attack_support import find_sipvicious, svwar
from fixtures.farm import (
    DOMAIN,
    USERS,
    BalancerProcess,
    SipClient,
    free_udp_tcp_port,
    wait_nodes_usable,
)
from fixtures.protect import bans, protect_metrics
from fixtures.startup import START_TIMEOUT_S

from benchmarks.sipp import find_sipp

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "register_flood.xml"
FLOODER, PHONE, BYSTANDER, SVMAP_SOURCE = (f"127.0.0.{n}" for n in (2, 3, 4, 5))
SVWAR_SOURCE = "127.0.0.1"  # where svwar 0.3.8 sends from, whatever its -b says

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 60)


@pytest.fixture
def protected(
    request: pytest.FixtureRequest,
    redis_url: str,
    start_node,
    start_balancer,
    accounts,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[BalancerProcess, BalancerProcess, int]]:
    monkeypatch.setenv("SIPFARM_EXEMPT", getattr(request, "param", "127.0.0.1/32"))
    monkeypatch.setenv("SIPFARM_DOMAINS", DOMAIN)
    monkeypatch.setenv("SIPFARM_BAN_TIME", "120")
    start_node(redis_url)
    metrics_port = free_udp_tcp_port()
    lb1 = start_balancer(redis_url, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    lb2 = start_balancer(redis_url)
    wait_nodes_usable(lb1, 1)
    wait_nodes_usable(lb2, 1)
    yield lb1, lb2, metrics_port


def options(client: SipClient, dest: tuple[str, int], timeout: float = 0.5) -> bool:
    """An OPTIONS to the farm's domain through a balancer: whether anything answered."""
    request = (
        f"OPTIONS sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {client.host}:{client.port};branch=z9hG4bK{time.time_ns()}"
        f";rport\r\nMax-Forwards: 70\r\nFrom: <sip:probe@{DOMAIN}>;tag=1\r\nTo: <sip:{DOMAIN}>\r\n"
        f"Call-ID: {time.time_ns()}@probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    client.send(request.encode(), dest)
    return client.recv(timeout) is not None


@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed (apt-get install sip-tester)")
def test_flooder_banned_phone_served_bans_shared(protected, redis_url: str, tmp_path: Path):
    lb1, lb2, metrics_port = protected
    bystander = SipClient(BYSTANDER)
    flooder_probe = SipClient(FLOODER)
    try:
        assert options(bystander, lb2.address) and options(flooder_probe, lb2.address)
        argv = [
            find_sipp(None), f"127.0.0.1:{lb1.port}", "-sf", str(SCENARIO), "-i", FLOODER, "-p", "0", "-t", "t1",
            "-set", "domain", DOMAIN, "-r", "2000", "-m", "16000", "-l", "2000", "-recv_timeout", "300",
            "-timeout", "9", "-nostdin", "-trace_err", "-error_file", str(tmp_path / "sipp_errors.log"),
        ]  # fmt: skip
        flood = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        started = time.monotonic()
        banned_after: list[float] = []

        def watch() -> None:
            while time.monotonic() - started < 7 and not banned_after:
                if FLOODER in bans(redis_url):
                    banned_after.append(time.monotonic() - started)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        phone = SipClient(PHONE)
        times: list[float] = []
        try:
            while time.monotonic() - started < 8:
                t0 = time.monotonic()
                reply = phone.register(lb1.address, "alice", USERS["alice"], expires=60)
                times.append(time.monotonic() - t0)
                assert reply is not None and reply.status == 200, lb1.log()[-1500:]
                time.sleep(0.3)  # ~6 REGISTERs/s with the challenges: a busy phone, in budget
        finally:
            phone.close()
            watcher.join()
        # the flooder: banned within 5 s of the first flood (3 s over budget: a flood, not a
        # burst), in Redis with the balancer's reason
        assert banned_after and 2.5 < banned_after[0] < 5.0, banned_after
        assert bans(redis_url)[FLOODER] == "balancer:rate_register"
        # the phone: every registration (digest round trip) in under a second, throughout
        assert len(times) >= 20 and max(times) < 1.0, times
        # the other balancer never saw the flood: it refuses the flooder (within a second of the
        # ban, long past now) and still serves everyone else
        assert not options(flooder_probe, lb2.address)
        assert options(bystander, lb2.address)
        flood.wait(timeout=15)
        metrics = protect_metrics(metrics_port)
        assert metrics.get("rate_register", 0) >= 1 and metrics.get("banned", 0) > 100, metrics
    finally:
        bystander.close()
        flooder_probe.close()


def _scan(transport: str, port: int) -> bytes:
    return (
        f"OPTIONS sip:100@{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/{transport} 127.0.0.7:{port};branch=z9hG4bKscan"
        f"{time.time_ns()}\r\nMax-Forwards: 70\r\nFrom: <sip:100@{DOMAIN}>;tag=1\r\nTo: <sip:100@{DOMAIN}>\r\n"
        f"Call-ID: scan{time.time_ns()}\r\nCSeq: 1 OPTIONS\r\nUser-Agent: friendly-scanner\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def test_shared_ban_applies_within_a_second(protected, redis_url: str):
    """A scanner's User-Agent over UDP bans nobody (its source address may be a victim's): the
    message is dropped.  Over TCP the source is proven: it is banned, and the ban started at one
    balancer is refused at the other (within 1 s on an idle machine: two ban refreshes)."""
    lb1, lb2, _ = protected
    source = SipClient("127.0.0.7")
    try:
        assert options(source, lb2.address)
        source.send(_scan("UDP", source.port), lb1.address)
        assert source.recv(0.3) is None  # dropped, unanswered
        time.sleep(1.0)  # two ban refreshes
        assert options(source, lb1.address) and options(source, lb2.address)
        assert "127.0.0.7" not in bans(redis_url)
        with socket.create_connection(lb1.address, timeout=2, source_address=("127.0.0.7", 0)) as tcp:
            tcp.sendall(_scan("TCP", tcp.getsockname()[1]))
            tcp.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                assert tcp.recv(100) == b""  # dropped, unanswered
        # lb2 re-reads the bans every 0.5 s (ban_refresh): refused after one or two refreshes;
        # polled up to 3 s, as a loaded 2-core CI machine may run a refresh late
        deadline = time.monotonic() + 3.0
        while options(source, lb2.address) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not options(source, lb2.address)
        assert bans(redis_url)["127.0.0.7"] == "balancer:scanner"
    finally:
        source.close()


def _register(port: int, n: int) -> bytes:
    return (
        f"REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.8:{port};branch=z9hG4bKburst{n}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag={n}\r\nTo: <sip:alice@{DOMAIN}>\r\n"
        f"Call-ID: burst-{n}@127.0.0.8\r\nCSeq: 1 REGISTER\r\nContact: <sip:alice@127.0.0.8:{port};transport=tcp>\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _answered(conns: list[socket.socket], wait: float) -> int:
    """How many of ``conns`` got a 401 within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    answered = 0
    for conn in conns:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError, OSError):
            answered += conn.recv(2048).startswith(b"SIP/2.0 401")
    return answered


def test_an_offices_reconnection_burst_is_not_banned(protected, redis_url: str):
    """Phones behind one NAT address reconnecting at once (a balancer restarted, or failed
    over): 60 TCP connections from 127.0.0.8 send a REGISTER each within a fraction of a
    second, three times the 20/s budget. The excess is dropped (over TCP a phone waits for
    Timer F, then tries again), the rest challenged; the address is not banned, and once the
    burst is over its phones are served again. Banned at their first excess, as before, the
    whole office was cut off for ban_time."""
    lb1, _, metrics_port = protected
    conns = [socket.create_connection(lb1.address, timeout=2, source_address=("127.0.0.8", 0)) for _ in range(60)]
    try:
        for n, conn in enumerate(conns):
            conn.sendall(_register(conn.getsockname()[1], n))
        answered = _answered(conns, 2.0)
        assert 15 <= answered < 60, answered  # the budget's worth (and what the window slid in)
        time.sleep(1.5)  # the burst is over: a quiet window
        assert "127.0.0.8" not in bans(redis_url)
        for n, conn in enumerate(conns[:10]):
            conn.sendall(_register(conn.getsockname()[1], 100 + n))
        assert _answered(conns[:10], 2.0) == 10
        assert "127.0.0.8" not in bans(redis_url)
        assert protect_metrics(metrics_port).get("rate_register", 0) >= 1
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.skipif(find_sipvicious("svmap") is None or find_sipvicious("svwar") is None, reason="no SIPVicious")
# svwar 0.3.8 ignores -b (its socket is bound to any address): it sends from 127.0.0.1, so here
# loopback is not exempt (the node passes as a node; nothing else of the test runs after svwar)
@pytest.mark.parametrize("protected", ["192.0.2.1/32"], indirect=True)
def test_sipvicious_learns_nothing_and_bans_nobody_over_udp(protected, redis_url: str, tmp_path: Path):
    lb1, _, _ = protected
    argv = [
        str(find_sipvicious("svmap")), "-b", SVMAP_SOURCE, "-x", SVMAP_SOURCE,
        "-P", str(free_udp_tcp_port(SVMAP_SOURCE)), "-p", str(lb1.port), "-t", "0.5", "127.0.0.1",
    ]  # fmt: skip
    svmap = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    # svmap lists every SIP device that answered, with its User-Agent: none here
    assert f"127.0.0.1:{lb1.port}" not in svmap.stdout, svmap.stdout + svmap.stderr
    runs = svwar(lb1.address, ["alice", "bob", "100", "admin"], tmp_path, source=SVWAR_SOURCE, max_silence=2)
    assert [row for run in runs for row in run.rows] == [], "\n".join(run.describe() for run in runs)
    # over UDP, nobody: a source address a datagram claims proves nothing (red team D,
    # 2026-12-02: one spoofed datagram banned its victim farm-wide for 10 minutes)
    listed = subprocess.run(
        [sys.executable, "-m", "sipfarm", "ban", "list", "--redis", redis_url],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    for source in (SVMAP_SOURCE, SVWAR_SOURCE):
        assert not re.search(rf"^{re.escape(source)}\t", listed, re.M), listed


def test_a_banned_source_is_refused_at_accept(protected, redis_url: str):
    """A banned source's SIP was dropped on every transport, but its connections were still
    accepted (and TLS handshakes done, WebSocket upgrades answered): 7,476 TLS handshakes in
    8 s from one banned scanner took 64% of a core (red team, 2026-12-03). Once the ban is
    known, its connections are closed at accept; other sources are served."""
    lb1, _, metrics_port = protected
    banned_host = "127.0.0.9"
    scanner = socket.create_connection(lb1.address, timeout=2, source_address=(banned_host, 0))
    try:
        probe = _register(scanner.getsockname()[1], 0)
        scanner.sendall(probe.replace(b"\r\n\r\n", b"\r\nUser-Agent: friendly-scanner\r\n\r\n", 1))
        deadline = time.monotonic() + 5
        while banned_host not in bans(redis_url) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert banned_host in bans(redis_url)
    finally:
        scanner.close()
    refused = 0
    for n in range(5):
        conn = socket.create_connection(lb1.address, timeout=1, source_address=(banned_host, 0))
        try:
            with contextlib.suppress(OSError):
                conn.sendall(_register(conn.getsockname()[1], 10 + n))
            try:
                closed = conn.recv(4096) == b""  # closed by the balancer, nothing answered
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                closed = False  # accepted, its request dropped: what it was
            refused += closed
        finally:
            conn.close()
    assert refused == 5
    deadline = time.monotonic() + 5  # the metrics are synced periodically
    while protect_metrics(metrics_port).get("refused_banned_connection", 0) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert protect_metrics(metrics_port).get("refused_banned_connection", 0) >= 5
    other = socket.create_connection(lb1.address, timeout=2, source_address=("127.0.0.10", 0))
    try:
        other.sendall(_register(other.getsockname()[1], 99))
        assert _answered([other], 2.0) == 1
    finally:
        other.close()
