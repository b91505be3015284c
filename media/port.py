"""One relay port's packet path: :class:`RelayPort` forwards, drops and counts each datagram.

The rules (latching, re-latch proof, counters, RFC 3550 statistics) are described in
:mod:`media.relay`'s theory of operation; this module holds only the per-port state and the
per-packet code, so that it can be compiled with mypyc (``scripts/build-compiled.sh``) apart
from the signalling, whose exceptions and dataclasses gain nothing from it.  It opens no
socket: a port sends through ``sender`` (its socket, or a test's recorder) and, once latched,
through ``link`` (a socket connected to its party, see :mod:`media.plane`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from media.rtp import (
    _TS_HALF,
    MAX_DROPOUT,
    RTCP_MAX_TYPE,
    RTCP_MIN_TYPE,
    SEQ_MOD,
    SEQ_TS_SSRC,
    TS_MOD,
    ReceiverStats,
)

__all__ = [
    "KIND_MUX",
    "KIND_RTCP",
    "KIND_RTP",
    "NEVER",
    "NULL_SENDER",
    "Addr",
    "Link",
    "PortStats",
    "RelayPort",
    "Sender",
]

Addr = tuple[Any, ...]  # (host, port) or, for IPv6, (host, port, flowinfo, scope_id)

# What a port takes (RelayPort.kind): RTP only (RTCP on the next port), RTCP only, or both
# (rtcp-mux, RFC 5761).
KIND_RTP: Final = 0
KIND_RTCP: Final = 1
KIND_MUX: Final = 2
_KIND_NAMES = ("rtp", "rtcp", "rtp+rtcp")
_unpack_seq_ts_ssrc = SEQ_TS_SSRC.unpack_from


class Sender(Protocol):
    """What a port sends through: its socket (:class:`RelayServer`), or a test's recorder.

    ``OSError`` from it (the kernel refused the datagram) is counted as ``drops_send_failed``."""

    def sendto(self, data: bytes, addr: Addr, /) -> object: ...


#: what a port's ``link`` is: the ``send`` of a socket connected to the port's latched source
#: (the glue's, :mod:`media.plane`): it sends there with no address to convert, and the kernel
#: gives that socket only that source's packets.  ``OSError`` from it is counted as
#: ``drops_send_failed``, as from a :class:`Sender`.
Link = Callable[[bytes], object]

#: ``RelayPort.last_seen`` of a port that never received an accepted packet
NEVER: Final = float("-inf")


class _NullSender:
    """A port whose socket is not open (yet, or any more) sends nothing."""

    def sendto(self, data: bytes, addr: Addr, /) -> None:
        return None


NULL_SENDER = _NullSender()


@dataclass(frozen=True, slots=True)
class PortStats:
    """Counters of the packets that entered one port (one stream, one direction)."""

    port: int
    kind: str  # "rtp", "rtcp" or "rtp+rtcp"
    source: Addr | None  # latched address of the party
    destination: Addr | None  # where the relay sends to that party now
    packets: int  # forwarded
    bytes: int
    last_seen: float | None
    drops_no_destination: int  # the other party has no address yet (not latched, SDP refused)
    drops_unexpected_source: int
    drops_malformed: int  # not RTP/RTCP, or not the kind this port expects
    relatches: int
    ssrc: int | None
    extended_max_seq: int
    expected: int
    received: int
    lost: int
    jitter_ms: float
    drops_send_failed: int = 0  # the kernel refused to send it (sendto raised OSError)


class RelayPort:
    """One local UDP port of a side; see the module docstring for what ``receive`` does."""

    __slots__ = (
        "_cand_addr",
        "_cand_count",
        "_cand_seq",
        "_cand_ssrc",
        "_clock",
        "_relatch_packets",
        "_relatch_silence",
        "bytes",
        "closed",
        "dest",
        "drops_malformed",
        "drops_no_destination",
        "drops_send_failed",
        "drops_unexpected_source",
        "farm_address",
        "kind",
        "last_seen",
        "latch_allowed",
        "link",
        "packets",
        "peer_rtcp",
        "peer_rtp",
        "port",
        "relatches",
        "retired",
        "rtcp_ssrc",
        "sdp_dest",
        "sender",
        "source",
        "sources",
        "stats",
    )

    def __init__(
        self, port: int, kind: int, clock: Callable[[], float], relatch_packets: int, relatch_silence: float
    ) -> None:
        self.port = port
        self.kind = kind
        self._clock = clock
        self._relatch_packets = relatch_packets
        self._relatch_silence = relatch_silence
        self.sender: Sender = NULL_SENDER
        # set by the glue once the port has latched: its socket connected to ``source`` (which
        # is ``dest`` then); the core drops it whenever ``source`` changes
        self.link: Link | None = None
        self.peer_rtp: RelayPort = self  # wired by the engine before any socket opens
        self.peer_rtcp: RelayPort = self
        self.source: Addr | None = None
        # the IPs the signalling vouched for as this party's (its SDP address, the address its
        # SIP came from): the only ones the port latches or re-latches onto; None: any
        self.sources: frozenset[str] | None = None
        # whether (host, port) is an address of the farm (media.farm.FarmAddresses): never
        # latched onto, so no spoofed packet can make two relays feed each other
        self.farm_address: Callable[[str, int], bool] | None = None
        # where the relay may send (the engine's sdp_allowed): a latched port sends to its
        # source, so a source this refuses is never latched onto (None: any)
        self.latch_allowed: Callable[[str, int], bool] | None = None
        self.sdp_dest: Addr | None = None
        self.dest: Addr | None = None
        self.packets = 0
        self.bytes = 0
        self.last_seen = NEVER  # a plain float (no box per packet in mypyc); None in PortStats
        self.drops_no_destination = 0
        self.drops_unexpected_source = 0
        self.drops_malformed = 0
        self.drops_send_failed = 0
        self.relatches = 0
        self.stats = ReceiverStats()
        self.rtcp_ssrc: int | None = None
        self.closed = False
        self.retired = False
        self._cand_addr: Addr | None = None
        self._cand_count = 0
        self._cand_ssrc = -1
        self._cand_seq = 0

    def receive(self, data: bytes, addr: Addr) -> None:
        """One datagram from ``addr``: forward it out of the peer port, or drop and count it.

        The common case comes first and is flat: RTP from the latched source on a port that
        takes RTP, of the SSRC being counted, in sequence (or a duplicate).  Its receiver
        statistics are :meth:`ReceiverStats.update`'s in-sequence branch inlined (RFC 3550 A.1
        update_seq, A.8 jitter): a method call per packet is a sizeable part of the relay's work
        per packet.  Everything else takes :meth:`_receive`, the general path."""
        # a link's datagrams come with the very tuple latched (identity: no comparison)
        if (addr is self.source or addr == self.source) and self.kind != KIND_RTCP:
            n = len(data)
            if n >= 12 and data[0] & 0xC0 == 0x80 and not RTCP_MIN_TYPE <= data[1] <= RTCP_MAX_TYPE:
                seq, ts, ssrc = _unpack_seq_ts_ssrc(data, 2)
                stats = self.stats
                max_seq = stats.max_seq
                if ssrc == stats.ssrc and (seq - max_seq) & 0xFFFF < MAX_DROPOUT:
                    now = self._clock()
                    self.last_seen = now
                    if seq < max_seq:
                        stats.cycles += SEQ_MOD  # wrapped
                    stats.max_seq = seq
                    stats.received += 1
                    transit = now * stats.clock_rate - ts
                    if stats._timed:
                        d = transit - stats._transit
                        if d < 0.0:
                            d = -d
                        if d > _TS_HALF:  # the RTP timestamp wrapped between the two packets
                            d = abs(d - TS_MOD)
                        stats.jitter += (d - stats.jitter) * 0.0625
                    stats._transit = transit
                    stats._timed = True
                    out = self.peer_rtp
                    link = out.link
                    try:
                        if link is not None:  # connected to out.dest: no address to convert
                            link(data)
                        else:
                            dest = out.dest
                            if dest is None:
                                self.drops_no_destination += 1
                                return
                            out.sender.sendto(data, dest)
                    except OSError:  # a full send buffer, no route: counted, never raised into the loop
                        self.drops_send_failed += 1
                        return
                    self.packets += 1
                    self.bytes += n
                    return
        self._receive(data, addr)

    def _receive(self, data: bytes, addr: Addr) -> None:
        """Every datagram but the common case of :meth:`receive` (same outcome for that too)."""
        n = len(data)
        if n < 8 or data[0] & 0xC0 != 0x80:  # RTP/RTCP version 2 (RFC 3550 5.1)
            self.drops_malformed += 1
            return
        rtcp = RTCP_MIN_TYPE <= data[1] <= RTCP_MAX_TYPE  # RFC 5761 4
        if rtcp:
            if self.kind == KIND_RTP:
                self.drops_malformed += 1
                return
        elif self.kind == KIND_RTCP or n < 12:
            self.drops_malformed += 1
            return
        now = self._clock()
        if addr != self.source and not self._new_source(data, addr, rtcp, now):
            return
        self.last_seen = now
        if rtcp:
            out = self.peer_rtcp
            self.rtcp_ssrc = int.from_bytes(data[4:8])  # for the re-latch rule; RTCP is rare
        else:
            out = self.peer_rtp
            seq, ts, ssrc = _unpack_seq_ts_ssrc(data, 2)
            self.stats.update(seq, ts, ssrc, now)
        link = out.link
        try:
            if link is not None:
                link(data)
            else:
                dest = out.dest
                if dest is None:
                    self.drops_no_destination += 1
                    return
                out.sender.sendto(data, dest)
        except OSError:
            self.drops_send_failed += 1
            return
        self.packets += 1
        self.bytes += n

    def _new_source(self, data: bytes, addr: Addr, rtcp: bool, now: float) -> bool:
        """A packet not from the latched source: latch, count towards a re-latch, or drop.

        A source whose IP the signalling did not vouch for (``sources``) is never latched onto
        first, nor after the party's silence: the first sender from anywhere took a call's
        media (RTP bleed: a stranger spraying the port range while a call rang, or after 2 s
        of a party's silence, heard one side and spoke into the other; red team,
        2026-12-02).  It may take over only by continuing the latched stream's own SSRC and
        sequence (a phone whose network changed mid-call), which only a party that sees the
        stream can.  The port is learnt freely: a NAT picks it."""
        sources = self.sources
        foreign = sources is not None and addr[0] not in sources
        farm = self.farm_address
        if (foreign and self.source is None) or (farm is not None and farm(addr[0], addr[1])):
            self.drops_unexpected_source += 1
            return False
        allowed = self.latch_allowed
        if allowed is not None and not allowed(addr[0], addr[1]):
            # a destination the farm refuses: the relay never sends there, so never latches
            self.drops_unexpected_source += 1
            return False
        if addr[1] == 0:
            # nothing can answer source port 0 (raw-socket senders, e.g. SIPp's pcap play):
            # forwarded while the port has not latched (it keeps sending to the SDP address),
            # never latched onto
            if self.source is None:
                return True
            self.drops_unexpected_source += 1
            return False
        if self.source is None:
            self._latch(addr)
            return True
        if rtcp:
            ssrc = int.from_bytes(data[4:8])
            seq = -1
        else:
            seq = int.from_bytes(data[2:4])
            ssrc = int.from_bytes(data[8:12])
        if addr != self._cand_addr or ssrc != self._cand_ssrc:
            self._cand_addr = addr
            self._cand_ssrc = ssrc
            self._cand_count = 0
            if rtcp:
                known = ssrc == self.rtcp_ssrc
            else:
                stats = self.stats
                known = ssrc == stats.ssrc and 0 < (seq - stats.max_seq) & 0xFFFF < MAX_DROPOUT
            quiet = not foreign and now - self.last_seen >= self._relatch_silence  # NEVER: -inf
            if not (known or quiet):
                self._cand_addr = None  # not a handover candidate: forget it
                self.drops_unexpected_source += 1
                return False
        elif not rtcp and not 0 < (seq - self._cand_seq) & 0xFFFF < MAX_DROPOUT:
            self._cand_count = 0
        self._cand_seq = seq
        self._cand_count += 1
        if self._cand_count < self._relatch_packets:
            self.drops_unexpected_source += 1
            return False
        self._latch(addr)
        self.relatches += 1
        return True

    def _latch(self, addr: Addr) -> None:
        self.source = addr
        self.dest = addr
        self.link = None  # connected to the previous source, if any: the glue links it again
        self._cand_addr = None
        self._cand_count = 0

    def _set_sdp(self, dest: Addr | None) -> None:
        if dest != self.sdp_dest:
            self.sdp_dest = dest
            self.source = None  # the party moved its media: learn it again
            self.link = None
            self._cand_addr = None
        if self.source is None:
            self.dest = dest

    def snapshot(self) -> PortStats:
        s = self.stats
        rtp = self.kind != KIND_RTCP
        return PortStats(
            port=self.port,
            kind=_KIND_NAMES[self.kind],
            source=self.source,
            destination=self.dest,
            packets=self.packets,
            bytes=self.bytes,
            last_seen=None if self.last_seen == NEVER else self.last_seen,
            drops_no_destination=self.drops_no_destination,
            drops_unexpected_source=self.drops_unexpected_source,
            drops_malformed=self.drops_malformed,
            drops_send_failed=self.drops_send_failed,
            relatches=self.relatches,
            ssrc=s.ssrc if rtp else self.rtcp_ssrc,
            extended_max_seq=s.extended_max_seq if rtp else 0,
            expected=s.expected if rtp else 0,
            received=s.total_received if rtp else 0,
            lost=s.lost if rtp else 0,
            jitter_ms=s.jitter_ms if rtp else 0.0,
        )
