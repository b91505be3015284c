"""``sipfarm status`` and ``sipfarm drain NODE [--undo]`` (parsed by :mod:`sipfarm.cli`): the
farm as Redis's membership records show it.

Both work from any host that reaches the farm's Redis. Exit status: 0 done, 1 the operator
must act (Redis unreachable, unknown member), as :mod:`sipfarm.cli` promises.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from sipfarm.protect.bans import BanStore
from sipfarm.store.errors import StoreError
from sipfarm.store.redis_client import create_redis

from .membership import HEARTBEAT_INTERVAL, MembershipStore, MemberState
from .status import render_json, render_table

__all__ = ["run_cluster_command"]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
#: how long ``drain`` waits for the member's heartbeat to confirm the new state
CONFIRM_TIMEOUT = 4 * HEARTBEAT_INTERVAL
_CONFIRMED = {
    MemberState.DRAINING: "draining (no new work; its transactions finish)",
    MemberState.ACTIVE: "active again",
}


def run_cluster_command(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def _redis_url(args: argparse.Namespace) -> str:
    return str(getattr(args, "redis", None) or os.environ.get("REDIS_URL") or DEFAULT_REDIS)


async def _run(args: argparse.Namespace) -> int:
    url = _redis_url(args)
    redis = create_redis(url, client_name="sipfarm-cli")
    store = MembershipStore(redis)
    try:
        if args.command == "status":
            return await _status(store, BanStore(redis), as_json=bool(getattr(args, "json", False)))
        if args.command == "drain":
            return await _drain(store, str(args.node_id), undo=bool(getattr(args, "undo", False)))
        print(f"sipfarm: unknown cluster command {args.command!r}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"sipfarm: cannot read the farm's state from {url}: {e}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


async def _status(store: MembershipStore, bans: BanStore, *, as_json: bool) -> int:
    members = await store.members()
    flags = await store.drain_flags(m.id for m in members)
    render = render_json if as_json else render_table
    sys.stdout.write(render(members, now=time.time(), drain_flags=flags, bans=await bans.list()))
    if as_json:
        sys.stdout.write("\n")
    return 0


async def _drain(store: MembershipStore, member_id: str, *, undo: bool) -> int:
    if await store.get(member_id) is None:
        if undo and await store.undrain(member_id):
            print(f"{member_id}: not live now; its drain flag is cleared")
            return 0
        # Refuse rather than leave a flag behind for a mistyped id.
        print(f"sipfarm: no live member {member_id!r} (see `sipfarm status`)", file=sys.stderr)
        return 1
    if undo:
        await store.undrain(member_id)
    else:
        await store.drain(member_id)
    want = MemberState.ACTIVE if undo else MemberState.DRAINING
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONFIRM_TIMEOUT
    while loop.time() < deadline:
        member = await store.get(member_id)
        if member is None:
            print(f"{member_id}: left the farm")
            return 0
        if member.state is want:
            print(f"{member_id}: {_CONFIRMED[want]}")
            return 0
        await asyncio.sleep(HEARTBEAT_INTERVAL / 5)
    print(
        f"{member_id}: {want.value} requested; not confirmed by its heartbeat within "
        f"{CONFIRM_TIMEOUT:.1f}s (it applies at its next heartbeat)"
    )
    return 0
