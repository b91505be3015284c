"""Bans as operators see them (``sipfarm ban``): list, add and lift, through redis-py; and as a
balancer reads them (:meth:`BanStore.current`, :meth:`BanStore.changes`).

Same keys as the guards (:mod:`sipfarm.protect.guard`). A ban added here is seen by the next
request from that source on any node; a lifted one within ``local_ban_recheck`` seconds on nodes
that had cached it, and within a ban refresh on balancers (both are written to the ban log).
Lifting a ban also forgets the source's counted failures.
"""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from sipfarm.store.redis_client import redis_errors
from sipfarm.transport.subject import IPV6_PREFIX, source_subject

from .guard import BAN_INDEX, BAN_LOG, BAN_LOG_KEEP, ban_key, ban_source, milliseconds, source_failures_key

__all__ = ["BALANCER_REASON", "BanEntry", "BanStore", "source_address"]

MANUAL: bytes = b"manual"
BALANCER_REASON: bytes = b"balancer:"  # value of a ban a balancer started: balancer:<reason>
INDEX_GRACE = 60.0  # seconds an index entry outlives its ban's end (clocks of writers differ)


def source_address(text: str) -> str:
    """What ``sipfarm ban`` bans for ``text``: an IPv4 address, or an IPv6 address's /64 (also
    written as the /64 itself), the subject the farm counts and bans sources as
    (:mod:`sipfarm.transport.subject`); ValueError otherwise."""
    text = text.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            if network.version != 6 or network.prefixlen != IPV6_PREFIX:
                raise ValueError(text)
            return str(network)
        return source_subject(str(ipaddress.ip_address(text.strip("[]"))))
    except ValueError:
        raise ValueError(f"not an IP address or an IPv6 /{IPV6_PREFIX}: {text!r}") from None


@dataclass(frozen=True, slots=True)
class BanEntry:
    source: str
    seconds_left: float | None  # None: until lifted
    reason: str  # "manual", or the failure count that started it ("10 failures")


class BanStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def list(self) -> list[BanEntry]:
        """Every current ban, by source address: the index's sources (pruned of bans ended
        more than a minute ago: the index's scores are wall clocks), then each ban key."""
        with redis_errors:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(BAN_INDEX, "-inf", f"({(time.time() - INDEX_GRACE) * 1000:.0f}")
                pipe.zrange(BAN_INDEX, 0, -1)
                _, sources = await pipe.execute()
            if not sources:
                return []
            keys = [ban_key(s.decode()).encode() for s in sources]
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                    pipe.pttl(key)
                replies = await pipe.execute()
        entries = []
        for key, value, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if value is None or pttl == -2:  # ended between SCAN and GET
                continue
            source = ban_source(key.decode())
            if value == MANUAL:
                reason = "manual"
            elif value.startswith(BALANCER_REASON):  # a balancer's front door (rate, scanner...)
                reason = value.decode("latin-1")
            else:
                reason = f"{value.decode()} failures"
            entries.append(BanEntry(source, None if pttl == -1 else pttl / 1000, reason))
        return sorted(entries, key=lambda e: _sort_key(e.source))

    async def add(self, source: str, seconds: float | None, reason: bytes = MANUAL) -> None:
        """Ban ``source`` for ``seconds`` (None: until lifted), replacing any ban it has;
        ``reason`` is what ``list`` shows (a balancer's: ``balancer:<why>``)."""
        wall = time.time() * 1000
        ends = math.inf if seconds is None else wall + seconds * 1000
        with redis_errors:
            # not a transaction: the ban and the index are in different Redis Cluster slots; the
            # ban key is written first and is the truth (an index entry without one is skipped)
            async with self.redis.pipeline(transaction=False) as pipe:
                if seconds is None:
                    pipe.set(ban_key(source), reason)
                else:
                    pipe.set(ban_key(source), reason, px=milliseconds(seconds))
                pipe.zadd(BAN_INDEX, {source: ends})
                _log_change(pipe, source, wall)
                await pipe.execute()

    async def delete(self, source: str) -> bool:
        """Lift the ban of ``source`` and forget its failures; whether it was banned."""
        with redis_errors:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(ban_key(source))
                pipe.delete(source_failures_key(source))
                pipe.zrem(BAN_INDEX, source)
                _log_change(pipe, source, time.time() * 1000)
                banned = (await pipe.execute())[0]
        return bool(banned)

    # -- what a balancer reads every refresh (sipfarm/balancer/main.py: sync_bans) ----------------

    async def current(self) -> tuple[dict[str, float], float]:
        """Every ban in force as the index has it, in one command: source -> seconds left
        (``math.inf``: until lifted); and the wall clock (unix ms) the read started at.  The
        index's scores are the bans' ends (each written with its key), so no key is read."""
        wall = time.time() * 1000
        with redis_errors:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(BAN_INDEX, "-inf", f"({wall - INDEX_GRACE * 1000:.0f}")
                pipe.zrangebyscore(BAN_INDEX, f"({wall:.0f}", "+inf", withscores=True)
                _, entries = await pipe.execute()
        return {_text(source): _left(score, wall) for source, score in entries}, wall

    async def changes(self, since: float) -> tuple[dict[str, float | None], float]:
        """The bans started, changed or lifted since ``since`` (unix ms), as they stand now:
        source -> seconds left (``math.inf``: until lifted; None: no ban any more); and the wall
        clock the read started at.  Two round trips when anything changed, one otherwise; the
        cost is the changes', whatever the number of bans."""
        wall = time.time() * 1000
        with redis_errors:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(BAN_LOG, "-inf", f"({wall - BAN_LOG_KEEP * 1000:.0f}")
                pipe.zrangebyscore(BAN_LOG, f"{since:.0f}", "+inf")
                _, changed = await pipe.execute()
            if not changed:
                return {}, wall
            async with self.redis.pipeline(transaction=False) as pipe:
                for source in changed:
                    pipe.zscore(BAN_INDEX, source)
                ends = await pipe.execute()
        return {
            _text(source): None if end is None or end <= wall else _left(end, wall)
            for source, end in zip(changed, ends, strict=True)
        }, wall


def _log_change(pipe: Pipeline, source: str, wall: float) -> None:
    """Queue the change log's entry for ``source`` and the trim of entries past BAN_LOG_KEEP."""
    pipe.zadd(BAN_LOG, {source: wall})
    pipe.zremrangebyscore(BAN_LOG, "-inf", f"({wall - BAN_LOG_KEEP * 1000:.0f}")


def _text(source: bytes | str) -> str:
    return source.decode() if isinstance(source, bytes) else source


def _left(end: float, wall: float) -> float:
    """Seconds from ``wall`` to ``end`` (unix ms; inf stays inf)."""
    return math.inf if math.isinf(end) else (end - wall) / 1000


def _sort_key(source: str) -> tuple[int, int | str]:
    try:
        network = ipaddress.ip_network(source)
    except ValueError:
        return (7, source)
    return (network.version, int(network.network_address))
