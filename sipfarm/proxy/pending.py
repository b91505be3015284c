"""Each authenticated account's calls in progress on this node, and what they hold.

The node's transaction layer bounds the bytes every transaction holds together
(``max_transaction_bytes``): that bound is shared by all callers, so one account calling a
number that rings for ever (its own second phone, a number that never picks up) could fill it
with 64 KB INVITEs held to Timer C, and every other caller would get 503. :class:`PendingInvites`
gives each account a share: its calls in progress (INVITEs not answered, cancelled or ended) may
hold at most ``max_bytes`` of transaction memory (the server transaction's request and each
branch's), and, when ``max_calls`` is set, be at most that many. Past either, the account's next
call gets 403 Too Many Calls and holds nothing, while its other calls and every other account
go on. The share is in bytes, not calls: a trunk or a load test sets up hundreds of ordinary
1-2 KB calls at once (a count of 100 refused an overloaded node's admitted calls), a
thief with 64 KB INVITEs a few hundred. Despite the name, every request the proxy holds is
admitted (a MESSAGE to a phone that never answers waits 32 s too), and the key of an
in-dialog request is its sender's address (``src:...``), which did not authenticate.

The calls are kept, not counted up and down: a call leaves its account's share once answered or
ended, however it ended. The charge of a call grows as its branches are created (the proxy adds
each one's bytes) and is recomputed exactly, from the transactions' own sizes, when an account
reaches a bound or its list has doubled since the last look (:meth:`admit` prunes then): O(1)
per call, amortized.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from sipfarm.proxy.forking import AccountCalls, ProxyCall
from sipfarm.sip.errors import TooManyCalls

MAX_PENDING_INVITES: Final = 1000  # an account's calls in progress on one node (0: no bound)
MAX_PENDING_INVITE_BYTES: Final = 16 * 2**20  # what they may hold: 1/16 of the default budget
PENDING_ACCOUNTS: Final = 10_000  # accounts tracked (the least recently calling forgotten)
# an account's list is pruned of ended calls at this length at the earliest: an account with no
# call in progress keeps at most 2 ended ones (their transactions' objects, messages released),
# so 10,000 accounts keep 20,000 at most
MIN_PRUNE: Final = 2


def held_bytes(call: ProxyCall) -> int:
    """The transaction bytes ``call`` holds now: its server transaction's and its branches'."""
    total = call.server_tx.size
    for branch in call.branches:
        ctx = branch.client_tx
        if ctx is not None:
            total += ctx.size
    return total


def in_progress(call: ProxyCall) -> bool:
    return not (call.answered or call.cancelled or call.server_tx.terminated)


class PendingInvites:
    """Per account (``user@domain``), its INVITEs in progress on this node; see the module."""

    def __init__(
        self,
        max_calls: int = MAX_PENDING_INVITES,
        max_bytes: int = MAX_PENDING_INVITE_BYTES,
        accounts: int = PENDING_ACCOUNTS,
    ) -> None:
        self.max_calls = max_calls  # 0: no bound on the count
        self.max_bytes = max_bytes  # 0: no bound on the bytes
        self.accounts = accounts
        self._by_account: OrderedDict[str, AccountCalls] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_account)

    @property
    def enabled(self) -> bool:
        return self.max_calls > 0 or self.max_bytes > 0

    def admit(self, key: str, call: ProxyCall) -> None:
        """Count ``call`` among ``key``'s calls in progress; :class:`TooManyCalls` (403) when
        the account already has ``max_calls`` of them, or they and this one would hold more
        than ``max_bytes``."""
        by_account = self._by_account
        entry = by_account.get(key)
        if entry is None:
            entry = AccountCalls()
            by_account[key] = entry
            if len(by_account) > self.accounts:
                by_account.popitem(last=False)
        else:
            by_account.move_to_end(key)
        cost = call.server_tx.size
        if len(entry.calls) >= entry.prune_at or self._over(entry, cost):
            # the list keeps ended calls until the next prune, and the charges are upper bounds
            # (a call's bytes are released once it is answered): the calls still in progress and
            # what they hold now, exactly. Pruning again only once the list has doubled keeps
            # the cost O(1) per call and the ended calls kept per account below its live ones + 2
            entry.calls = [c for c in entry.calls if in_progress(c)]
            entry.held = sum(held_bytes(c) for c in entry.calls)
            entry.prune_at = max(MIN_PRUNE, 2 * len(entry.calls))
            if self._over(entry, cost):
                raise TooManyCalls(
                    f"{len(entry.calls)} calls of this account in progress, holding {entry.held} bytes",
                    partial=call.request,
                )
        entry.calls.append(call)
        entry.held += cost
        call.held_by = entry

    def _over(self, entry: AccountCalls, cost: int) -> bool:
        max_calls = self.max_calls
        max_bytes = self.max_bytes
        if max_calls > 0 and len(entry.calls) >= max_calls:
            return True
        # room for the request and a branch's copy of it, as the transaction layer's own check
        return max_bytes > 0 and entry.held + 2 * cost > max_bytes
