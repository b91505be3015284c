"""The :class:`~sipfarm.proxy.media.MediaHook` that anchors calls' media at RTP relays over ng.

Theory of operation
-------------------
The proxy calls :meth:`RelayMedia.offer` with a request carrying an SDP offer (an initial
INVITE; in dialog, a re-INVITE or UPDATE), :meth:`RelayMedia.answer` with a 18x/2xx carrying
SDP, and :meth:`RelayMedia.release` when a call ends.  Each becomes an ng request (the flags
Kamailio's rtpengine module sends: replace origin and session-connection, ICE remove,
``via-branch``; ``trust-address`` not set and no ``received-from``: the SIP source a node sees
is the balancer, never a phone's media address, and the relay latches onto where media really
comes from), so Debian's rtpengine or sipfarm's relay (``sipfarm relay``) serve alike.  The
relay's SDP replaces the message's body (Content-Length follows) and ``done(None)`` lets the
proxy forward it.

Relay choice (this slice): among the configured ng addresses, the one a hash of the Call-ID
picks, so every node picks the same relay for a call's re-INVITE, UPDATE or BYE without asking
Redis.  A new call whose relay does not answer within the ng timeout tries the next relay in the
list; when none answers (or every one refuses), ``on_failure`` decides: ``"503"`` answers the
caller 503 (Retry-After), ``"forward"`` forwards with the SDP untouched (media end to end).
What comes next: choice by load among live relays (cluster membership), and the relay of a call
recorded in Redis by Call-ID and tags, so a call that failed over keeps its relay for in-dialog
offers and the BYE on any node (today only the node that set it up remembers, until the call's
answer has been forwarded for a while).

Left for the next step: late offer (offer in the 2xx, answer in the ACK), PRACK and UPDATE
bodies before the 2xx other than by the generic in-dialog path, forked answers with distinct
To tags as separate legs (each answer is passed as is; the relay keeps the newest).
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from media.bencode import Value
from sipfarm.proxy.media import Done
from sipfarm.proxy.ng_client import NgClient, NgError, NgReply, RelayAddress
from sipfarm.sip.errors import ServiceUnavailable
from sipfarm.sip.headers import via_branch
from sipfarm.sip.message import SipMessage

log = logging.getLogger("sipfarm.proxy.media")

__all__ = ["FAILURE_POLICIES", "RelayMedia", "relay_index"]

FAILURE_POLICIES = ("503", "forward")
SDP = b"application/sdp"
# how long a node remembers the relay of an offer it anchored after the answer went through
# (a 2xx retransmitted by the callee is anchored again on the same relay): Timer H's 64*T1
REMEMBER_SECONDS = 32.0
MAX_REMEMBERED = 100_000
# ng flags as Kamailio's rtpengine module sends them for a plain RTP/AVP call
_REPLACE: list[Value] = [b"origin", b"session-connection"]


def relay_index(call_id: bytes, count: int) -> int:
    """The relay a call starts on: the same on every node and process (no Redis, no state;
    Python's own ``hash`` is salted per process, CRC-32 is not)."""
    return zlib.crc32(call_id) % count


@dataclass(slots=True)
class _Offer:
    relay: int  # index in RelayMedia.relays
    expires: float | None = None  # set once answered: then forgotten after REMEMBER_SECONDS


class RelayMedia:
    """Media through ng relays (see the module docstring)."""

    def __init__(
        self,
        client: NgClient,
        relays: Sequence[RelayAddress],
        clock: Callable[[], float],
        *,
        on_failure: str = "503",
    ) -> None:
        if not relays:
            raise ValueError("relays: at least one ng address is required")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"media_failure: expected one of {FAILURE_POLICIES}, got {on_failure!r}")
        self.client = client
        self.relays = list(relays)
        self.clock = clock
        self.on_failure = on_failure
        # offers anchored here, by (Call-ID, From tag of the offer): the relay its answer goes
        # to. Bounded: entries go on release, REMEMBER_SECONDS after the answer, or oldest first.
        self._offers: OrderedDict[tuple[bytes, bytes], _Offer] = OrderedDict()
        self.failures = 0  # offers no relay anchored

    # -- MediaHook -------------------------------------------------------------------------------

    def offer(self, request: SipMessage, done: Done) -> None:
        from_tag = request.from_tag
        if not request.body or from_tag is None:
            done(None)
            return
        call_id = request.call_id
        first = relay_index(call_id, len(self.relays))
        message: dict[str, Value] = {
            "command": b"offer",
            "call-id": call_id,
            "from-tag": from_tag,
            "sdp": request.body,
            "replace": _REPLACE,
            "ICE": b"remove",
        }
        to_tag = request.to_tag
        if to_tag is not None:
            message["to-tag"] = to_tag
        branch = via_branch(request.top_via_value)
        if branch:
            message["via-branch"] = branch
        self._prune()
        self._send_offer(request, done, message, first, 0)

    def answer(self, response: SipMessage, done: Done) -> None:
        from_tag, to_tag = response.from_tag, response.to_tag
        if from_tag is None or to_tag is None or not response.body:
            done(None)
            return
        offer = self._offers.get((response.call_id, from_tag))
        if offer is None:
            # not an answer to an offer anchored here: an offer in a 2xx (late offer), or a
            # call forwarded without a relay
            done(None)
            return
        if response.status >= 200:
            offer.expires = self.clock() + REMEMBER_SECONDS
        message: dict[str, Value] = {
            "command": b"answer",
            "call-id": response.call_id,
            "from-tag": from_tag,
            "to-tag": to_tag,
            "sdp": response.body,
            "replace": _REPLACE,
            "ICE": b"remove",
        }
        branch = via_branch(response.top_via_value)
        if branch:
            message["via-branch"] = branch
        relay = self.relays[offer.relay]
        self.client.request(relay, message, self.clock(), partial(self._answered, response, done))

    def release(self, call_id: bytes, from_tag: bytes | None) -> None:
        """ng delete of the whole call, fire and forget (the relay's media timeout frees what a
        lost delete leaves)."""
        index: int | None = None
        if from_tag is not None:
            offer = self._offers.pop((call_id, from_tag), None)
            if offer is not None:
                index = offer.relay
        if index is None:
            index = relay_index(call_id, len(self.relays))
        message: dict[str, Value] = {"command": b"delete", "call-id": call_id}
        self.client.request(self.relays[index], message, self.clock(), _ignore)

    # -- replies ---------------------------------------------------------------------------------

    def _send_offer(self, request: SipMessage, done: Done, message: dict[str, Value], first: int, tried: int) -> None:
        index = (first + tried) % len(self.relays)
        then = partial(self._offered, request, done, message, first, tried)
        self.client.request(self.relays[index], message, self.clock(), then)

    def _offered(
        self,
        request: SipMessage,
        done: Done,
        message: dict[str, Value],
        first: int,
        tried: int,
        reply: NgReply | NgError,
    ) -> None:
        index = (first + tried) % len(self.relays)
        sdp = reply.get(b"sdp") if isinstance(reply, dict) else None
        if isinstance(sdp, bytes):
            request.set_body(sdp, SDP)
            key = (request.call_id, request.from_tag or b"")
            self._offers[key] = _Offer(index)
            self._offers.move_to_end(key)
            done(None)
            return
        relay = self.relays[index]
        error = reply if isinstance(reply, NgError) else NgError("offer reply without SDP")
        cid = request.call_id.decode("latin-1")
        log.warning("event=relay_offer_failed call_id=%s relay=%s:%d error=%s", cid, *relay, _word(error))
        # another relay for a new call only: in dialog, the relay holding the call is the one
        if tried + 1 < len(self.relays) and request.to_tag is None:
            self._send_offer(request, done, message, first, tried + 1)
            return
        self.failures += 1
        if self.on_failure == "forward":
            log.warning("event=media_unanchored call_id=%s", cid)
            done(None)
            return
        done(ServiceUnavailable("no media relay available", partial=request))

    def _answered(self, response: SipMessage, done: Done, reply: NgReply | NgError) -> None:
        sdp = reply.get(b"sdp") if isinstance(reply, dict) else None
        if isinstance(sdp, bytes):
            response.set_body(sdp, SDP)
            done(None)
            return
        error = reply if isinstance(reply, NgError) else NgError("answer reply without SDP")
        done(ServiceUnavailable(f"media relay: {error}", partial=response))

    def _prune(self) -> None:
        """Forget answered offers past REMEMBER_SECONDS (oldest first), and the oldest beyond
        MAX_REMEMBERED (calls that never ended here: their BYE went through another node)."""
        offers = self._offers
        now = self.clock()
        while offers:
            key, offer = next(iter(offers.items()))
            if len(offers) <= MAX_REMEMBERED and (offer.expires is None or offer.expires > now):
                break
            del offers[key]


def _ignore(_reply: NgReply | NgError) -> None:
    return None


def _word(error: Exception) -> str:
    return str(error).replace(" ", "_")
