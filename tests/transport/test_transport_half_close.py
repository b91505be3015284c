"""A TCP client that shuts down its write side (FIN) after its request still gets the answer.

Real sockets on 127.0.0.1, asyncio and uvloop (``arun``): the client sends a request and
``write_eof()`` (``shutdown(SHUT_WR)``); the answer, written later (a node's, through the
balancer), reaches it over that connection, which closes once every request it sent has a
final response written, or at ``half_closed_timeout`` whatever is owed.  Meanwhile it counts
towards the connection limits (a registered one towards its source's again), takes no hold,
and refuses requests for the peer, which could never answer them.
"""

from __future__ import annotations

import asyncio

from conftest import Runner, Uas, read_message, sip_request, wait_until

from sipfarm.sip.address import Address
from sipfarm.sip.message import make_response
from sipfarm.sip.parser import parse_message
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager

TCP_VIA = "SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-1;rport"


async def _listening(uas: Uas, **config: float) -> tuple[TransportManager, Address]:
    manager = TransportManager(uas, config=TransportConfig(**config))  # type: ignore[arg-type]
    uas.manager = manager
    return manager, await manager.listen("tcp:127.0.0.1:0")


async def _half_closed_request(
    addr: Address, uas: Uas, method: str = "INVITE"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Address]:
    """Connect, send one request, shut down the write side; its source as the manager sees it."""
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    writer.write(sip_request(via=TCP_VIA, method=method))
    writer.write_eof()
    await writer.drain()
    await wait_until(lambda: bool(uas.seen))
    return reader, writer, uas.seen[-1][1]


async def _eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """Whether the connection ends (EOF or reset) within ``timeout`` with nothing more to read."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


def test_the_answer_written_after_the_clients_fin_reaches_it_then_the_flow_closes(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas(answer=False)  # the answer comes later, as a node's through the balancer
        manager, addr = await _listening(uas)
        reader, writer, source = await _half_closed_request(addr, uas)
        await wait_until(lambda: manager.stats.half_closed == 1)
        await asyncio.sleep(0.05)  # the FIN has been read: the flow must still be open
        request = uas.seen[0][0]
        for status in (100, 180, 200):
            answer = make_response(request, status, to_tag=b"callee")
            assert manager.send(answer.to_bytes(), source, connect=False), status  # a response: flow only
        for status in (100, 180, 200):
            assert parse_message(await read_message(reader)).status == status
        # every request it sent is answered: flushed, closed, its slot free
        assert await _eof(reader)
        await wait_until(lambda: manager.open_connections == 0)
        assert manager.stats.connections_closed == 1 and manager.stats.half_closed_timeouts == 0
        writer.close()
        await manager.close()

    arun(scenario())


def test_a_half_closed_flow_closes_at_half_closed_timeout_whatever_it_is_owed(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas(answer=False)
        manager, addr = await _listening(uas, half_closed_timeout=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer, _ = await _half_closed_request(addr, uas)  # never answered
        assert await _eof(reader)
        assert 0.25 <= loop.time() - started < 2.0
        await wait_until(lambda: manager.open_connections == 0)
        assert manager.stats.half_closed_timeouts == 1 and manager.stats.refused == {}
        writer.close()
        await manager.close()

    arun(scenario())


def test_the_bound_is_idle_timeout_when_shorter(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas(answer=False)
        manager, addr = await _listening(uas, half_closed_timeout=30.0, idle_timeout=0.3)
        reader, writer, _ = await _half_closed_request(addr, uas)
        assert await _eof(reader, timeout=2.0)
        writer.close()
        await manager.close()

    arun(scenario())


def test_a_half_close_with_nothing_owed_closes_at_once(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()  # answers at once: nothing owed by the time the FIN is read
        manager, addr = await _listening(uas)
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(sip_request(via=TCP_VIA))
        await writer.drain()
        assert parse_message(await read_message(reader)).status == 200
        writer.write(sip_request(via=TCP_VIA, method="ACK", cseq_method="ACK"))  # no answer owed to an ACK
        writer.write_eof()
        assert await _eof(reader, timeout=1.0)
        assert manager.stats.half_closed == 0
        writer.close()
        await manager.close()

    arun(scenario())


def test_a_half_closed_flow_counts_towards_its_sources_limit_takes_no_hold_nor_request(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas(answer=False)
        manager, addr = await _listening(uas, max_connections_per_source=1)
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(sip_request(via=TCP_VIA, method="REGISTER"))
        await writer.drain()
        await wait_until(lambda: bool(uas.seen))
        source = uas.seen[0][1]
        # its REGISTER's 2xx: a registered phone's connection spares its source's limit
        assert manager.hold_flow(source, 3600.0)
        writer.write(sip_request(via=TCP_VIA, call_id="call-2@test", method="INVITE"))
        writer.write_eof()
        await writer.drain()
        await wait_until(lambda: manager.stats.half_closed == 1)
        # leaving: it counts again (a second connection from the source is over the limit)...
        assert manager.connections_from("127.0.0.1") == 1
        _, other = await asyncio.open_connection(addr.host, addr.port)
        await wait_until(lambda: manager.stats.refused.get("per_source") == 1)
        other.close()
        # ... no hold extends it, and a request for the peer, who cannot answer, is refused
        assert not manager.hold_flow(source, 3600.0)
        assert not manager.send(sip_request(via=TCP_VIA, method="OPTIONS"), source, connect=False)
        # the answer it is still owed goes out (the REGISTER's 200 was never sent: one more owed)
        for msg, _, _ in uas.seen:
            assert manager.send(make_response(msg, 200, to_tag=b"t").to_bytes(), source, connect=False)
        assert [parse_message(await read_message(reader)).status for _ in uas.seen] == [200, 200]
        assert await _eof(reader)
        await wait_until(lambda: manager.open_connections == 0)
        writer.close()
        await manager.close()

    arun(scenario())
