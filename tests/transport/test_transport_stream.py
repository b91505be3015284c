"""TCP flows through TransportManager over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Runner, Uas, read_message, sip_request, wait_until

from sipfarm.sip.address import Address
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import parse_message
from sipfarm.sip.via import response_target
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager

TCP_VIA = "SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-1;rport"


async def _uas_on_tcp(uas: Uas, **config: float) -> tuple[TransportManager, Address]:
    manager = TransportManager(uas, config=TransportConfig(**config))  # type: ignore[arg-type]
    uas.manager = manager
    return manager, await manager.listen("tcp:127.0.0.1:0")


async def _connect(addr: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(addr.host, addr.port)


async def _closed_by_peer(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionResetError:
        pass
    return True


def test_message_split_byte_by_byte_is_framed_and_answered_on_the_same_connection(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_tcp(uas)
        reader, writer = await _connect(addr)
        data = sip_request(via=TCP_VIA, body=b"v=0\r\n")
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        response = parse_message(await read_message(reader))
        assert response.status == 200
        msg, source, local = uas.seen[0]
        assert msg.body == b"v=0\r\n"
        assert source == Address("tcp", *writer.get_extra_info("sockname")[:2])
        assert local == addr
        # the answer used the connection the client opened: no second connection
        assert manager.stats.connections_opened == 1
        assert manager.stats.received["tcp"] == manager.stats.sent["tcp"] == 1
        writer.close()
        await manager.close()

    arun(scenario())


def test_two_messages_in_one_write(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_tcp(uas)
        reader, writer = await _connect(addr)
        writer.write(sip_request(via=TCP_VIA, call_id="one") + sip_request(via=TCP_VIA, call_id="two"))
        first = parse_message(await read_message(reader))
        second = parse_message(await read_message(reader))
        assert (first.call_id, second.call_id) == (b"one", b"two")
        assert [m.call_id for m, _, _ in uas.seen] == [b"one", b"two"]
        writer.close()
        await manager.close()

    arun(scenario())


def test_crlfcrlf_ping_gets_a_crlf_pong(arun: Runner) -> None:
    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas())
        reader, writer = await _connect(addr)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), 3) == b"\r\n"
        # the flow is still usable afterwards
        writer.write(sip_request(via=TCP_VIA))
        assert parse_message(await read_message(reader)).status == 200
        assert manager.stats.keepalive_pings == 1
        writer.close()
        await manager.close()

    arun(scenario())


async def _read_until_closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything the peer sent until it closed the connection."""
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_a_flood_of_pings_gets_one_pong_a_read_and_is_closed_as_abuse(arun: Runner) -> None:
    """Red team, 2026-12-02: 0.8 MB/s of CRLFCRLF on one connection, one pong each, took half
    a core from the balancer.  A read of many pings gets one pong; over ``ping_limit`` pings
    in ``ping_window`` the flow is closed and counted; other flows are not affected."""

    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas())
        abused: list[str] = []
        manager.on_abuse = abused.append  # the balancer's front door counts them (bans a repeater)
        other_r, other_w = await _connect(addr)
        reader, writer = await _connect(addr)
        writer.write(b"\r\n\r\n" * 1000)
        pongs = await _read_until_closed(reader)
        assert pongs == b"\r\n" * (len(pongs) // 2) and 0 < len(pongs) <= 3 * 2
        assert manager.stats.abuse == {"ping_flood": 1} and abused == ["127.0.0.1"]
        assert manager.stats.connections_closed_abuse == 1
        assert manager.stats.keepalive_pings <= manager.config.ping_limit + 1
        other_w.write(sip_request(via=TCP_VIA))
        assert parse_message(await read_message(other_r)).status == 200
        for w in (writer, other_w):
            w.close()
        await manager.close()

    arun(scenario())


def test_a_client_pinging_at_its_pace_gets_every_pong_and_stays(arun: Runner) -> None:
    """RFC 5626 4.4.1: one ping at a time, each answered (here 2 per 0.5 s window, limit 3)."""

    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas(), ping_limit=3, ping_window=0.5)
        reader, writer = await _connect(addr)
        for _ in range(8):
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), 3) == b"\r\n"
            await asyncio.sleep(0.25)
        writer.write(sip_request(via=TCP_VIA))
        assert parse_message(await read_message(reader)).status == 200
        assert manager.stats.keepalive_pings == 8
        assert manager.stats.abuse == {}
        writer.close()
        await manager.close()

    arun(scenario())


