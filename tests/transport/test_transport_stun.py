"""STUN keep-alives on SIP UDP ports (RFC 5626 4.4.2 / 8, RFC 5389), and held stream flows.

The sans-IO codec against RFC 5769's vectors and a fuzz; then real sockets: a Binding request
to a SIP UDP listener is answered with the sender's address and never reaches the SIP
callback; a held TCP flow outlives the idle timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct

import pytest
from conftest import Runner, Uas, sip_request, udp_client, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.sip.address import Address
from sipfarm.sip.parser import parse_message
from sipfarm.transport.config import TransportConfig
from sipfarm.transport.manager import TransportManager
from sipfarm.transport.stun import (
    BINDING_REQUEST,
    BINDING_SUCCESS,
    MAGIC_COOKIE,
    StunError,
    binding_response,
    fingerprint,
    is_stun,
    parse_header,
    xor_mapped_address,
)

# RFC 5769 2.2 and 2.3: the transaction id of the sample responses, and their mapped addresses
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
RFC5769_V4 = bytes.fromhex("0020 0008 0001 a147 e112a643".replace(" ", ""))  # 192.0.2.1:32853
RFC5769_V6 = bytes.fromhex(
    "0020 0014 0002 a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9".replace(" ", "")
)  # [2001:db8:1234:5678:11:2233:4455:6677]:32853


def binding_request(tid: bytes = RFC5769_TID, *, with_fingerprint: bool = False) -> bytes:
    if not with_fingerprint:
        return struct.pack("!HHI", BINDING_REQUEST, 0, MAGIC_COOKIE) + tid
    head = struct.pack("!HHI", BINDING_REQUEST, 8, MAGIC_COOKIE) + tid
    return head + struct.pack("!HHI", 0x8028, 4, fingerprint(head))


def decode_xor_mapped(message: bytes) -> tuple[str, int]:
    """The XOR-MAPPED-ADDRESS of a response (test-side decoder, RFC 5389 15.2)."""
    tid = message[8:20]
    offset = 20
    while offset < len(message):
        kind, length = struct.unpack_from("!HH", message, offset)
        value = message[offset + 4 : offset + 4 + length]
        if kind == 0x0020:
            family, xport = value[1], struct.unpack_from("!H", value, 2)[0]
            port = xport ^ (MAGIC_COOKIE >> 16)
            if family == 1:
                host = str(ipaddress.IPv4Address(int.from_bytes(value[4:8], "big") ^ MAGIC_COOKIE))
            else:
                key = int.from_bytes(struct.pack("!I", MAGIC_COOKIE) + tid, "big")
                host = str(ipaddress.IPv6Address(int.from_bytes(value[4:20], "big") ^ key))
            return host, port
        offset += 4 + (length + 3) // 4 * 4
    raise AssertionError("no XOR-MAPPED-ADDRESS")


# -- sans-IO codec -------------------------------------------------------------------------------


def test_xor_mapped_address_matches_rfc5769_ipv4_and_ipv6_vectors() -> None:
    assert xor_mapped_address("192.0.2.1", 32853, RFC5769_TID) == RFC5769_V4
    assert xor_mapped_address("2001:db8:1234:5678:11:2233:4455:6677", 32853, RFC5769_TID) == RFC5769_V6


def test_binding_response_keeps_the_transaction_id_and_names_the_source() -> None:
    header = parse_header(binding_request())
    assert header.type == BINDING_REQUEST and header.transaction_id == RFC5769_TID
    response = binding_response(header, "203.0.113.7", 40000)
    parsed = parse_header(response)
    assert parsed.type == BINDING_SUCCESS and parsed.transaction_id == RFC5769_TID
    assert not parsed.has_fingerprint
    assert decode_xor_mapped(response) == ("203.0.113.7", 40000)
    six = binding_response(header, "[2001:db8::1]", 5060)
    assert decode_xor_mapped(six) == ("2001:db8::1", 5060)


def test_fingerprint_is_checked_and_echoed() -> None:
    request = binding_request(with_fingerprint=True)
    header = parse_header(request)
    assert header.has_fingerprint
    response = binding_response(header, "192.0.2.1", 32853)
    assert parse_header(response).has_fingerprint  # verified by parse_header itself
    bad = request[:-1] + bytes([request[-1] ^ 1])
    with pytest.raises(StunError) as err:
        parse_header(bad)
    assert err.value.reason == "stun_bad_fingerprint"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (binding_request()[:19], "stun_truncated"),
        (binding_request() + b"\x00\x00\x00\x00", "stun_truncated"),  # length says 0
        (b"\x40" + binding_request()[1:], "stun_malformed"),
        (binding_request()[:4] + b"\x21\x12\xa4\x43" + RFC5769_TID, "stun_malformed"),
        (struct.pack("!HHI", 1, 2, MAGIC_COOKIE) + RFC5769_TID + b"\x00\x00", "stun_malformed"),
    ],
)
def test_malformed_stun_raises_the_typed_error(data: bytes, reason: str) -> None:
    with pytest.raises(StunError) as err:
        parse_header(data)
    assert err.value.reason == reason


def test_sip_and_crlf_are_never_taken_for_stun() -> None:
    assert is_stun(binding_request())
    assert not is_stun(sip_request())
    assert not is_stun(b"\r\n\r\n")
    assert not is_stun(b"SIP/2.0 200 OK\r\n" + b"x" * 40)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_fuzz_random_bytes_parse_or_raise_the_typed_error(data: bytes, with_cookie: bool) -> None:
    if with_cookie and len(data) >= 8:
        data = data[:4] + struct.pack("!I", MAGIC_COOKIE) + data[8:]
    for chunk in (data, data[: len(data) // 2]):
        is_stun(chunk)
        try:
            header = parse_header(chunk)
        except StunError:
            continue
        assert len(header.transaction_id) == 12
        if header.type == BINDING_REQUEST:
            assert parse_header(binding_response(header, "10.0.0.1", 1)).type == BINDING_SUCCESS


# -- real sockets --------------------------------------------------------------------------------


def test_binding_request_on_a_sip_udp_port_is_answered_and_never_parsed_as_sip(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager = TransportManager(uas)
        uas.manager = manager
        heard: list[Address] = []
        manager.on_keepalive = heard.append
        addr = await manager.listen("udp:127.0.0.1:0")
        client = await udp_client()
        source = Address("udp", "127.0.0.1", client.port)
        for with_fingerprint in (False, True):
            client.send(binding_request(b"%012d" % with_fingerprint, with_fingerprint=with_fingerprint), addr)
            response = await client.recv()
            header = parse_header(response)
            assert header.type == BINDING_SUCCESS
            assert header.transaction_id == b"%012d" % with_fingerprint
            assert header.has_fingerprint is with_fingerprint
            assert decode_xor_mapped(response) == ("127.0.0.1", client.port)
        # a Binding *response* or another method: dropped and counted, never answered
        client.send(binding_response(parse_header(binding_request()), "10.0.0.1", 1), addr)
        client.send(struct.pack("!HHI", 0x0003, 0, MAGIC_COOKIE) + RFC5769_TID, addr)
        client.send(b"\r\n\r\n", addr)  # CRLF keep-alive: counted too
        client.send(sip_request(), addr)  # SIP still works on the port
        assert parse_message(await client.recv()).status == 200
        assert len(uas.seen) == 1
        stats = manager.stats
        assert stats.stun_answered == 2
        assert stats.stun_dropped == {"stun_not_binding_request": 2}
        assert stats.keepalive_pings == 3
        assert heard == [source, source, source]
        assert stats.parse_errors == {}
        client.close()
        await manager.close()

    arun(scenario())


def test_held_tcp_flow_outlives_the_idle_timeout_until_released(arun: Runner) -> None:
    async def scenario() -> None:
        uas = Uas()
        manager = TransportManager(uas, config=TransportConfig(idle_timeout=0.3))
        uas.manager = manager
        addr = await manager.listen("tcp:127.0.0.1:0")
        loop = asyncio.get_running_loop()
        held_r, held_w = await asyncio.open_connection(addr.host, addr.port)
        other_r, other_w = await asyncio.open_connection(addr.host, addr.port)
        remote = Address("tcp", *held_w.get_extra_info("sockname")[:2])
        await wait_until(lambda: manager.has_flow(remote))
        assert manager.hold_flow(remote, 60.0)
        assert not manager.hold_flow(Address("tcp", "127.0.0.1", 1), 60.0)  # no such flow
        start = loop.time()
        assert await other_r.read() == b""  # the unheld one is closed for idleness
        await asyncio.sleep(0.5)
        assert manager.has_flow(remote)  # held: open well past the idle timeout
        assert manager.stats.connections_idle_closed == 1
        assert manager.hold_flow(remote, 0)  # a de-REGISTER releases it
        assert await asyncio.wait_for(held_r.read(), 2) == b""
        assert loop.time() - start < 2.0
        assert manager.stats.connections_idle_closed == 2
        for w in (held_w, other_w):
            w.close()
        await manager.close()

    arun(scenario())
