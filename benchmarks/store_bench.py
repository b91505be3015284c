"""Throughput of the Redis stores on one loopback redis-server (not a test; prints numbers).

    .venv/bin/python benchmarks/store_bench.py [--n 20000] [--url redis://127.0.0.1:6379/0]

Without --url it starts its own redis-server. Measures apply_register/s and lookup/s on one
connection (sequential: one round trip at a time), on a pool with concurrent callers, and
lookup_many pipelined; plus client CPU per operation, the node's budget being ~100 us/message.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipfarm.store import ContactUpdate, LocationStore, create_redis, start_redis
from sipfarm.store.location import Binding

NOW = 1_700_000_000.0


async def timed(label: str, n: int, run: Callable[[], Awaitable[None]]) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label:<48} {n / wall:>10,.0f} ops/s   {cpu / n * 1e6:>6.1f} us client CPU/op")


async def bench(url: str, n: int, concurrency: int) -> None:
    one = create_redis(url, max_connections=1)
    pool = create_redis(url, max_connections=concurrency)
    await one.flushall()
    seq, par = LocationStore(one), LocationStore(pool)
    aors = [f"user{i}@bench.example.com" for i in range(n)]

    def contact(i: int) -> list[ContactUpdate]:
        return [ContactUpdate(f"sip:user{i}@198.51.100.{i % 250}:5060;transport=udp", 3600)]

    async def register(store: LocationStore, i: int, cseq: int) -> None:
        r = await store.apply_register(
            aors[i], contact(i), call_id=f"{i}-bench@198.51.100.1", cseq=cseq, now=NOW, max_contacts=10,
            path=["<sip:lb1.example.com;lr>"], received=f"udp:198.51.100.{i % 250}:5060",
            user_agent="bench/1.0", node="node-1",
        )  # fmt: skip
        assert r.ok, r

    async def seq_register() -> None:
        for i in range(n):
            await register(seq, i, 1)

    async def seq_lookup() -> None:
        for i in range(n):
            assert await seq.lookup(aors[i], NOW)

    async def in_parallel(job: Callable[[int], Awaitable[None]]) -> None:
        it = iter(range(n))

        async def worker() -> None:
            for i in it:
                await job(i)

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def par_register() -> None:
        await in_parallel(lambda i: register(par, i, 2))

    async def par_lookup() -> None:
        async def one_lookup(i: int) -> None:
            assert await par.lookup(aors[i], NOW)

        await in_parallel(one_lookup)

    async def pipelined_lookup() -> None:
        for start in range(0, n, 100):
            found = await seq.lookup_many(aors[start : start + 100], NOW)
            assert all(found.values())

    sample = Binding(
        "sip:user1@198.51.100.1:5060;transport=udp", NOW + 3600, 1.0, "1-bench@198.51.100.1", 1, None, None,
        ("<sip:lb1.example.com;lr>",), "udp:198.51.100.1:5060", "bench/1.0", "node-1", NOW,
    )  # fmt: skip
    print(f"binding JSON: {len(sample.to_json())} bytes; n={n}, concurrency={concurrency}")
    await timed("apply_register, 1 connection, sequential", n, seq_register)
    await timed(f"apply_register, pool, {concurrency} concurrent", n, par_register)
    await timed("lookup, 1 connection, sequential", n, seq_lookup)
    await timed(f"lookup, pool, {concurrency} concurrent", n, par_lookup)
    await timed("lookup_many x100, 1 connection, pipelined", n, pipelined_lookup)
    cnt = await seq.count_all(NOW)
    print(f"count_all: {cnt.aors} AORs, {cnt.bindings} bindings")
    await one.aclose()
    await pool.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--url", help="an existing Redis (it is FLUSHALLed); default: start one")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the node does")
    args = parser.parse_args()
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional

        run = uvloop.run
    if args.url:
        run(bench(args.url, args.n, args.concurrency))
        return
    with tempfile.TemporaryDirectory() as tmp, start_redis(tmp) as redis:
        run(bench(redis.url, args.n, args.concurrency))


if __name__ == "__main__":
    main()
