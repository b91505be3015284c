"""The cluster controller: which processes are in the farm, in Redis.

- :mod:`.membership`: :class:`Member` records and :class:`MembershipStore` (heartbeat with
  TTL, list, leave, drain flags);
- :mod:`.heartbeat`: :class:`Heartbeater`, the background task that keeps a process listed;
- :mod:`.watcher`: :class:`MemberWatcher`, the background poller whose snapshot the balancer
  and proxy read without awaiting;
- :mod:`.ring`: :class:`HashRing`, consistent hashing of keys onto members;
- :mod:`.status`: the ``sipfarm status`` table.
"""

from .heartbeat import Heartbeater
from .membership import (
    DEFAULT_TTL,
    HEARTBEAT_INTERVAL,
    Member,
    MembershipStore,
    MemberState,
    Role,
    default_member_id,
    parse_address,
)
from .ring import HashRing, ring_hash
from .status import render_json, render_table
from .watcher import ChangeKind, MembershipChange, MemberWatcher

__all__ = [
    "DEFAULT_TTL",
    "HEARTBEAT_INTERVAL",
    "ChangeKind",
    "HashRing",
    "Heartbeater",
    "Member",
    "MemberState",
    "MemberWatcher",
    "MembershipChange",
    "MembershipStore",
    "Role",
    "default_member_id",
    "parse_address",
    "render_json",
    "render_table",
    "ring_hash",
]
