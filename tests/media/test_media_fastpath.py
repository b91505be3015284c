"""The C fast path (media/_fastpath.c) against the Python packet path it mirrors.

The same packet sequences (Hypothesis: in order, duplicates, late, jumps, another SSRC, RTCP,
short and non-RTP datagrams, strangers) go through a RelayPort on the Python path alone and
through a twin whose link is held by a LinkTable the way media/plane.py holds it (the table
forwards the common case, hands the rest back, the port's counters go back and forth):
the counters, the RFC 3550 statistics and the forwarded datagrams must be identical.  Then the
relay on real loopback sockets with the fast path on: counters reach query and totals.

The extension exists only in the compiled build (scripts/test-compiled.sh); the interpreted
stage skips this file (its path is the Python one, tested everywhere else).
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fixtures.relay import free_port_range
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.port import KIND_MUX, KIND_RTP, RelayPort
from media.ports import PortAllocator
from media.relay import MediaEndpoint, RelayEngine, RelayServer, policy_predicate
from sipfarm.transport.destinations import DestinationPolicy

fastpath = pytest.importorskip("media._fastpath")

SOURCE = ("127.0.0.2", 4000)
STRANGER = ("127.0.0.9", 4000)
SSRC = 0x5EED
_HEADER = struct.Struct("!BBHII")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rtp(seq: int, ts: int, ssrc: int, size: int = 20, marker_pt: int = 0) -> bytes:
    return _HEADER.pack(0x80, marker_pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + b"\xab" * size


# one datagram of the sequence: (what, argument, seconds since the previous one)
_STEP = st.one_of(
    st.tuples(st.just("next"), st.integers(1, 3), st.floats(0.0, 0.05)),  # in order, maybe a loss
    st.tuples(st.just("dup"), st.just(0), st.floats(0.0, 0.05)),
    st.tuples(st.just("late"), st.integers(1, 150), st.floats(0.0, 0.05)),
    st.tuples(st.just("jump"), st.integers(2000, 65535), st.floats(0.0, 0.05)),
    st.tuples(st.just("ssrc"), st.integers(0, 2**32 - 1), st.floats(0.0, 0.05)),
    st.tuples(st.just("rtcp"), st.integers(200, 204), st.floats(0.0, 0.05)),
    st.tuples(st.just("short"), st.integers(0, 11), st.floats(0.0, 0.05)),
    st.tuples(st.just("v1"), st.just(0), st.floats(0.0, 0.05)),
    st.tuples(st.just("stranger"), st.just(0), st.floats(0.0, 0.05)),
    st.tuples(st.just("tswrap"), st.just(0), st.floats(0.0, 0.05)),
)


class Stream:
    """Builds the datagrams of one party from the steps."""

    def __init__(self) -> None:
        self.seq = 65530  # wraps after a few packets (RFC 3550 A.1 cycles)
        self.ts = 0xFFFF0000
        self.ssrc = SSRC

    def datagram(self, what: str, arg: int) -> tuple[bytes, tuple[str, int]]:
        if what == "next":
            self.seq = (self.seq + arg) & 0xFFFF
            self.ts = (self.ts + 160 * arg) & 0xFFFFFFFF
        elif what == "late":
            return rtp(self.seq - arg, self.ts - 160 * arg, self.ssrc), SOURCE
        elif what == "jump":
            self.seq = (self.seq + arg) & 0xFFFF
        elif what == "ssrc":
            self.ssrc = arg
        elif what == "rtcp":
            return struct.pack("!BBHI", 0x81, arg, 1, self.ssrc) + b"\0" * 4, SOURCE
        elif what == "short":
            return rtp(self.seq, self.ts, self.ssrc)[:arg], SOURCE
        elif what == "v1":
            return b"\x40" + rtp(self.seq, self.ts, self.ssrc)[1:], SOURCE
        elif what == "stranger":
            return rtp(self.seq + 1, self.ts, self.ssrc), STRANGER
        elif what == "tswrap":
            self.seq = (self.seq + 1) & 0xFFFF
            self.ts = (self.ts + 0x80000010) & 0xFFFFFFFF
        return rtp(self.seq, self.ts, self.ssrc), SOURCE


class Twin:
    """A latched port with a linked peer (``one_way``: a peer that never latched, sending from
    its own socket to its SDP address); with ``table``, the port's link is the fast path's."""

    def __init__(self, clock: Clock, kind: int, table: object | None, *, one_way: bool = False) -> None:
        self.table = table
        self.port = RelayPort(40000, kind, clock, 2, 5.0)
        self.peer = RelayPort(40002, KIND_RTP, clock, 2, 5.0)
        self.port.peer_rtp = self.peer
        self.port.peer_rtcp = self.peer
        self.peer.peer_rtp = self.port
        if one_way:
            self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.out.bind(("127.0.0.1", 0))
            self.sink.bind(("127.0.0.1", 0))
        else:
            self.out, self.sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.out, self.sink):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sink.setblocking(False)
        self.out.setblocking(False)
        self.link_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an fd for the port's link
        self.link_send = self.link_sock.send
        if one_way:
            self.peer.sender = self.out
            self.peer.dest = self.sink.getsockname()
        else:
            self.peer.link = self.out.send
            self.peer.dest = ("127.0.0.3", 5000)
        self.one_way = one_way

    def register(self) -> None:
        """The plane's part: the peer's link, or its own socket as a target."""
        assert self.table is not None
        if self.one_way:
            assert self.table.target(self.out.fileno(), self.peer, self.peer.dest)  # type: ignore[attr-defined]
        else:
            self.table.register(self.out.fileno(), self.peer)  # type: ignore[attr-defined]
        self.table.register(self.link_sock.fileno(), self.port)  # type: ignore[attr-defined]

    def settle(self) -> None:
        """media/plane.py's _settle, with links that never need opening."""
        if self.port.link is None and self.port.source == SOURCE:
            self.port.link = self.link_send  # the plane links it (again) to the same address
        if self.table is None:
            return
        fd = self.link_sock.fileno()
        if self.port.link is not self.link_send:
            self.table.retire(fd)  # type: ignore[attr-defined]
            return
        self.table.set_current(fd)  # type: ignore[attr-defined]
        self.table.load(fd, self.out.fileno())  # type: ignore[attr-defined]

    def feed(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        table = self.table
        fd = self.link_sock.fileno()
        if table is not None:
            if addr == SOURCE and self.port.link is self.link_send:
                if table.feed(fd, data, now):  # type: ignore[attr-defined]
                    return
            else:
                table.unload(fd)  # type: ignore[attr-defined]
        self.port.receive(data, addr)
        self.settle()

    def forwarded(self, most: int = 1000) -> list[bytes]:
        """What reached the peer's party (loopback UDP for one way: delivered on send)."""
        out: list[bytes] = []
        while len(out) < most:
            try:
                out.append(self.sink.recv(65536))
            except BlockingIOError:
                break
        return out

    def close(self) -> None:
        for s in (self.out, self.sink, self.link_sock):
            s.close()


@contextmanager
def link_table() -> Iterator[object]:
    epoll = select.epoll()
    table = fastpath.LinkTable(epoll.fileno())
    try:
        yield table
    finally:
        table.close()
        epoll.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_STEP, min_size=1, max_size=60), mux=st.booleans(), one_way=st.booleans())
