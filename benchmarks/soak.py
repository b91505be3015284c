"""Memory under a long mixed load: calls from SIPp and hostile datagrams from thousands of sources.

    .venv/bin/python -m benchmarks.soak --seconds 180 --call-rate 150 --attack-rate 1500   # ~4 min
    ... --build compiled|interpreted       # default: compiled when fresh (as `sipfarm bench`)

The brief's rule: nothing from outside may cost a farm process more than a bounded amount of
memory. Unit tests bound each table (`tests/balancer/test_balancer_cache_bounds.py`,
`tests/node/test_memory_security.py`); this checks the whole processes, over minutes, with
every table filling at once. A farm (Redis, one balancer, one node: `SipfarmTarget`) gets:

- SIPp calls at ``--call-rate`` for ``--seconds`` (every user registered first), the load
  whose transactions (32 s of Timers J/L/M) and caches fill the node and the balancer;
- at the same time ``--attack-rate`` datagrams/s from a sender cycling through fresh source
  addresses (127.2.x.y, 256 new ones every 5 s: each source is new state for the front door,
  the ban counters and the balancer's per-source tables), each one of: an INVITE without
  credentials to a random user (known or not; a stateless 407), a REGISTER with made-up
  Digest credentials (401, a failed authentication counted in Redis), a forged response (the
  balancer drops it), an ACK with a made-up challenge tag, an in-dialog BYE with a made-up
  Route, an OPTIONS, and bytes that are not SIP.

Memory (PSS, as `sipfarm bench` samples it) of the node and the balancer, and Redis's
``used_memory`` and key count, are read every ``--sample-s`` seconds. Verdict per process: the
growth from the middle third of the run to the last third (mean of the samples); after the
first ~35 s (Timer J/L/M's 32 s: the transaction table's fill) it should be flat. Writes
``soak.json`` and ``soak.md`` under ``--out``; exit status 1 when a process died, the node or
the balancer grew by more than ``--max-growth`` (default 10%), or more than ``--max-failed``
(0.1%) of the calls failed. Redis is reported, not judged: its keys (each call's nonce use,
each failing source's counter) expire after 300-360 s, longer than a run of a few minutes.

Traffic goes to 127.0.0.0/8 only, bounded in count (rate x seconds) and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.harness import Bench, build_parser, settings_from
from benchmarks.kamailio import make_users
from benchmarks.measure import MemorySampler, pss_kb
from benchmarks.process import sipfarm_env
from benchmarks.sipp import SippServer
from benchmarks.targets import HOST, SipfarmTarget

SOURCES_PER_ROUND = 256
ROUND_S = 5.0


@dataclass(slots=True)
class Sample:
    t: float
    node_mb: float
    balancer_mb: float
    redis_mb: float
    redis_keys: int


@dataclass(slots=True)
class SoakResult:
    seconds: float
    call_rate: float
    attack_rate: float
    build: str
    calls_ok: int = 0
    calls_failed: int = 0
    attack_sent: int = 0
    attack_sources: int = 0
    samples: list[Sample] = field(default_factory=list)
    growth_pct: dict[str, float] = field(default_factory=dict)
    dead: str | None = None


def _made_up(kind: int, domain: str, users: int, rng: random.Random, port: int, src: str) -> bytes:
    """One hostile datagram of ``kind`` (see the module docstring), from ``src``."""
    tag = rng.getrandbits(48)
    call_id = f"soak-{rng.getrandbits(64):x}"
    branch = f"z9hG4bK{rng.getrandbits(64):x}"
    user = f"alice{rng.randrange(users):03d}" if rng.random() < 0.5 else f"nobody{rng.getrandbits(24)}"
    via = f"Via: SIP/2.0/UDP {src}:{port};branch={branch};rport"
    common = f"From: <sip:{user}@{domain}>;tag={tag:x}\r\nCall-ID: {call_id}\r\nMax-Forwards: 70\r\n"
    if kind == 0:
        return (
            f"INVITE sip:{user}@{domain} SIP/2.0\r\n{via}\r\n{common}To: <sip:{user}@{domain}>\r\n"
            f"CSeq: 1 INVITE\r\nContact: <sip:{user}@{src}:{port}>\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    if kind == 1:
        creds = (
            f'Digest username="{user}",realm="{domain}",nonce="{rng.getrandbits(128):x}",'
            f'uri="sip:{domain}",response="{rng.getrandbits(128):032x}",algorithm=MD5'
        )
        return (
            f"REGISTER sip:{domain} SIP/2.0\r\n{via}\r\n{common}To: <sip:{user}@{domain}>\r\n"
            f"CSeq: 2 REGISTER\r\nContact: <sip:{user}@{src}:{port}>\r\nAuthorization: {creds}\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
    if kind == 2:  # a response to nothing the farm sent
        return (
            f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {HOST}:{port};branch=z9hG4bKlb-{rng.getrandbits(96):x}\r\n"
            f"{via}\r\n{common}To: <sip:{user}@{domain}>;tag=x\r\nCSeq: 1 INVITE\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
    if kind == 3:  # the ACK of a 407 it never got
        return (
            f"ACK sip:{user}@{domain} SIP/2.0\r\n{via}\r\n{common}To: <sip:{user}@{domain}>;tag=ch-"
            f"{rng.getrandbits(80):x}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    if kind == 4:  # a BYE in a dialog that does not exist, routed through a made-up entry
        return (
            f"BYE sip:{user}@{src}:{port} SIP/2.0\r\n{via}\r\n"
            f"Route: <sip:{rng.getrandbits(64):x}@{HOST}:{port};lr;sf={rng.getrandbits(80):x}>\r\n"
            f"{common}To: <sip:{user}@{domain}>;tag={rng.getrandbits(32):x}\r\nCSeq: 3 BYE\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
    if kind == 5:
        return (
            f"OPTIONS sip:{domain} SIP/2.0\r\n{via}\r\n{common}To: <sip:{domain}>\r\nCSeq: 1 OPTIONS\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
    return bytes(rng.getrandbits(8) for _ in range(rng.randrange(20, 400)))


class Attacker:
    """Sends ``rate`` hostile datagrams/s to ``dest`` for ``seconds`` (a daemon thread)."""

    def __init__(self, dest: tuple[str, int], domain: str, users: int, rate: float, seconds: float) -> None:
        self.dest = dest
        self.domain = domain
        self.users = users
        self.rate = rate
        self.seconds = seconds
        self.sent = 0
        self.sources = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-attacker", daemon=True)

    def start(self) -> Attacker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sockets(self, round_no: int) -> list[tuple[socket.socket, str, int]]:
        out = []
        for i in range(SOURCES_PER_ROUND):
            n = round_no * SOURCES_PER_ROUND + i
            src = f"127.2.{(n // 250) % 250 + 1}.{n % 250 + 1}"
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((src, 0))
            sock.setblocking(False)
            out.append((sock, src, sock.getsockname()[1]))
        self.sources += len(out)
        return out

    def _run(self) -> None:
        rng = random.Random(1)
        start = time.monotonic()
        end = start + self.seconds
        limit = int(self.rate * self.seconds)
        round_no = 0
        socks = self._sockets(round_no)
        next_round = start + ROUND_S
        try:
            while not self._stop.is_set() and self.sent < limit:
                now = time.monotonic()
                if now >= end:
                    break
                if now >= next_round:
                    for sock, _, _ in socks:
                        sock.close()
                    round_no += 1
                    socks = self._sockets(round_no)
                    next_round += ROUND_S
                due = int((now - start) * self.rate)
                while self.sent < min(due, limit):
                    sock, src, port = socks[rng.randrange(len(socks))]
                    with contextlib.suppress(OSError):  # a full buffer: that one is lost
                        sock.sendto(_made_up(rng.randrange(7), self.domain, self.users, rng, port, src), self.dest)
                    self.sent += 1
                time.sleep(0.002)
        finally:
            for sock, _, _ in socks:
                sock.close()


def _pss_mb(pids: list[int]) -> float:
    return sum(pss_kb(pid) or 0 for pid in pids) / 1024


def run(args: argparse.Namespace) -> SoakResult:
    env, build_used = sipfarm_env(args.build)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    bench_args = build_parser().parse_args(["--quick", "--no-search", "--nodes", "1", "--no-kamailio"])
    settings = settings_from(bench_args)
    users = make_users(args.users)
    result = SoakResult(args.seconds, args.call_rate, args.attack_rate, build_used)
    target = SipfarmTarget(out / "raw", users, nodes=1, workers=1, env=env)
    with contextlib.ExitStack() as stack:
        stack.enter_context(target)
        target.start()
        uas = stack.enter_context(SippServer(out / "raw" / "uas"))
        sampler = MemorySampler()
        bench = Bench(target, uas, out / "raw", users, sampler, settings, print)
        reg = bench.run("register", "register-all", 500.0, calls=len(users))
        print(f"registered: {reg.line()}", flush=True)
        trees = {tree.label: tree for tree in target.trees()}
        redis = target.redis_stats()
        host, port = target.address.rsplit(":", 1)
        attacker = Attacker((host, int(port)), target.domain, len(users), args.attack_rate, args.seconds)
        calls: dict[str, object] = {}

        def drive() -> None:
            calls["m"] = bench.run("call", "soak-calls", args.call_rate, duration_s=args.seconds)

        driver = threading.Thread(target=drive, name="soak-calls", daemon=True)
        t0 = time.monotonic()
        attacker.start()
        driver.start()
        while driver.is_alive() and time.monotonic() - t0 < args.seconds + 60:
            time.sleep(args.sample_s)
            dead = target.dead()
            if dead is not None:
                result.dead = dead
                break
            sample = Sample(
                round(time.monotonic() - t0, 1),
                round(_pss_mb(trees["node1"].pids()), 1),
                round(_pss_mb(trees["balancer"].pids()), 1),
                round((redis.used_memory() if redis is not None else 0) / 2**20, 1),
                redis.dbsize() if redis is not None else 0,
            )
            result.samples.append(sample)
            print(
                f"  t={sample.t:5.0f}s node {sample.node_mb:6.1f} MB  balancer {sample.balancer_mb:6.1f} MB"
                f"  redis {sample.redis_mb:6.1f} MB {sample.redis_keys} keys  attack sent {attacker.sent}",
                flush=True,
            )
        attacker.stop()
        driver.join(args.seconds + 60)
        result.attack_sent = attacker.sent
        result.attack_sources = attacker.sources
        measured = calls.get("m")
        if measured is not None:
            result.calls_ok = measured.succeeded  # type: ignore[attr-defined]
            result.calls_failed = measured.failed  # type: ignore[attr-defined]
        result.dead = result.dead or target.dead()
    span = [s for s in result.samples if s.t <= args.seconds]
    third = args.seconds / 3
    middle = [s for s in span if third <= s.t < 2 * third]
    last = [s for s in span if s.t >= 2 * third]
    if middle and last:
        for role in ("node_mb", "balancer_mb", "redis_mb"):
            before = statistics.mean(getattr(s, role) for s in middle)
            after = statistics.mean(getattr(s, role) for s in last)
            result.growth_pct[role[:-3]] = round(100 * (after - before) / before, 1) if before else 0.0
    return result


def report(result: SoakResult, out: Path, command: str) -> None:
    (out / "soak.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    lines = [
        f"# Soak: {result.seconds:g} s, {result.call_rate:g} calls/s + {result.attack_rate:g} hostile datagrams/s",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, build {result.build}, "
        f"{os.cpu_count()} CPUs.",
        "",
        f"Calls: {result.calls_ok} completed, {result.calls_failed} failed. Hostile datagrams: "
        f"{result.attack_sent} from {result.attack_sources} source addresses. Died: {result.dead or 'none'}.",
        "",
        "Growth from the middle third to the last third (mean PSS / used_memory): "
        + ", ".join(f"{k} {v:+.1f}%" for k, v in result.growth_pct.items()),
        "",
        "| t (s) | node MB | balancer MB | Redis MB | Redis keys |",
        "|---|---|---|---|---|",
        *(f"| {s.t:g} | {s.node_mb} | {s.balancer_mb} | {s.redis_mb} | {s.redis_keys} |" for s in result.samples),
        "",
    ]
    (out / "soak.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--call-rate", type=float, default=150.0)
    ap.add_argument("--attack-rate", type=float, default=1500.0)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--max-growth", type=float, default=10.0, help="percent, middle third to last third")
    ap.add_argument("--max-failed", type=float, default=0.1, help="percent of the calls")
    ap.add_argument("--build", choices=("auto", "compiled", "interpreted"), default="auto")
    ap.add_argument("--out", default=".run/soak")
    args = ap.parse_args(argv)
    result = run(args)
    out = Path(args.out).resolve()
    report(result, out, "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]))
    print((out / "soak.md").read_text())
    # Redis is reported, not judged: its keys (the calls' nonce uses, the sources' failure
    # counters) expire after 300-360 s, longer than a run of a few minutes
    grew = {k: v for k, v in result.growth_pct.items() if v > args.max_growth and k != "redis"}
    calls = result.calls_ok + result.calls_failed
    if result.dead or grew or not calls or 100 * result.calls_failed / calls > args.max_failed:
        print(f"soak: FAILED (died: {result.dead}, grew: {grew}, failed calls: {result.calls_failed})")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
