"""The proxy's hook for RTP relays: SDP offers and answers pass through it.

A relay-backed implementation (:mod:`sipfarm.proxy.relay_media`) rewrites the SDP so media
flows through a relay it picks by load, records which relay holds the call in Redis, and
releases the ports when the call ends.  The proxy calls the hook at three points and waits for
``done`` before it forwards:

* :meth:`MediaHook.offer` with a request that may carry SDP: an initial INVITE with SDP, before
  the branches are forked; in dialog a re-INVITE (with SDP or without: then the 2xx offers),
  UPDATE or PRACK; an ACK with SDP (the answer to an offer in a 2xx).  The hook tells an offer
  from an answer;
* :meth:`MediaHook.answer` on a 18x/2xx with SDP (to an INVITE, UPDATE or PRACK), before it goes
  upstream: an answer, or an offer when the request had no SDP;
* :meth:`MediaHook.release` when the call ends (BYE, CANCEL, a final failure).

``done(None)`` means "go on" (with the message possibly rewritten in place); ``done(error)``
fails the request with that SIP error.  :class:`NoMedia` is the default: media flows end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sipfarm.sip.errors import SipError
from sipfarm.sip.message import SipMessage

Done = Callable[[SipError | None], None]


class MediaHook(Protocol):
    """``sender``: the IP the SDP's party sent its SIP from, where the proxy knows it (behind a
    balancer, the client its signed branch names; for a callee, the flow its binding was
    registered over): a relay takes media for that party only from it or its SDP's address.
    ``owner``: whose new call it is (the authenticated account, else the caller's address):
    a relay bounds the ports one owner's calls hold."""

    def offer(
        self,
        request: SipMessage,
        done: Done,
        *,
        to_webrtc: bool = False,
        sender: str | None = None,
        owner: str | None = None,
    ) -> None: ...

    def answer(self, response: SipMessage, done: Done, *, sender: str | None = None) -> None: ...

    def release(self, call_id: bytes, from_tag: bytes | None) -> None: ...


class NoMedia:
    """Media goes straight between the phones."""

    def offer(
        self,
        request: SipMessage,
        done: Done,
        *,
        to_webrtc: bool = False,
        sender: str | None = None,
        owner: str | None = None,
    ) -> None:
        done(None)

    def answer(self, response: SipMessage, done: Done, *, sender: str | None = None) -> None:
        done(None)

    def release(self, call_id: bytes, from_tag: bytes | None) -> None:
        return None
