"""The WebSocket listener (RFC 7118) over real sockets: ``max_connections`` holds for it too."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import pytest
from conftest import Runner, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from sipfarm.balancer.websocket import listen_websocket
from sipfarm.sip.address import Address
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager


def test_websocket_handshakes_over_max_connections_are_refused(arun: Runner) -> None:
    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig(max_connections=2))
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        url = f"ws://127.0.0.1:{bound.port}"
        first = await connect(url, subprotocols=["sip"])  # type: ignore[list-item]
        second = await connect(url, subprotocols=["sip"])  # type: ignore[list-item]
        await wait_until(lambda: manager.stats.connections_opened == 2)
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, subprotocols=["sip"])  # type: ignore[list-item]
        assert refused.value.response.status_code == 503
        assert manager.stats.connections_refused == 1
        await first.close()
        await wait_until(lambda: manager.stats.connections_closed == 1)
        third = await connect(url, subprotocols=["sip"])  # type: ignore[list-item]  # room again
        await third.close()
        await second.close()
        server.close()
        await manager.close()

    arun(scenario())


def test_concurrent_handshakes_cannot_overshoot_the_limit(arun: Runner) -> None:
    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig(max_connections=3))
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        url = f"ws://127.0.0.1:{bound.port}"
        results = await asyncio.gather(
            *(connect(url, subprotocols=["sip"]) for _ in range(10)),  # type: ignore[list-item]
            return_exceptions=True,
        )
        opened = [r for r in results if not isinstance(r, BaseException)]
        await asyncio.sleep(0.2)
        alive = [ws for ws in opened if ws.state.name == "OPEN"]
        assert len(alive) <= 3
        assert manager.stats.connections_refused >= 7
        for ws in opened:
            await ws.close()
        server.close()
        await manager.close()

    arun(scenario())


def _upgrade(port: int) -> socket.socket:
    """A raw WebSocket client (RFC 6455 4.1) with a small receive buffer that never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sip\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + body


def test_a_peer_that_pings_and_never_reads_is_closed_at_the_byte_limit(arun: Runner) -> None:
    """Every ping gets a pong at once, without flow control in the library: a peer that never
    reads must not have them pile up in the balancer's memory (red team, 2026-12-02: 150 MB of
    pings took a balancer from 32 to 279 MB). Over ``write_buffer_limit`` it is closed, counted
    as a TCP peer that does not read."""
    # no ping limit here: this is about the bytes (a ping flood is closed sooner, see below)
    config = TransportConfig(
        write_buffer_high=16 * 1024, write_buffer_limit=64 * 1024, ping_limit=10**9, ws_frame_limit=10**9
    )

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=config)
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        sock = await asyncio.to_thread(_upgrade, bound.port)
        sock.setblocking(False)
        ping = _masked(0x9, b"p" * 125)
        sent = 0
        try:
            for _ in range(40_000):  # 5.3 MB of pings at most
                try:
                    sock.send(ping)
                    sent += 1
                except BlockingIOError:
                    await asyncio.sleep(0.005)
                except OSError:
                    break  # closed by the balancer
                if manager.stats.abuse.get("slow_reader"):
                    break
                if sent % 200 == 0:
                    await asyncio.sleep(0)
            await wait_until(lambda: manager.stats.abuse.get("slow_reader") == 1)
            assert manager.stats.connections_closed_abuse == 1
        finally:
            sock.close()
            server.close()
            await manager.close()

    arun(scenario(), timeout=30.0)


def test_a_flow_whose_peer_does_not_read_is_closed_at_the_byte_limit(arun: Runner) -> None:
    """Answers queued for a WebSocket peer are bounded in bytes, not only in count (256 answers
    of 60 kB were 16 MB per connection)."""
    config = TransportConfig(write_buffer_high=16 * 1024, write_buffer_limit=64 * 1024)

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=config)
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        client = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        await client.send("OPTIONS sip:x SIP/2.0\r\n\r\n")  # its first message (a 400's worth)
        await wait_until(lambda: len(manager._flows) == 1)
        (flow,) = manager._flows.values()
        assert flow.write(b"x" * 40_000) and not flow.write(b"y" * 40_000)
        await wait_until(lambda: manager.stats.abuse.get("slow_reader") == 1)
        server.close()
        await manager.close()

    arun(scenario())


