"""`sipfarm bench` / `python -m benchmarks`: sipfarm against Kamailio, same scenarios, same machine.

Theory of operation. For every target (a sipfarm farm of N nodes for each N in `--nodes`,
then Kamailio with its location in memory, once per memory manager of `--kamailio-memory`,
and in Redis) the harness starts the servers on
loopback, provisions U users, starts a SIPp UAS, and then:

1. registers all U users once at a fixed rate, every Contact pointing at the UAS (so any user
   can be called; Redis memory per registration is read here);
2. searches the highest REGISTER rate sustained with < 1% failures (`benchmarks.search`),
   each step a bounded SIPp run over the next slice of users;
3. searches the highest call rate the same way: UAC -> target -> UAS, INVITE challenged with
   407, 180/200/ACK, hold, BYE/200.

Every SIPp run records its response-time percentiles, retransmissions, 5xx answers, the CPU
used meanwhile by every process (Redis, balancer, each node, Kamailio, each SIPp) and Redis
command counts; a background sampler keeps each process's peak memory. The results go to
`results/<timestamp>/` (see `benchmarks.report`). `--tiny` is one fixed low-rate step of each
kind against one node (the test suite's end-to-end check).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks.kamailio import KAMAILIO_BIN, KamailioError, User, make_users, write_calls_csv, write_users_csv
from benchmarks.measure import MemorySampler, ProcessTree, calls_delta, cpu_delta, udp_drops, udp_drops_by_inode
from benchmarks.process import sipfarm_env, udp_receive_buffer_errors
from benchmarks.search import SearchResult, Step, find_max_rate
from benchmarks.sipp import REGISTER_AUTH, UAC_CALL, SippError, SippResult, SippServer, run_sipp
from benchmarks.targets import (
    KAMAILIO_MEMORY_MANAGERS,
    KamailioTarget,
    NodeAloneTarget,
    SipfarmTarget,
    Target,
    TargetError,
    kamailio_target_name,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_MISSING_TOOL = 2
EXIT_INTERRUPTED = 130

_5XX = re.compile(rb"received 'SIP/2\.0 5\d\d")


class BenchError(RuntimeError):
    """The benchmark cannot go on (a target died, SIPp failed); one line for the operator."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a run depends on; stored in summary.json."""

    mode: str
    nodes: tuple[int, ...]
    workers: int
    users: int
    hold_ms: int
    step_s: float
    settle_s: float
    search: bool
    search_budget_s: float
    total_budget_s: float
    max_steps: int
    precision: float
    max_p99_ms: float | None
    register_all_rate: float
    register_start: float
    call_start: float
    fixed_register_rate: float
    fixed_call_rate: float
    kamailio: bool
    kamailio_redis: bool
    build: str = "auto"  # requested: auto | compiled | interpreted
    build_used: str = ""  # what the sipfarm processes ran (sipfarm_env)
    relays: int = 0  # `sipfarm relay` processes started with each farm, its nodes anchoring media on them
    kinds: tuple[str, ...] = ("register", "call")  # the searches run (--media: calls only)
    kamailio_memory: tuple[str, ...] = ("qm",)
    node_alone: bool = False  # also one node with no balancer, SIPp straight at it (sipfarm-node)
    """Kamailio's memory managers: the in-memory target runs once with each (the first also
    runs the Redis one); qm is Debian's default, the historical reference."""

    @property
    def target_count(self) -> int:
        return (len(self.nodes) + int(self.node_alone) + (len(self.kamailio_memory) if self.kamailio else 0)
                + int(self.kamailio_redis))


