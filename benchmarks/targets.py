"""The servers a benchmark drives: a sipfarm farm (Redis, balancer, N nodes) or Kamailio.

Each target starts its processes on free loopback ports, exposes the address SIPp sends to,
the process trees to measure (`measure.ProcessTree`) and, when it has one, the Redis whose
command counters the model needs; `stop()` stops everything it started, in reverse order,
also after a failed start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from benchmarks.kamailio import DEFAULT_DOMAIN, Kamailio, RedisServer, User
from benchmarks.measure import ProcessTree, RedisStats
from benchmarks.process import ManagedProcess, free_port, wait_until

HOST = "127.0.0.1"


class TargetError(RuntimeError):
    """A target failed to start or one of its processes died; the message names which."""


async def _provision(redis_url: str, users: Sequence[User], domain: str, concurrency: int = 64) -> None:
    """Accounts through sipfarm's AccountStore, `concurrency` adds in flight on as many connections."""
    from sipfarm.store import AccountExists, AccountStore, create_redis  # noqa: PLC0415

    redis = create_redis(redis_url, max_connections=concurrency, socket_timeout=5.0)
    try:
        store = AccountStore(redis)
        queue = list(users)

        async def worker() -> None:
            while queue:
                user = queue.pop()
                with contextlib.suppress(AccountExists):
                    await store.add(user.name, domain, user.password)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await redis.aclose()


async def _node_members(redis_url: str) -> int:
    from sipfarm.cluster.membership import MembershipStore, Role  # noqa: PLC0415
    from sipfarm.store import create_redis  # noqa: PLC0415

    redis = create_redis(redis_url)
    try:
        return len(await MembershipStore(redis).members(Role.NODE))
    finally:
        await redis.aclose()


def _up_or_dead(proc: ManagedProcess, port: int) -> bool:
    return not proc.alive() or _sip_ping(port)


def _sip_ping(port: int) -> bool:
    from sipfarm.up import sip_ping  # noqa: PLC0415

    return sip_ping(HOST, port, 0.3) is not None