def test_bad_upgrades_and_protocol_errors_are_counted(arun: Runner) -> None:
    """What the library refuses itself is counted too: an HTTP request that is no upgrade
    (``refused["bad_upgrade"]``), a frame a client must mask sent unmasked (RFC 6455 5.1,
    closed 1002: ``abuse["ws_protocol"]``)."""

    def bad_http(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(100).startswith(b"HTTP/1.1 4")

    def unmasked(port: int) -> None:
        sock = _upgrade(port)
        sock.sendall(bytes((0x81, 5)) + b"hello")  # a text frame, no mask
        sock.settimeout(5)
        try:
            sock.recv(100)
        finally:
            sock.close()

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig())
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        await asyncio.to_thread(bad_http, bound.port)
        await wait_until(lambda: manager.stats.refused.get("bad_upgrade") == 1)
        await asyncio.to_thread(unmasked, bound.port)
        await wait_until(lambda: manager.stats.abuse.get("ws_protocol") == 1)
        server.close()
        await manager.close()

    arun(scenario())


def test_a_crlf_keepalive_gets_its_pong_and_is_no_parse_error(arun: Runner) -> None:
    """RFC 5626 3.5.1 over WebSocket (RFC 7118 6): a message of a double CRLF is a ping,
    answered with one CRLF; a lone CRLF is a pong.  Neither reaches the parser (SIP.js's
    keep-alives were each an "empty message" parse error and got no pong, 2026-12-02)."""
    heard: list[Address] = []

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None)
        manager.on_keepalive = heard.append
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        client = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        for _ in range(3):
            await client.send("\r\n\r\n")
            assert await asyncio.wait_for(client.recv(), 2) == "\r\n"
        await client.send("\r\n")  # a pong: no answer
        await client.send("OPTIONS sip:x SIP/2.0\r\n\r\n")  # the next message is still read (a bad one)
        await wait_until(lambda: manager.stats.parse_errors != {})
        assert manager.stats.keepalive_pings == 4 and manager.stats.parse_errors == {"bad_message": 1}
        assert len(heard) == 4 and {a.transport for a in heard} == {"ws"}
        await client.close()
        server.close()
        await manager.close()

    arun(scenario())


def _flood(port: int, frame: bytes, count: int) -> bytes:
    """Send ``count`` copies of ``frame`` in one write after the upgrade; what came back
    before the balancer closed the connection."""
    sock = _upgrade(port)
    received = b""
    try:
        sock.sendall(frame * count)
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return received


@pytest.mark.parametrize(
    "frame",
    [_masked(0xA, b""), _masked(0x1, b"OPTIONS", fin=False) + _masked(0x0, b"", fin=False) * 2000],
    ids=["empty-pongs", "empty-fragments"],
)
def test_a_flood_of_frames_is_closed_as_abuse(arun: Runner, frame: bytes) -> None:
    """Red team (2026-12-03): empty pongs, or empty fragments of a message never finished, on one
    connection (~6 us of the balancer each; no SIP message for the rate limits, no ping for the
    ping limit) pinned the balancer's CPU.  Every frame counts: over ``ws_frame_limit`` in
    ``ws_frame_window`` the connection is closed as abuse; another connection is served."""

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig())
        abused: list[str] = []
        manager.on_abuse = abused.append  # the balancer's front door counts them (bans a repeater)
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        client = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        try:
            repeat = 1000 if len(frame) < 100 else 1
            await asyncio.to_thread(_flood, bound.port, frame, repeat)
            await wait_until(lambda: manager.stats.abuse == {"frame_flood": 1})
            assert manager.stats.connections_closed_abuse == 1 and abused == ["127.0.0.1"]
            await client.send("\r\n\r\n")  # the other connection is not affected
            assert await asyncio.wait_for(client.recv(), 2) == "\r\n"
        finally:
            await client.close()
            server.close()
            await manager.close()

    arun(scenario())


def test_a_silent_connection_is_closed_after_idle_timeout_unless_held(arun: Runner) -> None:
    """Red team (2026-12-03): WebSocket connections that had sent one message were never closed
    (no idle timeout, and a connection that spoke is not evicted): 10,000 of them kept every new
    stream client out.  As on TCP: ``idle_timeout`` without a message or keep-alive closes it,
    unless a registration holds it."""

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig(idle_timeout=0.5))
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        idle = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        held = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        talking = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        try:
            port = held.local_address[1]
            await wait_until(lambda: manager.hold_flow(Address("ws", "127.0.0.1", port), 5.0))
            for _ in range(8):  # 0.8 s: past idle_timeout, each keep-alive starting it again
                await talking.send("\r\n\r\n")
                assert await asyncio.wait_for(talking.recv(), 2) == "\r\n"
                await asyncio.sleep(0.1)
            await wait_until(lambda: manager.stats.connections_idle_closed == 1)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(idle.recv(), 2)
            await held.send("\r\n\r\n")
            assert await asyncio.wait_for(held.recv(), 2) == "\r\n"
        finally:
            for c in (idle, held, talking):
                await c.close()
            server.close()
            await manager.close()

    arun(scenario())


