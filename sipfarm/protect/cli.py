"""``sipfarm ban list|add IP [--seconds N]|del IP`` (parsed by :mod:`sipfarm.cli`).

Exit status as :mod:`sipfarm.cli` promises: 0 done, 1 the operator must act (Redis unreachable,
no such ban), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from sipfarm.store.errors import StoreError
from sipfarm.store.redis_client import create_redis

from .bans import BanStore, source_address

__all__ = ["run_ban_command"]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def run_ban_command(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    try:
        source = source_address(args.ip) if args.ban_cmd in ("add", "del") else ""
    except ValueError as exc:
        print(f"sipfarm: {exc}", file=sys.stderr)
        return 2
    seconds: float | None = getattr(args, "seconds", None)
    if seconds is not None and seconds < 0:
        print("sipfarm: --seconds must be 0 (until lifted) or more", file=sys.stderr)
        return 2
    url = str(args.redis or os.environ.get("REDIS_URL") or DEFAULT_REDIS)
    redis = create_redis(url, client_name="sipfarm-cli")
    store = BanStore(redis)
    try:
        if args.ban_cmd == "list":
            for entry in await store.list():
                left = "until lifted" if entry.seconds_left is None else f"{entry.seconds_left:.0f}s left"
                print(f"{entry.source}\t{left}\t{entry.reason}")
        elif args.ban_cmd == "add":
            await store.add(source, seconds or None)
            print(f"banned {source} " + (f"for {seconds:g}s" if seconds else "until lifted"))
        elif args.ban_cmd == "del":
            if not await store.delete(source):
                print(f"sipfarm: {source} is not banned (its failure count is reset)", file=sys.stderr)
                return 1
            print(f"lifted the ban of {source}")
        return 0
    except StoreError as exc:
        print(f"sipfarm: cannot reach the farm's bans in {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
