"""REGISTER writes through the node's pipelined client: one Redis vs a Redis Cluster, and the cost of
``replicas_ack`` (not a test; prints numbers).

    .venv/bin/python benchmarks/cluster_bench.py [--n 20000] [--burst 50]

Starts a redis-server and a 3-master + 3-replica cluster on loopback, then runs ``FarmState.register``
(the node's REGISTER write: register.lua, one EVALSHA) in bursts of ``--burst`` per event-loop
iteration, as a busy node sends them, each burst awaited before the next. Prints writes/s, the
client's CPU per write and the burst's round trip (median, p99), for: one Redis; the cluster; the
cluster with ``replicas_ack = 1`` (one WAIT per burst and master).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sipfarm.node.farmstate import FarmState
from sipfarm.store import ContactUpdate, start_redis
from sipfarm.store.redis_server import RedisClusterProcesses
from sipfarm.store.resp import RedisPipe
from sipfarm.store.resp_cluster import ClusterPipe

NOW = 1_700_000_000.0


async def run(label: str, pipe: RedisPipe, cluster: bool, n: int, burst: int) -> None:
    await pipe.connect()
    state = FarmState(pipe, cluster=cluster)
    loop = asyncio.get_running_loop()
    rtts: list[float] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, n, burst):
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(burst)]
        began = time.perf_counter()
        for i, fut in enumerate(futures):
            user = f"user{(start + i) % 5000}@farm.test"
            state.register(user, [ContactUpdate(f"sip:{user}:5060", 3600)], fut.set_result,
                           call_id=f"c{start + i}", cseq=1, now=NOW, max_contacts=10)  # fmt: skip
        results = await asyncio.gather(*futures)
        rtts.append(time.perf_counter() - began)
        bad = [r for r in results if not getattr(r, "ok", False)]
        if bad:
            raise SystemExit(f"{label}: {bad[0]!r}")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rtts.sort()
    print(
        f"{label:<34} {n / wall:>9,.0f} writes/s  {cpu / n * 1e6:>5.1f} us client CPU/write  "
        f"burst rtt p50 {statistics.median(rtts) * 1e3:.2f} ms p99 {rtts[int(len(rtts) * 0.99)] * 1e3:.2f} ms"
    )
    await pipe.close()


async def bench(single_url: str, cluster_url: str, n: int, burst: int) -> None:
    await run("one Redis", RedisPipe(single_url), False, n, burst)
    await run("cluster (3 masters)", ClusterPipe(cluster_url), True, n, burst)
    acked = ClusterPipe(cluster_url)
    acked.require_replicas(1, 1000)
    await run("cluster, replicas_ack = 1", acked, True, n, burst)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = start_redis(Path(tmp) / "single")
        try:
            with RedisClusterProcesses(Path(tmp) / "cluster") as cluster:
                asyncio.run(bench(single.url, cluster.url, args.n, args.burst))
        finally:
            single.stop()


if __name__ == "__main__":
    main()
