"""The media relay's forwarding engine: sessions, ports, latching, counters, media timeout.

Theory of operation
-------------------
A *call* (Call-ID) holds *monologues*, one per party, keyed by its SIP tag (rtpengine's model).
A monologue has one *side* per media stream (m= line): the relay's local port(s) that party sends
to, and from which the relay sends to that party, so the party sees the relay as the source of
what it receives (symmetric RTP, RFC 4961).  A side is one :class:`RelayPort` (rtcp-mux, RFC 5761)
or two (RTP on an even port, RTCP on the next, RFC 3550 11).

A packet from party A arrives on A's port and leaves from B's port of the same stream towards B's
current address.  Each :class:`RelayPort` holds direct references to the peer ports it forwards
to, so the per-packet path is an attribute walk: classify two bytes, compare the source, update
the counters, ``sendto``.  No dict lookup, no task, no log line, no exception on that path.

Signalling (the later ng layer): ``offer(call_id, from_tag, media)`` makes (or updates) the
offerer's monologue with its SDP endpoints and returns the ports of the other monologue, to be
written into the SDP the answerer receives; ``answer(call_id, from_tag, to_tag, media)`` gives
the answerer's endpoints and returns the offerer's ports for the SDP the offerer receives.  A
re-INVITE from the callee is an offer with the tags swapped (from_tag = the callee's tag).

Forked answers: every branch received the same offer, so every early answer reaches the same
ports.  Each To tag is recorded as its own leg of the answering monologue (its SDP endpoints);
the newest answer directs the media, deleting one leg leaves the others, and deleting the last
leg (or the From tag, or the call) frees the call.

Latching (symmetric RTP through NAT)
------------------------------------
Before a port has latched, the relay sends to the party's SDP address only if the injected
policy permits it (``sdp_allowed``, typically :func:`policy_predicate` of a
:class:`~sipfarm.transport.destinations.DestinationPolicy`); otherwise packets towards that
party are dropped (``drops_no_destination``) until it sends.  The first well-formed packet
arriving on a port from an address the signalling vouched for latches the port to its source
(IP, port): from then on the relay sends to that address and drops packets from any other
source (``drops_unexpected_source``).

Vouched for (``latch_from="signalled"``, the default): the IPs of the party's SDP connection
addresses and the IP its SIP came from (ng ``received-from``, which sipfarm's nodes send with
the phone's real address, as Kamailio does), gathered over the call's offers and answers; the
port is learnt, as a NAT picks it.  A party that has sent no SDP yet (the callee while its
phone rings) has none, so nothing latches its ports.  Before this rule the first sender from
anywhere was taken: a stranger who sprayed the relay's port range while a call rang, or after a
party's 2 s of silence, heard one side of the call and spoke into the other (RTP bleed; red
team, 2026-12-02).  ``latch_from="any"`` restores rtpengine's default (an operator whose phones
send media from addresses their signalling never names).  Whatever the rule, a port never
latches onto an address of the farm (``farm_address``: another relay's media ports, a node's
SIP listener): a packet spoofed from relay B's port must not set relay A sending there, with B
set the same way (two relays feeding each other for ever).  Nor onto any address ``sdp_allowed``
refuses: a latched port sends there, so a caller whose SDP named a refused address (a Redis on
loopback, a metadata service) and who then spoofed one packet from it would have the relay
stream the other party's media, or its own chosen payloads, at it (red team, 2026-12-03).

Re-latching (from a vouched IP only) needs proof that the new source is the same party (rtpengine's "media handover",
without its open window for anyone who sends first): ``relatch_packets`` consecutive packets
(default 5) from one new source, all with one SSRC, RTP sequence numbers each ahead of the
previous by less than MAX_DROPOUT, and either

a. the SSRC is the one the latched source was sending, and the first packet continues its
   sequence (a phone whose NAT binding or network changed mid-stream), or
b. the latched source has been silent for ``relatch_silence`` seconds (default 2 s): a phone
   that restarted its stream with a new SSRC from a new port.

An RTCP port checks the sender SSRC for (a) (no sequence numbers).  New SDP endpoints for a
party (a re-INVITE that moves its media) unlatch its ports: they latch again on the next packet.

Counters and timeout
--------------------
Per port (that is, per stream and direction, counted where the packet enters): packets and
bytes forwarded, drops by reason, last seen (the injected clock, monotonic), relatches, and RTP
receiver statistics (:class:`~media.rtp.ReceiverStats`: extended highest sequence, expected,
lost, interarrival jitter at the stream's clock rate).  A call none of whose ports received an
accepted packet for ``media_timeout`` seconds (counted from the last offer/answer too) is freed
by :meth:`RelayEngine.handle_timer`; the glue calls it at :meth:`RelayEngine.next_timer`.

The core opens no socket: a new port is queued for :meth:`RelayEngine.take_opened` and the glue
(:class:`RelayServer`, asyncio) binds it and sets ``port.sender`` to its socket; a freed port
is queued for :meth:`RelayEngine.take_closed`.  Tests put in-memory senders there instead.  Once
a port has latched, the glue may also give it ``port.link``, the ``send`` of a socket connected
to its source (the kernel then sends there with no address to convert, and gives that socket
only that source's packets: :mod:`media.plane`); the core drops it whenever the source changes.  The per-packet
code (:class:`RelayPort`) is in :mod:`media.port`, compiled with mypyc in the compiled build.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from media.plane import MAX_EVENTS, MediaPlane
from media.port import KIND_MUX, KIND_RTCP, KIND_RTP, NULL_SENDER, Addr, PortStats, RelayPort
from media.ports import PortAllocator, PortsExhausted, RelayError
from sipfarm.sip.address import Address
from sipfarm.transport.destinations import DestinationPolicy

__all__ = [
    "CallStats",
    "MediaEndpoint",
    "MediaPorts",
    "MediaStats",
    "MonologueStats",
    "PortStats",
    "PortsExhausted",
    "RelayEngine",
    "RelayError",
    "RelayPort",
    "RelayServer",
    "RelayTotals",
    "SessionLimitReached",
    "TooManyAnswers",
    "UnknownCall",
    "UnknownTag",
    "policy_predicate",
]

DEFAULT_MEDIA_TIMEOUT = 60.0
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_RELATCH_PACKETS = 5
DEFAULT_RELATCH_SILENCE = 2.0
DEFAULT_CLOCK_RATE = 8000  # PCMU/PCMA (RFC 3551 4.5.14)
LATCH_FROM = ("signalled", "any")  # whom a port latches onto: see "Latching"
# ports one owner's calls may hold at once (an account's, or a source's, as the controller says
# in ng "owner"): 100 two-party audio calls with RTCP on its own port; 0: no limit
DEFAULT_MAX_PORTS_PER_OWNER = 400
# answer legs (distinct To tags) one call may hold: forks and their early media; a hostile callee's
# 183s under ever new tags are refused beyond it (each leg ~2.5 KB), the legs it has kept
MAX_ANSWER_LEGS = 32

_RTP, _RTCP, _MUX = KIND_RTP, KIND_RTCP, KIND_MUX  # kinds of port: what it accepts
_MAX_ROUNDS = 16  # polls of the plane per loop callback (MAX_EVENTS sockets each)
DEFAULT_BATCH_INTERVAL = 0.001  # seconds: see RelayServer
_OWN_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class UnknownCall(RelayError):
    reason = "Unknown call-id"


class UnknownTag(RelayError):
    reason = "Unknown from-tag or to-tag"


class SessionLimitReached(RelayError):
    reason = "Session limit reached"


class TooManyAnswers(RelayError):
    """A call's answers under new To tags (forked or early-media legs) beyond ``MAX_ANSWER_LEGS``:
    each holds its own state, and a callee could send any number of 183s, each with a new tag."""

    reason = "Too many answers (To tags) for one call"


class OwnerLimitReached(RelayError):
    """The offer's owner (an account, or a source) holds ``max_ports_per_owner`` ports already."""

    reason = "Owner's port limit reached"


