"""A quick local figure for the relay's forwarding rate (not a test, not the real benchmark).

One RelayEngine + RelayServer on uvloop in this process forwards one RTP stream: a sender
process on 127.0.0.2 pushes COUNT packets (172 bytes, PCMU-sized) at RATE packets/s to the
caller's relay port, a sink process on 127.0.0.3 counts what leaves the callee's port.  Prints
packets/s, loss, and packets per relay CPU-second (the issue's figure of merit).

    .venv/bin/python -m benchmarks.relay_pps --count 200000 --rate 80000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import struct
import time
from multiprocessing.connection import Connection

import uvloop

from media.ports import PortAllocator
from media.relay import MediaEndpoint, RelayEngine, RelayServer

RELAY_HOST = "127.0.0.1"
SENDER_HOST = "127.0.0.2"
SINK_HOST = "127.0.0.3"
PAYLOAD = b"\xff" * 160


def _send(port: int, count: int, rate: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SENDER_HOST, 0))
    dest = (RELAY_HOST, port)
    pack = struct.Struct("!BBHII").pack
    start = time.perf_counter()
    for i in range(count):
        if rate and i % 64 == 0:  # pace in bursts of 64
            ahead = start + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        sock.sendto(pack(0x80, 0, i & 0xFFFF, i * 160 & 0xFFFFFFFF, 0x5EED) + PAYLOAD, dest)
    sock.close()


def _sink(sock: socket.socket, count: int, out: Connection) -> None:
    sock.settimeout(1.0)
    received = 0
    first = last = 0.0
    try:
        while received < count:
            sock.recv(2048)
            last = time.perf_counter()
            if not received:
                first = last
            received += 1
    except TimeoutError:
        pass
    out.send((received, last - first))


async def run(count: int, rate: float, fast_path: bool = True) -> None:
    engine = RelayEngine(PortAllocator(42000, 42099), sdp_allowed=lambda host, port: host.startswith("127."))
    server = RelayServer(engine, RELAY_HOST, receive_buffer=4 << 20, fast_path=fast_path)
    sink_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sink_sock.bind((SINK_HOST, 0))
    sink_port = sink_sock.getsockname()[1]
    try:
        [b_ports] = await server.offer("bench", "a", [MediaEndpoint(SENDER_HOST, 9)])
        [a_ports] = await server.answer("bench", "a", "b", [MediaEndpoint(SINK_HOST, sink_port)])
        # the sink sends one packet first, so that its port latches as a phone's would (and gets
        # a link: the fast path forwards between two latched ports)
        sink_sock.sendto(struct.pack("!BBHII", 0x80, 0, 0, 0, 0x51C) + PAYLOAD, (RELAY_HOST, b_ports.rtp))
        await asyncio.sleep(0.05)
        ctx = mp.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        sink = ctx.Process(target=_sink, args=(sink_sock, count, writer))
        sink.start()
        sender = ctx.Process(target=_send, args=(a_ports.rtp, count, rate))
        cpu0 = time.process_time()
        sender.start()
        limit = count / max(rate, 1000.0) * 3 + 30
        await asyncio.to_thread(sender.join, limit)  # the loop keeps forwarding meanwhile
        await asyncio.sleep(0.3)  # let the relay drain its socket buffer
        cpu = time.process_time() - cpu0
        await asyncio.to_thread(sink.join, 5.0)
        received, span = reader.recv() if reader.poll(1.0) else (0, 0.0)
        for proc in (sender, sink):
            if proc.is_alive():
                proc.kill()
            proc.join()
        stats = server.query("bench").monologues[0].media[0].rtp
        loss = 1 - received / count
        print(f"fast path {'on' if server.fast_path else 'off'}")
        print(f"sent {count} at target {rate:.0f} pps; relay forwarded {stats.packets}, sink received {received}")
        print(f"loss {loss:.4%} (relay saw RTP loss {stats.lost}, drops {stats.drops_unexpected_source})")
        if span > 0:
            print(f"sink rate {received / span:,.0f} pps over {span:.2f} s")
        if cpu > 0:
            print(f"relay CPU {cpu:.2f} s -> {stats.packets / cpu:,.0f} packets per relay CPU-second")
    finally:
        server.close()
        sink_sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=80_000.0, help="packets/s to send, 0 = as fast as possible")
    parser.add_argument("--no-fast-path", action="store_true", help="every packet on the Python path")
    args = parser.parse_args()
    uvloop.run(run(args.count, args.rate, not args.no_fast_path))


if __name__ == "__main__":
    main()