@dataclass(frozen=True, slots=True)
class Measurement:
    """One bounded SIPp run against a target, with what every process used meanwhile."""

    name: str
    kind: str  # "register" or "call"
    target_rate: float
    achieved_rate: float
    throughput: float
    attempted: int
    succeeded: int
    failed: int
    failure_pct: float
    retransmissions: int
    responses_5xx: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    wall_s: float
    udp_drops: int
    """Datagrams the kernel dropped on full receive buffers during the run, any socket."""
    udp_drops_by_role: dict[str, int]
    """The same for the sockets of each role (who could not read fast enough)."""
    cpu_s: dict[str, float]
    cpu_pct: dict[str, float]
    hottest_pct: dict[str, float]
    """Per role: CPU% of its busiest single process (100 = one core saturated)."""
    redis_commands: dict[str, int]
    passed: bool | None = None
    raw_dir: str = ""

    @property
    def redis_total(self) -> int:
        return sum(self.redis_commands.values())

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        hot = max(self.hottest_pct.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (f"{self.name:<22} {self.target_rate:>6g}/s sent {self.achieved_rate:>7.1f} done "
                f"{self.throughput:>7.1f} ok {self.succeeded}/{self.attempted} fail {self.failure_pct:.2f}% "
                f"retr {self.retransmissions} 5xx {self.responses_5xx} p50/95/99 {ms(self.p50_ms)}/"
                f"{ms(self.p95_ms)}/{ms(self.p99_ms)} ms, hottest {hot[0]} {hot[1]:.0f}%")


@dataclass
class TargetResult:
    name: str
    kind: str
    nodes: int
    workers: int
    note: str = ""
    server_labels: list[str] = field(default_factory=list)
    runs: list[Measurement] = field(default_factory=list)
    register_max: float | None = None
    call_max: float | None = None
    register_stopped_by: str = ""
    call_stopped_by: str = ""
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    redis_memory: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def best(self, kind: str) -> Measurement | None:
        """The run at the max sustained rate (or, without a search, the last passing run)."""
        best_rate = self.register_max if kind == "register" else self.call_max
        candidates = [m for m in self.runs if m.kind == kind and m.passed]
        if best_rate is not None:
            candidates = [m for m in candidates if m.target_rate == best_rate] or candidates
        return candidates[-1] if candidates else None

    def first_failure(self, kind: str) -> Measurement | None:
        """The lowest failing step above the max rate (what broke first), if any."""
        best = self.best(kind)
        failing = [m for m in self.runs if m.kind == kind and m.passed is False
                   and (best is None or m.target_rate > best.target_rate)]
        return min(failing, key=lambda m: m.target_rate) if failing else None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(argv, capture_output=True, timeout=10, check=False)
        text = (out.stdout + out.stderr).decode(errors="replace").strip()
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sipp": _tool_version(["sipp", "-v"]) if shutil.which("sipp") else None,
        "kamailio": _tool_version([KAMAILIO_BIN, "-v"]) if Path(KAMAILIO_BIN).exists() else None,
        "redis": _tool_version(["redis-server", "--version"]) if shutil.which("redis-server") else None,
        "loadavg_at_start": list(os.getloadavg()),
    }


