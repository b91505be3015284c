"""The store's one exception family.

A message handler catches :class:`StoreError` and answers ``sip_status``; nothing else from
Redis escapes the store. :class:`StoreUnavailable` is the only one the node should see in
normal operation (Redis down, slow or failing over): it answers ``503`` with
``Retry-After: retry_after`` (RFC 3261 21.5.4) so the UA, or the balancer, tries again.
"""

from __future__ import annotations

from typing import ClassVar


class StoreError(Exception):
    """Anything the store cannot do; an unexpected Redis reply (corrupt data, script bug)."""

    sip_status: ClassVar[int] = 500
    sip_reason: ClassVar[str] = "Server Internal Error"


class StoreUnavailable(StoreError):
    """Redis cannot be reached, timed out, is loading, read-only or out of memory."""

    sip_status: ClassVar[int] = 503
    sip_reason: ClassVar[str] = "Service Unavailable"
    #: seconds for the ``Retry-After`` header of the 503
    retry_after: ClassVar[int] = 5


class AccountExists(StoreError):
    """``AccountStore.add`` for an account that is already there (admin API, not SIP)."""

    sip_status: ClassVar[int] = 409
    sip_reason: ClassVar[str] = "Conflict"


class AccountNotFound(StoreError):
    """``delete``/``set_password`` of an unknown account (admin API, not SIP)."""

    sip_status: ClassVar[int] = 404
    sip_reason: ClassVar[str] = "Not Found"
