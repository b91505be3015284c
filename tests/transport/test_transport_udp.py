"""UDP through TransportManager over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio

from conftest import Runner, Uas, sip_request, udp_client, wait_until

from sipfarm.sip.address import Address
from sipfarm.sip.errors import CallDoesNotExist
from sipfarm.sip.parser import parse_message
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager


async def _uas_on_udp(uas: Uas) -> tuple[TransportManager, Address]:
    manager = TransportManager(uas)
    uas.manager = manager
    return manager, await manager.listen("udp:127.0.0.1:0")


def test_request_reaches_callback_with_its_source_and_is_answered(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_udp(uas)
        assert addr.port != 0 and manager.addresses == [addr]
        client = await udp_client()
        client.send(sip_request(), addr)
        response = parse_message(await client.recv())
        assert response.status == 200
        msg, source, local = uas.seen[0]
        assert source == Address("udp", "127.0.0.1", client.port)
        assert local == addr
        # RFC 3581: the bare rport was filled in before the callback saw the request
        assert msg.top_via.rport == str(client.port)
        assert manager.stats.received["udp"] == 1
        assert manager.stats.sent["udp"] == 1
        client.close()
        await manager.close()

    arun(scenario())


def test_malformed_datagram_is_answered_400_counted_and_the_next_one_works(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_udp(uas)
        client = await udp_client()
        client.send(sip_request(call_id="bad", cseq_method="INVITE"), addr)
        answer = parse_message(await client.recv())
        assert answer.status == 400
        assert b"CSeq method" in answer.reason
        assert answer.to_tag  # RFC 3261 8.2.6.2
        client.send(b"\x00\x01 not sip at all", addr)  # garbage: dropped silently
        client.send(sip_request(call_id="good"), addr)
        assert parse_message(await client.recv()).status == 200
        assert [m.call_id for m, _, _ in uas.seen] == [b"good"]
        stats = manager.stats
        assert stats.parse_errors == {"bad_message": 1, "dropped": 1}
        assert stats.error_responses == 1
        assert stats.received["udp"] == 1
        client.close()
        await manager.close()

    arun(scenario())


def test_oversize_datagram_is_answered_413(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager = TransportManager(uas, config=TransportConfig(max_message_size=4000))
        uas.manager = manager
        addr = await manager.listen("udp:127.0.0.1:0")
        client = await udp_client()
        body = b"x" * 5000
        client.send(sip_request(body=body), addr)
        assert parse_message(await client.recv()).status == 413
        assert manager.stats.parse_errors == {"too_large": 1}
        client.close()
        await manager.close()

    arun(scenario())


def test_callback_failures_are_contained(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        uas.raise_for["boom"] = RuntimeError("bug in the handler")
        uas.raise_for["gone"] = CallDoesNotExist("no such dialog")
        manager, addr = await _uas_on_udp(uas)
        client = await udp_client()
        client.send(sip_request(call_id="boom"), addr)
        client.send(sip_request(call_id="gone"), addr)
        assert parse_message(await client.recv()).status == 481  # a SipError is answered
        client.send(sip_request(call_id="fine"), addr)
        assert parse_message(await client.recv()).status == 200
        assert manager.stats.callback_errors == 1
        assert manager.stats.rejected == {"no_transaction": 1}
        client.close()
        await manager.close()

    arun(scenario())


def test_crlf_keepalive_is_absorbed(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager, addr = await _uas_on_udp(uas)
        client = await udp_client()
        client.send(b"\r\n\r\n", addr)
        await wait_until(lambda: manager.stats.keepalive_pings == 1)
        assert manager.stats.parse_errors == {}
        assert not uas.seen
        client.close()
        await manager.close()

    arun(scenario())


def test_send_refuses_what_it_cannot_route(arun: Runner) -> None:
    async def scenario() -> None:
        manager, _ = await _uas_on_udp(Uas())
        data = sip_request()
        assert not manager.send(data, Address("udp", "sip.example.com", 5060))  # names: resolve first
        assert not manager.send(data, Address("sctp", "127.0.0.1", 5060))
        assert not manager.send(data, Address("udp", "::1", 5060))  # no IPv6 socket
        assert manager.stats.dropped == 3
        await manager.close()

    arun(scenario())


def test_two_managers_share_a_udp_port_with_reuse_port(arun: Runner) -> None:
    async def scenario() -> None:
        first = TransportManager(Uas())
        addr = await first.listen("udp:127.0.0.1:0", reuse_port=True)
        second = TransportManager(Uas())
        again = await second.listen(addr, reuse_port=True)
        assert again == addr
        await first.close()
        await second.close()

    arun(scenario())


def test_many_datagrams_are_all_delivered(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas(answer=False)
        manager, addr = await _uas_on_udp(uas)
        client = await udp_client()
        for i in range(200):
            client.send(sip_request(call_id=f"c{i}"), addr)
            # asyncio's selector loop reads one datagram per socket per iteration: pace the
            # sender so the kernel buffer never overflows (this is not a load test)
            await asyncio.sleep(0)
        await wait_until(lambda: len(uas.seen) == 200)
        client.close()
        await manager.close()

    arun(scenario())