def policy_predicate(
    policy: DestinationPolicy, farm_address: Callable[[str, int], bool] | None = None
) -> Callable[[str, int], bool]:
    """``sdp_allowed`` from the farm's destination policy (allowed/denied networks) and, when
    given, ``farm_address`` (:meth:`media.farm.FarmAddresses.farm_address`): an address of the
    farm (a relay's media range or ng socket, a node's SIP port) is refused whatever the
    networks allow, since media sent there loops between relays or floods the farm."""
    if farm_address is None:

        def permitted(host: str, port: int) -> bool:
            return policy.permits(Address("udp", host, port))

        return permitted

    def permitted_outside_farm(host: str, port: int) -> bool:
        return not farm_address(host, port) and policy.permits(Address("udp", host, port))

    return permitted_outside_farm


@dataclass(frozen=True, slots=True)
class MediaEndpoint:
    """Where one party receives one media stream, from its SDP (the ng layer parses it).

    ``port`` 0 is a disabled stream (RFC 3264 6): nothing is sent to it before latching.
    ``rtcp_port`` is the a=rtcp port (RFC 3605) if given, else ``port + 1``; ``rtcp_mux`` that
    the party offered or accepted a=rtcp-mux.  ``clock_rate`` is the RTP clock of its codec.
    """

    host: str
    port: int
    rtcp_port: int | None = None
    rtcp_mux: bool = False
    clock_rate: int = DEFAULT_CLOCK_RATE
    #: the IP the party's signalling came from (ng ``received-from``), if the controller said
    source: str | None = None


