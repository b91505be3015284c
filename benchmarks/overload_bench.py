"""`sipfarm bench --overload`: calls offered at several times the farm's capacity, shedding on and off.

Theory of operation. A farm (Redis, balancer, N nodes: `--nodes`, default 2) is started as for
the SIP benchmark (`benchmarks.targets.SipfarmTarget`), every user registered once, and then:

1. the farm's max call rate is searched as `sipfarm bench` does (same SIPp scenario, < 1%
   failed, p99 <= 200 ms), with shedding on (the default configuration);
2. calls are offered at `--overload-factor` (default 3) x that max for `--overload-s` seconds
   with `uac_call_shed.xml`: a 503 to either INVITE ends the call as *shed* (logged by SIPp
   with its Retry-After), anything else unexpected fails it;
3. a fresh farm with `sipfarm balancer --no-shed` gets the same offered rate.

Each flood reports: calls offered, shed (503 from the balancer: its
`sipfarm_balancer_shed_total`, and 503s seen by SIPp), *admitted* (offered - 503), completed
(BYE answered), failed among admitted, admitted calls/s (completed / duration), setup
p50/p99 of answered calls (first INVITE to 200, the 407 round trip included) and CPU per role.

On a 2-core machine SIPp, the balancer and the nodes share the cores, and the balancer is the
first to saturate for calls (see benchmarks/README.md): overload at the balancer itself is not
what shedding can fix.  So, when a cgroup v1 CPU quota can be set (root), each node is held to
`--overload-node-cpu` of a core (default 0.15; 0: no limit), making the nodes the bottleneck as
on a real farm whose balancer has cores to spare.  The quota is in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.cpulimit import CpuLimit, CpuLimitError
from benchmarks.harness import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING_TOOL,
    EXIT_OK,
    Bench,
    _raise_interrupt,
    machine_info,
    settings_from,
)
from benchmarks.kamailio import User, make_users, write_calls_csv
from benchmarks.measure import MemorySampler, ProcessTree, cpu_delta
from benchmarks.process import free_port, sipfarm_env
from benchmarks.search import Step, find_max_rate
from benchmarks.sipp import UAC_CALL_SHED, SippServer, read_call_outcomes, run_sipp
from benchmarks.targets import HOST, SipfarmTarget


@dataclass(slots=True)
class Flood:
    """One overload run: offered rate, what was shed, what was admitted and how it went."""

    shedding: bool
    offered_rate: float
    duration_s: float
    attempted: int = 0
    shed_503: int = 0  # calls ended by a 503 (SIPp's log)
    balancer_shed: int = 0  # the balancer's sipfarm_balancer_shed_total over the run
    retry_after: list[int] = field(default_factory=list)  # min, max seen
    admitted: int = 0
    completed: int = 0
    failed: int = 0  # among admitted: every call SIPp counted failed
    failure_pct_admitted: float = 0.0
    admitted_per_s: float = 0.0
    retransmissions: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    cpu_pct: dict[str, float] = field(default_factory=dict)
    raw_dir: str = ""

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        return (
            f"shedding {'on ' if self.shedding else 'off'}: offered {self.offered_rate:g}/s x {self.duration_s:g} s = "
            f"{self.attempted} calls; 503 {self.shed_503} (balancer shed {self.balancer_shed}); admitted "
            f"{self.admitted}, completed {self.completed}, failed {self.failed} "
            f"({self.failure_pct_admitted:.2f}% of admitted); {self.admitted_per_s:.0f} admitted calls/s; "
            f"setup p50/p99 {ms(self.p50_ms)}/{ms(self.p99_ms)} ms"
        )


def _metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class OverloadBench:
    def __init__(self, args: argparse.Namespace, out: Path, log: Callable[[str], None]) -> None:
        nodes = args.nodes[-1] if args.nodes else 2
        self.settings = replace(settings_from(args), nodes=(nodes,), kamailio=False, kamailio_redis=False,
                                kinds=("call",))
        self.env, self.build_used = sipfarm_env(args.build)
        self.settings = replace(self.settings, build_used=self.build_used)
        self.out = out
        self.log = log
        self.factor: float = args.overload_factor
        self.duration_s: float = args.overload_s or (10.0 if self.settings.mode != "full" else 20.0)
        self.node_cpu: float = args.overload_node_cpu
        self.notes: list[str] = []
        reason = CpuLimit.unavailable() if self.node_cpu > 0 else None
        if reason is not None:
            self.notes.append(f"nodes not CPU-limited: {reason}")
            self.node_cpu = 0.0
        self.users: list[User] = make_users(self.settings.users)
        self.farm_max: float | None = None
        self.floods: list[Flood] = []

    def run(self) -> None:
        rate = self._farm(shedding=True, search=True)
        if rate is not None:
            self._farm(shedding=False, search=False, rate=rate)

    def _farm(self, *, shedding: bool, search: bool, rate: float | None = None) -> float | None:
        s = self.settings
        name = f"sipfarm-{s.nodes[0]}n-{'shed' if shedding else 'noshed'}"
        metrics_port = free_port(HOST)
        balancer_args = ["--metrics", f"{HOST}:{metrics_port}", *([] if shedding else ["--no-shed"])]
        workdir = self.out / "raw" / name
        sampler = MemorySampler()
        target = SipfarmTarget(workdir, self.users, nodes=s.nodes[0], workers=s.workers, env=self.env,
                               balancer_args=balancer_args)
        target.name = name
        with contextlib.ExitStack() as stack:
            stack.enter_context(target)
            target.start()
            if self.node_cpu > 0:
                limit = stack.enter_context(CpuLimit(f"sipfarm-bench-{name}", self.node_cpu))
                for tree in target.trees():
                    if tree.label.startswith("node"):
                        for pid in tree.pids():
                            limit.add(pid)
            uas = stack.enter_context(SippServer(workdir / "uas"))
            bench = Bench(target, uas, workdir, self.users, sampler, s, self.log)
            self.log(f"{name}: up on {target.address}"
                     + (f", each node held to {self.node_cpu:.0%} of a core" if self.node_cpu else ""))
            reg = bench.run("register", "register-all", s.register_all_rate, calls=len(self.users))
            self.log(f"  {reg.line()}")
            if search:
                rate = self._search(bench)
                if rate is None:
                    self.notes.append("no call rate passed: overload not measured")
                    return None
                time.sleep(2.0)
            assert rate is not None
            offered = round(rate * self.factor)
            self.floods.append(self._flood(target, uas, workdir, shedding, offered, metrics_port))
            self.log(f"  {self.floods[-1].line()}")
        return rate

    def _search(self, bench: Bench) -> float | None:
        s = self.settings
        if not s.search:  # --tiny, --no-search: the fixed call rate stands for the max
            self.farm_max = s.fixed_call_rate
            self.notes.append(f"no search: {s.fixed_call_rate:g} calls/s taken as the farm's max")
            return s.fixed_call_rate

        def step(rate: float) -> Step:
            st, m = bench.step("call", rate)
            self.log(f"  {'PASS' if m.failure_pct < 1 else 'FAIL'} {m.line()}")
            return st

        result = find_max_rate(step, start_rate=s.call_start, precision=s.precision, max_steps=s.max_steps,
                               time_budget_s=s.search_budget_s, max_p99_ms=s.max_p99_ms)
        self.farm_max = result.max_rate
        self.log(f"  farm max {result.max_rate} calls/s ({result.stopped_by}, {len(result.steps)} steps)")
        return result.max_rate

    def _flood(self, target: SipfarmTarget, uas: SippServer, workdir: Path, shedding: bool, rate: float,
               metrics_port: int) -> Flood:
        s = self.settings
        flood = Flood(shedding=shedding, offered_rate=rate, duration_s=self.duration_s)
        count = round(rate * self.duration_s)
        run_dir = workdir / f"flood-{'shed' if shedding else 'noshed'}-{rate:g}"
        run_dir.mkdir(parents=True, exist_ok=True)
        callers = [self.users[1 + i % (len(self.users) - 1)] for i in range(count)]
        injection = write_calls_csv(run_dir / "calls.csv", callers, self.users[0].name)
        trees = [*target.trees(), ProcessTree("sipp-uas", uas.process.pid)]
        cpu0 = {tree.label: tree.cpu_by_pid() for tree in trees}
        shed0 = _metric(metrics_port, "sipfarm_balancer_shed_total")
        t0 = time.monotonic()
        result = run_sipp(UAC_CALL_SHED, target.address, workdir=run_dir, rate=rate, calls=count,
                          injection=injection, variables={"domain": target.domain}, call_length_ms=s.hold_ms,
                          timeout_s=self.duration_s + s.hold_ms / 1000 + 12,
                          extra_args=["-trace_logs", "-recv_timeout", "8000"])
        wall = time.monotonic() - t0
        time.sleep(1.2)  # the balancer syncs its counters every 0.5 s
        flood.balancer_shed = round(_metric(metrics_port, "sipfarm_balancer_shed_total") - shed0)
        for tree in trees:
            flood.cpu_pct[tree.label] = cpu_delta(cpu0[tree.label], tree.cpu_by_pid(), wall).cpu_pct
        flood.cpu_pct["sipp-uac"] = round(100 * result.sipp_cpu_s / max(wall, 1e-6), 1)
        outcomes = read_call_outcomes(run_dir)
        retry = []
        for path in run_dir.glob("*_logs.log"):
            retry += [int(p[2]) for p in (line.split() for line in path.read_text().splitlines())
                      if len(p) > 2 and p[0] == "shed" and p[2].isdigit()]
        flood.retry_after = [min(retry), max(retry)] if retry else []
        flood.attempted = result.calls_attempted
        flood.shed_503 = len(outcomes.get("shed", ()))
        flood.admitted = flood.attempted - flood.shed_503
        flood.completed = len(outcomes.get("end", ()))
        flood.failed = result.calls_failed
        flood.failure_pct_admitted = round(100 * flood.failed / max(flood.admitted, 1), 2)
        flood.admitted_per_s = round(flood.completed / self.duration_s, 1)
        flood.retransmissions = result.retransmissions
        flood.p50_ms, flood.p95_ms, flood.p99_ms = result.p50_ms, result.p95_ms, result.p99_ms
        flood.raw_dir = str(run_dir)
        return flood

    def summary(self, machine: dict[str, Any], command: str, elapsed_s: float, interrupted: bool) -> dict[str, Any]:
        return {
            "command": command,
            "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine,
            "build": self.build_used,
            "nodes": self.settings.nodes[0],
            "node_cpu_limit": self.node_cpu,
            "users": self.settings.users,
            "hold_ms": self.settings.hold_ms,
            "farm_max_calls_per_s": self.farm_max,
            "overload_factor": self.factor,
            "floods": [asdict(f) for f in self.floods],
            "notes": self.notes,
            "elapsed_s": round(elapsed_s, 1),
            "interrupted": interrupted,
        }


def markdown(summary: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    m = summary["machine"]
    limit = summary["node_cpu_limit"]
    lines = [
        f"# Overload: calls offered at {summary['overload_factor']:g}x the farm's max, shedding on and off",
        "",
        f"`{summary['command']}`, {summary['time']}, {summary['elapsed_s']:.0f} s; "
        f"{m.get('nproc', '?')} CPUs ({m.get('cpu_model', '?')}), kernel {m.get('kernel', '?')}, "
        f"SIPp {m.get('sipp', '?')}, sipfarm {summary['build']}; "
        f"{summary['nodes']} node(s)" + (f", each held to {limit:.0%} of a core (cgroup CPU quota)" if limit else "")
        + f"; {summary['users']} users, hold {summary['hold_ms']} ms.",
        "",
        f"Farm max (search, < 1% failed, p99 <= 200 ms, shedding on): **{summary['farm_max_calls_per_s']} calls/s**.",
        "",
        "| shedding | offered calls/s | calls | 503 (balancer shed) | Retry-After s | admitted | completed | "
        "failed among admitted | admitted calls/s | setup p50/p95/p99 ms | CPU % balancer / nodes / SIPp UAC |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in summary["floods"]:
        nodes_cpu = sum(v for k, v in f["cpu_pct"].items() if k.startswith("node"))
        retry = "-" if not f["retry_after"] else "-".join(str(v) for v in f["retry_after"])
        lines.append(
            f"| {'on' if f['shedding'] else 'off'} | {f['offered_rate']:g} | {f['attempted']} | "
            f"{f['shed_503']} ({f['balancer_shed']}) | {retry} | {f['admitted']} | {f['completed']} | "
            f"{f['failed']} ({f['failure_pct_admitted']:.2f}%) | {f['admitted_per_s']:.0f} | "
            f"{ms(f['p50_ms'])}/{ms(f['p95_ms'])}/{ms(f['p99_ms'])} | "
            f"{f['cpu_pct'].get('balancer', 0):.0f} / {nodes_cpu:.0f} / {f['cpu_pct'].get('sipp-uac', 0):.0f} |"
        )
    lines += ["", *(f"- {note}" for note in summary["notes"])]
    return "\n".join(lines) + "\n"


def overload_main(args: argparse.Namespace, args_list: Sequence[str]) -> int:
    import shutil  # noqa: PLC0415

    missing = [tool for tool in ("sipp", "redis-server") if shutil.which(tool) is None]
    if missing:
        print(f"sipfarm bench: --overload needs {' and '.join(missing)}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = (args.out / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    try:
        bench = OverloadBench(args, out, log)
    except RuntimeError as exc:
        print(f"sipfarm bench: {exc}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    machine = machine_info()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        log("sipfarm bench: interrupted; every process it started is stopped")
    except (RuntimeError, CpuLimitError) as exc:
        bench.notes.append(f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        log(f"sipfarm bench: {exc}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    command = "sipfarm bench " + " ".join(args_list)
    summary = bench.summary(machine, command, time.monotonic() - started, interrupted)
    (out / "overload.json").write_text(json.dumps(summary, indent=2))
    (out / "overload.md").write_text(markdown(summary))
    print(json.dumps({"json": str(out / "overload.json"), "markdown": str(out / "overload.md")}))
    for flood in bench.floods:
        print(flood.line())
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if len(bench.floods) == 2 else EXIT_FAILED
