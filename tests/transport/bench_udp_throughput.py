"""UDP datagrams/s through TransportManager.on_message (parse + Via stamping), per event loop.

Not a test (not collected): ``.venv/bin/python tests/transport/bench_udp_throughput.py``.

Bursts: a plain socket queues ``--burst`` OPTIONS datagrams in the server socket's receive buffer
(synchronously, so the sender never competes with the receiver for the CPU), then the loop runs
until the callback has seen them all.  The time from the end of the burst to the last callback
is summed over the rounds: it is the receive path's cost (wake-up, recvfrom, parse_message,
stamp_received, the callback).  Mode ``answer`` also builds a 200 and sends it back through the
manager (a stateless responder's path).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.via import response_target
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager

MESSAGES = [
    (
        "OPTIONS sip:svc@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{i};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@test>;tag=a1\r\nTo: <sip:svc@test>\r\n"
        f"Call-ID: bench-{i}@test\r\nCSeq: 1 OPTIONS\r\nUser-Agent: bench\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    for i in range(1000)
]


async def measure(rounds: int, burst: int, answer: bool) -> tuple[int, float]:
    received = 0
    last_at = 0.0
    done = asyncio.Event()
    target = 0
    manager: TransportManager

    def on_message(msg: SipMessage, source: Address, local: Address) -> None:
        nonlocal received, last_at
        received += 1
        if answer:
            response = make_response(msg, 200, to_tag=b"bench")
            manager.send(response.to_bytes(), response_target(response, source), local=local)
        if received == target:
            last_at = time.perf_counter()
            done.set()

    manager = TransportManager(on_message, config=TransportConfig(udp_recv_buffer=4 << 20))
    addr = await manager.listen("udp:127.0.0.1:0")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sender.bind(("127.0.0.1", 0))
    sender.setblocking(False)
    dest = (addr.host, addr.port)
    total = 0.0
    i = 0
    for _ in range(rounds):
        target += burst
        done.clear()
        for _ in range(burst):
            sender.sendto(MESSAGES[i % 1000], dest)
            i += 1
        start = time.perf_counter()
        await asyncio.wait_for(done.wait(), 10)
        total += last_at - start
        try:  # drain the answers, outside the timed part
            while True:
                sender.recv(65536)
        except BlockingIOError:
            pass
    sender.close()
    await manager.close()
    return received, total


def run(loop_name: str, rounds: int, burst: int, answer: bool) -> float:
    if loop_name == "uvloop":
        import uvloop  # noqa: PLC0415

        factory = uvloop.new_event_loop
    else:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        received, elapsed = runner.run(measure(rounds, burst, answer))
    rate = received / elapsed
    mode = "answer" if answer else "count"
    print(f"{loop_name:8s} {mode:6s} {received:7d} datagrams in {elapsed:5.2f} s = {rate:8.0f} datagrams/s")
    return rate


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    for answer in (False, True):
        for name in ("asyncio", "uvloop"):
            run(name, args.rounds, args.burst, answer)