@dataclass(frozen=True, slots=True)
class MediaPorts:
    """The relay's ports for one party's stream: RTCP equals RTP when the side is rtcp-mux."""

    rtp: int
    rtcp: int

    @property
    def rtcp_mux(self) -> bool:
        return self.rtp == self.rtcp


@dataclass(frozen=True, slots=True)
class MediaStats:
    index: int
    ports: MediaPorts
    rtp: PortStats
    rtcp: PortStats | None  # None with rtcp-mux (RTCP is counted on the RTP port)


@dataclass(frozen=True, slots=True)
class MonologueStats:
    tag: str | None  # None: the offer is not answered yet
    legs: tuple[str, ...]  # every To tag that answered on these ports (forks)
    media: tuple[MediaStats, ...]


class RelayTotals(NamedTuple):
    """Counters summed over ports (see :meth:`RelayServer.totals`)."""

    packets: int = 0  # forwarded
    bytes: int = 0
    drops_no_destination: int = 0
    drops_unexpected_source: int = 0
    drops_malformed: int = 0
    drops_send_failed: int = 0


@dataclass(frozen=True, slots=True)
class CallStats:
    call_id: str
    created: float
    last_activity: float
    monologues: tuple[MonologueStats, ...]


class _Side:
    """One party's end of one media stream: its port(s) and its SDP endpoint."""

    __slots__ = ("endpoint", "index", "owner", "rtcp", "rtp")

    def __init__(self, index: int, rtp: RelayPort, rtcp: RelayPort | None, owner: str | None = None) -> None:
        self.index = index
        self.rtp = rtp
        self.rtcp = rtcp
        self.owner = owner  # whose call holds these ports (max_ports_per_owner)
        self.endpoint: MediaEndpoint | None = None

    @property
    def ports(self) -> MediaPorts:
        return MediaPorts(self.rtp.port, self.rtp.port if self.rtcp is None else self.rtcp.port)

    def all_ports(self) -> tuple[RelayPort, ...]:
        return (self.rtp,) if self.rtcp is None else (self.rtp, self.rtcp)

    def set_endpoint(self, endpoint: MediaEndpoint, allowed: Callable[[str, int], bool]) -> None:
        self.endpoint = endpoint
        sources = self.rtp.sources
        if sources is not None:  # latch_from="signalled": vouch for this SDP's and SIP's IPs
            vouched = sources | _source_forms(endpoint.host) | _source_forms(endpoint.source)
            if vouched != sources:
                for port in self.all_ports():
                    port.sources = vouched
        self.rtp.stats.clock_rate = endpoint.clock_rate
        self.rtp.kind = _MUX if endpoint.rtcp_mux or self.rtcp is None else _RTP
        rtp_dest: Addr | None = None
        rtcp_dest: Addr | None = None
        if endpoint.port and allowed(endpoint.host, endpoint.port):
            rtp_dest = (endpoint.host, endpoint.port)
        rtcp_port = endpoint.rtcp_port or endpoint.port + 1
        if endpoint.port and not endpoint.rtcp_mux and allowed(endpoint.host, rtcp_port):
            rtcp_dest = (endpoint.host, rtcp_port)
        self.rtp._set_sdp(rtp_dest)
        if self.rtcp is not None:
            self.rtcp._set_sdp(rtcp_dest)

    @property
    def rtcp_target(self) -> RelayPort:
        """The port from which this party receives RTCP (its RTP port when it muxes)."""
        if self.rtcp is None or self.rtp.kind == _MUX:
            return self.rtp
        return self.rtcp


def _source_forms(host: str | None) -> frozenset[str]:
    """How a datagram's source names ``host`` (an IP of an SDP or ``received-from``): its
    canonical text, and for IPv4 also its IPv4-mapped IPv6 form (a dual-stack socket's)."""
    if not host:
        return frozenset()
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return frozenset()  # a name, or nonsense: vouches for nothing
    if ip.is_unspecified:
        return frozenset()  # c=0.0.0.0: held, no address
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return frozenset((ip.compressed,) if mapped is None else (ip.compressed, str(mapped)))
    return frozenset((str(ip), f"::ffff:{ip}"))


