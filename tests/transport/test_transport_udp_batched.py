"""The batched UDP endpoint (recvmmsg/sendmmsg) does what asyncio's datagram protocol does.

A Hypothesis property feeds the same datagrams (SIP requests and responses, malformed ones,
CRLF and STUN keep-alives, garbage) from several sources to both endpoints: the batched one in
batches of any size, with its answers written to real loopback sockets by sendmmsg; the
datagram protocol one with a transport that records what it is asked to send.  What reaches
the message callback, what is answered to whom and in which order, and every counter must be
the same.  Plus the endpoint over real sockets: reading in batches with a batch interval,
sends from outside a batch (a timer), a full send queue, closing.

The C extension is built by scripts/build-compiled.sh only: skipped in the interpreted stage.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from conftest import Runner, sip_request, udp_client, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager
from sipfarm.transport.stun import MAGIC_COOKIE
from sipfarm.transport.udp import HAVE_BATCHIO, BatchedUdpEndpoint, UdpBatches, UdpEndpoint

pytestmark = pytest.mark.skipif(not HAVE_BATCHIO, reason="sipfarm.transport._batchio is built by build-compiled.sh")

# sources: two on 127.0.0.1 and one on 127.0.0.2, a host allow_source refuses
SOURCE_HOSTS = ("127.0.0.1", "127.0.0.1", "127.0.0.2")
REFUSED_HOST = "127.0.0.2"


def _stun(kind: int, length: int = 0, cookie: int = MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", kind, length, cookie) + b"\x07" * 12


DATAGRAMS = st.one_of(
    st.builds(
        lambda n, method: sip_request(call_id=f"c{n}@t", method=method),
        st.integers(0, 9),
        st.sampled_from(["OPTIONS", "INVITE", "REGISTER", "BYE"]),
    ),
    st.just(sip_request(call_id="bad", cseq_method="INVITE")),  # answered 400
    st.just(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5;branch=z9hG4bK-x\r\nFrom: <sip:a@t>;tag=1\r\n"
        b"To: <sip:b@t>\r\nCall-ID: r@t\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ),
    st.sampled_from([b"\r\n", b"\r\n\r\n", b"", b"\n"]),  # keep-alives (and an empty datagram)
    st.sampled_from([_stun(0x0001), _stun(0x0101), _stun(0x0001, length=4), _stun(0x0011)]),
    st.binary(max_size=40),
)


class _RecordingTransport:
    """What UdpEndpoint needs of a datagram transport; keeps what it is asked to send."""

    def __init__(self, sockname: tuple[str, int]) -> None:
        self.sockname = sockname
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def get_extra_info(self, name: str) -> object:
        return self.sockname if name == "sockname" else None

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _normalized(data: bytes) -> bytes:
    return re.sub(rb"tag=[0-9a-f]{8}", b"tag=T", data)  # error responses get a random To tag


class _Recorder:
    def __init__(self) -> None:
        self.manager: TransportManager | None = None
        self.seen: list[tuple[bytes, Address, Address]] = []
        self.keepalives: list[Address] = []

    def on_message(self, msg: SipMessage, source: Address, local: Address) -> None:
        self.seen.append((msg.to_bytes(), source, local))
        if msg.status == 0 and self.manager is not None:
            self.manager.send(b"answer to " + msg.call_id, source, local=local)

    def new_manager(self) -> TransportManager:
        manager = TransportManager(self.on_message)
        manager.on_keepalive = self.keepalives.append
        manager.allow_source = lambda host: host != REFUSED_HOST
        self.manager = manager
        return manager


@pytest.fixture
def sources() -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for host in SOURCE_HOSTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host, 0))
            sock.setblocking(False)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    datagrams=st.lists(st.tuples(DATAGRAMS, st.integers(0, len(SOURCE_HOSTS) - 1)), max_size=40),
    cuts=st.lists(st.integers(1, 12), max_size=10),
)
def test_batched_endpoint_does_what_the_datagram_protocol_does(
    sources: list[socket.socket], datagrams: list[tuple[bytes, int]], cuts: list[int]
) -> None:
    addrs = [sock.getsockname() for sock in sources]
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        # the batched endpoint, its answers sent for real
        batched = _Recorder()
        manager = batched.new_manager()
        endpoint = BatchedUdpEndpoint(manager, sock, UdpBatches(loop), 0.0)
        manager._udp[endpoint.local] = endpoint
        manager._udp_v4 = endpoint
        batch = [(data, addrs[i]) for data, i in datagrams]
        position = 0
        for size in [*cuts, len(batch)]:
            chunk = batch[position : position + size]
            position += len(chunk)
            endpoint._batches.begin()
            endpoint.handle(chunk)
            endpoint._batches.end()
        # the datagram protocol with the same local address, its answers recorded
        reference = _Recorder()
        ref_manager = reference.new_manager()
        ref_endpoint = UdpEndpoint(ref_manager)
        transport = _RecordingTransport(endpoint.local[1:])
        ref_endpoint.connection_made(transport)  # type: ignore[arg-type]
        ref_manager._udp[ref_endpoint.local] = ref_endpoint
        ref_manager._udp_v4 = ref_endpoint
        for data, i in datagrams:
            ref_endpoint.datagram_received(data, addrs[i])

        assert [(_normalized(m), s, loc) for m, s, loc in batched.seen] == [
            (_normalized(m), s, loc) for m, s, loc in reference.seen
        ]
        assert batched.keepalives == reference.keepalives
        assert manager.stats.flat() == ref_manager.stats.flat()
        for source, addr in zip(sources, addrs, strict=True):
            expected = [_normalized(data) for data, dest in transport.sent if dest == addr]
            got: list[bytes] = []
            deadline = time.monotonic() + 10
            while len(got) < len(expected) and time.monotonic() < deadline:
                select.select([source], [], [], 0.2)
                try:
                    got.append(_normalized(source.recv(65536)))
                except BlockingIOError:
                    continue
            assert got == expected
            time.sleep(0.001)
            with pytest.raises(BlockingIOError):
                source.recv(65536)  # nothing more than the datagram protocol sent
    finally:
        sock.close()
        loop.close()


async def _batched_manager(interval: float, on_message: object) -> tuple[TransportManager, Address]:
    manager = TransportManager(on_message, config=TransportConfig(udp_batch_interval=interval))  # type: ignore[arg-type]
    addr = await manager.listen("udp:127.0.0.1:0")
    assert manager.batched_udp
    return manager, addr


@pytest.mark.parametrize("interval", [0.0, 0.002])
def test_a_burst_is_read_in_batches_and_every_request_answered(arun: Runner, interval: float) -> None:
    async def scenario() -> None:
        seen: list[bytes] = []
        holder: list[TransportManager] = []

        def on_message(msg: SipMessage, source: Address, local: Address) -> None:
            seen.append(msg.call_id)
            holder[0].send(b"ok " + msg.call_id, source, local=local)

        manager, addr = await _batched_manager(interval, on_message)
        holder.append(manager)
        client = await udp_client()
        count = 500
        for i in range(count):
            client.send(sip_request(call_id=f"burst-{i}"), addr)
            if i % 50 == 49:
                await asyncio.sleep(0.005)
        answers = {await client.recv(timeout=10) for _ in range(count)}
        assert answers == {b"ok burst-%d" % i for i in range(count)}
        assert seen == [b"burst-%d" % i for i in range(count)]  # in order
        assert manager.stats.sent["udp"] == count
        assert manager.stats.dropped == 0
        # idle again: the next datagram is read at once (the socket is watched again)
        client.send(sip_request(call_id="after"), addr)
        assert await client.recv() == b"ok after"
        client.close()
        await manager.close()

    arun(scenario())


def test_with_an_interval_a_light_load_is_read_as_it_comes_and_a_burst_once_per_interval(arun: Runner) -> None:
    """batch_interval > 0 delays nothing under a light load: a wake-up that finds one datagram
    keeps the socket watched. One that finds BUSY or more hands the socket to the timer, which
    reads it once per interval while datagrams keep coming, then watches it again."""

    async def scenario() -> None:
        seen: list[bytes] = []
        manager, addr = await _batched_manager(0.05, lambda msg, source, local: seen.append(msg.call_id))
        endpoint = manager._udp[addr]
        assert isinstance(endpoint, BatchedUdpEndpoint)
        client = await udp_client()
        for i in range(5):
            client.send(sip_request(call_id=f"one-{i}"), addr)
            await wait_until(lambda: len(seen) == i + 1)  # noqa: B023 - awaited here
            assert endpoint._reading and endpoint._timer is None
        for i in range(20):  # sent before the loop runs the endpoint: one wake-up finds them all
            client.send(sip_request(call_id=f"burst-{i}"), addr)
        await wait_until(lambda: len(seen) == 25)
        assert not endpoint._reading and endpoint._timer is not None
        await wait_until(lambda: endpoint._reading and endpoint._timer is None)  # quiet: watched again
        client.send(sip_request(call_id="after"), addr)
        await wait_until(lambda: len(seen) == 26)
        assert endpoint._reading and endpoint._timer is None
        client.close()
        await manager.close()

    arun(scenario())


def test_sends_outside_a_batch_go_out_on_the_next_iteration(arun: Runner) -> None:
    async def scenario() -> None:
        manager, _ = await _batched_manager(0.0, lambda *_: None)
        client = await udp_client()
        dest = Address("udp", "127.0.0.1", client.port)
        loop = asyncio.get_running_loop()
        # from a timer, as a retransmission or a Redis reply would: three sends, one flush
        loop.call_later(0.01, lambda: [manager.send(b"timer %d" % i, dest) for i in range(3)])
        assert [await client.recv(timeout=10) for _ in range(3)] == [b"timer 0", b"timer 1", b"timer 2"]
        # from a coroutine
        assert manager.send(b"task", dest)
        assert await client.recv() == b"task"
        assert manager.stats.sent["udp"] == 4
        client.close()
        await manager.close()

    arun(scenario())


def test_the_send_queue_is_bounded(arun: Runner) -> None:
    async def scenario() -> None:
        manager = TransportManager(lambda *_: None, config=TransportConfig(udp_send_buffer_limit=10_000))
        await manager.listen("udp:127.0.0.1:0")
        client = await udp_client()
        dest = Address("udp", "127.0.0.1", client.port)
        # a burst from one callback, no flush between: bounded by the limit, drops counted
        sent = sum(manager.send(b"x" * 1000, dest) for _ in range(30))
        assert 10 <= sent < 30
        assert manager.stats.dropped == 30 - sent
        await wait_until(lambda: manager.stats.sent["udp"] == sent)
        # queue written: room again
        await asyncio.sleep(0.01)
        assert manager.send(b"again", dest)
        client.close()
        await manager.close()
        assert not manager.send(b"closed", dest)

    arun(scenario())


def test_ipv6_and_keepalives_over_real_sockets(arun: Runner) -> None:
    async def scenario() -> None:
        seen: list[Address] = []
        manager = TransportManager(lambda msg, source, local: seen.append(source))
        try:
            addr = await manager.listen("udp:[::1]:0")
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback: {exc}")
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        client.bind(("::1", 0))
        client.settimeout(10)
        try:
            loop = asyncio.get_running_loop()
            client.sendto(_stun(0x0001), (addr.host, addr.port))
            answer = await loop.run_in_executor(None, client.recv, 2048)
            assert answer[:2] == b"\x01\x01"  # Binding success
            client.sendto(b"\r\n\r\n", (addr.host, addr.port))
            client.sendto(sip_request(call_id="v6"), (addr.host, addr.port))
            await wait_until(lambda: len(seen) == 1)
            assert seen == [Address("udp", "::1", client.getsockname()[1])]
            assert manager.stats.keepalive_pings == 2
            assert manager.stats.stun_answered == 1
        finally:
            client.close()
            await manager.close()

    arun(scenario())


def test_one_endpoints_failed_write_stops_neither_it_nor_the_others(arun: Runner) -> None:
    """A send_batch that raises (here: a destination the extension cannot take) drops that
    endpoint's queue and is counted; the other endpoints in the same flush still write, and the
    failed endpoint writes again afterwards."""

    async def scenario() -> None:
        manager = TransportManager(lambda *_: None)
        first = await manager.listen("udp:127.0.0.1:0")
        second = await manager.listen("udp:127.0.0.1:0")
        client = await udp_client()
        dest = Address("udp", "127.0.0.1", client.port)
        # queued outside a batch: one flush on the next iteration writes both endpoints
        broken = manager._udp[first]
        assert isinstance(broken, BatchedUdpEndpoint)
        broken._queue.append((b"bad", ("127.0.0.1",)))  # type: ignore[arg-type]  # send_batch raises on it
        assert manager.send(b"lost with it", dest, local=first)
        assert manager.send(b"good", dest, local=second)
        assert await client.recv(timeout=10) == b"good"
        await wait_until(lambda: manager.stats.send_errors == 2)
        assert manager.send(b"again", dest, local=first)
        assert await client.recv(timeout=10) == b"again"
        client.close()
        await manager.close()

    arun(scenario())


def test_a_failing_datagram_does_not_lose_the_rest_of_its_batch(arun: Runner) -> None:
    seen: list[str] = []

    def on_message(msg: SipMessage, source: Address, local: Address) -> None:
        seen.append(msg.call_id)

    async def scenario() -> None:
        manager, addr = await _batched_manager(0.002, on_message)
        deliver = manager.deliver

        def flaky(data: bytes, source: Address, local: Address) -> None:
            if b"boom" in data:
                raise RuntimeError("a bug on one datagram")
            deliver(data, source, local)

        for endpoint in manager._udp.values():
            endpoint._deliver = flaky  # type: ignore[union-attr]
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for n in range(6):
                client.sendto(sip_request(call_id="boom" if n == 2 else f"ok{n}"), (addr.host, addr.port))
            await wait_until(lambda: len(seen) == 5)
        finally:
            client.close()
        assert manager.stats.internal_errors == 1
        await manager.close()

    arun(scenario())
