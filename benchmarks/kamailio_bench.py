"""Reference figures: SIPp against Kamailio doing sipfarm's job on this machine.

    .venv/bin/python -m benchmarks.kamailio_bench [--children 2] [--users 1000] [--step-s 5]

(a) REGISTER with digest auth for every provisioned user at a modest rate, (b) calls
UAC -> Kamailio -> UAS (the UAS registered as alice000) at a modest rate, (c) a max-rate
search for REGISTER/s and calls/s (<1% failures), each step bounded in time. For every run it
records SIPp's figures plus CPU seconds of Kamailio (all its processes), of the SIPp client and
of the SIPp UAS, all sharing the same cores. Writes results/kamailio/<variant>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.kamailio import Kamailio, KamailioError, RedisServer, User, make_users, write_calls_csv, write_users_csv
from benchmarks.process import udp_receive_buffer_errors
from benchmarks.search import SearchResult, Step, find_max_rate
from benchmarks.sipp import REGISTER_AUTH, UAC_CALL, SippResult, SippServer, run_sipp


@dataclass(frozen=True, slots=True)
class Measurement:
    """One SIPp run with the CPU used meanwhile by every process on the machine's cores."""

    name: str
    target_rate: float
    achieved_rate: float
    throughput: float
    attempted: int
    succeeded: int
    failed: int
    failure_pct: float
    retransmissions: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    wall_s: float
    server_cpu_s: float
    sipp_client_cpu_s: float
    sipp_uas_cpu_s: float
    udp_drops: int
    """Datagrams dropped by the kernel on full receive buffers during the run (any socket)."""

    @property
    def per_server_cpu_s(self) -> float | None:
        """Successful calls (or registrations) per CPU-second of the server."""
        return self.succeeded / self.server_cpu_s if self.server_cpu_s > 0 else None

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        per = self.per_server_cpu_s
        return (
            f"{self.name:<24} target {self.target_rate:>6g}/s sent {self.achieved_rate:>7.1f}/s "
            f"done {self.throughput:>7.1f}/s "
            f"ok {self.succeeded:>6}/{self.attempted:<6} fail {self.failure_pct:5.2f}% "
            f"retr {self.retransmissions:>5} rtt p50/95/99 {ms(self.p50_ms)}/{ms(self.p95_ms)}/"
            f"{ms(self.p99_ms)} ms | cpu s: server {self.server_cpu_s:.2f} sipp {self.sipp_client_cpu_s:.2f}"
            f" uas {self.sipp_uas_cpu_s:.2f} | per server cpu-s {'-' if per is None else f'{per:.0f}'}"
            f" | udp drops {self.udp_drops}"
        )


def measure(name: str, run: Callable[[], SippResult], server: Kamailio, uas: SippServer | None) -> Measurement:
    kam0 = server.cpu_seconds()
    uas0 = uas.cpu_seconds() if uas else 0.0
    drops0 = udp_receive_buffer_errors()
    t0 = time.monotonic()
    result = run()
    wall = time.monotonic() - t0
    if not server.process.alive():
        raise KamailioError(f"kamailio died during {name}:\n{server.process.log_tail(15)}")
    return Measurement(
        name=name,
        target_rate=result.target_rate,
        achieved_rate=round(result.achieved_rate, 1),
        throughput=round(result.throughput, 1),
        attempted=result.calls_attempted,
        succeeded=result.calls_succeeded,
        failed=result.calls_failed,
        failure_pct=round(result.failure_pct, 3),
        retransmissions=result.retransmissions,
        p50_ms=result.p50_ms,
        p95_ms=result.p95_ms,
        p99_ms=result.p99_ms,
        wall_s=round(wall, 2),
        server_cpu_s=round(server.cpu_seconds() - kam0, 3),
        sipp_client_cpu_s=round(result.sipp_cpu_s, 3),
        sipp_uas_cpu_s=round((uas.cpu_seconds() - uas0) if uas else 0.0, 3),
        udp_drops=udp_receive_buffer_errors() - drops0,
    )


class KamailioBench:
    """Kamailio + SIPp UAS + SIPp clients wired together for one benchmark session."""

    def __init__(self, kam: Kamailio, uas: SippServer, workdir: Path, users: Sequence[User]) -> None:
        self.kam = kam
        self.uas = uas
        self.workdir = workdir
        self.users = list(users)
        self.target = f"{kam.host}:{kam.port}"
        self.users_csv = write_users_csv(workdir / "users.csv", self.users)
        self.callee = self.users[0]
        self.calls_csv = write_calls_csv(workdir / "calls.csv", self.users[1:], self.callee.name)
        self._runs = 0

    def _dir(self, name: str) -> Path:
        self._runs += 1
        return self.workdir / f"{self._runs:03d}-{name}"

    def register(self, name: str, rate: float, *, calls: int | None = None,
                 duration_s: float | None = None) -> Measurement:
        """Every registration points at the UAS, so any user can be called afterwards."""
        return measure(name, lambda: run_sipp(
            REGISTER_AUTH, self.target, workdir=self._dir(name), rate=rate, calls=calls,
            duration_s=duration_s, injection=self.users_csv,
            variables={"domain": self.kam.domain, "contact": self.uas.contact, "expires": "3600"},
        ), self.kam, self.uas)

    def call(self, name: str, rate: float, *, calls: int | None = None, duration_s: float | None = None,
             hold_ms: int = 0) -> Measurement:
        return measure(name, lambda: run_sipp(
            UAC_CALL, self.target, workdir=self._dir(name), rate=rate, calls=calls,
            duration_s=duration_s, injection=self.calls_csv, call_length_ms=hold_ms,
            variables={"domain": self.kam.domain},
        ), self.kam, self.uas)