def _wire(a: _Side, b: _Side) -> None:
    for port in a.all_ports():
        port.peer_rtp = b.rtp
        port.peer_rtcp = b.rtcp_target
    for port in b.all_ports():
        port.peer_rtp = a.rtp
        port.peer_rtcp = a.rtcp_target


class _Monologue:
    __slots__ = ("legs", "peer", "sides", "tag")

    def __init__(self, tag: str | None) -> None:
        self.tag = tag
        self.legs: dict[str, Sequence[MediaEndpoint]] = {}  # To tags that answered here (forks)
        self.sides: list[_Side] = []
        self.peer: _Monologue | None = None

    def ports(self) -> list[RelayPort]:
        return [p for side in self.sides for p in side.all_ports()]

    def snapshot(self) -> MonologueStats:
        media = tuple(
            MediaStats(
                index=s.index,
                ports=s.ports,
                rtp=s.rtp.snapshot(),
                rtcp=None if s.rtcp is None else s.rtcp.snapshot(),
            )
            for s in self.sides
        )
        return MonologueStats(tag=self.tag, legs=tuple(self.legs), media=media)


class _Call:
    __slots__ = ("call_id", "created", "last_signal", "monologues", "owner", "tags")

    def __init__(self, call_id: str, now: float, owner: str | None = None) -> None:
        self.call_id = call_id
        self.owner = owner
        self.created = now
        self.last_signal = now
        self.monologues: list[_Monologue] = []
        self.tags: dict[str, _Monologue] = {}

    def ports(self) -> list[RelayPort]:
        return [p for m in self.monologues for p in m.ports()]

    def last_activity(self) -> float:
        last = self.last_signal
        for m in self.monologues:
            for side in m.sides:
                for p in side.all_ports():
                    seen = p.last_seen  # NEVER (-inf) for a port that never received
                    last = max(last, seen)
        return last

    def snapshot(self) -> CallStats:
        return CallStats(
            call_id=self.call_id,
            created=self.created,
            last_activity=self.last_activity(),
            monologues=tuple(m.snapshot() for m in self.monologues),
        )


