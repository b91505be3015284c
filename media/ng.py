"""rtpengine's ng control protocol: the relay's signalling interface (what a proxy calls).

Theory of operation
-------------------
An ng message is one UDP datagram ``<cookie> <bencoded dictionary>``; the reply is
``<same cookie> <bencoded dictionary>`` to the sender.  The dictionary's ``"command"`` names the
operation; the reply's ``"result"`` is ``"ok"`` (or ``"pong"``), or ``"error"`` with an
``"error-reason"``.  Speaking it means Kamailio's rtpengine module (or any ng client) can drive
this relay, and Debian's rtpengine can replace it with no change in the proxy.

:class:`NgController` is the protocol without sockets: ``await handle(datagram)`` returns the
reply datagram (or None: nothing to answer).  It is async at its edge only because the relay binds
a call's new ports before their numbers may be answered (:meth:`media.relay.RelayServer.offer`);
everything else in it is synchronous, and tests drive it with an in-memory relay.
:class:`NgServer` is the thin asyncio glue: a ``DatagramProtocol`` that hands each datagram to the
controller and sends the reply.  ng has no authentication, so the glue first asks ``accepts``
(the relay's ``accept_from``: :class:`media.farm.NgAccess`) whether the sender may drive the
relay at all; a datagram from anyone else is dropped unanswered and counted.

Retransmissions: an ng client resends a message under the same cookie until it has a reply, and
rtpengine answers a cookie it has seen with the reply it gave then, without doing the work again
(so a retransmitted offer does not allocate twice).  :class:`CookieCache` keeps replies for
:data:`COOKIE_TTL` seconds, at most :data:`COOKIE_CACHE_SIZE` of them (oldest out first).  A
duplicate that arrives while the first copy is still being executed is dropped: the client
retransmits again and then gets the cached reply.

Errors: every defect of a message (bencoding, a missing or ill-typed key, an unsupported option,
SDP the relay cannot use, a :class:`~media.ports.RelayError`) becomes an error reply in
:meth:`NgController._execute`, the one place that maps them; an unexpected exception is logged
with the Call-ID and answered ``"internal error"``.  A datagram without a readable cookie gets no
reply (there is nothing to address it to) and is counted in ``NgController.dropped``.

The ng subset implemented
-------------------------
Commands: ``ping``, ``offer``, ``answer``, ``delete``, ``query``, ``list``; any other command is
answered ``Unrecognized command``.  Keys are read as rtpengine reads them: case-insensitive,
``-``, ``_`` and space equivalent (``call-id`` = ``call id``), so both Kamailio's spellings and
rtpengine's documented ones work.  Keys outside this list are ignored, as rtpengine ignores them.

What Kamailio 5.6's rtpengine module sends (captured in tests/interop/test_kamailio_drives_relay.py
for ``rtpengine_manage("replace-origin replace-session-connection ICE=remove RTP/AVP
rtcp-mux-demux SDES-off label=... via-branch=1 record-call=no")``), keys in its order::

    offer:  supports sdp ICE label record-call replace transport-protocol rtcp-mux SDES
            call-id via-branch received-from from-tag command
    answer: the same + to-tag
    delete: supports ICE label record-call transport-protocol call-id via-branch
            received-from from-tag command
    ping:   command (alone; at startup, to mark the relay up)
    (trust-address adds "flags": ["trust-address"], received-from is still sent;
     direction=X direction=Y adds "direction": [X, Y]; both checked against this relay)

Honoured:

- ``call-id``, ``from-tag`` (all but ping/list), ``to-tag`` (answer; optional for offer and
  delete: a delete with both tags of a two-party call frees it), ``sdp`` (offer, answer).
- ``replace``: ``origin`` (o= names the relay), ``session-connection`` (session-level c=).
  Media-level c= always names the relay.
- ``ICE``: ``remove`` and ``default`` strip ICE (a relay that does not speak ICE must, or the
  phones would check connectivity around it); ``pass``/``passthrough`` keep it.
- ``rtcp-mux``: ``offer`` (add a=rtcp-mux), ``demux``/``reject`` (remove it), ``accept``
  (keep); the relay terminates rtcp-mux per leg, and confirms it in an SDP whenever the port it
  writes there is a single (muxed) one.  ``accept``/``require`` keep what the SDP says.
- ``transport-protocol``: ``RTP/AVP``/``RTP/AVPF`` when the SDP already says so (a conversion
  between them is refused).
- ``label``: reported in ``query``/``delete`` under its tag.
- ``owner`` (offer; sipfarm's own key, ignored by rtpengine): whose call a new one is, the
  caller's account or address; the ports one owner's calls hold are bounded
  (``max_ports_per_owner``), and an offer over it is refused, allocating nothing.  At most
  :data:`MAX_RELAYED_SECTIONS` enabled media sections per SDP.
- ``limit`` (list): at most that many Call-IDs (default 32).

Accepted and ignored (harmless here):

- ``flags``: ``trust-address``, ``SIP-source-address`` (Kamailio's default config, NATed
  phones) and ``symmetric``: the relay always latches onto where media really comes from, and
  an SDP address is only ever the pre-latch destination, subject to the relay's allowed
  networks; any unknown flag (``generate-mid``, ``strict-source``...), as rtpengine ignores
  unknown ones.
- ``received-from`` (``[family, address]``, type-checked) is never a destination (the SIP
  source may be another proxy): its IP is one the party's ports may latch onto, with the SDP's
  own (:mod:`media.relay`, "Latching").
- ``direction`` (a list; one interface here), ``via-branch`` (one session per call and tag:
  no per-branch legs), ``supports`` (``["load limit"]``: the client's capabilities),
  ``SDES`` (``off`` and friends: nothing to switch off, encrypted SDPs are refused anyway),
  ``DTLS``: ``off``/``no``/``disable``, ``record call``: ``no``/``off``,
  ``media timeout`` and ``delete delay`` (numbers: the relay's own media timeout applies, and it
  frees a deleted call at once).

Refused with an ng error, allocating nothing:

- WebRTC or any encrypted media, with :data:`WEBRTC_UNSUPPORTED` ("DTLS-SRTP/ICE (WebRTC) media
  not supported by sipfarm relay; use rtpengine"): an SDP whose enabled stream is ``RTP/SAVP``,
  ``RTP/SAVPF``, ``UDP/TLS/RTP/SAVP(F)`` or carries ``a=fingerprint`` or ``a=crypto``
  (:func:`media.sdp.secure_media`; the relay cannot hold the keys), or a message asking for
  ``ICE``: ``force``/``force-relay``/``optional``, ``DTLS``: ``passive``/``active``, or a
  ``transport-protocol`` with SAVP or TLS.  Proxies match "not supported" (sipfarm's own lets
  such a call's media go end to end); rtpengine bridges these.
- ``record call``: ``yes``/``on`` or the ``record-call`` flag (:data:`RECORDING_UNSUPPORTED`):
  a call asked to be recorded must not go unrecorded silently.
- ``flags``: ``asymmetric`` (the relay always latches).
- Ill-typed values (a string for a list, a word for a number...), missing keys, bad SDP.

Replies: offer/answer ``{"result": "ok", "sdp": ...}``; delete and query the call's statistics in
rtpengine's shape: ``created``, ``last signal`` (UNIX seconds), ``tags`` (per tag: ``tag``,
``label``, ``created``, ``in dialogue with``, ``medias`` with ``streams``: ``local port``,
``endpoint``, ``last packet``, ``stats`` {``packets``, ``bytes``, ``errors``}), and ``totals``
{``RTP``, ``RTCP``: {``packets``, ``bytes``, ``errors``}}.  Counts are of packets the relay
received and forwarded on a port; ``errors`` are the packets it dropped there (malformed,
unexpected source, no destination yet).  With rtcp-mux, RTCP is counted under RTP.

SDP: disabled streams (port 0) stay disabled.  Successive SDPs one party's side sends keep one
o= line with an increasing version (:func:`media.sdp.continue_session`), per (Call-ID, tag); that
memory is freed on delete and, for calls the relay timed out, by a sweep every
:data:`SWEEP_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from media import relay, sdp
from media.bencode import BencodeError, Value, decode, encode
from media.ports import RelayError
from media.relay import CallStats, MediaPorts, PortStats, UnknownCall
from sipfarm.sip.memo import MAX_CACHED_KEY, bounded_key

__all__ = [
    "COMMANDS",
    "COOKIE_CACHE_SIZE",
    "COOKIE_TTL",
    "DTLS_UNSUPPORTED",
    "WEBRTC_UNSUPPORTED",
    "CookieCache",
    "NgController",
    "NgError",
    "NgServer",
    "RelayControl",
]

log = logging.getLogger("sipfarm.media.ng")

COOKIE_TTL = 30.0  # seconds a reply is kept for retransmissions (rtpengine keeps its for 30 s)
COOKIE_CACHE_SIZE = 10_000
MAX_COOKIE = 128  # bytes; rtpengine's clients send ~20
# The identifiers a call is kept under come from SIP (Call-ID, tags), off the wire: one longer
# than MAX_CACHED_KEY is kept as "~" + 34 hex digits of a keyed hash (the same value, the same
# name, in this process), so each of the relay's max_sessions calls costs a bounded amount.
_IDENTIFIERS = ("call id", "from tag", "to tag")
SWEEP_INTERVAL = 30.0
DEFAULT_LIST_LIMIT = 32  # rtpengine's default for "list"
MAX_LIST_LIMIT = 10_000
MAX_OWNER = 256  # "owner" (sipfarm's nodes: the caller's account or address): never longer
#: enabled media sections one offer may anchor: a call's audio, video, data and screen share
#: need a few; 64 (the SDP parser's bound) reserved 256 ports per INVITE (red team C, 2026-12-02)
MAX_RELAYED_SECTIONS = 16
MAX_IN_FLIGHT = 1_000  # ng messages being executed at once (NgServer); more are dropped
#: seconds between two log lines about ng datagrams from sources not accepted (each is counted)
REFUSED_LOG_INTERVAL = 10.0

COMMANDS = frozenset({"ping", "offer", "answer", "delete", "query", "list"})  # the subset
#: the error-reason of an offer or answer asking for WebRTC (or any encrypted) media; proxies
#: look for "not supported" (sipfarm.proxy.relay_media then lets the call's media go end to end)
WEBRTC_UNSUPPORTED = "DTLS-SRTP/ICE (WebRTC) media not supported by sipfarm relay; use rtpengine"
DTLS_UNSUPPORTED = WEBRTC_UNSUPPORTED  # the earlier name
RECORDING_UNSUPPORTED = "call recording not supported by sipfarm relay; use rtpengine"
_WEBRTC_ICE = frozenset({"force", "force relay", "optional"})
_WEBRTC_DTLS = frozenset({"passive", "active", "actpass"})
_YES = frozenset({"yes", "on", "true", "1"})
INTERNAL_ERROR = "internal error"

# RFC 3551 6: RTP clock rates of the static payload types that are not 8000 Hz
_STATIC_CLOCK_RATES = {10: 44100, 11: 44100, 14: 90000, 25: 90000, 26: 90000, 28: 90000}
_STATIC_CLOCK_RATES.update(dict.fromkeys(range(31, 35), 90000))
_PLAIN_PROTOCOLS = frozenset({"RTP/AVP", "RTP/AVPF"})


class NgError(Exception):
    """A message the relay will not execute; ``reason`` is the ``error-reason`` answered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RelayControl(Protocol):
    """What the controller drives: :class:`media.relay.RelayServer` (or a test's stand-in)."""

    async def offer(
        self,
        call_id: str,
        from_tag: str,
        media: Sequence[relay.MediaEndpoint],
        to_tag: str | None = None,
        owner: str | None = None,
    ) -> list[MediaPorts]: ...

    async def answer(
        self, call_id: str, from_tag: str, to_tag: str, media: Sequence[relay.MediaEndpoint]
    ) -> list[MediaPorts]: ...

    def delete(self, call_id: str, from_tag: str | None = None, to_tag: str | None = None) -> CallStats: ...

    def query(self, call_id: str) -> CallStats: ...

    def list_calls(self) -> list[str]: ...


