"""Farm membership in Redis: who is up (nodes, relays, balancers), where, how loaded.

Theory of operation
-------------------
Every process heartbeats its :class:`Member` record every ``HEARTBEAT_INTERVAL`` (0.5 s). A
heartbeat writes the record with a short TTL (``DEFAULT_TTL``, 1.5 s: three missed beats) and
indexes its id in a sorted set scored by the record's expiry time. A member is *live* while
its record exists: Redis expires it on its own clock, so a process that dies or loses Redis
drops out of :meth:`MembershipStore.members` at most ``ttl`` after its last beat, whatever the
clocks of the hosts say. The index only saves a ``SCAN``: entries whose score is long past are
garbage collected by ``members()``, with ``PRUNE_GRACE`` of slack for clock skew between hosts
(an id of a live member pruned by a skewed clock would vanish until its next beat re-adds it).

Draining is an operator's flag kept apart from the record, so ``sipfarm drain NODE`` works
from any host without racing the member's own writes: the member's next heartbeat (one
script, one round trip) finds the flag, stores the record as ``draining`` and returns that
state to the process, which stops taking new work.

Key layout (``{cluster}`` is a Redis Cluster hash tag: every membership key lives in one slot,
so the heartbeat script and ``leave``'s transaction may touch several of them)::

    sipfarm:{cluster}:member:<id>   string: the member's JSON record, PX ttl
    sipfarm:{cluster}:members       zset: id -> expiry of its record (unix seconds, member's clock)
    sipfarm:{cluster}:drain:<id>    string "1": operator's drain flag (no TTL unless given)

The prefix (``sipfarm``) is configurable so two farms, or two tests, can share one Redis.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from redis.asyncio import Redis

from sipfarm.store.errors import StoreError
from sipfarm.store.redis_client import redis_errors

__all__ = [
    "DEFAULT_TTL",
    "HEARTBEAT_INTERVAL",
    "PRUNE_GRACE",
    "Member",
    "MemberState",
    "MembershipStore",
    "Role",
    "default_member_id",
    "parse_address",
]

log = logging.getLogger("sipfarm.cluster")


def default_member_id(prefix: str = "") -> str:
    """The member id of a process started without one: ``<prefix><host>-<pid>-<6 hex digits>``.

    Host and pid alone do not tell processes apart: containers on the host's network (Docker's
    ``network_mode: host``) share the host's name and each process is pid 1 of its own PID
    namespace, so two nodes started alike would share one membership record, each heartbeat
    overwriting the other's addresses. The random part keeps ids apart; ``--node-id`` (and
    ``--balancer-id``, ``--relay-id``) give an id that stays the same across restarts.
    """
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


#: seconds between two heartbeats of a member
HEARTBEAT_INTERVAL: Final = 0.5
#: seconds a member's record lives after its last heartbeat (three missed beats)
DEFAULT_TTL: Final = 1.5
#: seconds past its expiry an index entry is kept, to absorb clock skew between hosts
PRUNE_GRACE: Final = 30.0
#: version of the JSON record; readers ignore unknown fields and default missing ones, so
#: a rolling upgrade can add fields without bumping it
RECORD_VERSION: Final = 1

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False).encode

# KEYS: member record, index zset, drain flag. ARGV: id, ttl ms, index score, record as
# reported, record with state "draining" ('' when the reported state is already draining).
# Returns 1 when the drain flag overrode the reported state.
_HEARTBEAT_LUA: Final = """
local forced = ARGV[5] ~= '' and redis.call('EXISTS', KEYS[3]) == 1
redis.call('SET', KEYS[1], forced and ARGV[5] or ARGV[4], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if forced then return 1 end
return 0
"""


class Role(enum.StrEnum):
    NODE = "node"  # registrar/proxy
    RELAY = "relay"  # RTP relay
    BALANCER = "balancer"  # SIP load balancer


class MemberState(enum.StrEnum):
    ACTIVE = "active"  # takes new work
    DRAINING = "draining"  # finishes what it has (dialogs, transactions), takes nothing new


@dataclass(frozen=True, slots=True)
class Member:
    """One process of the farm as it last reported itself."""

    id: str
    role: Role
    #: where it takes SIP (nodes, balancers) or media (relays): ``"udp:127.0.0.1:5071"``
    addresses: tuple[str, ...]
    #: a relay's control address (the ng protocol), e.g. ``"udp:127.0.0.1:2223"``
    control_address: str | None = None
    state: MemberState = MemberState.ACTIVE
    #: the member's own figure of load: transactions in flight, or CPU %; compared only
    #: between members of one role
    load: float = 0.0
    registrations: int = 0
    transactions: int = 0
    pid: int = 0
    host: str = ""
    #: unix seconds when the process started (a change with the same id means a restart)
    started_at: float = 0.0
    version: str = ""
    #: a relay's free media ports (of its configured range); None for other roles. Optional in
    #: the record: written only when set, so records of other roles are unchanged
    free_ports: int | None = None
    #: a relay's packets forwarded per second over its last heartbeat interval; None likewise
    packet_rate: float | None = None
    #: a node's static group (the balancer pins accounts to it); None: the dynamic pool.
    #: Written only when set, like ``free_ports``
    group: str | None = None
    #: a balancer's address facing the nodes (``"udp:10.0.0.5:5060"``), where its requests to
    #: them come from when it differs from ``addresses`` (``advertise``, ``internal``); a
    #: node's ``accept_from = ["balancers"]`` takes the hosts of both. Written only when set
    internal_address: str | None = None
    #: a relay's last media port: its range runs from the port of its ``addresses`` (the
    #: first) to this one. Every relay refuses to send media into another's range (two relays
    #: pointed at each other would bounce packets for ever: media.farm), so each must know the
    #: whole range, not its first port. None for other roles and for relays of earlier
    #: versions (their first port alone is known). Written only when set, like ``free_ports``
    port_max: int | None = None

    def __post_init__(self) -> None:
        if not self.id or not self.id.isprintable() or any(c.isspace() for c in self.id):
            raise ValueError(f"invalid member id {self.id!r}: empty, or contains spaces/control characters")

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "v": RECORD_VERSION,
            "id": self.id,
            "role": self.role.value,
            "addresses": self.addresses,
            "control_address": self.control_address,
            "state": self.state.value,
            "load": self.load,
            "registrations": self.registrations,
            "transactions": self.transactions,
            "pid": self.pid,
            "host": self.host,
            "started_at": self.started_at,
            "version": self.version,
        }
        if self.free_ports is not None:
            record["free_ports"] = self.free_ports
        if self.packet_rate is not None:
            record["packet_rate"] = self.packet_rate
        if self.group is not None:
            record["group"] = self.group
        if self.internal_address is not None:
            record["internal_address"] = self.internal_address
        if self.port_max is not None:
            record["port_max"] = self.port_max
        return _dumps(record)

    @classmethod
    def from_json(cls, data: bytes | str) -> Member:
        """Parse a stored record; ``ValueError`` if it is not one."""
        try:
            d: Any = json.loads(data)
            control = d.get("control_address")
            free_ports = d.get("free_ports")
            packet_rate = d.get("packet_rate")
            group = d.get("group")
            internal = d.get("internal_address")
            port_max = d.get("port_max")
            return cls(
                id=str(d["id"]),
                role=Role(d["role"]),
                addresses=tuple(str(a) for a in d.get("addresses", ())),
                control_address=None if control is None else str(control),
                state=MemberState(d.get("state", MemberState.ACTIVE)),
                load=float(d.get("load", 0.0)),
                registrations=int(d.get("registrations", 0)),
                transactions=int(d.get("transactions", 0)),
                pid=int(d.get("pid", 0)),
                host=str(d.get("host", "")),
                started_at=float(d.get("started_at", 0.0)),
                version=str(d.get("version", "")),
                free_ports=None if free_ports is None else int(free_ports),
                packet_rate=None if packet_rate is None else float(packet_rate),
                group=None if group is None else str(group),
                internal_address=None if internal is None else str(internal),
                port_max=None if port_max is None else int(port_max),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"not a member record {data!r:.200}: {e!r}") from e


def parse_address(address: str) -> tuple[str, str, int]:
    """``"udp:127.0.0.1:5071"`` -> ``("udp", "127.0.0.1", 5071)``; IPv6 hosts in brackets
    (``"tcp:[::1]:5060"`` -> ``("tcp", "::1", 5060)``). ``ValueError`` if malformed."""
    transport, sep, rest = address.partition(":")
    host, sep2, port_s = rest.rpartition(":")
    if not sep or not sep2 or not transport or not host or not port_s.isdigit():
        raise ValueError(f"invalid address {address!r}: expected transport:host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"invalid address {address!r}: port out of range")
    return transport.lower(), host, port


class MembershipStore:
    """Membership records in Redis (see the module docstring for the key layout).

    Every method is one or two round trips and raises :class:`~sipfarm.store.StoreUnavailable`
    when Redis cannot serve, :class:`~sipfarm.store.StoreError` on anything else from Redis.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        ttl: float = DEFAULT_TTL,
        prefix: str = "sipfarm",
        prune_grace: float = PRUNE_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, not {ttl}")
        self._redis = redis
        self.ttl = ttl
        self._ttl_ms = max(1, round(ttl * 1000))
        self._prune_grace = prune_grace
        self._clock = clock
        tag = f"{prefix}:{{cluster}}:"
        self._member_prefix = tag + "member:"
        self._drain_prefix = tag + "drain:"
        self.index_key = tag + "members"
        self._heartbeat = redis.register_script(_HEARTBEAT_LUA)

    def member_key(self, member_id: str) -> str:
        return self._member_prefix + member_id

    def drain_key(self, member_id: str) -> str:
        return self._drain_prefix + member_id

    async def heartbeat(self, member: Member, *, now: float | None = None) -> MemberState:
        """Write ``member`` for ``ttl`` seconds; return its effective state (``draining`` if
        it said so or an operator's drain flag is set). One round trip."""
        now = self._clock() if now is None else now
        as_reported = member.to_json()
        as_drained = (
            "" if member.state is MemberState.DRAINING else replace(member, state=MemberState.DRAINING).to_json()
        )
        with redis_errors:
            forced = await self._heartbeat(
                keys=[self.member_key(member.id), self.index_key, self.drain_key(member.id)],
                args=[member.id, self._ttl_ms, now + self.ttl, as_reported, as_drained],
            )
        return MemberState.DRAINING if forced else member.state

    async def members(self, role: Role | None = None, *, now: float | None = None) -> list[Member]:
        """Live members (of ``role``), sorted by id. Prunes index entries that expired more than
        ``prune_grace`` before ``now``; ignores ids whose record is gone or unreadable."""
        now = self._clock() if now is None else now
        with redis_errors:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self.index_key, "-inf", f"({now - self._prune_grace!r}")
                pipe.zrange(self.index_key, 0, -1)
                _, ids = await pipe.execute()
            if not ids:
                return []
            records = await self._redis.mget([self._member_prefix + i.decode() for i in ids])
        out: list[Member] = []
        for raw_id, record in zip(ids, records, strict=True):
            if record is None:
                continue  # expired since its last beat, or left: the index lags the records
            try:
                member = Member.from_json(record)
            except ValueError as e:
                log.warning("event=member_record_corrupt id=%s error=%r", raw_id.decode(errors="replace"), e)
                continue
            if role is None or member.role is role:
                out.append(member)
        out.sort(key=lambda m: m.id)
        return out

    async def get(self, member_id: str) -> Member | None:
        """One member's record, or ``None`` if it is not live."""
        with redis_errors:
            record = await self._redis.get(self.member_key(member_id))
        if record is None:
            return None
        try:
            return Member.from_json(record)
        except ValueError as e:
            raise StoreError(str(e)) from e

    async def leave(self, member_id: str) -> None:
        """Remove a member now (clean shutdown). Its drain flag stays: an operator's decision
        outlives a restart until ``undrain``."""
        with redis_errors:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.member_key(member_id))
                pipe.zrem(self.index_key, member_id)
                await pipe.execute()

    async def drain(self, member_id: str, *, ttl: float | None = None) -> bool:
        """Set the drain flag of ``member_id`` (for ``ttl`` seconds, or until ``undrain``); its
        next heartbeat stores and reports it as draining. Returns whether it is live now
        (``False`` for an unknown id: the flag is set anyway, for a member about to start)."""
        with redis_errors:
            async with self._redis.pipeline(transaction=True) as pipe:
                if ttl is None:
                    pipe.set(self.drain_key(member_id), b"1")
                else:
                    pipe.set(self.drain_key(member_id), b"1", px=max(1, round(ttl * 1000)))
                pipe.exists(self.member_key(member_id))
                _, live = await pipe.execute()
        return bool(live)

    async def undrain(self, member_id: str) -> bool:
        """Clear the drain flag; the member's next heartbeat reports its own state again.
        Returns whether a flag was set."""
        with redis_errors:
            removed = await self._redis.delete(self.drain_key(member_id))
        return bool(removed)

    async def set_state(self, member_id: str, state: MemberState) -> bool:
        """``drain`` or ``undrain`` by target state."""
        if state is MemberState.DRAINING:
            return await self.drain(member_id)
        return await self.undrain(member_id)

    async def drain_flags(self, member_ids: Iterable[str]) -> dict[str, bool]:
        """Which of ``member_ids`` have a drain flag (for ``sipfarm status``)."""
        ids = list(member_ids)
        if not ids:
            return {}
        with redis_errors:
            flags = await self._redis.mget([self.drain_key(i) for i in ids])
        return {i: f is not None for i, f in zip(ids, flags, strict=True)}
