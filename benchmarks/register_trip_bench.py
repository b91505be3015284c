"""The node's CPU per authenticated REGISTER, in process, against a real redis-server.

    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled .venv/bin/python benchmarks/register_trip_bench.py

One NodeCore (the node's sans-IO core), FarmState and RedisGuard on one pipelined Redis client,
as ``sipfarm node`` wires them, in this process; redis-server in its own. REGISTERs with valid
credentials (fresh nonce each, accounts cached by a warm-up pass) are parsed and handed to the
core ``--batch`` at a time, as a busy node's event-loop iteration gets them, and the loop runs
until each has its 200. This process's CPU time (``time.process_time``, Redis's not counted)
per REGISTER, best of ``--runs``. No SIPp, no sockets for SIP: what differs between two builds
is the node's own work per REGISTER, Redis round trips included (command packing, reply
parsing, callbacks). Run it with each build's PYTHONPATH to compare them (PYTHONSAFEPATH keeps
the script's directory off sys.path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sipfarm.element import NodeIdentity
from sipfarm.node.core import NodeCore
from sipfarm.node.farmstate import FarmState
from sipfarm.protect import RedisGuard
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.parser import parse_message
from sipfarm.sip.transaction import TimerConfig
from sipfarm.sip.via import stamp_received
from sipfarm.store import AccountStore, create_redis
from sipfarm.store.redis_server import free_port
from sipfarm.store.resp import RedisPipe

DOMAIN = "bench.test"
NODE = Address("udp", "127.0.0.1", 5060)


def _register(user: str, password: str, port: int, cseq: int, nonces: auth.NonceFactory, wall: float) -> bytes:
    """An authenticated REGISTER answering a fresh challenge (nc=00000001), as SIPp sends it."""
    uri = f"sip:{DOMAIN}"
    challenge = auth.parse_challenge(auth.build_challenges(DOMAIN, nonces.issue(wall, DOMAIN), ("MD5",))[0])
    creds = auth.build_credentials(challenge, user, password, "REGISTER", uri, secrets.token_hex(4)).decode()
    return (
        f"REGISTER {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{secrets.token_hex(8)}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{DOMAIN}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\n"
        f"Call-ID: {secrets.token_hex(8)}@bench\r\n"
        f"CSeq: {cseq} REGISTER\r\n"
        f"Contact: <sip:{user}@127.0.0.1:{port}>\r\n"
        "Expires: 3600\r\n"
        f"Authorization: {creds}\r\n"
        "User-Agent: sipfarm-bench\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


async def _provision(url: str, users: list[tuple[str, str]]) -> None:
    redis = create_redis(url)
    try:
        store = AccountStore(redis)
        for start in range(0, len(users), 32):
            await asyncio.gather(*(store.add(u, DOMAIN, p) for u, p in users[start : start + 32]))
    finally:
        await redis.aclose()


class _Batch:
    """What the node's glue does after every input and every batch of Redis replies: drain the
    core's output (here: count the answers), waking the benchmark when the batch is answered."""

    def __init__(self, core: NodeCore, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self.loop = loop
        self.waiting = 0
        self.ok = 0
        self.done: asyncio.Future[None] | None = None

    def drain(self) -> None:
        for out, _dest in self.core.datagrams_to_send():
            if out.startswith(b"SIP/2.0 "):
                self.waiting -= 1
                self.ok += out.startswith(b"SIP/2.0 200 ")
        if self.waiting <= 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    async def run(self, datagrams: list[tuple[bytes, Address]], batch: int) -> int:
        """Hand ``datagrams`` to the core ``batch`` at a time (as one event-loop iteration of a
        busy node gets them); each batch runs until every REGISTER in it is answered."""
        self.ok = 0
        for start in range(0, len(datagrams), batch):
            chunk = datagrams[start : start + batch]
            self.waiting = len(chunk)
            self.done = self.loop.create_future()
            for data, source in chunk:
                msg = parse_message(data)
                stamp_received(msg, source)
                self.core.on_message(msg, source, NODE, self.loop.time())
            self.drain()
            await asyncio.wait_for(self.done, 10)
        return self.ok


async def _measure(url: str, users: list[tuple[str, str]], args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    pipe = RedisPipe(url)
    await pipe.start()
    try:
        state = FarmState(pipe, account_cache_ttl=3600.0)
        guard = RedisGuard(pipe, clock=loop.time)
        nonces = auth.NonceFactory(b"bench-secret-0123456789abcdef!!!", 300.0)
        identity = NodeIdentity(
            node_id="node1",
            domains=frozenset({DOMAIN}),
            addresses={"udp": (NODE.host, NODE.port)},
            aliases=frozenset({(NODE.host, NODE.port)}),
            route_addresses={"udp": (NODE.host, NODE.port)},
        )
        core = NodeCore(identity, state, nonces, timers=TimerConfig(), guard=guard, clock=loop.time)
        batches = _Batch(core, loop)
        pipe.after_replies = batches.drain
        ports = {user: 20000 + i for i, (user, _) in enumerate(users)}
        cseq = 1

        def requests(count: int) -> list[tuple[bytes, Address]]:
            nonlocal cseq
            cseq += 1
            wall = time.time()
            picked = (users[i % len(users)] for i in range(count))
            return [
                (_register(u, p, ports[u], cseq, nonces, wall), Address("udp", "127.0.0.1", ports[u]))
                for u, p in picked
            ]

        warm = await batches.run(requests(len(users)), args.batch)  # caches every account
        results = []
        for _ in range(args.runs):
            datagrams = requests(args.count)
            cpu0 = time.process_time()
            ok = await batches.run(datagrams, args.batch)
            cpu = time.process_time() - cpu0
            if ok != len(datagrams):
                raise RuntimeError(f"{len(datagrams) - ok} of {len(datagrams)} REGISTERs not answered 200")
            results.append(cpu / len(datagrams) * 1e6)
        return {
            "warm_ok": warm,
            "us_per_register_best": round(min(results), 2),
            "us_per_register_all": [round(r, 2) for r in results],
            "redis_commands": pipe.commands,
            "batch": args.batch,
            "count": args.count,
        }
    finally:
        await pipe.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--count", type=int, default=20_000, help="REGISTERs per measured run")
    ap.add_argument("--batch", type=int, default=32, help="REGISTERs handed to the core per loop iteration")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH")
    users = [(f"user{i:04d}", f"pw-{i}") for i in range(args.users)]
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        redis = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", work],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(200):  # bounded wait for it to listen
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            asyncio.run(_provision(url, users))
            import sipfarm.node.farmstate as farmstate  # noqa: PLC0415

            out = asyncio.run(_measure(url, users, args))
            out["farmstate"] = str(Path(farmstate.__file__ or "").parent)
            print(json.dumps(out))
        finally:
            redis.terminate()
            redis.wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