def test_pings_over_the_limit_one_read_at_a_time_close_the_flow(arun: Runner) -> None:
    """The limit counts pings, not reads: one ping a write, faster than ping_limit allows."""

    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas(), ping_limit=3, ping_window=5.0)
        reader, writer = await _connect(addr)
        for _ in range(3):
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), 3) == b"\r\n"
        writer.write(b"\r\n\r\n")
        assert await _read_until_closed(reader) == b""
        assert manager.stats.abuse == {"ping_flood": 1}
        writer.close()
        await manager.close()

    arun(scenario())


def test_garbage_and_oversize_connections_are_closed_others_keep_working(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_tcp(uas, max_message_size=4000)
        good_r, good_w = await _connect(addr)
        good_w.write(sip_request(via=TCP_VIA, call_id="before"))
        assert parse_message(await read_message(good_r)).status == 200

        bad_r, bad_w = await _connect(addr)
        bad_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no Content-Length: framing error
        assert await _closed_by_peer(bad_r)
        big_r, big_w = await _connect(addr)
        big_w.write(sip_request(via=TCP_VIA, content_length=10_000))  # announces an oversize body
        assert await _closed_by_peer(big_r)
        flood_r, flood_w = await _connect(addr)
        flood_w.write(b"INVITE sip:x SIP/2.0\r\n" + b"X: y\r\n" * 1000)  # headers never end
        assert await _closed_by_peer(flood_r)

        good_w.write(sip_request(via=TCP_VIA, call_id="after"))
        assert parse_message(await read_message(good_r)).call_id == b"after"
        stats = manager.stats
        assert stats.parse_errors == {"bad_message": 1, "too_large": 2}
        assert stats.abuse == {"bad_message": 1, "too_large": 2}
        assert stats.connections_closed_abuse == 3
        await wait_until(lambda: stats.connections_closed == 3)
        for w in (good_w, bad_w, big_w, flood_w):
            w.close()
        await manager.close()

    arun(scenario())


@pytest.mark.parametrize(
    ("shape", "status"),
    [
        ("no content-length", 400),
        ("content-length: abc", 400),
        ("two content-lengths", 400),
        ("content-length over the maximum", 413),
    ],
)
def test_a_request_that_breaks_the_framing_is_answered_before_the_flow_closes(
    arun: Runner, shape: str, status: int
) -> None:
    """RFC 3261 18.3 asks for Content-Length on a stream: a request without a usable one has no
    message boundary, so the flow cannot go on, but its header section can be answered (red
    team 2026-12-03: closed without a word, a phone saw only a reset)."""
    request = sip_request(via=TCP_VIA, call_id="framing")
    if shape == "no content-length":
        request = request.replace(b"Content-Length: 0\r\n", b"")
    elif shape == "content-length: abc":
        request = request.replace(b"Content-Length: 0", b"Content-Length: abc")
    elif shape == "two content-lengths":
        request = request.replace(b"Content-Length: 0\r\n", b"Content-Length: 0\r\nl: 5\r\n")
    else:
        request = sip_request(via=TCP_VIA, call_id="framing", content_length=10_000)

    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_tcp(uas, max_message_size=4000)
        reader, writer = await _connect(addr)
        writer.write(request)
        received = await _read_until_closed(reader)
        answer = parse_message(received)
        assert (answer.status, answer.call_id, answer.cseq) == (status, b"framing", (1, b"OPTIONS")), received
        assert received.endswith(b"\r\n\r\n")  # one whole answer, then the close
        assert uas.seen == []
        assert manager.stats.connections_closed_abuse == 1 and manager.stats.error_responses == 1
        writer.close()
        await manager.close()

    arun(scenario())


def test_a_request_answered_after_the_framing_broke_behind_it_still_gets_its_answer(arun: Runner) -> None:
    """A valid request and garbage in one write (red team 2026-12-03, RFC 4475 dblreq over
    TCP): the connection closed at once and the valid request's answer, not written yet, was
    lost. Nothing more is read; the flow closes once the owed answers are written."""

    async def scenario() -> None:
        uas = Uas(answer=False)  # answers later, as a node behind the balancer does
        manager, addr = await _uas_on_tcp(uas)
        reader, writer = await _connect(addr)
        writer.write(sip_request(via=TCP_VIA, call_id="owed") + b"xyz\r\n\r\n")
        await wait_until(lambda: manager.stats.abuse == {"bad_message": 1})
        writer.write(sip_request(via=TCP_VIA, call_id="unread"))  # no longer read
        await asyncio.sleep(0.2)
        assert [m.call_id for m, _, _ in uas.seen] == [b"owed"]
        msg, source, local = uas.seen[0]
        response = make_response(msg, 200, to_tag=b"uas")
        assert manager.send(response.to_bytes(), response_target(response, source), local=local)
        received = await _read_until_closed(reader, timeout=5.0)
        answer = parse_message(received)
        assert (answer.status, answer.call_id) == (200, b"owed"), received
        assert received.endswith(b"\r\n\r\n")  # that answer alone, then the close
        writer.close()
        await manager.close()

    arun(scenario())


def test_what_breaks_the_framing_without_an_answerable_request_gets_no_answer(arun: Runner) -> None:
    """Not SIP, a response, an ACK, a request without its Via: closed without a word."""
    shapes = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        sip_request(via=TCP_VIA, method="ACK").replace(b"Content-Length: 0\r\n", b""),
        b"SIP/2.0 200 OK\r\nVia: " + TCP_VIA.encode() + b"\r\nCSeq: 1 OPTIONS\r\n\r\n",
        sip_request(via=TCP_VIA).replace(b"Content-Length: 0\r\n", b"").replace(f"Via: {TCP_VIA}\r\n".encode(), b""),
    ]

    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas())
        for data in shapes:
            reader, writer = await _connect(addr)
            writer.write(data)
            assert await _read_until_closed(reader) == b"", data
            writer.close()
        assert manager.stats.error_responses == 0
        await manager.close()

    arun(scenario())


