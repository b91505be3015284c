"""The :class:`~sipfarm.proxy.media.MediaHook` that anchors calls' media at RTP relays over ng.

Theory of operation
-------------------
The proxy hands the hook every request that may carry SDP (:meth:`RelayMedia.offer`: INVITE,
re-INVITE, UPDATE, PRACK, ACK), every 18x/2xx with SDP (:meth:`RelayMedia.answer`), and the
end of a call (:meth:`RelayMedia.release`).  The hook tells offers from answers (RFC 3264 with
RFC 3261 13.2.1 and RFC 3262): a response's SDP answers the offer its request carried, or is an
offer itself when the request had none (late offer), answered in the ACK or PRACK; an ACK's SDP
is always such an answer.  Each becomes an ng request with the flags Kamailio's rtpengine module
sends (replace origin and session-connection, ICE remove, ``via-branch``, no ``trust-address``),
so Debian's rtpengine and ``sipfarm relay`` serve alike.  ``received-from`` is the party's own
address as the proxy knows it (``sender``; behind a balancer, never the balancer's): the client
the balancer's signed branch names, or the flow a callee registered over.  rtpengine then sends
to that IP before the phone's first packet (a NATed phone's SDP names a private address);
``sipfarm relay`` latches a port only onto a source whose IP the SDP or ``received-from`` named
(RTP bleed: a stranger spraying the port range took calls' media, red team 2026-12-02).  Where
the proxy does not know it (an in-dialog response), none is sent and the relay keeps what the
call's earlier messages named.  The ``from-tag`` of an ng offer is always the offerer's tag and
the ``to-tag`` the answerer's, whichever way the offer goes.  The relay's SDP replaces the
message's body and ``done(None)`` lets the proxy forward it.  No ng exchange ever blocks the
forwarding path: replies and timeouts come back as callbacks (:mod:`~sipfarm.proxy.ng_client`).

Relay choice and the call's record
----------------------------------
A new call's relay comes from the :class:`~sipfarm.proxy.relay_choice.RelayTable` (by load among
the live relays of the membership, or a Call-ID hash over a static list), trying the next one on
timeout or refusal.  Once anchored, the relay is recorded in Redis under the Call-ID with the
offerer's tag (:class:`CallRelays`, ``RECORD_SECONDS``), so any node handles the call's
re-INVITE, UPDATE, BYE or failure on the same relay; the node that set the call up also keeps it
in memory for ``REMEMBER_SECONDS`` after the answer (a retransmitted 2xx, the ACK, a quick
re-INVITE need no Redis read).  A call that hangs up without BYE leaves its session to the
relay's media timeout and its record to the TTL.

When no relay anchors a new call, ``on_failure`` decides: ``"503"`` answers the caller 503
(Retry-After), ``"forward"`` forwards with the SDP untouched (media end to end).

WebRTC
------
A party that reached the farm over WebSocket (its Via says WS/WSS) or whose SDP is
``UDP/TLS/RTP/SAVPF`` is a WebRTC endpoint: what goes to it is asked with ICE forced, DTLS-SRTP
and rtcp-mux, what comes from it towards a desk phone with plain RTP/AVP (rtpengine's usual
WebRTC gateway flags).  sipfarm's own relay does not bridge DTLS-SRTP and refuses such offers
("not supported"): the call then goes with its SDP untouched (browsers talk ICE to each other),
whatever ``on_failure`` says, and is counted ``unanchored_webrtc``.

Forking: the offer is anchored once, before the branches (with WebRTC flags when every
device of the callee is a browser); each branch's 18x/2xx answer goes to the relay with its own
To tag, which keeps a leg per To tag (rtpengine and ``sipfarm relay`` alike): the newest answer
directs the media, so early media follows the device that last answered and the 2xx's device
has the call.  A fork to browsers and desk phones at once gets one offer for all (the desk
phones' kind): per-branch offers are not made.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from media.bencode import Value
from sipfarm.proxy.media import Done
from sipfarm.proxy.ng_client import NgClient, NgError, NgRefused, NgReply, NgTimeout, RelayAddress
from sipfarm.proxy.relay_choice import RelayTable, relay_index
from sipfarm.sip.errors import NotAcceptableHere, ServiceUnavailable
from sipfarm.sip.headers import via_branch
from sipfarm.sip.memo import bounded_key
from sipfarm.sip.message import SipMessage
from sipfarm.sip.multipart import SdpPart, sdp_part

log = logging.getLogger("sipfarm.proxy.media")

__all__ = ["FAILURE_POLICIES", "CallRelays", "RelayMedia", "relay_index"]

FAILURE_POLICIES = ("503", "forward")
SDP = b"application/sdp"
# how long a node remembers a call it anchored after an answer went through (a 2xx
# retransmitted by the callee is answered again on the same relay): Timer H's 64*T1
REMEMBER_SECONDS = 32.0
MAX_REMEMBERED = 100_000
MAX_WEBRTC_TAGS = 64  # browser parties noted per call (two, or a few forks, in real calls)
#: how long the Redis record of a call's relay lives (refreshed by each in-dialog offer)
RECORD_SECONDS = 4 * 3600
# ng flags as Kamailio's rtpengine module sends them for a plain RTP/AVP call
_REPLACE: list[Value] = [b"origin", b"session-connection"]
_SAVPF = b"UDP/TLS/RTP/SAVPF"
# what a relay that cannot bridge WebRTC says (sipfarm relay): the call goes unanchored
_UNSUPPORTED = "not supported"
_BAD_SDP = "Failed to parse SDP"  # the relay's (and rtpengine's) error-reason for an unreadable offer


class CallRelays(Protocol):
    """Where the relay of a call is recorded (Redis: :class:`sipfarm.node.farmstate.FarmState`)."""

    def record_relay(self, call_id: bytes, tag: bytes, relay: str, ttl: int) -> None: ...

    def find_relay(self, call_id: bytes, callback: Callable[[str | None], None]) -> None: ...

    def forget_relay(self, call_id: bytes) -> None: ...


@dataclass(slots=True)
class _Call:
    relay: RelayAddress | None  # None: the call's media goes end to end (not anchored)
    offerer: bytes | None = None  # tag of the party whose offer awaits an answer
    webrtc: set[bytes] = field(default_factory=set)  # tags of WebRTC parties
    unsupported: bool = False  # a relay refused its media kind: its offers go end to end
    expires: float | None = None  # set once answered: then forgotten after REMEMBER_SECONDS


def _address(relay: RelayAddress) -> str:
    return f"{relay[0]}:{relay[1]}"


def _parse_address(text: str) -> RelayAddress | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host, int(port)


def _has_sdp(msg: SipMessage) -> bool:
    """``msg`` has a body that is (or may hold) SDP: ``application/sdp``, no Content-Type at all
    (RFC 3261 20.15 wants one; a sloppy phone's SDP is served), or ``multipart/*`` with an SDP
    part (RFC 5621: the relay gets that part, :func:`_sdp_of`), or one naming
    ``application/sdp`` where no part of it could be read (which the relay refuses: 488, rather
    than SDP going on unanchored).  Any other type is not an offer or an answer: the body goes
    on untouched (red team, 2026-12-03: text/plain was anchored as SDP and went on as
    application/sdp; a SIP-T gateway's multipart offer got 488)."""
    if not msg.body:
        return False
    kind = msg.get("content-type")
    if kind is None:
        return True
    kind = kind.partition(b";")[0].strip().lower()
    if kind.startswith(b"multipart/"):
        return _multipart_sdp(msg) is not None or msg.body.lower().find(b"application/sdp") >= 0
    return kind == b"application/sdp"


def _multipart_sdp(msg: SipMessage) -> SdpPart | None:
    """The SDP part of ``msg``'s multipart body, if it is one and has one."""
    kind = msg.get("content-type")
    if kind is None or kind.lstrip()[:10].lower() != b"multipart/":
        return None
    return sdp_part(kind, msg.body)


def _sdp_of(msg: SipMessage) -> bytes:
    """What the relay reads of ``msg``'s body: its SDP part, or the whole body."""
    part = _multipart_sdp(msg)
    return part.sdp if part is not None else msg.body


def _put_sdp(msg: SipMessage, sdp: bytes) -> None:
    """The relay's rewritten ``sdp`` in ``msg``: in place of its SDP part (every other part as
    it was), or as its whole body."""
    part = _multipart_sdp(msg)
    if part is not None:
        msg.set_body(part.with_sdp(sdp), msg.get("content-type"))
    else:
        msg.set_body(sdp, SDP)


def _from_webrtc(msg: SipMessage) -> bool:
    """The party that sent ``msg`` (a request; for a response, its request's sender) is a
    browser: its own Via (the bottom one) says WS/WSS, or its SDP is DTLS-SRTP."""
    vias = msg.values("via")
    if vias and vias[-1][:10].upper() == b"SIP/2.0/WS":
        return True
    return _SAVPF in msg.body


class RelayMedia:
    """Media through ng relays (see the module docstring)."""

    def __init__(
        self,
        client: NgClient,
        relays: Sequence[RelayAddress] | RelayTable,
        clock: Callable[[], float],
        *,
        on_failure: str = "503",
        calls: CallRelays | None = None,
        count: Callable[[str], None] | None = None,
    ) -> None:
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"media_failure: expected one of {FAILURE_POLICIES}, got {on_failure!r}")
        if isinstance(relays, RelayTable):
            self.table = relays
        else:
            if not relays:
                raise ValueError("relays: at least one ng address is required")
            self.table = RelayTable(relays)
        self.client = client
        self.clock = clock
        self.on_failure = on_failure
        self.records = calls
        self._count = count
        # calls anchored or seen here, by Call-ID (and tags) as bounded_key holds them: a long
        # one off the wire costs 17 bytes. Bounded: entries go on release,
        # REMEMBER_SECONDS after an answer, or oldest first beyond MAX_REMEMBERED.
        self._calls: OrderedDict[bytes, _Call] = OrderedDict()
        self.failures = 0  # new calls no relay anchored

    @property
    def relays(self) -> list[RelayAddress]:
        return self.table.addresses

    # -- MediaHook -------------------------------------------------------------------------------

    def offer(
        self,
        request: SipMessage,
        done: Done,
        *,
        to_webrtc: bool = False,
        sender: str | None = None,
        owner: str | None = None,
    ) -> None:
        """A request that may carry SDP: an offer (INVITE, UPDATE, a PRACK not answering), an
        answer (ACK; a PRACK answering an offer in a reliable 18x), or none (a late offer).
        ``to_webrtc``: the proxy knows the receiver is a browser (its Contact says WebSocket)."""
        from_tag = request.from_tag
        call_id = request.call_id
        if from_tag is None:
            done(None)
            return
        call = self._calls.get(bounded_key(call_id))
        if not _has_sdp(request):
            if call is not None and request.method == b"INVITE":
                call.offerer = None  # RFC 3261 14.2: the offer will come in the response
            done(None)
            return
        method = request.method
        to_tag = request.to_tag
        # an ACK answers only an offer its 2xx made (late offer); the call forgotten here (another
        # node's, or long answered), the relay's record decides as before
        answering = to_tag is not None and (
            (method == b"ACK" and (call is None or call.offerer == bounded_key(to_tag)))
            or (method == b"PRACK" and call is not None and call.offerer == bounded_key(to_tag))
        )
        if answering:
            assert to_tag is not None
            # the offer came from the other party (in a 2xx or reliable 18x): from-tag is theirs
            message = self._message(b"answer", request, to_tag, from_tag, sender)
            self._flags(message, call, sender=from_tag, receiver=to_tag, msg=request, answer=True)
            self._with_relay(call_id, call, partial(self._send_answer, request, done, message, call_id))
            return
        if method == b"ACK":
            # SDP in an ACK with no offer outstanding (RFC 3264 4: ignored): not a new answer
            # for the relay (it moved the sender's media, red team 2026-12-03), and not passed
            # on either (the sender's own addresses, which an anchored call never shows)
            if call is not None and call.relay is not None:
                request.set_body(b"", SDP)
            done(None)
            return
        if call is not None and call.unsupported:
            done(None)  # a call no relay can carry
            return
        self._prune()
        message = self._message(b"offer", request, from_tag, to_tag, sender)
        receiver = to_tag or b""
        self._flags(message, call, sender=from_tag, receiver=receiver, msg=request, answer=False, to_webrtc=to_webrtc)
        if owner:
            # whose call it is, for the relay's bound on the ports one owner's calls hold: a
            # new call's, or one an in-dialog offer makes again (the relay forgot it: a BYE)
            message["owner"] = owner.encode("utf-8", "replace")[:200]
        if to_tag is None:
            # a new call: the relay the table picks (no record to read)
            self._new_offer(request, done, message, from_tag)
            return
        self._with_relay(call_id, call, partial(self._offer_on, request, done, message, from_tag))

    def answer(self, response: SipMessage, done: Done, *, sender: str | None = None) -> None:
        """An 18x/2xx with SDP: the answer to its request's offer, or a (late) offer."""
        from_tag, to_tag = response.from_tag, response.to_tag
        if from_tag is None or to_tag is None or not _has_sdp(response):
            done(None)
            return
        call_id = response.call_id
        call = self._calls.get(bounded_key(call_id))
        if call is not None and call.offerer == bounded_key(from_tag):
            if response.status >= 200:
                call.expires = self.clock() + REMEMBER_SECONDS
            if call.relay is None:
                done(None)  # its offer went end to end: so does the answer
                return
            message = self._message(b"answer", response, from_tag, to_tag, sender)
            self._flags(message, call, sender=to_tag, receiver=from_tag, msg=response, answer=True)
            self._send(call.relay, message, partial(self._answered, response, done, call.relay))
            return
        # the request carried no SDP (RFC 3261 13.2.1 late offer; RFC 3262 offer in a reliable
        # 18x): the responder offers, the requester answers in the ACK or PRACK
        message = self._message(b"offer", response, to_tag, from_tag, sender)
        self._flags(message, call, sender=to_tag, receiver=from_tag, msg=response, answer=False)
        self._with_relay(call_id, call, partial(self._offer_on, response, done, message, to_tag))

    def release(self, call_id: bytes, from_tag: bytes | None) -> None:
        """ng delete of the whole call on its relay, fire and forget (the relay's media
        timeout frees what a lost delete leaves), and its record goes."""
        call = self._calls.pop(bounded_key(call_id), None)
        if call is not None:
            if call.relay is not None:
                self._delete(call_id, call.relay)
        elif self.records is not None:
            self.records.find_relay(call_id, partial(self._release_recorded, call_id))
            return
        else:
            relay = self._hashed(call_id)
            if relay is not None:
                self._delete(call_id, relay)
        if self.records is not None:
            self.records.forget_relay(call_id)

    # -- the relay of a call ---------------------------------------------------------------------

    def _with_relay(self, call_id: bytes, call: _Call | None, then: Callable[[RelayAddress | None], None]) -> None:
        """``then`` gets the relay holding the call: remembered here, recorded in Redis, or
        None (a call this farm did not anchor, or whose record is gone)."""
        if call is not None:
            then(call.relay)
        elif self.records is not None:
            self.records.find_relay(call_id, partial(self._found, then))
        else:
            then(self._hashed(call_id))

    def _hashed(self, call_id: bytes) -> RelayAddress | None:
        """With a static list and no record: the relay the Call-ID's hash picks (where a new
        call starts when all are healthy); by load, nothing to go on."""
        relays = self.table.addresses
        if self.table.by_load or not relays:
            return None
        return relays[relay_index(call_id, len(relays))]

    def _found(self, then: Callable[[RelayAddress | None], None], recorded: str | None) -> None:
        relay = _parse_address(recorded) if recorded else None
        then(relay)

    def _remember(self, call_id: bytes, relay: RelayAddress | None) -> _Call:
        call = self._calls.get(bounded_key(call_id))
        if call is None or call.relay != relay:
            previous = call
            call = _Call(relay)
            if previous is not None:
                call.webrtc = previous.webrtc
            self._calls[bounded_key(call_id)] = call
        self._calls.move_to_end(bounded_key(call_id))
        return call

    def _unanchored(self, call_id: bytes, offerer: bytes) -> _Call:
        """An offer that went end to end: its answer will too. A call anchored before keeps
        its relay (a failed in-dialog offer leaves the session as it was)."""
        call = self._calls.get(bounded_key(call_id))
        if call is None:
            call = self._calls[bounded_key(call_id)] = _Call(None)
        call.offerer = bounded_key(offerer)
        return call

    def _release_recorded(self, call_id: bytes, recorded: str | None) -> None:
        relay = _parse_address(recorded) if recorded else None
        if relay is not None:
            self._delete(call_id, relay)
        if self.records is not None:
            self.records.forget_relay(call_id)

    def _delete(self, call_id: bytes, relay: RelayAddress) -> None:
        self._send(relay, {"command": b"delete", "call-id": call_id}, _ignore)

    # -- offers ----------------------------------------------------------------------------------

    def _new_offer(self, msg: SipMessage, done: Done, message: dict[str, Value], offerer: bytes) -> None:
        candidates = self.table.choose(msg.call_id, self.clock())
        self._try_offer(msg, done, message, offerer, candidates, 0)

    def _offer_on(
        self, msg: SipMessage, done: Done, message: dict[str, Value], offerer: bytes, relay: RelayAddress | None
    ) -> None:
        """An offer of a call that may be anchored already (in dialog, or in a response): on
        the relay holding it, else (not anchored by this farm, or its record lost) anchored now
        on the relay the table picks, which answers an unknown call's offer as a new session."""
        if relay is None:
            self._new_offer(msg, done, message, offerer)
            return
        self._try_offer(msg, done, message, offerer, [relay], 0)

    def _try_offer(
        self,
        msg: SipMessage,
        done: Done,
        message: dict[str, Value],
        offerer: bytes,
        candidates: list[RelayAddress],
        tried: int,
    ) -> None:
        if tried >= len(candidates):
            self._not_anchored(msg, done, offerer, "no media relay available")
            return
        then = partial(self._offered, msg, done, message, offerer, candidates, tried)
        self._send(candidates[tried], message, then)

    def _offered(
        self,
        msg: SipMessage,
        done: Done,
        message: dict[str, Value],
        offerer: bytes,
        candidates: list[RelayAddress],
        tried: int,
        reply: NgReply | NgError,
    ) -> None:
        relay = candidates[tried]
        sdp = reply.get(b"sdp") if isinstance(reply, dict) else None
        call_id = msg.call_id
        if isinstance(sdp, bytes):
            new = bounded_key(call_id) not in self._calls
            webrtc = _from_webrtc(msg) if msg.is_request else _SAVPF in msg.body
            _put_sdp(msg, sdp)
            call = self._remember(call_id, relay)
            call.offerer = bounded_key(offerer)
            call.expires = None
            if webrtc:
                _mark_webrtc(call, offerer)
            if new:
                self.table.assigned(relay)
            if self.records is not None:
                self.records.record_relay(call_id, offerer, _address(relay), RECORD_SECONDS)
            self._counted("anchored")
            done(None)
            return
        error = reply if isinstance(reply, NgError) else NgRefused("offer reply without SDP")
        cid = call_id.decode("latin-1")
        log.warning("event=relay_offer_failed call_id=%s relay=%s:%d error=%s", cid, *relay, _word(error))
        if isinstance(error, NgRefused) and error.reason.startswith(_BAD_SDP):
            # the offer itself: every relay would refuse it (rtpengine words it the same way),
            # and no relay is marked failed for a caller's bad SDP
            self._counted("sdp_refused")
            log.info("event=media_sdp_refused call_id=%s reason=%s", cid, error.reason[:200])
            done(
                NotAcceptableHere("SDP not acceptable: " + error.reason[len(_BAD_SDP) :].strip(" :")[:100], partial=msg)
            )
            return
        if isinstance(error, NgRefused) and _UNSUPPORTED in error.reason:
            # a relay that cannot bridge this media (WebRTC on sipfarm's relay): end to end
            self._counted("unanchored_webrtc")
            log.info("event=media_unanchored reason=unsupported call_id=%s", cid)
            self._unanchored(call_id, offerer).unsupported = True
            done(None)
            return
        self._counted("relay_timeout" if isinstance(error, NgTimeout) else "relay_refused")
        self.table.failed(relay, self.clock())
        self._try_offer(msg, done, message, offerer, candidates, tried + 1)

    def _not_anchored(self, msg: SipMessage, done: Done, offerer: bytes, why: str) -> None:
        self.failures += 1
        cid = msg.call_id.decode("latin-1")
        if self.on_failure == "forward" or msg.to_tag is not None:
            self._unanchored(msg.call_id, offerer)
            # in dialog the call is up already: a failed re-INVITE would not bring media back
            self._counted("failed_forward")
            log.warning("event=media_unanchored call_id=%s reason=%s", cid, _word(Exception(why)))
            done(None)
            return
        self._counted("failed_503")
        done(ServiceUnavailable(why, partial=msg))

    # -- answers ---------------------------------------------------------------------------------

    def _send_answer(
        self, msg: SipMessage, done: Done, message: dict[str, Value], call_id: bytes, relay: RelayAddress | None
    ) -> None:
        if relay is None:
            done(None)  # an answer to an offer this farm did not anchor
            return
        call = self._calls.get(bounded_key(call_id))
        if call is not None and msg.method == b"ACK":
            call.expires = self.clock() + REMEMBER_SECONDS
        self._send(relay, message, partial(self._answered, msg, done, relay))

    def _answered(self, msg: SipMessage, done: Done, relay: RelayAddress, reply: NgReply | NgError) -> None:
        sdp = reply.get(b"sdp") if isinstance(reply, dict) else None
        if isinstance(sdp, bytes):
            _put_sdp(msg, sdp)
            done(None)
            return
        error = reply if isinstance(reply, NgError) else NgRefused("answer reply without SDP")
        self._counted("answer_failed")
        log.warning(
            "event=relay_answer_failed call_id=%s relay=%s:%d error=%s",
            msg.call_id.decode("latin-1"),
            *relay,
            _word(error),
        )
        done(ServiceUnavailable(f"media relay: {error}", partial=msg))

    # -- helpers ---------------------------------------------------------------------------------

    def _message(
        self, command: bytes, msg: SipMessage, from_tag: bytes, to_tag: bytes | None, sender: str | None = None
    ) -> dict[str, Value]:
        message: dict[str, Value] = {"command": command, "call-id": msg.call_id, "from-tag": from_tag}
        if to_tag:
            message["to-tag"] = to_tag
        message["sdp"] = _sdp_of(msg)
        if sender:  # rtpengine's [family, address] (Kamailio's rtpengine module sends it too)
            message["received-from"] = [b"IP6" if ":" in sender else b"IP4", sender.strip("[]").encode("latin-1")]
        branch = via_branch(msg.top_via_value)
        if branch:
            message["via-branch"] = branch
        return message

    def _flags(
        self,
        message: dict[str, Value],
        call: _Call | None,
        *,
        sender: bytes,
        receiver: bytes,
        msg: SipMessage,
        answer: bool,
        to_webrtc: bool = False,
    ) -> None:
        """rtpengine's flags for the media going from ``sender``'s SDP to ``receiver``."""
        message["replace"] = _REPLACE
        to_webrtc = to_webrtc or (call is not None and bounded_key(receiver) in call.webrtc)
        if msg.is_request:
            from_webrtc = _from_webrtc(msg)
            if from_webrtc and call is not None:
                _mark_webrtc(call, sender)
        else:
            # a response: its bottom Via is the requester's, the receiver of this SDP
            from_webrtc = _SAVPF in msg.body
            to_webrtc = to_webrtc or _from_webrtc_via(msg)
            if call is not None:
                if from_webrtc:
                    _mark_webrtc(call, sender)  # later offers towards it ask for WebRTC media
                if to_webrtc:
                    _mark_webrtc(call, receiver)
        if to_webrtc:
            message["ICE"] = b"force"
            message["DTLS"] = b"passive"
            message["transport-protocol"] = _SAVPF
            message["rtcp-mux"] = [b"require" if answer else b"offer"]
            message["SDES"] = [b"off"]
            message["flags"] = [b"generate-mid"]
            return
        message["ICE"] = b"remove"
        if from_webrtc:
            message["transport-protocol"] = b"RTP/AVP"
            message["DTLS"] = b"off"
            message["rtcp-mux"] = [b"demux"]
            message["SDES"] = [b"off"]

    def _send(self, relay: RelayAddress, message: dict[str, Value], then: Callable[[NgReply | NgError], None]) -> None:
        self.client.request(relay, message, self.clock(), then)

    def _counted(self, outcome: str) -> None:
        if self._count is not None:
            self._count(outcome)

    def _prune(self) -> None:
        """Forget answered calls past REMEMBER_SECONDS (oldest first), and the oldest beyond
        MAX_REMEMBERED (calls that never ended here: their BYE went through another node)."""
        calls = self._calls
        now = self.clock()
        while calls:
            key, call = next(iter(calls.items()))
            if len(calls) <= MAX_REMEMBERED and (call.expires is None or call.expires > now):
                break
            del calls[key]


def _mark_webrtc(call: _Call, tag: bytes) -> None:
    """Note that the party of ``tag`` is a browser. Tags come off the wire (any number per
    Call-ID): at most MAX_WEBRTC_TAGS are noted, each in bounded bytes."""
    if len(call.webrtc) < MAX_WEBRTC_TAGS:
        call.webrtc.add(bounded_key(tag))


def _from_webrtc_via(response: SipMessage) -> bool:
    vias = response.values("via")
    return bool(vias) and vias[-1][:10].upper() == b"SIP/2.0/WS"


def _ignore(_reply: NgReply | NgError) -> None:
    return None


def _word(error: Exception) -> str:
    return str(error).replace(" ", "_")