def test_fast_path_counts_and_forwards_exactly_as_the_python_path(
    steps: list[tuple[str, int, float]], mux: bool, one_way: bool
) -> None:
    kind = KIND_MUX if mux else KIND_RTP
    clock = Clock()
    with link_table() as table:
        python, fast = Twin(clock, kind, None, one_way=one_way), Twin(clock, kind, table, one_way=one_way)
        try:
            fast_fd = fast.link_sock.fileno()
            fast.register()
            # latch both on a first packet, as the plane does before it links a port
            streams = Stream(), Stream()
            for twin, stream in zip((python, fast), streams, strict=True):
                data, addr = stream.datagram("next", 1)
                twin.port.receive(data, addr)
                twin.settle()
            assert table.loaded(fast_fd)  # type: ignore[attr-defined]
            for what, arg, delay in steps:
                clock.now += delay
                for twin, stream in zip((python, fast), streams, strict=True):
                    data, addr = stream.datagram(what, arg)
                    twin.feed(data, addr, clock.now)
            table.flush(fast_fd)  # type: ignore[attr-defined]
            assert fast.port.snapshot() == python.port.snapshot()
            assert fast.forwarded(len(steps) + 1) == python.forwarded(len(steps) + 1)
            # and with ownership back in Python, the next packets agree too
            table.unload(fast_fd)  # type: ignore[attr-defined]
            for twin, stream in zip((python, fast), streams, strict=True):
                data, addr = stream.datagram("next", 1)
                twin.port.receive(data, addr)
            assert fast.port.snapshot() == python.port.snapshot()
        finally:
            python.close()
            fast.close()