def test_malformed_but_framed_message_is_answered_and_the_flow_stays(arun: Runner) -> None:
    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas())
        reader, writer = await _connect(addr)
        writer.write(sip_request(via=TCP_VIA, cseq_method="BYE") + sip_request(via=TCP_VIA))
        assert parse_message(await read_message(reader)).status == 400
        assert parse_message(await read_message(reader)).status == 200
        assert manager.stats.connections_closed_abuse == 0
        writer.close()
        await manager.close()

    arun(scenario())


def test_stalled_partial_message_is_closed_after_the_timeout(arun: Runner) -> None:
    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas(), message_timeout=0.2)
        other_r, other_w = await _connect(addr)
        reader, writer = await _connect(addr)
        writer.write(sip_request(via=TCP_VIA)[:60])
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await _closed_by_peer(reader)
        assert 0.15 < loop.time() - start < 2.0
        assert manager.stats.abuse == {"stalled": 1}
        other_w.write(sip_request(via=TCP_VIA))  # idle, not stalled: still open
        assert parse_message(await read_message(other_r)).status == 200
        writer.close()
        other_w.close()
        await manager.close()

    arun(scenario())


def test_idle_connection_is_closed(arun: Runner) -> None:
    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas(), idle_timeout=0.2)
        reader, writer = await _connect(addr)
        assert await _closed_by_peer(reader)
        assert manager.stats.connections_idle_closed == 1
        assert manager.stats.connections_closed_abuse == 0
        writer.close()
        await manager.close()

    arun(scenario())


def test_connection_limit(arun: Runner) -> None:
    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas(), max_connections=1)
        reader, writer = await _connect(addr)
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), 3) == b"\r\n"
        refused_r, refused_w = await _connect(addr)
        assert await _closed_by_peer(refused_r)
        assert manager.stats.connections_refused == 1
        for w in (writer, refused_w):
            w.close()
        await manager.close()

    arun(scenario())


def test_peer_that_does_not_read_is_closed(arun: Runner) -> None:
    async def scenario() -> None:
        manager, addr = await _uas_on_tcp(Uas(), write_buffer_high=16 * 1024, write_buffer_limit=64 * 1024)
        _reader, writer = await _connect(addr)
        writer.write(b"\r\n\r\n")
        await wait_until(lambda: manager.stats.keepalive_pings == 1)
        peer = Address("tcp", *writer.get_extra_info("sockname")[:2])
        blob = b"x" * 65536
        for _ in range(2000):  # the kernel's buffers fill up first, then ours
            if not manager.send(blob, peer):
                break
            await asyncio.sleep(0)
        assert manager.stats.abuse == {"slow_reader": 1}
        writer.close()
        await manager.close()

    arun(scenario(), timeout=20)