class Bench:
    """SIPp runs against one started target with its UAS, measured (see the module docstring)."""

    def __init__(self, target: Target, uas: SippServer, workdir: Path, users: Sequence[User],
                 sampler: MemorySampler, settings: Settings, log: Callable[[str], None]) -> None:
        self.target = target
        self.uas = uas
        self.workdir = workdir
        self.users = list(users)
        self.sampler = sampler
        self.settings = settings
        self.log = log
        self.trees = [*target.trees(), ProcessTree("sipp-uas", uas.process.pid)]
        self.runs: list[Measurement] = []
        self._count = 0
        self._register_offset = 0
        self._call_offset = 0

    def _dir(self, name: str) -> Path:
        self._count += 1
        return self.workdir / f"{self._count:03d}-{name}"

    def _users_csv(self, path: Path, count: int) -> Path:
        """The next `count` users (wrapping), so successive steps walk the whole population."""
        n = len(self.users)
        start = self._register_offset % n
        picked = [self.users[(start + i) % n] for i in range(min(count, n))]
        self._register_offset += count
        return write_users_csv(path, picked)

    def _calls_csv(self, path: Path, count: int) -> Path:
        callers = self.users[1:] or self.users
        n = len(callers)
        start = self._call_offset % n
        picked = [callers[(start + i) % n] for i in range(min(count, n))]
        self._call_offset += count
        return write_calls_csv(path, picked, self.users[0].name)

    def run(self, kind: str, name: str, rate: float, *, calls: int | None = None,
            duration_s: float | None = None) -> Measurement:
        count = calls if calls is not None else max(1, round(rate * (duration_s or 1.0)))
        workdir = self._dir(name)
        workdir.mkdir(parents=True, exist_ok=True)
        hold_ms = self.settings.hold_ms if kind == "call" else 0
        # Bounded: the nominal duration plus a few seconds for the last transactions; calls
        # still open then count as failed (an overloaded server does not get to drain for 30 s).
        timeout_s = count / rate + hold_ms / 1000 + 5.0
        if kind == "register":
            injection = self._users_csv(workdir / "users.csv", count)
            variables = {"domain": self.target.domain, "contact": self.uas.contact, "expires": "3600"}
            scenario = REGISTER_AUTH
        else:
            injection = self._calls_csv(workdir / "calls.csv", count)
            variables = {"domain": self.target.domain}
            scenario = UAC_CALL
        redis = self.target.redis_stats()
        redis0 = redis.command_calls() if redis else {}
        cpu0 = {tree.label: tree.cpu_by_pid() for tree in self.trees}
        drops0 = udp_receive_buffer_errors()
        table0 = udp_drops_by_inode()
        role_drops0 = {tree.label: udp_drops(tree, table0) for tree in self.trees}
        self.sampler.client_label = f"sipp-uac-{kind}"
        t0 = time.monotonic()
        result: SippResult = run_sipp(scenario, self.target.address, workdir=workdir, rate=rate, calls=count,
                                      injection=injection, variables=variables, call_length_ms=hold_ms,
                                      timeout_s=timeout_s)
        wall = time.monotonic() - t0
        cpu1 = {tree.label: tree.cpu_by_pid() for tree in self.trees}
        drops = udp_receive_buffer_errors() - drops0
        table1 = udp_drops_by_inode()
        role_drops = {tree.label: udp_drops(tree, table1) - role_drops0[tree.label] for tree in self.trees}
        redis_cmds = calls_delta(redis0, redis.command_calls()) if redis else {}
        if (dead := self.target.dead()) is not None:
            raise BenchError(f"{self.target.name}: {dead}")
        cpu_s: dict[str, float] = {}
        cpu_pct: dict[str, float] = {}
        hottest: dict[str, float] = {}
        for label, after in cpu1.items():
            usage = cpu_delta(cpu0[label], after, wall)
            cpu_s[label], cpu_pct[label], hottest[label] = usage.cpu_s, usage.cpu_pct, usage.hottest_pct
        client = f"sipp-uac-{kind}"
        cpu_s[client] = round(result.sipp_cpu_s, 3)
        cpu_pct[client] = hottest[client] = round(100 * result.sipp_cpu_s / max(wall, 1e-6), 1)
        error_log = workdir / "errors.log"
        errors = error_log.read_bytes() if error_log.exists() else b""
        m = Measurement(
            name=name, kind=kind, target_rate=rate,
            achieved_rate=round(result.achieved_rate, 1), throughput=round(result.throughput, 1),
            attempted=result.calls_attempted, succeeded=result.calls_succeeded, failed=result.calls_failed,
            failure_pct=round(result.failure_pct, 3), retransmissions=result.retransmissions,
            responses_5xx=len(_5XX.findall(errors)),
            p50_ms=result.p50_ms, p95_ms=result.p95_ms, p99_ms=result.p99_ms,
            wall_s=round(wall, 2), udp_drops=drops,
            udp_drops_by_role={k: v for k, v in role_drops.items() if v > 0},
            cpu_s=cpu_s, cpu_pct=cpu_pct, hottest_pct=hottest,
            redis_commands=redis_cmds, raw_dir=str(workdir),
        )
        self.runs.append(m)
        return m

    def step(self, kind: str, rate: float) -> tuple[Step, Measurement]:
        m = self.run(kind, f"{kind}-{rate:g}", rate, duration_s=self.settings.step_s)
        time.sleep(self.settings.settle_s)  # let retransmissions of an overloaded step die down
        # Achieved = the lower of what SIPp sent and what completed: either side lagging fails.
        return Step(rate=rate, failure_pct=m.failure_pct, achieved_rate=min(m.achieved_rate, m.throughput),
                    p99_ms=m.p99_ms), m


def _mark(m: Measurement, passed: bool) -> Measurement:
    fields = asdict(m)
    fields["passed"] = passed
    return Measurement(**fields)


