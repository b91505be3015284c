"""RTP/RTCP header parsing, sequence arithmetic and RFC 3550 receiver statistics (media/rtp.py)."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.rtp import (
    ReceiverStats,
    RtcpHeader,
    RtpHeader,
    is_rtcp,
    seq_add,
    seq_diff,
    seq_gt,
)

# V=2, P=0, X=0, CC=0, M=1, PT=0, seq 0x1234, ts 0xDEADBEEF, SSRC 0x01020304, payload "ab"
GOLDEN = bytes.fromhex("80801234deadbeef01020304") + b"ab"


def rtp(seq: int, ts: int, ssrc: int = 0x1111, pt: int = 0, first: int = 0x80, tail: bytes = b"\x00" * 4) -> bytes:
    return struct.pack("!BBHII", first, pt, seq, ts, ssrc) + tail


def test_parse_golden_header() -> None:
    h = RtpHeader.parse(GOLDEN)
    fields = (h.payload_type, h.marker, h.sequence_number, h.timestamp, h.ssrc)
    assert fields == (0, True, 0x1234, 0xDEADBEEF, 0x01020304)
    assert h.csrc == ()
    assert h.payload_offset == 12
    assert GOLDEN[h.payload_offset :] == b"ab"


def test_parse_csrc_extension_padding() -> None:
    # CC=2, X=1, P=1: two CSRCs, a one-word extension, 3 bytes of padding
    data = (
        struct.pack("!BBHII", 0xB2, 8, 7, 160, 42)
        + struct.pack("!II", 5, 6)
        + struct.pack("!HH", 0xBEDE, 1)
        + b"\x01\x02\x03\x04"
        + b"xy"
        + b"\x00\x00\x03"
    )
    h = RtpHeader.parse(data)
    assert h.csrc == (5, 6)
    assert h.extension_profile == 0xBEDE
    assert h.extension == b"\x01\x02\x03\x04"
    assert h.payload_offset == 12 + 8 + 8
    assert h.padding_size == 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (GOLDEN[:11], "RTP packet length is less than 12 bytes"),
        (b"\x40" + GOLDEN[1:], "RTP packet has invalid version 1"),
        (b"\x80\xc8" + GOLDEN[2:], "RTP packet has an RTCP packet type"),
        (b"\x82" + GOLDEN[1:12] + b"\x00" * 4, "RTP packet has truncated CSRC"),
        (b"\x90" + GOLDEN[1:12] + b"\xbe\xde", "RTP packet has truncated extension profile / length"),
        (b"\x90" + GOLDEN[1:12] + b"\xbe\xde\x00\x02" + b"\x00" * 4, "RTP packet has truncated extension value"),
        (b"\xa0" + GOLDEN[1:12] + b"\x00", "RTP packet padding length is invalid"),
        (b"\xa0" + GOLDEN[1:12] + b"\x09", "RTP packet padding length is invalid"),
    ],
)
def test_parse_errors_are_exact(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        RtpHeader.parse(data)


def test_every_truncation_of_a_full_header_raises_value_error() -> None:
    data = struct.pack("!BBHII", 0x91, 0, 1, 2, 3) + struct.pack("!I", 9) + struct.pack("!HH", 1, 1) + b"abcd"
    RtpHeader.parse(data)
    for n in range(len(data)):
        with pytest.raises(ValueError):
            RtpHeader.parse(data[:n])


def test_rtcp_header_and_demux() -> None:
    rr = struct.pack("!BBHI", 0x80, 201, 1, 0xCAFE) + b"\x00" * 4  # RR, length 1 word -> 8 bytes
    h = RtcpHeader.parse(rr)
    assert (h.packet_type, h.count, h.length, h.ssrc) == (201, 0, 8, 0xCAFE)
    assert is_rtcp(rr)
    assert not is_rtcp(GOLDEN)  # marker + PT 0 = 0x80 < 192
    assert not is_rtcp(b"\x80")
    with pytest.raises(ValueError, match=r"^RTCP packet length is less than 8 bytes$"):
        RtcpHeader.parse(rr[:7])
    with pytest.raises(ValueError, match=r"^RTCP packet has invalid version 0$"):
        RtcpHeader.parse(b"\x00" + rr[1:])
    with pytest.raises(ValueError, match=r"^RTCP packet has invalid packet type 96$"):
        RtcpHeader.parse(rr[:1] + b"\x60" + rr[2:])
    with pytest.raises(ValueError, match=r"^RTCP packet length field exceeds the datagram$"):
        RtcpHeader.parse(rr[:2] + b"\x00\x05" + rr[4:])


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_fuzz_parsers_raise_only_value_error(data: bytes) -> None:
    for parse in (RtpHeader.parse, RtcpHeader.parse):
        try:
            parse(data)
        except ValueError:
            pass


@settings(max_examples=300)
@given(st.binary(min_size=12, max_size=64))
def test_fuzz_version_2_header_fields_round_trip(tail: bytes) -> None:
    data = b"\x80\x08" + tail  # V=2, no CC/X/P, PT 8: always parses
    h = RtpHeader.parse(data)
    assert struct.pack("!HII", h.sequence_number, h.timestamp, h.ssrc) == data[2:12]


def test_sequence_wraparound_helpers() -> None:
    assert seq_add(65535, 1) == 0
    assert seq_diff(0, 65535) == 1
    assert seq_diff(65535, 0) == -1
    assert seq_gt(0, 65535)
    assert not seq_gt(65535, 0)
    assert not seq_gt(5, 5)
    assert seq_diff(40000, 7232) == 32768 - 65536  # exactly half: counted as behind


def test_loss_from_a_known_gap() -> None:
    stats = ReceiverStats()
    missing = {10, 11, 12, 50}
    for i in range(100):
        if i not in missing:
            assert stats.update(1000 + i, i * 160, 7, i * 0.02)
    assert stats.expected == 100
    assert stats.total_received == 96
    assert stats.lost == 4
    assert stats.extended_max_seq == 1099


def test_sequence_wraps_and_extends() -> None:
    stats = ReceiverStats()
    for i in range(100):
        stats.update((65500 + i) & 0xFFFF, i * 160, 7, i * 0.02)
    assert stats.cycles == 65536
    assert stats.extended_max_seq == 65536 + 63
    assert stats.expected == 100
    assert stats.lost == 0


def test_duplicates_and_late_packets_make_loss_negative_not_reorder_the_max() -> None:
    stats = ReceiverStats()
    for seq in (1, 2, 3, 3, 2):
        stats.update(seq, seq * 160, 7, seq * 0.02)
    assert stats.max_seq == 3
    assert stats.lost == -2  # RFC 3550 A.3: duplicates are counted


def test_large_jump_resyncs_after_two_sequential_packets() -> None:
    stats = ReceiverStats()
    for seq in range(10):
        stats.update(seq, seq * 160, 7, 0.0)
    assert not stats.update(20000, 0, 7, 0.0)  # a lone jump is not counted
    assert stats.update(20001, 160, 7, 0.0)  # the next one confirms a restart
    assert stats.max_seq == 20001
    assert stats.expected == 10 + 1
    assert stats.total_received == 11


def test_new_ssrc_restarts_and_keeps_totals() -> None:
    stats = ReceiverStats()
    for seq in range(5):
        stats.update(seq, 0, 1, 0.0)
    for seq in range(500, 505):
        stats.update(seq, 0, 2, 0.0)
    assert stats.ssrc == 2
    assert stats.ssrc_changes == 1
    assert stats.expected == 10
    assert stats.lost == 0


def test_jitter_of_a_stream_with_known_alternating_delay() -> None:
    # 20 ms packets at 8 kHz; every other packet arrives 5 ms late: |D| = 40 timestamp units for
    # every pair, so J_n = 40 * (1 - (15/16)^n) (RFC 3550 A.8)
    stats = ReceiverStats(clock_rate=8000)
    n = 200
    for i in range(n + 1):
        stats.update(i, i * 160, 7, i * 0.020 + (0.005 if i % 2 else 0.0))
    assert stats.jitter == pytest.approx(40 * (1 - (15 / 16) ** n), rel=1e-6)
    assert stats.jitter_ms == pytest.approx(5.0, rel=1e-3)


def test_jitter_is_zero_for_a_perfect_stream_across_timestamp_wrap() -> None:
    stats = ReceiverStats(clock_rate=8000)
    start = 2**32 - 800
    for i in range(20):
        stats.update(i, (start + i * 160) % 2**32, 7, 1000.0 + i * 0.020)
    assert stats.jitter == pytest.approx(0.0, abs=1e-3)
