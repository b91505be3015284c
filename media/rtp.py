"""RTP and RTCP headers (RFC 3550) and the receiver statistics a relay keeps per stream.

Two paths read the same bytes:

- :meth:`RtpHeader.parse` / :meth:`RtcpHeader.parse` check a whole header (version, CSRC list,
  extension and padding bounds) and raise ``ValueError`` with an exact message; they are for
  tests, diagnostics and the control plane, not for every forwarded packet.
- the relay's per-packet path looks at two bytes to classify a datagram (:func:`is_rtcp`,
  RFC 5761 4) and unpacks sequence number, timestamp and SSRC in one ``struct`` call
  (:data:`SEQ_TS_SSRC`), then feeds :class:`ReceiverStats` (RFC 3550 A.1, A.3, A.8).

Sequence numbers are 16 bits and wrap: compare them with :func:`seq_gt` / :func:`seq_diff`,
never with ``<``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_DROPOUT",
    "MAX_MISORDER",
    "RTCP_HEADER_SIZE",
    "RTP_HEADER_SIZE",
    "SEQ_TS_SSRC",
    "ReceiverStats",
    "RtcpHeader",
    "RtpHeader",
    "is_rtcp",
    "seq_add",
    "seq_diff",
    "seq_gt",
]

RTP_VERSION: Final = 2
RTP_HEADER_SIZE: Final = 12
RTCP_HEADER_SIZE: Final = 8  # common header + sender SSRC (RFC 3550 6.4)

# RFC 5761 4: RTP payload types 64-95 must not be used with rtcp-mux, so that a second octet
# (marker bit + payload type) of 192-223 is RTCP. The RTCP packet types in use sit in 200-207.
RTCP_MIN_TYPE: Final = 192
RTCP_MAX_TYPE: Final = 223

# RFC 3550 A.1: a jump of less than MAX_DROPOUT ahead is in order (with loss); less than
# MAX_MISORDER behind is a late or duplicate packet; anything else restarts the source after two
# sequential packets.
MAX_DROPOUT: Final = 3000
MAX_MISORDER: Final = 100
SEQ_MOD: Final = 1 << 16
TS_MOD: Final = 1 << 32
_TS_HALF: Final = 1 << 31

#: sequence number, timestamp and SSRC: ``SEQ_TS_SSRC.unpack_from(data, 2)``
SEQ_TS_SSRC = struct.Struct("!HII")
_RTCP_COMMON = struct.Struct("!BBHI")
_EXTENSION = struct.Struct("!HH")


def seq_add(a: int, b: int) -> int:
    """``a + b`` modulo 2**16."""
    return (a + b) & 0xFFFF


def seq_diff(a: int, b: int) -> int:
    """Signed distance from ``b`` to ``a`` in [-32768, 32767]: ``seq_diff(0, 65535) == 1``."""
    d = (a - b) & 0xFFFF
    return d - SEQ_MOD if d >= 0x8000 else d


def seq_gt(a: int, b: int) -> bool:
    """Whether sequence number ``a`` comes after ``b`` (RFC 1982 serial arithmetic)."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 4: the second octet of RTCP is a packet type in 192-223; of RTP, M + PT < 192."""
    return len(data) >= 2 and RTCP_MIN_TYPE <= data[1] <= RTCP_MAX_TYPE


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """An RTP fixed header with its CSRC list and extension (RFC 3550 5.1, 5.3.1)."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension: bytes = b""
    payload_offset: int = RTP_HEADER_SIZE
    padding_size: int = 0

    @classmethod
    def parse(cls, data: bytes) -> RtpHeader:
        if len(data) < RTP_HEADER_SIZE:
            raise ValueError(f"RTP packet length is less than {RTP_HEADER_SIZE} bytes")
        first = data[0]
        if first >> 6 != RTP_VERSION:
            raise ValueError(f"RTP packet has invalid version {first >> 6}")
        second = data[1]
        if RTCP_MIN_TYPE <= second <= RTCP_MAX_TYPE:
            raise ValueError("RTP packet has an RTCP packet type")
        seq, ts, ssrc = SEQ_TS_SSRC.unpack_from(data, 2)
        pos = RTP_HEADER_SIZE
        cc = first & 0x0F
        if len(data) < pos + 4 * cc:
            raise ValueError("RTP packet has truncated CSRC")
        csrc = struct.unpack_from(f"!{cc}I", data, pos) if cc else ()
        pos += 4 * cc
        profile: int | None = None
        extension = b""
        if first & 0x10:  # RFC 3550 5.3.1
            if len(data) < pos + 4:
                raise ValueError("RTP packet has truncated extension profile / length")
            profile, words = _EXTENSION.unpack_from(data, pos)
            pos += 4
            if len(data) < pos + 4 * words:
                raise ValueError("RTP packet has truncated extension value")
            extension = bytes(data[pos : pos + 4 * words])
            pos += 4 * words
        padding = 0
        if first & 0x20:  # RFC 3550 5.1: the last octet counts the padding, itself included
            padding = data[-1]
            if padding == 0 or pos + padding > len(data):
                raise ValueError("RTP packet padding length is invalid")
        return cls(
            payload_type=second & 0x7F,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
            marker=bool(second & 0x80),
            csrc=tuple(csrc),
            extension_profile=profile,
            extension=extension,
            payload_offset=pos,
            padding_size=padding,
        )


@dataclass(frozen=True, slots=True)
class RtcpHeader:
    """The first RTCP packet of a (compound) datagram: RFC 3550 6.4 common header + SSRC."""

    packet_type: int
    count: int
    length: int  # in bytes, header included: (length field + 1) * 4
    ssrc: int

    @classmethod
    def parse(cls, data: bytes) -> RtcpHeader:
        if len(data) < RTCP_HEADER_SIZE:
            raise ValueError(f"RTCP packet length is less than {RTCP_HEADER_SIZE} bytes")
        first, packet_type, words, ssrc = _RTCP_COMMON.unpack_from(data, 0)
        if first >> 6 != RTP_VERSION:
            raise ValueError(f"RTCP packet has invalid version {first >> 6}")
        if not RTCP_MIN_TYPE <= packet_type <= RTCP_MAX_TYPE:
            raise ValueError(f"RTCP packet has invalid packet type {packet_type}")
        length = (words + 1) * 4
        if length > len(data):
            raise ValueError("RTCP packet length field exceeds the datagram")
        return cls(packet_type=packet_type, count=first & 0x1F, length=length, ssrc=ssrc)


class ReceiverStats:
    """What a receiver learns from one RTP stream (RFC 3550 appendix A), fed packet by packet.

    One SSRC at a time: a new SSRC (a re-INVITE, a transfer, a media handover) folds the
    finished source's counts into the totals and starts over, as does a resynchronisation after
    a large jump (A.1).  Times are seconds from the relay's clock; ``clock_rate`` converts them
    to timestamp units for the jitter (A.8).
    """

    __slots__ = (
        "_bad_seq",
        "_expected_before",
        "_received_before",
        "_timed",
        "_transit",
        "base_seq",
        "clock_rate",
        "cycles",
        "jitter",
        "max_seq",
        "received",
        "ssrc",
        "ssrc_changes",
    )

    def __init__(self, clock_rate: int = 8000) -> None:
        self.clock_rate = clock_rate
        self.ssrc: int | None = None
        self.ssrc_changes = 0
        self.base_seq = 0
        self.max_seq = 0
        self.cycles = 0
        self.received = 0
        self.jitter = 0.0  # timestamp units, A.8
        self._bad_seq = -1
        self._transit = 0.0  # of the previous packet, when _timed (a plain float: no box in mypyc)
        self._timed = False
        self._expected_before = 0
        self._received_before = 0

    def _restart(self, seq: int) -> None:
        # A.1 init_seq, keeping what the previous run counted
        if self.ssrc is not None:
            self._expected_before += self.cycles + self.max_seq - self.base_seq + 1
            self._received_before += self.received
        self.base_seq = seq
        self.max_seq = seq
        self.cycles = 0
        self.received = 0
        self._bad_seq = -1
        self._timed = False

    def update(self, seq: int, timestamp: int, ssrc: int, now: float) -> bool:
        """Account one packet; False if A.1 judged it out of the stream (not counted)."""
        if ssrc != self.ssrc:
            self._restart(seq)
            if self.ssrc is not None:
                self.ssrc_changes += 1
            self.ssrc = ssrc
        else:
            # A.1 update_seq
            udelta = (seq - self.max_seq) & 0xFFFF
            if udelta < MAX_DROPOUT:
                if seq < self.max_seq:
                    self.cycles += SEQ_MOD  # wrapped
                self.max_seq = seq
            elif udelta <= SEQ_MOD - MAX_MISORDER:
                if seq != self._bad_seq:
                    self._bad_seq = (seq + 1) & 0xFFFF
                    return False
                self._restart(seq)  # two sequential packets after a jump: the source restarted
            # else: duplicate or late packet, counted as received (A.3 lets "lost" go negative)
        self.received += 1
        # A.8: D(i-1, i) = (R_i - R_{i-1}) - (S_i - S_{i-1}) in timestamp units
        transit = now * self.clock_rate - timestamp
        if self._timed:
            d = abs(transit - self._transit)
            if d > _TS_HALF:  # the RTP timestamp wrapped between the two packets
                d = abs(d - TS_MOD)
            self.jitter += (d - self.jitter) / 16.0
        self._transit = transit
        self._timed = True
        return True

    @property
    def extended_max_seq(self) -> int:
        """A.1: the highest sequence number with its wrap count (``cycles`` + ``max_seq``)."""
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        """A.3: packets expected, over every source this stream has had."""
        if self.ssrc is None:
            return 0
        return self._expected_before + self.cycles + self.max_seq - self.base_seq + 1

    @property
    def total_received(self) -> int:
        return self._received_before + self.received

    @property
    def lost(self) -> int:
        """A.3: expected - received; negative when duplicates outnumber losses."""
        return self.expected - self.total_received

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000.0 / self.clock_rate
