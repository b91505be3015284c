"""The batched UDP system calls (sipfarm/transport/_batchio.c) over real loopback sockets.

The extension is built by scripts/build-compiled.sh only: these tests run in the compiled
stage (scripts/test-compiled.sh) and are skipped in the interpreted one.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

batchio = pytest.importorskip("sipfarm.transport._batchio")

SIZES = [0, 1, 17, 100, 1400, 1500, 9000, 60000]


def _pair(family: socket.AddressFamily, host: str) -> tuple[socket.socket, socket.socket]:
    receiver = socket.socket(family, socket.SOCK_DGRAM)
    sender = socket.socket(family, socket.SOCK_DGRAM)
    for sock in (receiver, sender):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((host, 0))
        sock.setblocking(False)
    return receiver, sender


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    family, host = request.param
    try:
        receiver, sender = _pair(family, host)
    except OSError as exc:  # no IPv6 on this machine
        pytest.skip(f"cannot bind {host}: {exc}")
    yield receiver, sender
    receiver.close()
    sender.close()


def _receive(
    sock: socket.socket, count: int, max_datagrams: int = 64, bufsize: int = 65536
) -> list[tuple[bytes, tuple[str, int]]]:
    """Datagrams from ``sock`` until ``count`` have come (or 10 s: then what came)."""
    got: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        select.select([sock], [], [], 0.2)
        got.extend(batchio.recv_batch(sock.fileno(), max_datagrams, bufsize))
    return got


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


def test_nothing_waiting_is_an_empty_list(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, _ = pair
    assert batchio.recv_batch(receiver.fileno(), 8, 2048) == []


def test_a_batch_of_mixed_sizes_arrives_whole_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    payloads = [bytes([i % 251]) * size for i, size in enumerate(SIZES * 3)]
    for data in payloads:
        sender.sendto(data, _address(receiver))
    got = _receive(receiver, len(payloads), max_datagrams=5)  # several batches
    assert [data for data, _ in got] == payloads
    # the source as the socket module formats it: (host, port)
    assert {source for _, source in got} == {_address(sender)}
    assert all(type(source[0]) is str and type(source[1]) is int for _, source in got)


def test_sources_are_told_apart(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, _ = pair
    family = receiver.family
    host = _address(receiver)[0]
    others = [_pair(family, host)[1] for _ in range(40)]  # more than the source cache holds
    try:
        for round_ in range(2):
            for i, other in enumerate(others):
                other.sendto(b"%d:%d" % (round_, i), _address(receiver))
        got = _receive(receiver, 2 * len(others))
        assert len(got) == 2 * len(others)
        for data, source in got:
            i = int(data.split(b":")[1])
            assert source == _address(others[i])
    finally:
        for other in others:
            other.close()


def test_send_batch_sends_in_order_with_one_call(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    dest = _address(receiver)
    datagrams: list[tuple[bytes, tuple[str, int] | None]] = [(b"m%03d" % i + b"x" * (i * 37), dest) for i in range(150)]
    assert batchio.send_batch(sender.fileno(), datagrams) == len(datagrams)
    got = _receive(receiver, len(datagrams))
    assert [data for data, _ in got] == [data for data, _ in datagrams]
    assert batchio.send_batch(sender.fileno(), []) == 0


def test_truncated_datagrams_are_dropped_and_counted(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    truncated_before = batchio.counters()[0]
    for size in (50, 150, 100, 99, 101, 0):
        sender.sendto(b"t" * size, _address(receiver))
    got = _receive(receiver, 4, bufsize=100)
    time.sleep(0.05)
    got += batchio.recv_batch(receiver.fileno(), 64, 100)
    assert [len(data) for data, _ in got] == [50, 100, 99, 0]  # never a cut one
    assert batchio.counters()[0] - truncated_before == 2


def test_a_refused_datagram_is_skipped_and_counted(pair: tuple[socket.socket, socket.socket]) -> None:
    receiver, sender = pair
    dest = _address(receiver)
    errors_before = batchio.counters()[1]
    datagrams: list[tuple[bytes, tuple[str, int] | None]] = [
        (b"first", dest),
        (b"not numeric", ("localhost", dest[1])),  # numeric hosts only
        (b"x" * 70_000, dest),  # EMSGSIZE
        (b"second", dest),
        (b"bad port", (dest[0], 70_000)),
        (b"third", dest),
    ]
    assert batchio.send_batch(sender.fileno(), datagrams) == len(datagrams)
    assert [data for data, _ in _receive(receiver, 3)] == [b"first", b"second", b"third"]
    assert batchio.counters()[1] - errors_before == 3


def test_a_full_socket_leaves_the_rest_to_the_caller() -> None:
    # a datagram socket pair: the sender gets EAGAIN once the peer's queue is full
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        left.setblocking(False)
        right.setblocking(False)
        datagrams: list[tuple[bytes, tuple[str, int] | None]] = [(b"%05d" % i + b"y" * 1000, None) for i in range(5000)]
        sent = batchio.send_batch(left.fileno(), datagrams)
        assert 0 < sent < len(datagrams)
        received = []
        while True:
            try:
                received.append(right.recv(2048))
            except BlockingIOError:
                break
        assert received == [data for data, _ in datagrams[:sent]]  # exactly what it said it sent
        # the caller retries the rest once there is room
        more = batchio.send_batch(left.fileno(), datagrams[sent:])
        assert more > 0
        assert right.recv(2048) == datagrams[sent][0]
    finally:
        left.close()
        right.close()


def test_bounds_are_checked() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(ValueError, match="max_datagrams"):
            batchio.recv_batch(sock.fileno(), batchio.MAX_BATCH + 1, 100)
        with pytest.raises(ValueError, match="bufsize"):
            batchio.recv_batch(sock.fileno(), 8, batchio.MAX_BUFSIZE + 1)
        with pytest.raises(TypeError):
            batchio.send_batch(sock.fileno(), [("text", ("127.0.0.1", 9))])
        with pytest.raises(OSError):
            batchio.recv_batch(-1, 8, 100)