class RelayEngine:
    """The sans-IO relay: see the module docstring.  Not thread-safe (one event loop)."""

    def __init__(
        self,
        ports: PortAllocator,
        *,
        clock: Callable[[], float] = time.monotonic,
        sdp_allowed: Callable[[str, int], bool] | None = None,
        media_timeout: float = DEFAULT_MEDIA_TIMEOUT,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        relatch_packets: int = DEFAULT_RELATCH_PACKETS,
        relatch_silence: float = DEFAULT_RELATCH_SILENCE,
        latch_from: str = "signalled",
        farm_address: Callable[[str, int], bool] | None = None,
        max_ports_per_owner: int = DEFAULT_MAX_PORTS_PER_OWNER,
    ) -> None:
        if latch_from not in LATCH_FROM:
            raise ValueError(f"latch_from: expected one of {LATCH_FROM}, got {latch_from!r}")
        if media_timeout <= 0:
            raise ValueError("media_timeout must be positive")
        if relatch_packets < 1:
            raise ValueError("relatch_packets must be at least 1")
        self.ports = ports
        self.clock = clock
        self._allowed = sdp_allowed or policy_predicate(DestinationPolicy())
        self.media_timeout = media_timeout
        self.max_sessions = max_sessions
        self.max_ports_per_owner = max_ports_per_owner  # 0: no limit
        self._owned: dict[str, int] = {}  # owner -> ports its calls hold
        self._relatch_packets = relatch_packets
        self._relatch_silence = relatch_silence
        self._strict = latch_from == "signalled"
        self._farm_address = farm_address  # never a source to latch onto (media.farm)
        self._calls: dict[str, _Call] = {}
        self._opened: list[RelayPort] = []
        self._closed: list[RelayPort] = []
        self._deadline: float | None = None

    # -- signalling ------------------------------------------------------------------------

    def offer(
        self,
        call_id: str,
        from_tag: str,
        media: Sequence[MediaEndpoint],
        to_tag: str | None = None,
        owner: str | None = None,
    ) -> list[MediaPorts]:
        """The offerer ``from_tag`` sends ``media``; returns the ports the answerer sends to.
        ``owner``: whose call a new one is (the caller's account, or its address), bounded by
        ``max_ports_per_owner`` (one account's ringing calls filled the whole port range and
        every other caller got 503; red teams C and D, 2026-12-02).

        Raises PortsExhausted, SessionLimitReached or OwnerLimitReached (a new call), leaving
        nothing allocated."""
        now = self.clock()
        call = self._calls.get(call_id)
        new_call = call is None
        if call is None:
            if len(self._calls) >= self.max_sessions:
                raise SessionLimitReached
            call = _Call(call_id, now, owner or None)
        offerer = call.tags.get(from_tag)
        if offerer is None and to_tag is not None:
            other = call.tags.get(to_tag)
            if other is not None and other.peer is not None:
                # the other party offers in an existing dialog under a tag not seen yet (an
                # UPDATE before the answer, or a fork's): it sends to the ports it was offered
                offerer = other.peer
                offerer.legs[from_tag] = ()
                offerer.tag = from_tag
                call.tags[from_tag] = offerer
        new_offerer = offerer is None
        if offerer is None:
            offerer = _Monologue(from_tag)
        answerer = offerer.peer
        if to_tag is not None and (answerer is None or to_tag not in answerer.legs):
            answerer = call.tags.get(to_tag)
        new_answerer = answerer is None
        if answerer is None:
            answerer = _Monologue(to_tag)
            if to_tag is not None:
                answerer.legs[to_tag] = ()
        self._grow(offerer, answerer, media, call.owner)
        if new_offerer:
            call.monologues.append(offerer)
            call.tags[from_tag] = offerer
        if new_answerer:
            call.monologues.append(answerer)
            if to_tag is not None:
                call.tags[to_tag] = answerer
        offerer.peer = answerer
        answerer.peer = offerer
        if from_tag in offerer.legs:  # a leg's own SDP, restored if a newer leg is deleted
            offerer.legs[from_tag] = tuple(media)
        for side, endpoint in zip(offerer.sides, media, strict=False):
            side.set_endpoint(endpoint, self._allowed)
        for a, b in zip(offerer.sides, answerer.sides, strict=True):
            _wire(a, b)
        call.last_signal = now
        if new_call:
            self._calls[call_id] = call
        self._arm(now + self.media_timeout)
        return [side.ports for side in answerer.sides[: len(media)]]

    def answer(self, call_id: str, from_tag: str, to_tag: str, media: Sequence[MediaEndpoint]) -> list[MediaPorts]:
        """The answerer ``to_tag`` sends ``media``; returns the ports the offerer sends to.

        A To tag not seen before takes the offer's ports as a new leg (forked answers)."""
        now = self.clock()
        call = self._call(call_id)
        offerer = call.tags.get(from_tag)
        if offerer is None or offerer.peer is None:
            raise UnknownTag(f"Unknown from-tag {from_tag!r}")
        answerer = call.tags.get(to_tag)
        if answerer is None:
            if len(offerer.peer.legs) >= MAX_ANSWER_LEGS:
                raise TooManyAnswers
            answerer = offerer.peer
            call.tags[to_tag] = answerer
        elif answerer is not offerer.peer:
            raise UnknownTag(f"to-tag {to_tag!r} is not the peer of from-tag {from_tag!r}")
        answerer.legs.pop(to_tag, None)
        answerer.legs[to_tag] = tuple(media)  # newest last: it directs the media
        answerer.tag = to_tag
        self._grow(offerer, answerer, media, call.owner)
        for side, endpoint in zip(answerer.sides, media, strict=False):
            side.set_endpoint(endpoint, self._allowed)
        for a, b in zip(offerer.sides, answerer.sides, strict=True):
            _wire(a, b)
        call.last_signal = now
        self._arm(now + self.media_timeout)
        return [side.ports for side in offerer.sides[: len(media)]]

    def delete(self, call_id: str, from_tag: str | None = None, to_tag: str | None = None) -> CallStats:
        """Free the call (ports return to the range), or only the leg ``to_tag`` of a forked
        answer when other legs remain.  Returns the call's final counters."""
        call = self._call(call_id)
        if from_tag is not None and from_tag not in call.tags:
            raise UnknownTag(f"Unknown from-tag {from_tag!r}")
        if to_tag is not None:
            leg = call.tags.get(to_tag)
            if leg is None:
                raise UnknownTag(f"Unknown to-tag {to_tag!r}")
            if len(leg.legs) > 1 and to_tag in leg.legs:
                del leg.legs[to_tag]
                del call.tags[to_tag]
                if leg.tag == to_tag:  # the newest remaining answer directs the media again
                    leg.tag, endpoints = next(reversed(leg.legs.items()))
                    for side, endpoint in zip(leg.sides, endpoints, strict=False):
                        side.set_endpoint(endpoint, self._allowed)
                    if leg.peer is not None:
                        for a, b in zip(leg.peer.sides, leg.sides, strict=True):
                            _wire(a, b)
                return call.snapshot()
        stats = call.snapshot()
        self._free(call)
        return stats

    def query(self, call_id: str) -> CallStats:
        return self._call(call_id).snapshot()

    def list_calls(self) -> list[str]:
        return list(self._calls)

    def call_ports(self, call_id: str) -> list[RelayPort]:
        """The ports of ``call_id`` (none for an unknown call)."""
        call = self._calls.get(call_id)
        return [] if call is None else call.ports()

    @property
    def sessions(self) -> int:
        return len(self._calls)

    # -- timer -----------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (clock time), None with no call."""
        return self._deadline

    def handle_timer(self, now: float) -> list[CallStats]:
        """Free every call silent for ``media_timeout``; returns their final counters."""
        expired: list[CallStats] = []
        deadline: float | None = None
        timeout = self.media_timeout
        for call in list(self._calls.values()):
            due = call.last_activity() + timeout
            if due <= now:
                expired.append(call.snapshot())
                self._free(call)
            elif deadline is None or due < deadline:
                deadline = due
        self._deadline = deadline
        return expired

    # -- sockets ---------------------------------------------------------------------------

    def take_opened(self) -> list[RelayPort]:
        """Ports allocated since the last call: the glue binds them and sets ``sender``."""
        opened, self._opened = self._opened, []
        return opened

    def take_closed(self) -> list[RelayPort]:
        """Ports freed since the last call: the glue closes their sockets."""
        closed, self._closed = self._closed, []
        return closed

    def port_unusable(self, port: RelayPort, *, retire: bool = True) -> None:
        """Binding ``port`` failed: free the call that holds it and, when another process holds
        the port (``retire``), never hand it out again.  A failure of this process (out of file
        descriptors, of memory) returns the port to the range with the call."""
        if retire:
            port.retired = True
            self.ports.retire(port.port)
        for call in list(self._calls.values()):
            if any(p is port for p in call.ports()):
                self._free(call)

    # -- internals -------------------------------------------------------------------------

    def _call(self, call_id: str) -> _Call:
        call = self._calls.get(call_id)
        if call is None:
            raise UnknownCall(f"Unknown call-id {call_id!r}")
        return call

    def _arm(self, due: float) -> None:
        if self._deadline is None or due < self._deadline:
            self._deadline = due

    def _grow(
        self, offerer: _Monologue, answerer: _Monologue, media: Sequence[MediaEndpoint], owner: str | None
    ) -> None:
        """Allocate the sides both monologues lack for ``media``, all or nothing."""
        if owner is not None and self.max_ports_per_owner:
            need = sum(2 * max(0, len(media) - len(mono.sides)) for mono in (offerer, answerer))
            if need and self._owned.get(owner, 0) + need > self.max_ports_per_owner:
                raise OwnerLimitReached
        made: list[_Side] = []
        try:
            for mono in (offerer, answerer):
                for index in range(len(mono.sides), len(media)):
                    # the offerer's own SDP says whether it muxes; the answerer's is unknown yet,
                    # so it gets a pair (RFC 5761 5.1.1: offer both, use one port if accepted)
                    mux = mono is offerer and media[index].rtcp_mux
                    made.append(self._new_side(index, mux, owner))
        except PortsExhausted:
            for side in made:
                self._release(side)
            raise
        for mono in (offerer, answerer):
            need = len(media) - len(mono.sides)
            if need > 0:
                mono.sides.extend(made[:need])
                del made[:need]

    def _new_side(self, index: int, mux: bool, owner: str | None = None) -> _Side:
        clock, n, silence = self.clock, self._relatch_packets, self._relatch_silence
        if mux:
            rtp = RelayPort(self.ports.allocate_single(), _MUX, clock, n, silence)
            side = _Side(index, rtp, None, owner)
        else:
            base = self.ports.allocate_pair()
            side = _Side(
                index, RelayPort(base, _RTP, clock, n, silence), RelayPort(base + 1, _RTCP, clock, n, silence), owner
            )
        if owner is not None:
            self._owned[owner] = self._owned.get(owner, 0) + len(side.all_ports())
        for port in side.all_ports():
            port.farm_address = self._farm_address
            port.latch_allowed = self._allowed
            if self._strict:  # nothing vouched for yet: nothing latches (see "Latching")
                port.sources = frozenset()
        self._opened.extend(side.all_ports())
        return side

    def _release(self, side: _Side) -> None:
        for port in side.all_ports():
            port.closed = True
            port.sender = NULL_SENDER
            port.link = None
            port.dest = None
            self._closed.append(port)
        if side.rtcp is None:
            self.ports.free_single(side.rtp.port)
        else:
            self.ports.free_pair(side.rtp.port)
        owner = side.owner
        if owner is not None:
            held = self._owned.get(owner, 0) - len(side.all_ports())
            if held > 0:
                self._owned[owner] = held
            else:
                self._owned.pop(owner, None)

    def _free(self, call: _Call) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        for mono in call.monologues:
            for side in mono.sides:
                self._release(side)
            mono.sides = []
        call.monologues = []
        call.tags = {}