class CookieCache:
    """Replies by cookie for ``ttl`` seconds, at most ``size`` of them (least recent out first)."""

    def __init__(self, ttl: float = COOKIE_TTL, size: int = COOKIE_CACHE_SIZE) -> None:
        self.ttl = ttl
        self.size = size
        self._replies: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, cookie: bytes, now: float) -> bytes | None:
        self._expire(now)
        entry = self._replies.get(cookie)
        return None if entry is None else entry[1]

    def put(self, cookie: bytes, reply: bytes, now: float) -> None:
        self._replies[cookie] = (now + self.ttl, reply)
        self._replies.move_to_end(cookie)
        while len(self._replies) > self.size:
            self._replies.popitem(last=False)

    def _expire(self, now: float) -> None:
        replies = self._replies
        while replies:
            cookie, (due, _) = next(iter(replies.items()))
            if due > now:
                break
            del replies[cookie]


@dataclass(frozen=True, slots=True)
class _Options:
    """The SDP-rewriting options of an offer or answer."""

    replace_origin: bool
    replace_session_connection: bool
    ice: sdp.IceMode
    rtcp_mux: sdp.RtcpMuxMode
    transport: str | None


@dataclass(slots=True)
class _CallState:
    """What the controller remembers of a call: per tag, the last SDP sent for it, its label."""

    last_signal: float
    sent: dict[str, sdp.SessionDescription] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