class Harness:
    bench_class: type[Bench] = Bench  # what measures each SIPp run (--routing adds slapd's searches)
    search_growth = 2.0  # the searches' step-up factor (--scaling starts near the limit: smaller)

    def __init__(self, settings: Settings, out: Path, log: Callable[[str], None],
                 progress: Callable[[str, float], None]) -> None:
        self.settings = settings
        self.out = out
        self.log = log
        self.progress = progress
        self.users = make_users(settings.users)
        self.sampler = MemorySampler()
        self.results: list[TargetResult] = []
        self.notes: list[str] = []
        self.deadline = time.monotonic() + settings.total_budget_s
        self.searches_left = len(settings.kinds) * settings.target_count if settings.search else 0
        self.env, _ = sipfarm_env(settings.build)

    def targets(self) -> Iterator[Callable[[], Target]]:
        s = self.settings
        raw = self.out / "raw"
        for n in s.nodes:
            yield functools.partial(SipfarmTarget, raw / f"sipfarm-{n}n", self.users, nodes=n, workers=s.workers,
                                    env=self.env, relays=s.relays)
        if s.node_alone:
            yield functools.partial(NodeAloneTarget, raw / "sipfarm-node", self.users, workers=s.workers, env=self.env)
        for memory in s.kamailio_memory if s.kamailio else ():
            name = kamailio_target_name(redis_location=False, memory_manager=memory)
            yield functools.partial(KamailioTarget, raw / name, self.users, workers=s.workers, redis_location=False,
                                    memory_manager=memory)
        if s.kamailio_redis:
            memory = s.kamailio_memory[0]
            name = kamailio_target_name(redis_location=True, memory_manager=memory)
            yield functools.partial(KamailioTarget, raw / name, self.users, workers=s.workers, redis_location=True,
                                    memory_manager=memory)

    def run(self) -> list[TargetResult]:
        self.sampler.start()
        try:
            for make in self.targets():
                target = make()
                try:
                    self.results.append(self.run_target(target))
                except (BenchError, TargetError, KamailioError, SippError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    self.log(f"[red]{target.name}: {first}[/red]")
                    self.notes.append(f"{target.name}: failed: {first}")
                    self.results.append(TargetResult(target.name, target.kind, target.nodes, target.workers,
                                                     error=str(exc)[:2000]))
                    self.progress(target.name, 1.0)
        finally:
            self.sampler.stop()
            self.sampler.kill_stray_clients()
        return self.results

    def run_target(self, target: Target) -> TargetResult:
        s = self.settings
        self.progress(f"{target.name}: starting", 0.0)
        result = TargetResult(target.name, target.kind, target.nodes, target.workers, note=target.note)
        self.sampler.peak_kb.clear()
        with contextlib.ExitStack() as stack:
            stack.callback(self.sampler.untrack_all)
            stack.enter_context(target)
            target.start()
            uas = stack.enter_context(SippServer(self.out / "raw" / target.name / "uas"))
            for tree in [*target.trees(), ProcessTree("sipp-uas", uas.process.pid)]:
                self.sampler.track(tree)
            result.server_labels = target.server_labels()
            bench = self.bench_class(target, uas, self.out / "raw" / target.name, self.users, self.sampler, s, self.log)
            redis = target.redis_stats()
            mem0 = redis.used_memory() if redis else 0
            self.log(f"{target.name}: up on {target.address} ({target.note or f'{target.workers} worker(s)/node'})")
            self.progress(f"{target.name}: registering {len(self.users)} users", 0.1)
            reg_all = bench.run("register", "register-all", s.register_all_rate, calls=len(self.users))
            reg_all = _mark(reg_all, reg_all.failure_pct < 1.0)
            bench.runs[-1] = reg_all
            self.log(f"  {reg_all.line()}")
            if redis is not None:
                # Per registered user, whatever the target keeps (bindings, indexes; sipfarm's
                # accounts were provisioned before mem0).
                keys = redis.dbsize()
                used = redis.used_memory()
                result.redis_memory = {
                    "used_memory_mb": round(used / 2**20, 1),
                    # Growth since before provisioning: account + binding + indexes, per user.
                    "bytes_per_user_total": round(
                        (used - (target.redis_baseline_memory or mem0)) / len(self.users)),
                    "bytes_per_registration": round((used - mem0) / max(reg_all.succeeded, 1)),
                    "keys": keys,
                }
            if reg_all.succeeded == 0:
                raise BenchError(f"{target.name}: no REGISTER succeeded; see {reg_all.raw_dir}")
            if s.search:
                if "register" in s.kinds:
                    reg = self._search(bench, "register", self._start_rate("register", s.register_start, target),
                                       target.name, 0.15, 0.55)
                    result.register_max, result.register_stopped_by = reg.max_rate, reg.stopped_by
                call = self._search(bench, "call", self._start_rate("call", s.call_start, target),
                                    target.name, 0.55, 0.95)
                result.call_max, result.call_stopped_by = call.max_rate, call.stopped_by
            else:
                for kind, rate, frac in (("register", s.fixed_register_rate, 0.4),
                                         ("call", s.fixed_call_rate, 0.8)):
                    if kind not in s.kinds:
                        continue
                    self.progress(f"{target.name}: {kind} at {rate:g}/s", frac)
                    _, m = bench.step(kind, rate)
                    ok = m.failure_pct < 1.0
                    bench.runs[-1] = _mark(m, ok)
                    self.log(f"  {'PASS' if ok else 'FAIL'} {m.line()}")
                    if kind == "register":
                        result.register_max, result.register_stopped_by = (rate if ok else None), "fixed"
                    else:
                        result.call_max, result.call_stopped_by = (rate if ok else None), "fixed"
            self.before_stop(bench, target, result)
            self.sampler.sample()
            result.runs = list(bench.runs)
        result.peak_rss_mb = self.sampler.peaks_mb()
        self.progress(f"{target.name}: done", 1.0)
        return result

    def before_stop(self, bench: Bench, target: Target, result: TargetResult) -> None:
        """After the searches, while the target still runs (--protect: equal-load steps, counters)."""

    def _start_rate(self, kind: str, default: float, target: Target) -> float:
        """Start near where the sipfarm runs ended: fewer steps to bracket the limit."""
        done = [r.register_max if kind == "register" else r.call_max
                for r in self.results if not r.error and r.kind == "sipfarm"]
        rates = [rate for rate in done if rate]
        if not rates:
            return default
        guess = max(rates)
        if target.kind == "kamailio" and not getattr(target, "redis_location", False):
            guess *= 4  # C, location in shared memory: expected well above a Python node
        return max(default, guess / 2)

    def _search(self, bench: Bench, kind: str, start: float, name: str, frac0: float, frac1: float) -> SearchResult:
        s = self.settings
        # The remaining time is shared by the remaining searches, so the whole run keeps to
        # `total_budget_s` (one step may overrun a search's budget).
        budget = min(s.search_budget_s, max(5.0, (self.deadline - time.monotonic()) / max(self.searches_left, 1)))
        self.searches_left -= 1
        by_rate: dict[float, int] = {}
        label = "REG/s" if kind == "register" else "calls/s"

        def step(rate: float) -> Step:
            done = min(len(by_rate) / s.max_steps, 1.0)
            self.progress(f"{name}: {label} step {rate:g}", frac0 + (frac1 - frac0) * done)
            st, _ = bench.step(kind, rate)
            by_rate[rate] = len(bench.runs) - 1
            return st

        def show(st: Step, ok: bool) -> None:
            index = by_rate[st.rate]
            bench.runs[index] = _mark(bench.runs[index], ok)
            self.log(f"  {'PASS' if ok else 'FAIL'} {bench.runs[index].line()}")

        result = find_max_rate(step, start_rate=start, precision=s.precision, max_steps=s.max_steps,
                               growth=self.search_growth, time_budget_s=budget, max_p99_ms=s.max_p99_ms, on_step=show)
        self.log(f"  {name}: max {label} {result.max_rate} ({result.stopped_by}, {len(result.steps)} steps, "
                 f"{result.elapsed_s:.0f} s)")
        return result


def _parse_nodes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list like 1,2; got {text!r}") from None
    if not values or any(v < 1 or v > 16 for v in values):
        raise argparse.ArgumentTypeError(f"node counts must be 1..16; got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sipfarm bench", description="Benchmark sipfarm against Kamailio with SIPp "
                                "(see benchmarks/README.md).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short searches, 2,000 users: under 5 minutes")
    mode.add_argument("--tiny", action="store_true",
                      help="1 node, 50 users, one fixed low-rate step of each kind, no search (tests)")
    p.add_argument("--nodes", type=_parse_nodes, help="sipfarm node counts to measure, e.g. 1,2 (default 1,2)")
    p.add_argument("--workers", type=int, default=1, help="worker processes per node; Kamailio children (default 1)")
    p.add_argument("--users", type=int, help="users provisioned and registered (default 10000; quick 2000)")
    p.add_argument("--hold-ms", type=int, help="call hold time between ACK and BYE (default 1000; quick 500)")
    p.add_argument("--step-s", type=float,
                   help="duration of one search step, whole seconds (SIPp reports once a second); default 5, quick 3")
    p.add_argument("--search-budget-s", type=float, help="time budget of each search (default 90; quick 24)")
    p.add_argument("--max-p99-ms", type=float, default=200.0,
                   help="a step also fails when p99 response time exceeds this (0: no latency limit)")
    p.add_argument("--register-rate", type=float, help="with --no-search/--tiny: the fixed REGISTER rate")
    p.add_argument("--call-rate", type=float, help="with --no-search/--tiny: the fixed call rate")
    p.add_argument("--register-start", type=float, help="first rate of the REGISTER search")
    p.add_argument("--call-start", type=float, help="first rate of the call search")
    p.add_argument("--no-search", action="store_true", help="one fixed-rate step of each kind")
    p.add_argument("--no-kamailio", action="store_true", help="skip the Kamailio comparison")
    p.add_argument("--no-kamailio-redis", action="store_true", help="skip Kamailio with location in Redis")
    p.add_argument("--kamailio-memory", choices=(*KAMAILIO_MEMORY_MANAGERS, "both"), default="qm",
                   help="Kamailio's memory manager (-x): qm, Debian's default and the historical reference "
                   "(default); tlsf, ~2x less CPU per message in this config; both: the in-memory Kamailio "
                   "twice, kamailio (qm) and kamailio-tlsf, sipfarm's ratios against each (the Redis one: qm)")
    p.add_argument("--node-alone", action="store_true",
                   help="also measure one node with no balancer, SIPp straight at it as at Kamailio (sipfarm-node): "
                   "its per CPU-second figures are not taken while a balancer shares the two cores with it")
    p.add_argument("--build", choices=("auto", "compiled", "interpreted"), default="auto",
                   help="sipfarm as compiled by 'make compiled' (mypyc) or pure Python; auto: compiled when "
                   "that build is fresh")
    p.add_argument("--media", action="store_true",
                   help="the media benchmark instead: sipfarm's relay against rtpengine userspace (packets/s at "
                   "< 0.1%% loss and per relay CPU-second, calls at 50 pps each way, one stream at 25k+ pps); "
                   "with --quick (~90 s) or --tiny (tests)")
    p.add_argument("--media-relays", default="sipfarm,rtpengine", help="with --media: the relays to measure")
    p.add_argument("--no-media-farm", action="store_true",
                   help="with --media: skip the call search of a 1-node farm with a relay (not run with --tiny)")
    p.add_argument("--routing", action="store_true",
                   help="the routing benchmark instead: calls/s of 1 node plain, with accounts in LDAP (cache cold "
                   "and warm) and with a routing helper program per call, same run; with --quick or --tiny (tests)")
    p.add_argument("--routing-configs", default="plain,ldap-cold,ldap-warm,helper",
                   help="with --routing: the configurations to measure (also: helper-cached)")
    p.add_argument("--protect", action="store_true",
                   help="the protection benchmark instead: REGISTER and call searches of 1 balancer + 1 node with "
                   "the balancer's front door off, as shipped and with every check on every message, same run; "
                   "with --quick or --tiny (tests)")
    p.add_argument("--protect-configs", default="off,default,full",
                   help="with --protect: the configurations to measure, the first is the reference")
    p.add_argument("--protect-calls-only", action="store_true", help="with --protect: the call searches only")
    p.add_argument("--overload", action="store_true",
                   help="calls offered at --overload-factor x the farm's max, shedding on and off (overload.md)")
    p.add_argument("--overload-factor", type=float, default=3.0, help="with --overload: x the farm's max (default 3)")
    p.add_argument("--overload-s", type=float, help="with --overload: seconds of each flood (default 10; full 20)")
    p.add_argument("--overload-node-cpu", type=float, default=0.15,
                   help="with --overload: each node's CPU quota in cores, cgroup v1, root only (0: none)")
    p.add_argument("--scaling", action="store_true",
                   help="the scaling curve instead: max calls/s and REGISTER/s of 1, 2, 4 nodes (--nodes), each held "
                   "to a fixed CPU quota, against linear; then the balancer alone held to a quota: calls per "
                   "balancer CPU-second vs the node's (scaling.json/.md/.png); cgroup v1, root only")
    p.add_argument("--scaling-node-cpu", type=float, default=0.1,
                   help="with --scaling: each node's CPU quota in cores (default 0.1: 4 nodes fit in 2 cores with "
                   "the balancer, Redis and SIPp)")
    p.add_argument("--scaling-balancer-cpu", type=float, default=0.15,
                   help="with --scaling: the balancer's CPU quota in cores for its own measurement (0: skip it)")
    p.add_argument("--scaling-runs", type=int, default=1,
                   help="with --scaling: measure every farm this many times, in turn; medians and spread reported")
    p.add_argument("--scaling-shares", type=int,
                   help="with --scaling: cpu.shares of the cgroup the benchmark and all it starts run in, against "
                   "other load on the machine (default 10240, tiny 0: none)")
    p.add_argument("--out", type=Path, default=Path("results"), help="results/<timestamp>/ goes here")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"

    def pick(value: Any, full: Any, quick: Any, tiny: Any) -> Any:
        if value is not None:
            return value
        return {"full": full, "quick": quick, "tiny": tiny}[mode]

    users = pick(args.users, 10_000, 2_000, 50)
    kamailio_ok = Path(KAMAILIO_BIN).exists()
    kamailio = kamailio_ok and not args.no_kamailio
    memory = KAMAILIO_MEMORY_MANAGERS if args.kamailio_memory == "both" else (args.kamailio_memory,)
    search_budget_s = pick(args.search_budget_s, 90.0, 24.0, 0.0)
    return Settings(
        mode=mode,
        nodes=pick(args.nodes, (1, 2), (1, 2), (1,)),
        workers=args.workers,
        users=users,
        hold_ms=pick(args.hold_ms, 1000, 500, 100),
        step_s=pick(args.step_s, 5.0, 3.0, 2.0),
        settle_s=pick(None, 1.0, 0.5, 0.2),
        search=not (args.no_search or args.tiny),
        search_budget_s=search_budget_s,
        # Searches share this: quick stays under 5 minutes with 4 targets (~15 s each to start
        # and register everyone); a second Kamailio memory manager adds its two searches.
        total_budget_s=pick(None, 3600.0, 215.0, 0.0) + 2 * search_budget_s * (len(memory) - 1 if kamailio else 0)
        + 2 * search_budget_s * int(args.node_alone),
        max_steps=pick(None, 12, 8, 1),
        precision=pick(None, 0.05, 0.15, 0.5),
        max_p99_ms=args.max_p99_ms or None,
        # The population is registered once in at most ~10 s (quick ~4 s).
        register_all_rate=pick(None, max(200.0, users / 10), max(200.0, users / 4), 50.0),
        register_start=pick(args.register_start, 500.0, 500.0, 25.0),
        call_start=pick(args.call_start, 100.0, 100.0, 5.0),
        fixed_register_rate=pick(args.register_rate, 100.0, 100.0, 25.0),
        fixed_call_rate=pick(args.call_rate, 20.0, 20.0, 5.0),
        kamailio=kamailio,
        kamailio_redis=kamailio and not args.no_kamailio_redis and not args.tiny,
        build=args.build,
        kamailio_memory=memory,
        node_alone=args.node_alone,
    )


def _missing_tools(settings: Settings) -> tuple[list[str], list[str]]:
    """(fatal messages, notes): sipp and redis-server are needed, Kamailio is optional."""
    fatal: list[str] = []
    notes: list[str] = []
    if shutil.which("sipp") is None:
        fatal.append("SIPp ('sipp') not found on PATH: install it with 'apt-get install sip-tester'")
    if shutil.which("redis-server") is None:
        fatal.append("redis-server not found on PATH: install it with 'apt-get install redis-server'")
    if not Path(KAMAILIO_BIN).exists():
        notes.append(f"Kamailio ({KAMAILIO_BIN}) not installed: comparison skipped "
                     "(apt-get install kamailio kamailio-redis-modules)")
    return fatal, notes


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def mode_log(text: str) -> None:
    """A benchmark mode's progress line on stderr."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


@dataclass
class ModeRun:
    """One run of a benchmark mode (``--routing``, ``--protect``...): its settings with the
    build the sipfarm processes will run, its output directory and when it started."""

    settings: Settings
    out: Path
    machine: dict[str, Any]
    started: float
    started_utc: str

    @classmethod
    def start(cls, settings: Settings, out_root: Path) -> ModeRun | None:
        """None (said on stderr) when the build asked for cannot run."""
        try:
            _, build_used = sipfarm_env(settings.build)
        except RuntimeError as exc:
            print(f"sipfarm bench: {exc}", file=sys.stderr)
            return None
        out = (out_root / dt.datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        return cls(
            replace(settings, build_used=build_used),
            out,
            machine_info(),
            time.monotonic(),
            dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        )

    def build_note(self) -> list[str]:
        build = self.settings.build_used
        return [] if build == "compiled" else [f"sipfarm ran {build}: 'make compiled' builds the faster mypyc modules"]

    @staticmethod
    def guarded(
        run: Callable[[], list[TargetResult]], partial: Callable[[], list[TargetResult]]
    ) -> tuple[list[TargetResult], bool]:
        """``run()`` with SIGTERM as an interrupt: (results, interrupted); interrupted, the
        results measured so far (``partial()``)."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            return run(), False
        except KeyboardInterrupt:
            mode_log("sipfarm bench: interrupted; every process it started is stopped")
            return partial(), True
        finally:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    while args_list and args_list[0] == "--":  # `sipfarm bench -- --nodes 1,2`
        args_list.pop(0)
    args = build_parser().parse_args(args_list)
    if args.media:
        return media_main(args, args_list)
    if args.routing:
        from benchmarks.routing_bench import routing_main  # noqa: PLC0415

        return routing_main(args, args_list)
    if args.protect:
        from benchmarks.protect_bench import protect_main  # noqa: PLC0415

        return protect_main(args, args_list)
    if args.overload:
        from benchmarks.overload_bench import overload_main  # noqa: PLC0415

        return overload_main(args, args_list)
    if args.scaling:
        from benchmarks.scaling_bench import scaling_main  # noqa: PLC0415

        return scaling_main(args, args_list)
    settings = settings_from(args)
    fatal, notes = _missing_tools(settings)
    if fatal:
        for message in fatal:
            print(f"sipfarm bench: {message}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    try:
        _, build_used = sipfarm_env(settings.build)
    except RuntimeError as exc:
        print(f"sipfarm bench: {exc}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    settings = replace(settings, build_used=build_used)
    if build_used != "compiled":
        notes.append(f"sipfarm ran {build_used}: 'make compiled' builds the faster mypyc modules")
    for note in notes:
        print(f"sipfarm bench: {note}", file=sys.stderr)
    if settings.kamailio and not settings.kamailio_redis and settings.mode != "tiny" and not args.no_kamailio_redis:
        notes.append("Kamailio with db_redis location skipped")

    from rich.console import Console  # noqa: PLC0415
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    from benchmarks import report  # noqa: PLC0415

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
    started = time.monotonic()
    machine = machine_info()
    target_count = settings.target_count
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description:<44}"), BarColumn(),
                        TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=console,
                        disable=args.no_progress or not console.is_terminal)
    interrupted = False
    results: list[TargetResult] = []
    harness: Harness | None = None
    try:
        with progress:
            task = progress.add_task("starting", total=100.0 * target_count)
            done_targets: list[str] = []

            def on_progress(text: str, frac: float) -> None:
                name = text.split(":", 1)[0]
                if frac >= 1.0 and name not in done_targets:
                    done_targets.append(name)
                base = 100.0 * (len(done_targets) - (1 if frac >= 1.0 else 0))
                progress.update(task, description=text, completed=base + 100.0 * min(frac, 1.0))

            def on_log(text: str) -> None:
                console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}", highlight=False)

            harness = Harness(settings, out, on_log, on_progress)
            harness.notes.extend(notes)
            results = harness.run()
    except KeyboardInterrupt:
        interrupted = True
        console.print("sipfarm bench: interrupted; every process it started is stopped", style="yellow")
        results = harness.results if harness is not None else []
    finally:
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    command = "sipfarm bench " + " ".join(args_list) if args_list else "sipfarm bench"
    summary = report.build_summary(settings=asdict(settings), machine=machine, results=results,
                                   notes=(harness.notes if harness else notes), command=command,
                                   elapsed_s=elapsed, interrupted=interrupted)
    paths = report.write_all(out, summary)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    for line in report.headline(summary):
        print(line)
    if interrupted:
        return EXIT_INTERRUPTED
    if not results or all(r.error for r in results if r.kind == "sipfarm"):
        return EXIT_FAILED
    return EXIT_OK