class RelayServer:
    """asyncio glue: binds the engine's ports on ``host``, closes freed ones, runs the timer.

    The ports' sockets are a :class:`~media.plane.MediaPlane` (one epoll, drained by the event
    loop through ``add_reader`` on its descriptor: see :mod:`media.plane`).  Signalling that
    allocates ports is async (the API of a relay that may wait to bind); the rest is synchronous.
    ``receive_buffer`` sets SO_RCVBUF on every port (bytes).

    The plane is read in batches (``batch_interval``, default 1 ms; 0: on every wakeup, as a
    bare event loop would): the first packet after a quiet spell is forwarded as soon as it
    arrives, then the loop stops watching the epoll and reads whatever every socket received
    once per interval while packets keep coming.  With hundreds of streams at 50-150 packets/s
    each, waking for every few packets costs more than forwarding them (a context switch and
    two epoll_waits per wakeup: 20% of the relay's CPU in a profile at 90,000 packets/s over
    1,800 streams); a batch a millisecond shares that among every packet of the interval.  The
    price: a packet may wait up to ``batch_interval`` (plus the loop's timer granularity, ~1 ms)
    in its socket, well inside any RTP jitter buffer (20 ms frames).
    ``on_expired`` is called with the final counters of each call the media timeout freed (no
    delete will come for it), after its ports are closed.  :meth:`totals` sums the counters of
    every port since start, for metrics read once in a while (the packet path counts nothing more).
    ``fast_path`` (default on) lets the plane's C fast path forward the latched ports' common
    case where the extension is built (:attr:`fast_path` says whether it runs); the glue gives
    the ports' counters back to Python around signalling and before reading them.
    """

    def __init__(
        self,
        engine: RelayEngine,
        host: str,
        *,
        receive_buffer: int | None = None,
        on_expired: Callable[[CallStats], None] | None = None,
        batch_interval: float = DEFAULT_BATCH_INTERVAL,
        fast_path: bool = True,
    ) -> None:
        self.engine = engine
        self.batch_interval = batch_interval
        self.host = host
        self.receive_buffer = receive_buffer
        self.on_expired = on_expired
        self._plane = MediaPlane(host, receive_buffer, clock=engine.clock, fast_path=fast_path)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the plane runs on
        self._watching = False  # the loop watches the plane's epoll (else a batch timer is due)
        self._batch_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed_totals = RelayTotals()

    async def offer(
        self,
        call_id: str,
        from_tag: str,
        media: Sequence[MediaEndpoint],
        to_tag: str | None = None,
        owner: str | None = None,
    ) -> list[MediaPorts]:
        self._plane.reclaim(self.engine.call_ports(call_id))
        try:
            ports = self.engine.offer(call_id, from_tag, media, to_tag, owner)
        finally:
            self._plane.refresh(self.engine.call_ports(call_id))
        await self._sync()
        return ports

    async def answer(
        self, call_id: str, from_tag: str, to_tag: str, media: Sequence[MediaEndpoint]
    ) -> list[MediaPorts]:
        self._plane.reclaim(self.engine.call_ports(call_id))
        try:
            ports = self.engine.answer(call_id, from_tag, to_tag, media)
        finally:
            self._plane.refresh(self.engine.call_ports(call_id))
        await self._sync()
        return ports

    def delete(self, call_id: str, from_tag: str | None = None, to_tag: str | None = None) -> CallStats:
        self._plane.reclaim(self.engine.call_ports(call_id))
        try:
            stats = self.engine.delete(call_id, from_tag, to_tag)
        finally:
            self._plane.refresh(self.engine.call_ports(call_id))
        self._close_freed()
        return stats

    def query(self, call_id: str) -> CallStats:
        self._plane.flush(self.engine.call_ports(call_id))
        return self.engine.query(call_id)

    @property
    def fast_path(self) -> bool:
        """Whether the plane's C fast path runs (see :mod:`media.plane`)."""
        return self._plane.fast

    @property
    def fast_ports(self) -> int:
        """Latched ports the fast path forwards for now (O(open ports): for tests and status)."""
        return self._plane.fast_ports

    def list_calls(self) -> list[str]:
        return self.engine.list_calls()

    @property
    def open_ports(self) -> int:
        return len(self._plane)

    @property
    def linked_ports(self) -> int:
        """Latched ports with a socket connected to their party (see :mod:`media.plane`)."""
        return self._plane.linked

    @property
    def links_failed(self) -> int:
        """Latched ports the plane could not give a connected socket (they work without)."""
        return self._plane.links_failed

    def totals(self) -> RelayTotals:
        """Packets and bytes forwarded and dropped on every port since start: the ports freed
        so far plus the open ones (O(open ports), attribute reads only)."""
        packets, size, no_dest, unexpected, malformed, send_failed = self._closed_totals
        self._plane.flush()
        for port in self._plane.ports():
            packets += port.packets
            size += port.bytes
            no_dest += port.drops_no_destination
            unexpected += port.drops_unexpected_source
            malformed += port.drops_malformed
            send_failed += port.drops_send_failed
        return RelayTotals(packets, size, no_dest, unexpected, malformed, send_failed)

    def close(self) -> None:
        """Free every call and close every socket (the relay stops)."""
        self._plane.flush()
        for call_id in self.engine.list_calls():
            self.engine.delete(call_id)
        self._close_freed()
        if self._loop is not None:
            if self._watching and not self._loop.is_closed():
                self._loop.remove_reader(self._plane.fileno())
            if self._batch_timer is not None:
                self._batch_timer.cancel()
                self._batch_timer = None
            self._watching = False
            self._loop = None
        self._plane.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _sync(self) -> None:
        failed: RelayPort | None = None
        # the batch is the ports of the one engine call just made
        for port in self.engine.take_opened():
            if port.closed:  # its call was freed meanwhile (or by a failed bind below)
                continue
            try:
                self._plane.bind(port)  # port.sender is its socket from now on
            except OSError as exc:
                failed = failed or port
                # the port is someone else's (EADDRINUSE, EACCES), or this process is short of
                # descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the port is fine then
                self.engine.port_unusable(port, retire=exc.errno not in _OWN_SHORTAGE)
        self._close_freed()
        self._arm_timer()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._watch()
        if failed is not None:
            raise PortsExhausted(f"Failed to bind port {failed.port}")

    # -- the media plane's schedule: wake on the first packet, then read in batches ----------

    def _watch(self) -> None:
        assert self._loop is not None
        self._loop.add_reader(self._plane.fileno(), self._on_readable)
        self._watching = True

    def _on_readable(self) -> None:
        """A packet arrived while the relay was quiet: forward it now, then batch (below)."""
        assert self._loop is not None
        self._drain()
        if self.batch_interval > 0:
            self._loop.remove_reader(self._plane.fileno())
            self._watching = False
            self._batch_timer = self._loop.call_later(self.batch_interval, self._on_batch)

    def _on_batch(self) -> None:
        """``batch_interval`` after the last read: read what came meanwhile, all at once, and
        keep doing so while packets keep coming; back to waking on the first packet when none
        did (one loop wakeup per interval for every stream, not one per few packets)."""
        self._batch_timer = None
        if self._loop is None:
            return
        if self._drain():
            self._batch_timer = self._loop.call_later(self.batch_interval, self._on_batch)
        else:
            self._watch()

    def _drain(self) -> int:
        ready = total = self._plane.drain()
        rounds = 1
        while ready == MAX_EVENTS and rounds < _MAX_ROUNDS:  # more sockets ready than one poll takes
            ready = self._plane.drain()
            total += ready
            rounds += 1
        return total

    def _close_freed(self) -> None:
        closed = self._closed_totals
        for port in self.engine.take_closed():
            if self._plane.unbind(port):
                closed = RelayTotals(
                    closed.packets + port.packets,
                    closed.bytes + port.bytes,
                    closed.drops_no_destination + port.drops_no_destination,
                    closed.drops_unexpected_source + port.drops_unexpected_source,
                    closed.drops_malformed + port.drops_malformed,
                    closed.drops_send_failed + port.drops_send_failed,
                )
        self._closed_totals = closed

    def _arm_timer(self) -> None:
        due = self.engine.next_timer()
        if due is None or (self._timer_at is not None and self._timer_at <= due and self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        delay = max(0.0, due - self.engine.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._plane.flush()  # the media timeout reads last_seen, the expired calls' counters
        expired = self.engine.handle_timer(self.engine.clock())
        self._close_freed()
        self._arm_timer()
        if self.on_expired is not None:
            for stats in expired:
                self.on_expired(stats)