def test_a_failed_send_is_counted_and_the_stats_still_move() -> None:
    clock = Clock()
    with link_table() as table:
        python, fast = Twin(clock, KIND_RTP, None), Twin(clock, KIND_RTP, table)
        try:
            fast.register()
            streams = Stream(), Stream()
            for twin, stream in zip((python, fast), streams, strict=True):
                data, addr = stream.datagram("next", 1)
                twin.port.receive(data, addr)
                twin.settle()
            python.sink.close()  # the receiving end is gone: every send fails
            fast.sink.close()
            for _ in range(5):
                clock.now += 0.02
                for twin, stream in zip((python, fast), streams, strict=True):
                    data, addr = stream.datagram("next", 1)
                    twin.feed(data, addr, clock.now)
            table.flush(fast.link_sock.fileno())  # type: ignore[attr-defined]
            assert fast.port.drops_send_failed == python.port.drops_send_failed == 5
            assert fast.port.snapshot() == python.port.snapshot()
        finally:
            python.out.close()
            fast.out.close()
            python.link_sock.close()
            fast.link_sock.close()


def test_a_peer_that_is_no_longer_linked_is_sent_to_by_python() -> None:
    clock = Clock()
    with link_table() as table:
        fast = Twin(clock, KIND_RTP, table)
        try:
            out_fd, fd = fast.out.fileno(), fast.link_sock.fileno()
            fast.register()
            stream = Stream()
            first = stream.datagram("next", 1)
            fast.feed(*first, clock.now)
            assert table.loaded(fd)  # type: ignore[attr-defined]
            # the peer re-latched elsewhere: its link is not its own any more
            sent: list[bytes] = []
            fast.peer.link = sent.append
            table.retire(out_fd)  # type: ignore[attr-defined]
            data, addr = stream.datagram("next", 1)
            fast.feed(data, addr, clock.now)
            assert sent == [data]
            assert fast.forwarded() == [first[0]]  # only the first, by Python
            assert fast.port.packets == 2
        finally:
            fast.close()


def _relay(low: int) -> RelayServer:
    engine = RelayEngine(
        PortAllocator(low, low + 19), sdp_allowed=policy_predicate(DestinationPolicy(allow=["127.0.0.0/8"]))
    )
    return RelayServer(engine, "127.0.0.1", receive_buffer=1 << 20)


def _parties() -> list[socket.socket]:
    """Two phones' sockets, on 127.0.0.2 and 127.0.0.3 (non-blocking, room for bursts)."""
    socks = []
    for host in ("127.0.0.2", "127.0.0.3"):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, 0))
        s.setblocking(False)
        socks.append(s)
    return socks


async def test_counters_of_the_fast_path_reach_query_and_totals() -> None:
    server = _relay(41400)
    assert server.fast_path
    socks = _parties()
    a, b = socks
    try:
        [b_ports] = await server.offer("call", "ta", [MediaEndpoint(*a.getsockname())])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint(*b.getsockname())])
        count = 300
        for seq in range(count):
            a.sendto(rtp(seq, seq * 160, 0xA, 160), ("127.0.0.1", a_ports.rtp))
            b.sendto(rtp(seq, seq * 160, 0xB, 160), ("127.0.0.1", b_ports.rtp))
            if seq % 20 == 0:
                await asyncio.sleep(0.005)  # both latch and link early; the rest is the fast path's

        async def drained(s: socket.socket) -> list[bytes]:
            got: list[bytes] = []
            for _ in range(500):
                while True:
                    try:
                        got.append(s.recv(2048))
                    except BlockingIOError:
                        break
                if len(got) >= count:
                    return got
                await asyncio.sleep(0.01)
            return got

        to_b, to_a = await drained(b), await drained(a)
        assert to_b == [rtp(seq, seq * 160, 0xA, 160) for seq in range(count)]
        assert to_a == [rtp(seq, seq * 160, 0xB, 160) for seq in range(count)]
        assert server.linked_ports == 2
        assert server.fast_ports == 2
        stats = server.query("call")
        legs = [m.media[0].rtp for m in stats.monologues]
        for leg in legs:
            assert (leg.packets, leg.bytes) == (count, count * 172)
            assert (leg.received, leg.expected, leg.lost) == (count, count, 0)
            assert leg.last_seen is not None
        totals = server.totals()
        assert (totals.packets, totals.bytes) == (2 * count, 2 * count * 172)
        final = server.delete("call")
        assert sum(m.media[0].rtp.packets for m in final.monologues) == 2 * count
        assert server.totals().packets == 2 * count  # the freed ports' counters were written back
    finally:
        server.close()
        for s in socks:
            s.close()