def test_outbound_connection_carries_request_and_response(arun: Runner) -> None:
    async def scenario() -> None:
        server_uas = Uas()
        server, addr = await _uas_on_tcp(server_uas)
        answers: list[tuple[SipMessage, Address]] = []
        client = TransportManager(lambda msg, source, local: answers.append((msg, source)))
        assert client.send(sip_request(via=TCP_VIA, call_id="out-1"), addr)  # queued while connecting
        assert client.send(sip_request(via=TCP_VIA, call_id="out-2"), addr)
        await wait_until(lambda: len(answers) == 2)
        assert [(m.status, m.call_id) for m, _ in answers] == [(200, b"out-1"), (200, b"out-2")]
        assert all(source == addr for _, source in answers)
        assert client.has_flow(addr)
        assert client.send(sip_request(via=TCP_VIA, call_id="out-3"), addr)
        await wait_until(lambda: len(answers) == 3)
        assert client.stats.connections_opened == 1  # one connection, reused
        assert server.stats.connections_opened == 1
        await client.close()
        await server.close()

    arun(scenario())


def test_outbound_connect_failure_is_counted(arun: Runner) -> None:
    async def scenario() -> None:
        probe = TransportManager(Uas())
        addr = await probe.listen("tcp:127.0.0.1:0")
        await probe.close()  # now nothing listens there
        client = TransportManager(Uas())
        assert client.send(sip_request(via=TCP_VIA), addr)  # queued
        await wait_until(lambda: client.stats.connect_failures == 1)
        assert client.stats.dropped == 1
        assert not client.has_flow(addr)
        await client.close()

    arun(scenario())


def test_send_without_connect_uses_only_an_open_flow_and_never_dials(arun: Runner) -> None:
    """``send(..., connect=False)`` (how every response is sent): over the connection the peer
    opened while it is up; once it is gone, or to an address we hold no connection to, the
    message is dropped and counted, and no connection is opened (a forged Via or a stale flow
    must not make us dial a local service)."""

    async def scenario() -> None:
        dialled: list[int] = []

        async def victim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            dialled.append(1)
            writer.close()

        server = await asyncio.start_server(victim, "127.0.0.1", 0)
        victim_addr = Address("tcp", "127.0.0.1", server.sockets[0].getsockname()[1])
        uas = Uas(answer=False)
        manager, addr = await _uas_on_tcp(uas)
        reader, writer = await _connect(addr)
        writer.write(sip_request(via=TCP_VIA))
        await wait_until(lambda: len(uas.seen) == 1)
        client = uas.seen[0][1]
        assert manager.send(b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", client, connect=False)
        assert (await read_message(reader)).startswith(b"SIP/2.0 200")
        assert not manager.send(b"x", victim_addr, connect=False)
        writer.close()
        await wait_until(lambda: not manager.has_flow(client))
        assert not manager.send(b"x", client, connect=False)
        await asyncio.sleep(0.1)
        assert dialled == []
        assert manager.stats.no_flow == 2 and manager.stats.dropped == 2
        assert manager.stats.connections_opened == 1
        await manager.close()
        server.close()

    arun(scenario())


def test_only_an_inbound_connection_closed_for_abuse_is_reported(arun: Runner) -> None:
    """``on_abuse`` feeds the balancer's bans: an outbound connection's peer is one the farm chose
    (a node, a registered phone's flow it dialled), never reported."""
    from sipfarm.transport.stream import StreamFlow  # noqa: PLC0415

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig())
        abused: list[str] = []
        manager.on_abuse = abused.append
        outbound = StreamFlow(manager, "tcp", Address("tcp", "192.0.2.9", 5060))
        outbound.abort_for_abuse("slow_reader", "test")
        inbound = StreamFlow(manager, "tcp", None)
        inbound.remote = Address("tcp", "198.51.100.4", 40000)
        inbound.abort_for_abuse("slow_reader", "test")
        assert abused == ["198.51.100.4"]
        assert manager.stats.abuse == {"slow_reader": 2}
        await manager.close()

    arun(scenario())