Message = dict[str, Value]


class NgController:
    """The ng protocol over a relay; see the module docstring.

    ``clock`` must be the relay engine's clock (monotonic seconds): call statistics carry its
    times, converted to UNIX time with ``wall_clock`` for the replies."""

    def __init__(
        self,
        relay_control: RelayControl,
        relay_address: str,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        cookie_cache: CookieCache | None = None,
    ) -> None:
        sdp.RelayEndpoint(relay_address, 2)  # validates the address (ValueError)
        self.relay = relay_control
        self.relay_address = relay_address
        self.clock = clock
        self.wall_clock = wall_clock
        self.cookies = cookie_cache or CookieCache()
        self.dropped = 0  # datagrams without a cookie, or duplicates of one in execution
        self.errors = 0  # error replies
        self.internal_errors = 0
        #: messages executed by (command, result): commands outside the subset count as
        #: "unknown", unreadable messages as "invalid" (bounded labels for metrics)
        self.commands: dict[tuple[str, str], int] = {}
        self._pending: set[bytes] = set()
        self._calls: dict[str, _CallState] = {}
        self._next_sweep = clock() + SWEEP_INTERVAL

    async def handle(self, datagram: bytes) -> bytes | None:
        """The reply to one ng datagram, or None when there is nothing to answer."""
        cookie, space, body = datagram.partition(b" ")
        if not space or not cookie or len(cookie) > MAX_COOKIE:
            self.dropped += 1
            return None
        now = self.clock()
        cached = self.cookies.get(cookie, now)
        if cached is not None:
            return cached
        if cookie in self._pending:
            self.dropped += 1
            return None
        self._pending.add(cookie)
        try:
            command, reply = await self._execute(body)
        finally:
            self._pending.discard(cookie)
        key = (command, str(reply["result"]))
        self.commands[key] = self.commands.get(key, 0) + 1
        data = cookie + b" " + encode(reply)
        self.cookies.put(cookie, data, self.clock())
        return data

    # -- dispatch --------------------------------------------------------------------------

    def forget(self, call_id: str) -> None:
        """The relay freed ``call_id`` on its own (media timeout): drop what is kept of it now
        (:attr:`media.relay.RelayServer.on_expired`); the periodic sweep covers relays without
        the hook."""
        self._calls.pop(call_id, None)

    async def _execute(self, body: bytes) -> tuple[str, dict[str, Any]]:
        """The command's name and the reply dictionary for one message body; the one place
        errors become replies."""
        call_id: str | None = None
        name = "invalid"
        try:
            try:
                decoded = decode(body)
            except BencodeError as exc:
                raise NgError(f"Invalid bencoded data: {exc}") from None
            if not isinstance(decoded, dict):
                raise NgError("Message is not a bencoded dictionary")
            message = {_key(k): v for k, v in decoded.items()}
            for ident in _IDENTIFIERS:
                value = message.get(ident)
                if isinstance(value, bytes) and len(value) > MAX_CACHED_KEY:
                    message[ident] = b"~" + bounded_key(value).hex().encode()
            command = _text(message, "command")
            if command is None:
                raise NgError("No command in message")
            raw_id = message.get("call id")
            if isinstance(raw_id, bytes):
                call_id = raw_id.decode("latin-1")
            self._sweep()
            name = command.lower() if command.lower() in COMMANDS else "unknown"
            return name, await self._dispatch(command.lower(), message)
        except NgError as exc:
            self.errors += 1
            return name, _error(exc.reason)
        except sdp.SdpError as exc:
            self.errors += 1
            return name, _error(f"Failed to parse SDP: {exc}")
        except RelayError as exc:
            self.errors += 1
            return name, _error(exc.reason)
        except Exception:
            self.internal_errors += 1
            log.exception("ng internal error call_id=%s", call_id)
            return name, _error(INTERNAL_ERROR)

    async def _dispatch(self, command: str, message: Message) -> dict[str, Any]:
        if command == "ping":
            return {"result": "pong"}
        if command == "offer":
            return await self._offer(message)
        if command == "answer":
            return await self._answer(message)
        if command == "delete":
            return self._delete(message)
        if command == "query":
            call_id = _required(message, "call id")
            return {"result": "ok", **self._statistics(call_id, self.relay.query(call_id))}
        if command == "list":
            return self._list(message)
        raise NgError(f"Unrecognized command {command[:40]!r}")

    # -- commands --------------------------------------------------------------------------

    async def _offer(self, message: Message) -> dict[str, Any]:
        call_id = _required(message, "call id")
        from_tag = _required(message, "from tag")
        to_tag = _text(message, "to tag") or None
        description, options = _description(message)
        media = _relay_media(description, _received_from(message))
        known = call_id in self._calls
        owner = _text(message, "owner")
        if owner is not None and len(owner) > MAX_OWNER:
            raise NgError("owner too long")
        ports = await self.relay.offer(call_id, from_tag, media, to_tag, owner or None)
        try:
            out = self._anchored(call_id, from_tag, description, ports, options, message)
        except BaseException:
            if not known:  # nothing answered: give the new call's ports back at once
                self._forget_failed(call_id)
            raise
        return {"result": "ok", "sdp": out}

    async def _answer(self, message: Message) -> dict[str, Any]:
        call_id = _required(message, "call id")
        from_tag = _required(message, "from tag")
        to_tag = _required(message, "to tag")
        description, options = _description(message)
        media = _relay_media(description, _received_from(message))
        ports = await self.relay.answer(call_id, from_tag, to_tag, media)
        return {"result": "ok", "sdp": self._anchored(call_id, to_tag, description, ports, options, message)}

    def _delete(self, message: Message) -> dict[str, Any]:
        call_id = _required(message, "call id")
        from_tag = _text(message, "from tag") or None
        to_tag = _text(message, "to tag") or None
        stats = self.relay.delete(call_id, from_tag, to_tag)
        reply = {"result": "ok", **self._statistics(call_id, stats)}
        try:
            self.relay.query(call_id)
        except UnknownCall:
            self._calls.pop(call_id, None)
        else:  # only a forked answer's leg went
            state = self._calls.get(call_id)
            if state is not None and to_tag is not None:
                state.sent.pop(to_tag, None)
                state.labels.pop(to_tag, None)
        return reply

    def _list(self, message: Message) -> dict[str, Any]:
        limit = message.get("limit", DEFAULT_LIST_LIMIT)
        if isinstance(limit, bytes) and limit.isdigit() and len(limit) < 10:
            limit = int(limit)
        if not isinstance(limit, int) or limit < 0:
            raise NgError("limit must be a non-negative number")
        calls = self.relay.list_calls()[: min(limit, MAX_LIST_LIMIT)]
        return {"result": "ok", "calls": [_raw(c) for c in calls]}

    # -- SDP -------------------------------------------------------------------------------

    def _anchored(
        self,
        call_id: str,
        author: str,
        description: sdp.SessionDescription,
        ports: Sequence[MediaPorts],
        options: _Options,
        message: Message,
    ) -> bytes:
        """The SDP to pass on for ``author``'s side: anchored at the relay's ``ports``."""
        relays: list[sdp.RelayEndpoint | None] = []
        mux_confirmed = False
        for index, section in enumerate(description.media):
            if section.disabled or index >= len(ports):
                relays.append(None)
                continue
            p = ports[index]
            relays.append(sdp.RelayEndpoint(self.relay_address, p.rtp, p.rtcp))
            mux_confirmed = mux_confirmed or p.rtcp_mux
        # the relay's side here is one port (its phone muxes): the SDP must say a=rtcp-mux
        mux = sdp.RtcpMuxMode.OFFER if mux_confirmed else options.rtcp_mux
        out = sdp.anchor(
            description,
            relays,
            replace_origin=options.replace_origin,
            replace_session_connection=options.replace_session_connection,
            ice=options.ice,
            rtcp_mux=mux,
        )
        now = self.clock()
        state = self._calls.get(call_id)
        if state is None:
            state = self._calls[call_id] = _CallState(now)
        state.last_signal = now
        out = sdp.continue_session(out, state.sent.get(author))
        state.sent[author] = out
        label = _text(message, "label")
        if label:
            state.labels[author] = label
        return out.to_bytes()

    def _forget_failed(self, call_id: str) -> None:
        self._calls.pop(call_id, None)
        try:
            self.relay.delete(call_id)
        except RelayError:
            pass

    def _sweep(self) -> None:
        """Forget the SDPs of calls the relay freed on its own (media timeout)."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL
        live = set(self.relay.list_calls())
        for call_id in [c for c in self._calls if c not in live]:
            del self._calls[call_id]

    # -- statistics ------------------------------------------------------------------------

    def _statistics(self, call_id: str, stats: CallStats) -> dict[str, Any]:
        """A call's counters in the shape of rtpengine's query/delete replies."""
        state = self._calls.get(call_id)
        totals = {"RTP": _counters(), "RTCP": _counters()}
        tags: dict[bytes, Any] = {}
        monologues = stats.monologues
        for mono in monologues:
            tag = mono.tag or ""
            medias = []
            for media in mono.media:
                streams = [self._stream(media.rtp, totals["RTP"])]
                if media.rtcp is not None:
                    streams.append(self._stream(media.rtcp, totals["RTCP"]))
                medias.append({"index": media.index + 1, "streams": streams})
            entry: dict[str, Any] = {"tag": _raw(tag), "created": self._wall(stats.created), "medias": medias}
            if len(monologues) == 2:
                other = monologues[1] if mono is monologues[0] else monologues[0]
                entry["in dialogue with"] = _raw(other.tag or "")
            if state is not None and tag in state.labels:
                entry["label"] = _raw(state.labels[tag])
            tags[_raw(tag)] = entry
        last_signal = stats.created if state is None else state.last_signal
        return {
            "created": self._wall(stats.created),
            "last signal": self._wall(last_signal),
            "tags": tags,
            "totals": totals,
        }

    def _stream(self, port: PortStats, total: dict[str, int]) -> dict[str, Any]:
        errors = port.drops_malformed + port.drops_unexpected_source + port.drops_no_destination
        total["packets"] += port.packets
        total["bytes"] += port.bytes
        total["errors"] += errors
        stream: dict[str, Any] = {
            "local port": port.port,
            "flags": [b"RTP", b"RTCP"] if port.kind == "rtp+rtcp" else [port.kind.upper().encode()],
            "last packet": 0 if port.last_seen is None else self._wall(port.last_seen),
            "stats": {"packets": port.packets, "bytes": port.bytes, "errors": errors},
        }
        address = port.source or port.destination
        if address is not None:
            host = str(address[0])
            stream["endpoint"] = {
                "family": "IPv6" if ":" in host else "IPv4",
                "address": host,
                "port": int(address[1]),
            }
        return stream

    def _wall(self, t: float) -> int:
        return int(self.wall_clock() - (self.clock() - t))


class NgServer(asyncio.DatagramProtocol):
    """The asyncio glue: one UDP socket; each datagram's reply goes back to its sender.

    A control message is rare next to media, so each runs as a task (an offer awaits the
    binding of its ports); at most :data:`MAX_IN_FLIGHT` at once, more are dropped (the client
    retransmits).

    ``accepts`` (the sender's IP address -> whether it may drive the relay; None: anyone) is
    asked before anything else: a datagram from a source it refuses gets no task and no answer
    (an error reply would tell a scanner a relay is here, and reflect traffic at whoever the
    source address names), and is counted in :attr:`refused`; a warning names the latest such
    source at most every :data:`REFUSED_LOG_INTERVAL` seconds (a flood writes no flood of logs)."""

    def __init__(
        self,
        controller: NgController,
        accepts: Callable[[str], bool] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller = controller
        self.accepts = accepts
        self.refused = 0  # datagrams from sources accepts refused
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._refusal_logged_at: float | None = None

    @classmethod
    async def listen(
        cls, controller: NgController, host: str, port: int, *, accepts: Callable[[str], bool] | None = None
    ) -> NgServer:
        loop = asyncio.get_running_loop()
        _, server = await loop.create_datagram_endpoint(lambda: cls(controller, accepts), local_addr=(host, port))
        return server

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        sockname = self.transport.get_extra_info("sockname")
        return (sockname[0], sockname[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if self.accepts is not None and not self.accepts(str(addr[0])):
            self._refuse(str(addr[0]))
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.controller.dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._reply(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = await self.controller.handle(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def _refuse(self, source: str) -> None:
        self.refused += 1
        now = self._clock()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= REFUSED_LOG_INTERVAL:
            self._refusal_logged_at = now
            log.warning(
                "event=ng_refused source=%s refused=%d hint=a_node_or_proxy_here_belongs_in_relay_accept_from",
                source,
                self.refused,
            )

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a proxy that went away: nothing to do, it retransmits or not
        return None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.transport is not None:
            self.transport.close()


# -- message helpers ---------------------------------------------------------------------------


def _key(raw: bytes) -> str:
    """rtpengine's key spelling rules: case, '-', '_' and ' ' do not matter."""
    return raw.decode("latin-1").lower().replace("-", " ").replace("_", " ")


def _raw(text: str) -> bytes:
    return text.encode("latin-1", "replace")


def _error(reason: str) -> dict[str, Any]:
    return {"result": "error", "error-reason": reason}


def _text(message: Message, key: str) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise NgError(f"{key} must be a string")
    return value.decode("latin-1")


def _text_or_number(message: Message, key: str) -> str | None:
    """A value rtpengine takes as a string or a number (``"record call": "yes"``, ``"DTLS": "off"``)."""
    value = message.get(key)
    if isinstance(value, int):
        return str(value)
    return _text(message, key)


def _required(message: Message, key: str) -> str:
    value = _text(message, key)
    if not value:
        raise NgError(f"No {key.replace(' ', '-')} in message")
    return value


def _names(message: Message, key: str) -> set[str]:
    """A list of names (flags, replace, rtcp-mux...), normalised like keys; one string is a list."""
    value = message.get(key)
    if value is None:
        return set()
    if isinstance(value, bytes):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise NgError(f"{key} must be a list of strings")
    return {_key(v) for v in value if isinstance(v, bytes)}


def _options(message: Message) -> _Options:
    flags = _names(message, "flags")
    if "asymmetric" in flags:
        raise NgError("asymmetric not supported: this relay always latches (symmetric RTP)")
    record = _text_or_number(message, "record call")
    if "record call" in flags or (record is not None and _key(record.encode()) in _YES):
        raise NgError(RECORDING_UNSUPPORTED)
    dtls = _text_or_number(message, "dtls")
    if dtls is not None and _key(dtls.encode()) in _WEBRTC_DTLS:
        raise NgError(WEBRTC_UNSUPPORTED)
    _names(message, "sdes")  # SDES-SRTP is refused by its SDP; "off" etc. need nothing here
    _names(message, "supports")
    received_from = message.get("received from")
    if received_from is not None and not (
        isinstance(received_from, list) and len(received_from) == 2 and all(isinstance(v, bytes) for v in received_from)
    ):
        raise NgError("received-from must be a list [family, address]")
    direction = message.get("direction")
    if direction is not None and not (isinstance(direction, list) and all(isinstance(v, bytes) for v in direction)):
        raise NgError("direction must be a list of interface names")
    for number in ("media timeout", "delete delay"):
        value = message.get(number)
        if value is not None and not isinstance(value, int) and not (isinstance(value, bytes) and value.isdigit()):
            raise NgError(f"{number} must be a number")
    _text(message, "label")
    _text(message, "via branch")
    replace = _names(message, "replace")
    ice_text = _key((_text(message, "ice") or "remove").encode("latin-1"))
    if ice_text in ("remove", "default"):
        ice = sdp.IceMode.REMOVE
    elif ice_text in ("pass", "passthrough", "pass through"):
        ice = sdp.IceMode.KEEP
    elif ice_text in _WEBRTC_ICE:
        raise NgError(WEBRTC_UNSUPPORTED)
    else:
        raise NgError(f"ICE={ice_text[:20]} not supported by this relay (it does not speak ICE)")
    mux_flags = _names(message, "rtcp mux")
    if mux_flags & {"demux", "reject"}:
        mux = sdp.RtcpMuxMode.DEMUX
    elif "offer" in mux_flags:
        mux = sdp.RtcpMuxMode.OFFER
    else:
        mux = sdp.RtcpMuxMode.KEEP
    transport = _text(message, "transport protocol")
    return _Options(
        replace_origin="origin" in replace,
        replace_session_connection="session connection" in replace,
        ice=ice,
        rtcp_mux=mux,
        transport=transport.upper() if transport else None,
    )


def _description(message: Message) -> tuple[sdp.SessionDescription, _Options]:
    """The message's SDP and options, refused when this relay cannot carry its media."""
    body = message.get("sdp")
    if not isinstance(body, bytes) or not body:
        raise NgError("No SDP body in message")
    options = _options(message)
    if options.transport is not None and ("SAVP" in options.transport or "TLS" in options.transport):
        raise NgError(WEBRTC_UNSUPPORTED)
    description = sdp.SessionDescription.parse(body)
    if sdp.secure_media(description) is not None:
        raise NgError(WEBRTC_UNSUPPORTED)
    for section in description.media:
        if section.disabled:
            continue
        proto = section.line.proto.upper()
        if options.transport is not None and proto != options.transport:
            if options.transport in _PLAIN_PROTOCOLS:
                raise NgError(f"transport-protocol conversion from {proto} to {options.transport} not supported")
            raise NgError(f"transport-protocol {options.transport[:40]} not supported")
    return description, options


def _received_from(message: Message) -> str | None:
    """The IP of ``received-from`` (``[family, address]``, checked by :func:`_options`): where
    the SDP's party sent its SIP from, one of the IPs its ports may latch onto."""
    value = message.get("received from")
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], bytes):
        return value[1].decode("latin-1")
    return None


