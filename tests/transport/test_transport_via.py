"""Via stamping and response routing (RFC 3261 18.2.1, 18.2.2; RFC 3581): sans-IO unit tests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage
from sipfarm.sip.headers import parse_via
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import parse_message
from sipfarm.sip.via import (
    _stamp_fast,
    _stamp_parsed,
    _target_fast,
    response_target,
    stamp_received,
    via_sent_by,
    via_target,
    via_value_target,
)

SRC = Address("udp", "192.0.2.7", 40123)


def request(*via_lines: str) -> SipMessage:
    vias = "".join(f"Via: {v}\r\n" for v in via_lines)
    return parse_message(
        (
            f"INVITE sip:bob@example.com SIP/2.0\r\n{vias}"
            "From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
            "Call-ID: c@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )


def test_same_host_without_rport_is_left_alone() -> None:
    msg = request("SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK1")
    before = msg.to_bytes()
    stamp_received(msg, SRC)
    assert msg.to_bytes() == before


def test_different_host_gets_received() -> None:
    msg = request("SIP/2.0/UDP pc33.example.com;branch=z9hG4bK1")
    stamp_received(msg, SRC)
    assert msg.get("via") == b"SIP/2.0/UDP pc33.example.com;branch=z9hG4bK1;received=192.0.2.7"


def test_bare_rport_is_filled_and_received_added_even_for_same_host() -> None:
    # RFC 3581 4: received MUST be added when rport is present, even if it equals sent-by
    msg = request("SIP/2.0/UDP 192.0.2.7:5060;rport;branch=z9hG4bK1")
    stamp_received(msg, SRC)
    assert msg.get("via") == b"SIP/2.0/UDP 192.0.2.7:5060;rport=40123;branch=z9hG4bK1;received=192.0.2.7"


def test_rport_with_value_is_kept() -> None:
    msg = request("SIP/2.0/UDP 10.0.0.1:5060;rport=5999;branch=z9hG4bK1")
    stamp_received(msg, SRC)
    via = msg.top_via
    assert via.rport == "5999"
    assert via.received == "192.0.2.7"


def test_existing_received_is_replaced() -> None:
    msg = request("SIP/2.0/UDP 10.0.0.1;received=10.9.9.9;branch=z9hG4bK1")
    stamp_received(msg, SRC)
    assert msg.get("via") == b"SIP/2.0/UDP 10.0.0.1;received=192.0.2.7;branch=z9hG4bK1"


def test_only_the_top_via_parm_is_edited() -> None:
    msg = request(
        "SIP/2.0/UDP 10.0.0.1;rport;branch=z9hG4bK1, SIP/2.0/UDP 10.0.0.2;rport;branch=z9hG4bK0",
        "SIP/2.0/TCP 10.0.0.3;rport;branch=z9hG4bKx",
    )
    stamp_received(msg, SRC)
    assert msg.get_all("via") == [
        b"SIP/2.0/UDP 10.0.0.1;rport=40123;branch=z9hG4bK1;received=192.0.2.7, "
        b"SIP/2.0/UDP 10.0.0.2;rport;branch=z9hG4bK0",
        b"SIP/2.0/TCP 10.0.0.3;rport;branch=z9hG4bKx",
    ]


def test_ipv6_sent_by_matching_the_source_needs_no_received() -> None:
    msg = request("SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1")
    before = msg.to_bytes()
    stamp_received(msg, Address("udp", "2001:db8:0::1", 5060))
    assert msg.to_bytes() == before


def test_responses_are_not_stamped() -> None:
    msg = request("SIP/2.0/UDP 10.0.0.1;rport;branch=z9hG4bK1")
    response = make_response(msg, 200)
    before = response.to_bytes()
    stamp_received(response, SRC)
    assert response.to_bytes() == before


def test_malformed_top_via_raises_bad_message() -> None:
    msg = request("garbage here")
    with pytest.raises(BadMessage):
        stamp_received(msg, SRC)


@pytest.mark.parametrize(
    ("via", "target"),
    [
        ("SIP/2.0/UDP 10.0.0.1:5070;branch=b;received=192.0.2.7;rport=40123", ("192.0.2.7", 40123)),
        ("SIP/2.0/UDP 10.0.0.1:5070;branch=b;received=192.0.2.7", ("192.0.2.7", 5070)),
        ("SIP/2.0/UDP 10.0.0.1;branch=b;received=192.0.2.7", ("192.0.2.7", 5060)),
        ("SIP/2.0/UDP 10.0.0.1:5070;branch=b", ("10.0.0.1", 5070)),
        ("SIP/2.0/UDP [2001:db8::1];branch=b", ("2001:db8::1", 5060)),
        ("SIP/2.0/UDP 10.0.0.1:5070;maddr=10.0.0.9;branch=b", ("10.0.0.9", 5070)),
    ],
)
def test_response_target_over_udp(via: str, target: tuple[str, int]) -> None:
    response = make_response(request(via), 200)
    assert response_target(response, SRC) == Address("udp", *target)


def test_response_target_over_a_connection_is_the_connection() -> None:
    response = make_response(request("SIP/2.0/TCP 10.0.0.1:5060;branch=b"), 200)
    flow = Address("tcp", "192.0.2.7", 51000)
    assert response_target(response, flow) == flow


def test_response_target_with_unreadable_via_falls_back_to_the_source() -> None:
    response = make_response(request("garbage"), 400)
    assert response_target(response, SRC) == SRC


@given(
    host=st.ip_addresses(v=4).map(str),
    port=st.integers(1, 65535),
    sent_by=st.sampled_from(["10.0.0.1", "pc.example.com", "10.0.0.1:5062", "192.0.2.200"]),
)
def test_stamped_rport_routes_the_response_back_to_the_source(host: str, port: int, sent_by: str) -> None:
    msg = request(f"SIP/2.0/UDP {sent_by};rport;branch=z9hG4bK1")
    source = Address("udp", host, port)
    stamp_received(msg, source)
    assert response_target(make_response(msg, 200), source) == source


_PARAM = st.sampled_from(
    [
        "branch=z9hG4bK77",
        "rport",
        "RPORT",
        "rport=5999",
        "received=10.1.1.1",
        "received=192.0.2.7",
        "maddr=10.0.0.9",
        "ttl=1",
        "lr",
        " rport ",
    ]
)


@given(
    transport=st.sampled_from(["UDP", "TCP", "tls"]),
    host=st.sampled_from(["192.0.2.7", "10.0.0.1", "PC.example.com", "pc.example.com"]),
    port=st.sampled_from(["", ":5060", ":40123"]),
    params=st.lists(_PARAM, max_size=5),
    source=st.sampled_from([SRC, Address("udp", "10.0.0.1", 5060)]),
)
def test_fast_stamping_agrees_with_the_parsed_path(
    transport: str, host: str, port: str, params: list[str], source: Address
) -> None:
    raw = f"SIP/2.0/{transport} {host}{port}{''.join(';' + p for p in params)}".encode()
    fast = _stamp_fast(raw, source)
    slow = _stamp_parsed(parse_via(raw), source)
    assert (fast is None) == (slow is None)
    if fast is not None and slow is not None:
        assert parse_via(fast) == parse_via(slow)
    stamped = fast or raw
    assert _target_fast(stamped) == via_target(parse_via(stamped))


def test_via_value_target_and_sent_by_fast_paths_match_the_full_parser():
    for raw in (
        b"SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bKa;rport=40000;received=203.0.113.7",
        b"SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKa",
        b"SIP/2.0/TCP host.example:5070;branch=z9hG4bKb;received=198.51.100.2",
        b"SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKc",
        b"SIP/2.0/UDP 10.0.0.1:5062;maddr=224.0.1.75;branch=z9hG4bKd",
    ):
        via = parse_via(raw)
        assert via_value_target(raw) == via_target(via)
        assert via_sent_by(raw) == (via.host.strip("[]"), via.port or (5061 if via.transport == "TLS" else 5060))