class Target:
    """Common surface of the benchmark targets."""

    name: str
    kind: str
    nodes: int
    workers: int
    domain: str = DEFAULT_DOMAIN
    port: int
    redis: RedisServer | None = None
    redis_baseline_memory: int | None = None
    """Redis used_memory before provisioning (sipfarm keeps accounts in Redis too)."""
    note: str = ""

    def __init__(self) -> None:
        self._procs: list[tuple[str, ManagedProcess]] = []

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def trees(self) -> list[ProcessTree]:
        return [ProcessTree(label, proc.pid) for label, proc in self._procs]

    def start(self) -> Target:
        raise NotImplementedError

    def server_labels(self) -> list[str]:
        """Roles doing the SIP work (what "per CPU-second" divides by)."""
        raise NotImplementedError

    def redis_stats(self) -> RedisStats | None:
        return RedisStats(self.redis.host, self.redis.port) if self.redis is not None else None

    def dead(self) -> str | None:
        """The label and log tail of a process that exited, or None when all run."""
        for label, proc in self._procs:
            if not proc.alive():
                return f"{label} exited with {proc.proc.returncode}:\n{proc.log_tail(15)}"
        return None

    def stop(self) -> None:
        for _label, proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()

    def __enter__(self) -> Target:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class SipfarmTarget(Target):
    """Redis + one balancer + `nodes` sipfarm nodes of `workers` worker processes each."""

    kind = "sipfarm"

    def __init__(self, workdir: Path, users: Sequence[User], *, nodes: int, workers: int,
                 env: Mapping[str, str] | None = None, relays: int = 0, node_args: Sequence[str] = (),
                 provision: bool = True, balancer_config: str = "", balancer_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.env = env
        self.balancer_config = balancer_config  # TOML lines added to [balancer] (--protect: the front door)
        self.node_args = tuple(node_args)  # appended to every `sipfarm node` (--routing: --config FILE)
        self.balancer_args = tuple(balancer_args)  # appended to `sipfarm balancer` (--overload: --no-shed)
        self.provision = provision  # False: no account in Redis (--routing: they are in LDAP only)
        self.relays = relays  # `sipfarm relay` processes the nodes anchor media on (ng)
        self.workdir = workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.nodes = nodes
        self.workers = workers
        self.name = f"sipfarm-{nodes}n" + (f"-{relays}relay" if relays else "")
        if relays:
            self.note = f"{relays} media relay(s): every call's SDP anchored (ng offer/answer/delete)"
        self.port = 0
        self.node_ports: list[int] = []
        self.provision_s = 0.0

    def server_labels(self) -> list[str]:
        return [f"node{i + 1}" for i in range(self.nodes)]

    def _spawn(self, label: str, argv: list[str], env: Mapping[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(label, [sys.executable, "-m", "sipfarm", *argv], self.workdir / f"{label}.log",
                              cwd=self.workdir, env=env if env is not None else self.env)
        self._procs.append((label, proc))
        return proc

    def start(self) -> SipfarmTarget:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.redis = RedisServer(self.workdir / "redis")
        self._procs.append(("redis", self.redis.process))
        stats = self.redis_stats()
        assert stats is not None
        self.redis_baseline_memory = stats.used_memory()
        t0 = time.monotonic()
        if self.provision:
            asyncio.run(_provision(self.redis.url, self.users, self.domain))
        self.provision_s = time.monotonic() - t0
        ports: list[int] = []
        relay_ng = [free_port(HOST) for _ in range(self.relays)]
        relay_flags = ["--relays", ",".join(f"{HOST}:{port}" for port in relay_ng)] if relay_ng else []
        for i in range(self.nodes):
            port = free_port(HOST)
            ports.append(port)
            self._spawn(f"node{i + 1}", [
                "node", "--listen", f"udp:{HOST}:{port}", "--listen", f"tcp:{HOST}:{port}",
                "--redis", self.redis.url, "--domain", self.domain, "--node-id", f"node{i + 1}",
                "--workers", str(self.workers), "--log-level", "warning", *relay_flags, *self.node_args,
            ])
        for i, port in enumerate(ports):
            label, proc = self._procs[i + 1]
            if not wait_until(functools.partial(_up_or_dead, proc, port), 20) or not proc.alive():
                raise TargetError(f"{label} did not answer OPTIONS on {HOST}:{port}:\n{proc.log_tail(15)}")
        for i, ng in enumerate(relay_ng):
            self._start_relay(i + 1, ng)
        self.node_ports = ports
        self._start_front()

    def _start_front(self) -> None:
        """The balancer in front of the nodes (``node_ports``); up when every node has joined."""
        assert self.redis is not None
        self.port = free_port(HOST)
        # SIPp's UAS listens on another loopback port than its REGISTER came from: the operator
        # setting that lets the balancer send there (loopback is refused by default)
        peers = self.workdir / "balancer-peers.toml"
        peers.write_text('[balancer]\nallow_destinations = ["127.0.0.0/8"]\n' + self.balancer_config)
        balancer = self._spawn("balancer", [
            "balancer", "--config", str(peers), "--redis", self.redis.url, "--listen", f"udp:{HOST}:{self.port}",
            "--balancer-id", "lb1", "--log-level", "warning", *self.balancer_args,
        ])
        if not wait_until(lambda: not balancer.alive() or _sip_ping(self.port), 20) or not balancer.alive():
            raise TargetError(f"balancer did not answer OPTIONS on {self.address}:\n{balancer.log_tail(15)}")
        url = self.redis.url
        if not wait_until(lambda: asyncio.run(_node_members(url)) >= self.nodes, 15, interval=0.2):
            raise TargetError(f"only {asyncio.run(_node_members(url))} of {self.nodes} nodes joined the farm")
        time.sleep(1.0)  # the balancer's watcher polls membership every 0.25 s, then probes


    def _start_relay(self, index: int, ng: int) -> None:
        """`sipfarm relay` on `ng`, media ports RELAY_PORTS apart per relay; up when it answers ping."""
        from benchmarks.media_bench import MediaBenchError, NgClient  # noqa: PLC0415

        assert self.redis is not None
        low = RELAY_PORT_BASE + (index - 1) * RELAY_PORTS
        env = dict(self.env if self.env is not None else os.environ)
        env["SIPFARM_ALLOW_DESTINATIONS"] = "127.0.0.0/8"  # SIPp's SDP names loopback addresses
        relay = self._spawn(f"relay{index}", [
            "relay", "--ng", f"{HOST}:{ng}", "--media-address", HOST, "--port-min", str(low),
            "--port-max", str(low + RELAY_PORTS - 1), "--redis", self.redis.url, "--relay-id", f"relay{index}",
            "--log-level", "warning",
        ], env=env)
        client = NgClient((HOST, ng))
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and relay.alive():
                with contextlib.suppress(MediaBenchError):
                    if client.request_all([{"command": "ping"}], timeout=0.5)[0].get(b"result") == b"pong":
                        return
        finally:
            client.close()
        raise TargetError(f"relay{index} did not answer an ng ping on {HOST}:{ng}:\n{relay.log_tail(15)}")


class NodeAloneTarget(SipfarmTarget):
    """One node, SIPp straight at it, no balancer: the node measured as Kamailio is (one process,
    the phones' messages arriving directly), so that its per CPU-second figures are not taken while
    a balancer in front shares the machine's two cores with it."""

    def __init__(self, workdir: Path, users: Sequence[User], *, workers: int,
                 env: Mapping[str, str] | None = None) -> None:
        # SIPp's UAS sits on loopback, which a node refuses as a destination unless allowed
        # (in a farm the balancer is the node's only next hop towards a phone)
        env = {**(env if env is not None else os.environ), "SIPFARM_ALLOW_DESTINATIONS": "127.0.0.0/8"}
        super().__init__(workdir, users, nodes=1, workers=workers, env=env)
        # its own kind: not a farm of the 1 -> 2 node scaling, the plot or the capacity model
        # (no balancer), compared with Kamailio as every target is
        self.kind = "sipfarm-node"
        self.name = "sipfarm-node"
        self.note = "one node, no balancer: SIPp straight at it, as at Kamailio"

    def _start_front(self) -> None:
        self.port = self.node_ports[0]


RELAY_PORT_BASE = 24000  # below the ephemeral range; a port another process holds is retired by the relay
RELAY_PORTS = 4000  # 4 a call: 1,000 concurrent calls a relay


KAMAILIO_MEMORY_MANAGERS = ("qm", "tlsf")
"""Kamailio's memory managers the benchmark runs it with (`-x`): qm, Debian's default and the
historical reference, costs ~2x per message in this config (benchmarks/README.md, lb_reference)."""


def kamailio_target_name(*, redis_location: bool, memory_manager: str = "qm") -> str:
    """kamailio, kamailio-redis; with another memory manager than qm, its name appended."""
    base = "kamailio-redis" if redis_location else "kamailio"
    return base if memory_manager == "qm" else f"{base}-{memory_manager}"


class KamailioTarget(Target):
    """Kamailio doing a node's job (benchmarks/kamailio.py), location in memory or in Redis,
    with memory manager qm (Debian's default: no `-x`) or tlsf."""

    kind = "kamailio"

    def __init__(self, workdir: Path, users: Sequence[User], *, workers: int, redis_location: bool,
                 memory_manager: str = "qm") -> None:
        super().__init__()
        if memory_manager not in KAMAILIO_MEMORY_MANAGERS:
            raise ValueError(f"memory manager {memory_manager!r}: expected one of {KAMAILIO_MEMORY_MANAGERS}")
        self.workdir = workdir.resolve()
        self.users = users
        self.nodes = 1
        self.workers = workers
        self.redis_location = redis_location
        self.memory_manager = memory_manager
        self.name = kamailio_target_name(redis_location=redis_location, memory_manager=memory_manager)
        self.note = ("usrloc db_mode 3 in Redis (db_redis)" if redis_location else "usrloc in shared memory") + (
            ", memory manager qm (Debian's default)" if memory_manager == "qm" else
            f", memory manager {memory_manager} (-x {memory_manager})")
        self.port = 0
        self.kamailio: Kamailio | None = None

    def server_labels(self) -> list[str]:
        return ["kamailio"]

    def start(self) -> KamailioTarget:
        try:
            if self.redis_location:
                self.redis = RedisServer(self.workdir / "redis")
                self._procs.append(("redis", self.redis.process))
            self.kamailio = Kamailio.start(self.workdir / "kamailio", self.users, children=self.workers,
                                           redis_url=self.redis.url if self.redis else None,
                                           memory_manager=None if self.memory_manager == "qm" else self.memory_manager)
            self._procs.append(("kamailio", self.kamailio.process))
            self.port = self.kamailio.port
            self.domain = self.kamailio.domain
        except BaseException:
            self.stop()
            raise
        return self