def _relay_media(description: sdp.SessionDescription, source: str | None = None) -> list[relay.MediaEndpoint]:
    """What the relay needs of each section up to the last enabled one (a disabled one in between
    is a placeholder without destination, to keep the sections' indexes).  ``source``: the
    party's signalling IP (``received-from``)."""
    endpoints = sdp.endpoints_of(description)
    enabled = [e.index for e in endpoints if not e.disabled]
    if len(enabled) > MAX_RELAYED_SECTIONS:
        # the offer's own defect, as a host name in c= is: "Failed to parse SDP", which a proxy
        # answers 488 at once, trying no other relay and marking none failed
        raise sdp.SdpError(f"more than {MAX_RELAYED_SECTIONS} media sections")
    media: list[relay.MediaEndpoint] = []
    for endpoint in endpoints[: enabled[-1] + 1 if enabled else 0]:
        section = description.media[endpoint.index]
        clock_rate = _clock_rate(section)
        if endpoint.disabled or endpoint.address is None or endpoint.zero_address:
            # no destination before latching: disabled, or held the RFC 2543 way (c=0.0.0.0)
            media.append(relay.MediaEndpoint("0.0.0.0", 0, None, endpoint.rtcp_mux, clock_rate, source))
            continue
        rtcp_port = endpoint.rtcp_port if endpoint.rtcp_address == endpoint.address else None
        media.append(
            relay.MediaEndpoint(endpoint.address, endpoint.rtp_port, rtcp_port, endpoint.rtcp_mux, clock_rate, source)
        )
    return media


def _clock_rate(section: sdp.MediaDescription) -> int:
    """The RTP clock of the section's first format (a=rtpmap, else RFC 3551's static table)."""
    if not section.line.formats:
        return relay.DEFAULT_CLOCK_RATE
    first = section.line.formats[0]
    for value in section.attribute_values("rtpmap"):
        payload_type, _, encoding = value.partition(" ")
        if payload_type == first:
            rate = encoding.split("/")[1:2]
            # str.isdigit() takes other scripts' digits too ("¹", which int() refuses): ASCII only
            if rate and rate[0].isascii() and rate[0].isdigit() and 0 < int(rate[0]) <= 1_000_000:
                return int(rate[0])
            break
    if first.isascii() and first.isdigit():
        return _STATIC_CLOCK_RATES.get(int(first), relay.DEFAULT_CLOCK_RATE)
    return relay.DEFAULT_CLOCK_RATE


def _counters() -> dict[str, int]:
    return {"packets": 0, "bytes": 0, "errors": 0}