def media_main(args: argparse.Namespace, args_list: Sequence[str]) -> int:
    """`sipfarm bench --media`: benchmarks.media_bench; results/<timestamp>/ gets summary.json
    (its `media` key), summary.md and media.json."""
    from benchmarks import media_bench, report  # noqa: PLC0415

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    relays = tuple(name for name in args.media_relays.split(",") if name)
    unknown = [name for name in relays if name not in media_bench.RELAYS]
    if unknown or not relays:
        print(f"sipfarm bench: --media-relays: expected some of {','.join(media_bench.RELAYS)}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    missing = [tool for tool in ("gcc", "redis-server") if shutil.which(tool) is None and "sipfarm" in relays]
    if missing:
        print(f"sipfarm bench: --media needs {' and '.join(missing)} (apt-get install gcc redis-server)",
              file=sys.stderr)
        return EXIT_MISSING_TOOL
    settings = media_bench.media_settings(mode, relays, args.build)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    media: dict[str, Any] | None = None

    def log(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    farm: list[TargetResult] = []
    notes: list[str] = []
    try:
        media = media_bench.run_media(settings, out / "raw", log=log)
        if mode != "tiny" and not args.no_media_farm and "sipfarm" in relays:
            if shutil.which("sipp") is None:
                notes.append("SIPp not installed: the farm's calls/s with a relay not measured")
            else:
                farm = _farm_with_relay(args, out, log, notes)
    except KeyboardInterrupt:
        interrupted = True
        log("sipfarm bench: interrupted; every process it started is stopped")
    except media_bench.MediaBenchError as exc:
        log(f"sipfarm bench: {exc}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    command = "sipfarm bench " + " ".join(args_list)
    summary = report.build_media_summary(media=media, machine=machine, command=command,
                                         elapsed_s=time.monotonic() - started, interrupted=interrupted,
                                         farm=farm, notes=notes)
    paths = report.write_media(out, summary)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    for line in report.media_headline(summary):
        print(line)
    if interrupted:
        return EXIT_INTERRUPTED
    if media is None or not media["relays"] or any(r["error"] for r in media["relays"].values()):
        return EXIT_FAILED
    return EXIT_OK


def _farm_with_relay(args: argparse.Namespace, out: Path, log: Callable[[str], None],
                     notes: list[str]) -> list[TargetResult]:
    """The call search of the SIP benchmark against one node without, then with one `sipfarm
    relay`: every call's SDP (SIPp's INVITE and 200 carry one) anchored over ng, deleted at BYE."""
    settings = replace(settings_from(args), nodes=(1,), kamailio=False, kamailio_redis=False, kinds=("call",))
    try:
        _, build_used = sipfarm_env(settings.build)
    except RuntimeError as exc:
        notes.append(f"farm with a relay not measured: {exc}")
        return []
    results: list[TargetResult] = []
    for relays in (0, 1):
        harness = Harness(replace(settings, build_used=build_used, relays=relays), out, log,
                          lambda _text, _frac: None)
        log(f"farm: 1 node, {relays} sipfarm relay(s), call search")
        results += harness.run()
        notes.extend(note for note in harness.notes if note not in notes)
    return results