async def test_a_one_way_stream_is_forwarded_and_counted_by_the_fast_path() -> None:
    """Only one party sends (its peer never latched): the fast path sends from the peer's port
    to the address of the peer's SDP, as the Python path does; then the peer latches."""
    server = _relay(41440)
    socks = _parties()
    a, b = socks

    async def drained(s: socket.socket, count: int) -> list[bytes]:
        got: list[bytes] = []
        for _ in range(500):
            while True:
                try:
                    got.append(s.recv(2048))
                except BlockingIOError:
                    break
            if len(got) >= count:
                break
            await asyncio.sleep(0.01)
        return got

    try:
        [b_ports] = await server.offer("call", "ta", [MediaEndpoint(*a.getsockname())])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint(*b.getsockname())])
        count = 200
        loaded = False
        for seq in range(count):
            a.sendto(rtp(seq, seq * 160, 0xA, 160), ("127.0.0.1", a_ports.rtp))
            if seq % 20 == 0:
                await asyncio.sleep(0.005)
                loaded = loaded or server.fast_ports == 1
        assert await drained(b, count) == [rtp(seq, seq * 160, 0xA, 160) for seq in range(count)]
        assert loaded
        [a_leg, b_leg] = [m.media[0].rtp for m in server.query("call").monologues]
        assert (a_leg.packets, a_leg.received, a_leg.lost, b_leg.packets) == (count, count, 0, 0)
        # the callee sends at last: it latches, and the caller's packets now take its link
        b.sendto(rtp(0, 0, 0xB, 160), ("127.0.0.1", b_ports.rtp))
        assert await drained(a, 1) == [rtp(0, 0, 0xB, 160)]
        await until_linked(server, 2)
        for seq in range(count, 2 * count):
            a.sendto(rtp(seq, seq * 160, 0xA, 160), ("127.0.0.1", a_ports.rtp))
            if seq % 20 == 0:
                await asyncio.sleep(0.005)
        assert await drained(b, count) == [rtp(seq, seq * 160, 0xA, 160) for seq in range(count, 2 * count)]
        [a_leg, b_leg] = [m.media[0].rtp for m in server.query("call").monologues]
        assert (a_leg.packets, a_leg.received, a_leg.lost, b_leg.packets) == (2 * count, 2 * count, 0, 1)
    finally:
        server.close()
        for s in socks:
            s.close()


async def until_linked(server: RelayServer, ports: int) -> None:
    for _ in range(200):
        if server.linked_ports == ports:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.linked_ports} linked ports, not {ports}")


async def test_the_media_timeout_sees_what_the_fast_path_forwards() -> None:
    """The fast path's "last seen" reaches the media timeout: a call whose media flows only
    through it outlives the timeout, and is freed once its media stops."""
    engine = RelayEngine(
        PortAllocator(*free_port_range(20)),
        sdp_allowed=policy_predicate(DestinationPolicy(allow=["127.0.0.0/8"])),
        media_timeout=1.5,
    )
    expired: list[str] = []
    server = RelayServer(engine, "127.0.0.1", receive_buffer=1 << 20, on_expired=lambda s: expired.append(s.call_id))
    socks = _parties()
    a, b = socks
    try:
        [b_ports] = await server.offer("call", "ta", [MediaEndpoint(*a.getsockname())])
        [a_ports] = await server.answer("call", "ta", "tb", [MediaEndpoint(*b.getsockname())])
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.5  # more than twice the timeout
        seq = 0
        fast = False
        while loop.time() < until:
            a.sendto(rtp(seq, seq * 160, 0xA, 160), ("127.0.0.1", a_ports.rtp))
            b.sendto(rtp(seq, seq * 160, 0xB, 160), ("127.0.0.1", b_ports.rtp))
            seq += 1
            await asyncio.sleep(0.05)
            fast = fast or server.fast_ports == 2
            for s in socks:  # keep the phones' queues short
                while True:
                    try:
                        s.recv(2048)
                    except BlockingIOError:
                        break
        assert fast
        assert expired == []
        assert engine.list_calls() == ["call"]
        for _ in range(100):  # silence: freed after the timeout
            if expired:
                break
            await asyncio.sleep(0.1)
        assert expired == ["call"]
        assert server.totals().packets == 2 * seq  # written back when its ports closed
    finally:
        server.close()
        for s in socks:
            s.close()


def test_fast_path_off_leaves_every_packet_to_python() -> None:
    engine = RelayEngine(PortAllocator(*free_port_range(20)))
    server = RelayServer(engine, "127.0.0.1", fast_path=False)
    try:
        assert not server.fast_path
        assert server.fast_ports == 0
    finally:
        server.close()