def as_step(m: Measurement) -> Step:
    # Achieved = the lower of what SIPp sent and what completed: either side falling behind fails.
    return Step(rate=m.target_rate, failure_pct=m.failure_pct, p99_ms=m.p99_ms,
                achieved_rate=min(m.achieved_rate, m.throughput),
                detail={"server_cpu_s": m.server_cpu_s, "sipp_client_cpu_s": m.sipp_client_cpu_s,
                        "sipp_uas_cpu_s": m.sipp_uas_cpu_s, "succeeded": m.succeeded})


def search(label: str, run: Callable[[float], Measurement], start: float, budget_s: float,
           log: list[Measurement], max_p99_ms: float | None = None) -> tuple[SearchResult, Measurement | None]:
    by_rate: dict[float, Measurement] = {}

    def step(rate: float) -> Step:
        m = run(rate)
        by_rate[rate] = m
        log.append(m)
        time.sleep(1.0)  # let retransmissions and lingering transactions of an overload die down
        return as_step(m)

    def show(s: Step, ok: bool) -> None:
        print(("PASS " if ok else "FAIL ") + by_rate[s.rate].line(), flush=True)

    result = find_max_rate(step, start_rate=start, precision=0.1, time_budget_s=budget_s,
                           max_p99_ms=max_p99_ms, on_step=show)
    print(f"{label}: max {result.max_rate} /s ({result.stopped_by}, {len(result.steps)} steps, "
          f"{result.elapsed_s:.0f} s)", flush=True)
    return result, (by_rate[result.max_rate] if result.max_rate is not None else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--register-rate", type=float, default=100.0)
    parser.add_argument("--call-rate", type=float, default=20.0)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--hold-ms", type=int, default=1000)
    parser.add_argument("--register-search-start", type=float, default=1000.0)
    parser.add_argument("--call-search-start", type=float, default=200.0)
    parser.add_argument("--step-s", type=float, default=5.0, help="duration of one search step")
    parser.add_argument("--search-budget-s", type=float, default=100.0, help="time budget of each search")
    parser.add_argument("--max-p99-ms", type=float, default=200.0,
                        help="a search step also fails when its p99 response time exceeds this")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--redis", action="store_true", help="location table in Redis (db_redis, db_mode 3)")
    parser.add_argument("--workdir", type=Path, default=Path(".run/bench-kamailio"))
    parser.add_argument("--out", type=Path, default=Path("results/kamailio"))
    args = parser.parse_args(argv)

    variant = "redis" if args.redis else "memory"
    workdir: Path = args.workdir / variant
    shutil.rmtree(workdir, ignore_errors=True)  # run directories are numbered from 001 each time
    workdir.mkdir(parents=True, exist_ok=True)
    users = make_users(args.users)
    log: list[Measurement] = []
    report: dict[str, object] = {"variant": variant, "children": args.children, "users": args.users,
                                 "cpus": os.cpu_count()}
    redis = RedisServer(workdir / "redis") if args.redis else None
    try:
        with Kamailio.start(workdir / "kamailio", users, children=args.children,
                            redis_url=redis.url if redis else None) as kam, \
                SippServer(workdir / "uas") as uas:
            bench = KamailioBench(kam, uas, workdir, users)
            print(f"kamailio pid {kam.process.pid} on {bench.target}, {args.children} children, "
                  f"{variant} location; UAS on {uas.contact}", flush=True)
            reg = bench.register("a-register-all-users", args.register_rate, calls=args.users)
            print(reg.line(), flush=True)
            log.append(reg)
            if redis is not None:
                report["redis_location_keys"] = redis.command("DBSIZE").decode().strip()
            call = bench.call("b-calls", args.call_rate, calls=args.calls, hold_ms=args.hold_ms)
            print(call.line(), flush=True)
            log.append(call)
            report["register"] = asdict(reg)
            report["calls"] = asdict(call)
            if not args.no_search:
                reg_search, reg_best = search(
                    "REGISTER/s",
                    lambda r: bench.register(f"c-register-{r:g}", r, duration_s=args.step_s),
                    start=args.register_search_start, budget_s=args.search_budget_s, log=log,
                    max_p99_ms=args.max_p99_ms)
                call_search, call_best = search(
                    "calls/s",
                    lambda r: bench.call(f"c-calls-{r:g}", r, duration_s=args.step_s),
                    start=args.call_search_start, budget_s=args.search_budget_s, log=log,
                    max_p99_ms=args.max_p99_ms)
                report["register_search"] = {"max_rate": reg_search.max_rate, "stopped_by": reg_search.stopped_by,
                                             "best": asdict(reg_best) if reg_best else None}
                report["call_search"] = {"max_rate": call_search.max_rate, "stopped_by": call_search.stopped_by,
                                         "best": asdict(call_best) if call_best else None}
            report["kamailio_exit"] = kam.stop()
    finally:
        if redis is not None:
            redis.stop()
    report["runs"] = [asdict(m) for m in log]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{variant}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