def test_an_upgrade_with_overlarge_headers_is_refused_and_an_accepted_ones_are_not_kept(arun: Runner) -> None:
    """Red team (2026-12-03): upgrades of 120 x 8 KB headers held ~1 MB a connection for its life
    (the library keeps the request).  Over MAX_UPGRADE_BYTES: 431, counted; an accepted
    connection's request keeps no headers."""

    async def scenario() -> None:
        manager = TransportManager(lambda msg, source, local: None, config=TransportConfig())
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        try:
            big = {f"X-Pad-{i}": "a" * 1000 for i in range(20)}
            with pytest.raises(InvalidStatus) as info:
                await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"], additional_headers=big)  # type: ignore[list-item]
            assert info.value.response.status_code == 431
            assert manager.stats.refused.get("upgrade_too_large") == 1
            client = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
            await client.send("\r\n\r\n")
            assert await asyncio.wait_for(client.recv(), 2) == "\r\n"
            [connection] = [c for c in server.connections]
            assert connection.request is not None and not list(connection.request.headers.raw_items())
            await client.close()
        finally:
            server.close()
            await manager.close()

    arun(scenario())


@pytest.mark.parametrize(("kind", "opcode", "payload"), [("crlf", 0x1, b"\r\n\r\n"), ("rfc6455", 0x9, b"p")])
def test_a_flood_of_pings_is_closed_as_abuse(arun: Runner, kind: str, opcode: int, payload: bytes) -> None:
    """CRLF keep-alives (RFC 7118 6) and RFC 6455 pings are bounded as on TCP: over
    ``ping_limit`` in ``ping_window`` the connection is closed and counted (red team,
    2026-12-02: a ping flood on one connection took half a core)."""

    async def scenario() -> None:
        config = TransportConfig(ws_frame_limit=10**9)  # the ping limit's doing (frames: below)
        manager = TransportManager(lambda msg, source, local: None, config=config)
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        client = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        await client.send("\r\n\r\n")  # another client, pinging as it should
        assert await asyncio.wait_for(client.recv(), 2) == "\r\n"
        answers = await asyncio.to_thread(_flood, bound.port, _masked(opcode, payload), 1000)
        if kind == "crlf":
            assert len(answers) <= 3 * (manager.config.ping_limit + 1)  # a pong (3 bytes) each at most
        else:
            # the library answers RFC 6455 pings as it reads them (a read's worth here), then
            # the connection is closed before its next read
            assert len(answers) <= 3 * 1000
        await wait_until(lambda: manager.stats.abuse == {"ping_flood": 1})
        assert manager.stats.connections_closed_abuse == 1
        if kind == "crlf":
            assert manager.stats.keepalive_pings == 1 + manager.config.ping_limit + 1
        await client.send("\r\n\r\n")  # the other connection is not affected
        assert await asyncio.wait_for(client.recv(), 2) == "\r\n"
        await client.close()
        server.close()
        await manager.close()

    arun(scenario())


def test_a_client_pinging_at_its_pace_is_answered_and_stays(arun: Runner) -> None:
    """CRLF and RFC 6455 pings one at a time, 2 in each 0.5 s window with a limit of 3."""

    async def scenario() -> None:
        config = TransportConfig(ping_limit=3, ping_window=0.5)
        manager = TransportManager(lambda msg, source, local: None, config=config)
        bound, server = await listen_websocket(manager, Address("ws", "127.0.0.1", 0), None)
        client = await connect(f"ws://127.0.0.1:{bound.port}", subprotocols=["sip"])  # type: ignore[list-item]
        for i in range(8):
            if i % 2:
                await asyncio.wait_for(await client.ping(), 2)
            else:
                await client.send("\r\n\r\n")
                assert await asyncio.wait_for(client.recv(), 2) == "\r\n"
            await asyncio.sleep(0.25)
        assert manager.stats.abuse == {} and manager.stats.keepalive_pings == 4
        await client.close()
        server.close()
        await manager.close()

    arun(scenario())
