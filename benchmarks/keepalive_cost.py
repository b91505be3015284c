"""What an RFC 5626 keep-alive costs the balancer: the capacity model's NAT keep-alive figure.

Theory of operation. A farm of ten million phones behind NAT sends a keep-alive every 24-29 s
on UDP (RFC 5626 4.4.1: a STUN Binding request, answered with the phone's public address) or a
CRLFCRLF every 95-120 s on a connection: some 400,000 packets/s that never reach a node, all
received by the balancers. This measures their CPU: one balancer (and one node behind it, as in
every farm) is started as the SIP benchmark starts it (`benchmarks.targets.SipfarmTarget`); then
``SOURCES`` UDP sockets on 127.0.0.1 each send STUN Binding requests (20 bytes, a fresh
transaction id each) at an even total rate for ``seconds``, and read the answers. The balancer's
CPU over the window (user + system, /proc via psutil) divided by the answers received is the CPU
per keep-alive; its inverse is keep-alives per balancer CPU-second.

    .venv/bin/python -m benchmarks.keepalive_cost [--rate 20000] [--seconds 5]

The sender is one Python process on the same cores, so the rate is what it can offer; the figure
per CPU-second holds as long as the balancer answers everything (loss is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

from benchmarks.targets import SipfarmTarget
from sipfarm.build import compiled_build_state

SOURCES = 64
MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001


def binding_request() -> bytes:
    return struct.pack("!HHI", BINDING_REQUEST, 0, MAGIC_COOKIE) + os.urandom(12)


def _drain(sel: selectors.BaseSelector, timeout: float) -> int:
    """Read every answer waiting on the ready sockets (within ``timeout``); how many."""
    got = 0
    for key, _ in sel.select(timeout=timeout):
        sock = cast(socket.socket, key.fileobj)
        while True:
            try:
                sock.recv(2048)
            except BlockingIOError:
                break
            got += 1
    return got


def measure(rate: float, seconds: float, workdir: Path) -> dict[str, float | str]:
    # what `sipfarm balancer` started from this checkout runs (sipfarm/build.py's choice)
    fresh = compiled_build_state() == "fresh" and os.environ.get("SIPFARM_BUILD", "auto") != "interpreted"
    build = "compiled" if fresh else "interpreted"
    with SipfarmTarget(workdir, [], nodes=1, workers=1, provision=False) as target:
        target.start()
        balancer = next(proc for label, proc in target._procs if label == "balancer")
        dest = ("127.0.0.1", target.port)
        sel = selectors.DefaultSelector()
        socks = []
        for _ in range(SOURCES):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        sent = received = 0
        cpu0 = balancer.cpu_seconds()
        started = time.monotonic()
        end = started + seconds
        batch = max(1, int(rate / 1000))  # requests per millisecond tick
        next_tick = started
        while (now := time.monotonic()) < end:
            if now >= next_tick:
                for _ in range(batch):
                    try:
                        socks[sent % SOURCES].sendto(binding_request(), dest)
                    except BlockingIOError:
                        break
                    sent += 1
                next_tick += batch / rate
            received += _drain(sel, max(0.0, min(next_tick - time.monotonic(), 0.001)))
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            received += _drain(sel, 0.05)
        cpu = balancer.cpu_seconds() - cpu0
        elapsed = time.monotonic() - started
        for sock in socks:
            sock.close()
    return {
        "build": build,
        "offered_per_s": round(sent / seconds),
        "answered": received,
        "loss_pct": round(100.0 * (sent - received) / sent, 3) if sent else 0.0,
        "balancer_cpu_s": round(cpu, 3),
        "balancer_cpu_pct": round(100.0 * cpu / elapsed, 1),
        "keepalives_per_cpu_s": round(received / cpu) if cpu > 0 else 0.0,
        "us_per_keepalive": round(1e6 * cpu / received, 2) if received else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.keepalive_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20_000.0, help="STUN Binding requests per second offered")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sipfarm-keepalive-") as tmp:
        result = measure(args.rate, args.seconds, Path(tmp))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
