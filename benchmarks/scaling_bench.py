"""`sipfarm bench --scaling`: the farm's max calls/s and REGISTER/s for 1, 2, 4 nodes, each node
held to a fixed CPU quota, against linear; then the balancer alone, held to a quota of its own.

Theory of operation. On one machine, adding a node process adds no CPU: N unlimited nodes share
the same cores with the balancer, Redis and SIPp, and the curve would show the machine, not the
farm. So every node process gets its own cgroup v1 CPU quota (`benchmarks.cpulimit.CpuLimit`,
``--scaling-node-cpu`` of a core, default 0.1): a node is a fixed amount of CPU, as a machine of
a real farm is, and N nodes are N times that amount. The balancer, Redis and SIPp run without a
quota; the quotas are chosen small enough that 4 nodes plus all of them fit in 2 cores, and the
report shows, for each farm at its max and at the first failing step, the CPU each role used
against its limit (the quota, or one core for an unlimited single-threaded process) and how
long each node was throttled, so it says which process saturated. A quota is a ceiling, not a
reservation: on a machine others load too, a node may get less than its quota and the curve
would show their load. So the benchmark process and everything it starts run in one cgroup of
``cpu.shares`` ``--scaling-shares`` (default 10240, ten ordinary processes' weight; the node
groups nested in it), and each step records how busy the whole machine was and how much of that
was not the farm's. Each farm is a fresh
`SipfarmTarget`; the searches are the SIP benchmark's (`Harness`): < 1% failed, >= 90% of the
offered rate sent and completed, p99 <= 500 ms (not 200: see MAX_P99_MS). After every step the
benchmark waits until each limited process is quiet again (`ScalingBench.wait_quiet`: a node at
0.1 core drains an overloaded step's backlog for seconds, which the next step must not pay for),
and a step in which no call failed but that missed
the p99 or the rate is run once more and the second run stands (`ScalingBench.step`).

- **curve**: for each N in ``--nodes`` (default 1,2,4) the REGISTER and call searches; linear =
  N x the 1-node max, efficiency = max(N) / linear (target >= 0.8 up to 4 nodes).
- **balancer**: a farm of 2 nodes without a quota (ample: they are not the limit) whose balancer
  is held to ``--scaling-balancer-cpu`` (default 0.15 core); its call search gives calls/s per
  balancer CPU-second (successful calls / the balancer's CPU seconds at its max step), compared
  with the node's calls per node CPU-second at the call max of the same run's curve farms (their
  median; issue 13 wants the balancer >= 3x the node: a stateless forwarder against a stateful
  node).

``--scaling-runs R`` measures every farm R times, in turn (1n, 2n, 4n, balancer, 1n, ...): the
curve is the median per N, with each run's figures and ratios beside it.

Output in ``results/<timestamp>/``: ``scaling.json``, ``scaling.md``, ``scaling.png`` (the curve
against linear and 0.8 x linear, and calls per CPU-second of node and balancer), raw SIPp
statistics under ``raw/``. Without a writable cgroup v1 cpu controller (not root) the mode
says why and exits 2: unlimited nodes would measure nothing worth plotting.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from benchmarks.cpulimit import CGROUP_CPU, CpuLimit, CpuLimitError
from benchmarks.harness import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_MISSING_TOOL,
    EXIT_OK,
    Bench,
    Harness,
    Measurement,
    ModeRun,
    Settings,
    TargetResult,
    mode_log,
    settings_from,
)
from benchmarks.kamailio import User
from benchmarks.search import Step, step_passes
from benchmarks.targets import SipfarmTarget, Target, TargetError

KINDS = ("register", "call")
DEFAULT_NODES = (1, 2, 4)
DEFAULT_NODE_CPU = 0.1
DEFAULT_BALANCER_CPU = 0.15
DEFAULT_SHARES = 10240  # the benchmark's weight against other load: 10 ordinary processes
BALANCER_FARM_NODES = 2
# A node held to 0.1 core runs 1 ms in each 10 ms period: a pause of 30 ms of CPU (a garbage
# collection, a timer sweep) holds its messages for 300 ms of wall time, which a machine of one
# core would not. So the latency bound here is 500 ms (`--max-p99-ms` sets another), still
# bounded: a farm past its limit queues for seconds.
MAX_P99_MS = 500.0
QUIET_LIMIT_S = 15.0  # after a step, wait for the limited roles to go quiet, at most this long
QUIET_WINDOW_S = 0.5
QUIET_FRACTION = 0.25  # quiet: under a quarter of the quota
TARGET_EFFICIENCY = 0.8  # issue 13: >= 0.8 x linear up to 4 nodes
TARGET_BALANCER_RATIO = 3.0  # issue 13: the balancer >= 3x the node's calls per CPU-second


@dataclass(frozen=True, slots=True)
class FarmShape:
    """One farm measured: its node count and the CPU quotas (cores; 0 = none) of its processes."""

    name: str
    nodes: int
    node_cpu: float
    balancer_cpu: float
    kinds: tuple[str, ...]
    role: str  # "curve" or "balancer"
    run: int = 1  # which of --scaling-runs


def farm_shapes(nodes: Sequence[int], node_cpu: float, balancer_cpu: float, kinds: Sequence[str],
                runs: int = 1) -> list[FarmShape]:
    """Every farm of one run, then of the next: a slow minute on a shared machine hits one run's
    farm, not every run's same farm."""
    shapes: list[FarmShape] = []
    for run in range(1, runs + 1):
        suffix = f"-run{run}" if runs > 1 else ""
        shapes += [FarmShape(f"sipfarm-{n}n{suffix}", n, node_cpu, 0.0, tuple(kinds), "curve", run) for n in nodes]
        if balancer_cpu > 0:
            shapes.append(FarmShape(f"balancer-alone{suffix}", BALANCER_FARM_NODES, 0.0, balancer_cpu, ("call",),
                                    "balancer", run))
    return shapes


class ScalingTarget(SipfarmTarget):
    """A farm whose node processes (and, for the balancer measurement, whose balancer) each run
    in a cgroup of their own with a fixed CPU quota; the cgroups go with the processes."""

    def __init__(self, workdir: Path, users: Sequence[User], *, shape: FarmShape, workers: int,
                 env: Mapping[str, str] | None, cgroup_root: Path = CGROUP_CPU) -> None:
        super().__init__(workdir, users, nodes=shape.nodes, workers=workers, env=env)
        self.shape = shape
        self.cgroup_root = cgroup_root
        self.name = shape.name
        quota = [f"each node {shape.node_cpu:g} core" if shape.node_cpu else "nodes without a quota",
                 f"balancer {shape.balancer_cpu:g} core" if shape.balancer_cpu else "balancer without a quota"]
        self.note = ", ".join(quota)
        self.limits: dict[str, CpuLimit] = {}  # by role label
        #: per SIPp run (raw directory): ms each limited role was throttled, and the machine's CPU
        self.throttled_ms: dict[str, dict[str, int]] = {}
        self.machine_cpu: dict[str, dict[str, float]] = {}

    def start(self) -> ScalingTarget:
        super().start()
        try:
            self._limit_cpu()
        except CpuLimitError as exc:
            self.stop()
            raise TargetError(str(exc)) from exc
        except BaseException:
            self.stop()
            raise
        return self

    def _limit_cpu(self) -> None:
        for tree in self.trees():
            cores = (self.shape.node_cpu if tree.label.startswith("node")
                     else self.shape.balancer_cpu if tree.label == "balancer" else 0.0)
            if cores <= 0:
                continue
            limit = CpuLimit(f"sipfarm-scaling-{self.name}-{tree.label}", cores, root=self.cgroup_root)
            self.limits[tree.label] = limit.__enter__()
            for pid in tree.pids():  # the node's workers too; later children inherit the group
                limit.add(pid)

    def throttled_us(self) -> dict[str, int]:
        return {label: limit.throttled_us() for label, limit in self.limits.items()}

    def stop(self) -> None:
        super().stop()
        for limit in self.limits.values():
            limit.remove()
        self.limits.clear()


def _machine_busy_s() -> tuple[float, float]:
    """(CPU seconds busy, all CPU seconds) of the whole machine so far, every core."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    return total - idle, total


class ScalingBench(Bench):
    """A `Bench` that also reads, per SIPp run, how long each limited role was throttled and how
    busy the whole machine was (other users of a shared machine show up as "other"), and runs a
    step that failed on latency alone once more."""

    def run(self, kind: str, name: str, rate: float, *, calls: int | None = None,
            duration_s: float | None = None) -> Measurement:
        target = self.target
        assert isinstance(target, ScalingTarget)
        throttled0 = target.throttled_us()
        busy0, total0 = _machine_busy_s()
        m = super().run(kind, name, rate, calls=calls, duration_s=duration_s)
        busy1, total1 = _machine_busy_s()
        throttled1 = target.throttled_us()
        target.throttled_ms[m.raw_dir] = {
            label: (throttled1[label] - throttled0.get(label, 0)) // 1000 for label in throttled1
        }
        cores = psutil.cpu_count() or 1
        window_s = max((total1 - total0) / cores, 1e-6)  # wall time of the reads, as the kernel counts it
        busy_s = busy1 - busy0
        ours = sum(m.cpu_s.values())  # the farm's processes and both SIPp
        target.machine_cpu[m.raw_dir] = {  # % of one core
            "cores": cores,
            "busy_pct": round(100 * busy_s / window_s, 1),
            "other_pct": round(100 * max(busy_s - ours, 0.0) / window_s, 1),
        }
        return m


    def step(self, kind: str, rate: float) -> tuple[Step, Measurement]:
        """A step in which every call succeeded but that failed on p99 or on the rate completed
        is run once more, and the second run stands: a farm at its limit fails again, a moment
        of other load on the machine (a p99 of 300 ms over a p95 of 20) usually does not."""
        st, m = self._quiet_step(kind, rate)
        s = self.settings
        if m.failed == 0 and m.succeeded > 0 and not step_passes(st, max_p99_ms=s.max_p99_ms):
            self.log(f"  again (no call failed): {m.line()}")
            st, m = self._quiet_step(kind, rate)
        return st, m

    def _quiet_step(self, kind: str, rate: float) -> tuple[Step, Measurement]:
        st, m = super().step(kind, rate)
        self.wait_quiet()
        return st, m

    def wait_quiet(self, limit_s: float = QUIET_LIMIT_S) -> float:
        """Wait (at most `limit_s`) until every limited role uses under a quarter of its quota:
        a node held to 0.1 core drains the backlog of an overloaded step (retransmissions,
        transactions timing out) ten times slower than a free one, and the next step, often a
        lower rate, must not pay for it. Returns the seconds waited."""
        target = self.target
        assert isinstance(target, ScalingTarget)
        trees = [tree for tree in target.trees() if tree.label in target.limits]
        started = time.monotonic()
        while trees and time.monotonic() - started < limit_s:
            before = {tree.label: sum(tree.cpu_by_pid().values()) for tree in trees}
            time.sleep(QUIET_WINDOW_S)
            busy = [tree.label for tree in trees
                    if sum(tree.cpu_by_pid().values()) - before[tree.label]
                    > QUIET_FRACTION * target.limits[tree.label].cores * QUIET_WINDOW_S]
            if not busy:
                break
        return time.monotonic() - started


class ScalingHarness(Harness):
    """The searches against one `ScalingTarget` per `FarmShape`, in order."""

    bench_class = ScalingBench
    search_growth = 1.5  # searches start near the expected limit (N x the 1-node max)

    def __init__(self, settings: Settings, out: Path, log: Callable[[str], None], shapes: Sequence[FarmShape],
                 cgroup_root: Path = CGROUP_CPU) -> None:
        super().__init__(settings, out, log, lambda _text, _frac: None)
        self.shapes = list(shapes)
        self.cgroup_root = cgroup_root
        self.searches_left = sum(len(shape.kinds) for shape in self.shapes) if settings.search else 0
        self.throttled_ms: dict[str, dict[str, dict[str, int]]] = {}  # by target, then by run's raw directory
        self.machine_cpu: dict[str, dict[str, dict[str, float]]] = {}

    def targets(self) -> Iterator[Callable[[], Target]]:
        for shape in self.shapes:
            yield functools.partial(ScalingTarget, self.out / "raw" / shape.name, self.users, shape=shape,
                                    workers=self.settings.workers, env=self.env, cgroup_root=self.cgroup_root)

    def run_target(self, target: Target) -> TargetResult:
        self.log(f"{target.name}: {target.nodes} node(s), {target.note}")
        if isinstance(target, ScalingTarget):  # the balancer's farm: calls only
            self.settings = replace(self.settings, kinds=target.shape.kinds)
        try:
            return super().run_target(target)
        finally:
            if isinstance(target, ScalingTarget):
                self.throttled_ms[target.name] = target.throttled_ms
                self.machine_cpu[target.name] = target.machine_cpu

    def _start_rate(self, kind: str, default: float, target: Target) -> float:
        """Near the expected limit: 0.8 x N x the 1-node max for the curve, 1.5 x the node's
        rate per core times the balancer's quota for the balancer (guesses: the search goes up or down)."""
        one = next((r for r in self.results if r.name == self.shapes[0].name and not r.error), None)
        base = (one.register_max if kind == "register" else one.call_max) if one else None
        if not base or not isinstance(target, ScalingTarget):
            return default
        first = self.shapes[0]
        if target.shape.role == "balancer" and first.node_cpu > 0:
            return max(1.0, round(1.5 * base / first.nodes / first.node_cpu * target.shape.balancer_cpu))
        return max(1.0, round(0.8 * base * target.nodes / first.nodes))


# -- summary --------------------------------------------------------------------------------------


def _per(ops: int, cpu_s: float | None) -> float | None:
    return round(ops / cpu_s, 1) if cpu_s and ops else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def utilisation(run: Mapping[str, Any], shape: FarmShape, throttled: Mapping[str, int],
                machine: Mapping[str, float] | None) -> dict[str, Any]:
    """CPU each role used in one run against its limit (its quota, or one core for the busiest
    process of an unlimited role); the role nearest its limit is the one that saturated."""
    roles: dict[str, Any] = {}
    for label, pct in run["cpu_pct"].items():
        quota = (shape.node_cpu if label.startswith("node") else shape.balancer_cpu if label == "balancer" else 0.0)
        # an unlimited role: its busiest process against one core (a process uses one at most)
        of_limit = pct / (100 * quota) if quota > 0 else run["hottest_pct"].get(label, pct) / 100
        roles[label] = {
            "cpu_pct": pct,
            "quota_cores": quota or None,
            "of_limit_pct": round(100 * of_limit, 1),
            "throttled_ms": throttled.get(label),
        }
    ranked = sorted(roles, key=lambda k: roles[k]["of_limit_pct"], reverse=True)
    return {
        "rate": run["target_rate"],
        "roles": roles,
        "nearest_limit": ranked[0] if ranked else None,
        "machine": dict(machine) if machine else None,
    }


def farm_row(t: Mapping[str, Any], shape: FarmShape, throttled: Mapping[str, Mapping[str, int]],
             machine: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": shape.name, "role": shape.role, "run": shape.run, "nodes": shape.nodes, "node_cpu": shape.node_cpu,
        "balancer_cpu": shape.balancer_cpu, "error": t["error"],
    }
    for kind in KINDS:
        best = t["best"].get(kind) if not t["error"] else None
        failure = t["first_failure"].get(kind) if not t["error"] else None
        entry: dict[str, Any] = {
            "max_rate": t["max_rate"][kind] if kind in shape.kinds and not t["error"] else None,
            "first_failing_rate": failure and failure["target_rate"],
            "stopped_by": t["stopped_by"][kind],
            "p50_ms": None, "p95_ms": None, "p99_ms": None,
            "per_node_cpu_s": None, "per_balancer_cpu_s": None,
            "at_max": None, "at_first_failure": None,
        }
        if best is not None and kind in shape.kinds:
            node_cpu = sum(v for k, v in best["cpu_s"].items() if k.startswith("node"))
            entry.update(
                p50_ms=best["p50_ms"], p95_ms=best["p95_ms"], p99_ms=best["p99_ms"],
                # per node: all nodes' work over all nodes' CPU (the same per node at N nodes)
                per_node_cpu_s=_per(best["succeeded"], node_cpu),
                per_balancer_cpu_s=_per(best["succeeded"], best["cpu_s"].get("balancer")),
                at_max=utilisation(best, shape, throttled.get(best["raw_dir"], {}), machine.get(best["raw_dir"])),
            )
        if failure is not None and kind in shape.kinds:
            entry["at_first_failure"] = utilisation(failure, shape, throttled.get(failure["raw_dir"], {}),
                                                    machine.get(failure["raw_dir"]))
        row[kind] = entry
    return row


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def curve(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per kind: for each N, the median over runs of the max (and each run's), linear (N x the
    1-node median per node) and their ratio; each run's ratio to its own 1-node max beside it."""
    farms = [r for r in rows if r["role"] == "curve" and not r["error"]]
    counts = sorted({r["nodes"] for r in farms})
    out: dict[str, Any] = {}
    for kind in KINDS:
        by_n = {n: [r for r in farms if r["nodes"] == n] for n in counts}
        medians = {n: _median([r[kind]["max_rate"] for r in by_n[n] if r[kind]["max_rate"]]) for n in counts}
        base_n = next((n for n in counts if medians[n]), None)
        per_node = medians[base_n] / base_n if base_n and medians[base_n] else None
        base_by_run = {r["run"]: r[kind]["max_rate"] / r["nodes"] for r in by_n.get(base_n or 0, [])
                       if r[kind]["max_rate"]}
        points = []
        for n in counts:
            linear = round(per_node * n, 1) if per_node else None
            rates = [r[kind]["max_rate"] for r in by_n[n]]
            known = [v for v in rates if v]
            points.append({
                "nodes": n, "max_rate": medians[n], "linear": linear, "efficiency": _ratio(medians[n], linear),
                "by_run": rates, "min": min(known, default=None), "max": max(known, default=None),
                "efficiency_by_run": [_ratio(r[kind]["max_rate"], base_by_run[r["run"]] * n)
                                      if r["run"] in base_by_run else None for r in by_n[n]],
            })
        effs = [p["efficiency"] for p in points if p["nodes"] > 1]
        out[kind] = {
            "points": points,
            "min_efficiency": min((e or 0.0 for e in effs), default=None),
            "meets_target": bool(effs) and all((e or 0.0) >= TARGET_EFFICIENCY for e in effs),
        }
    return out


def balancer_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per run, calls per balancer CPU-s (the balancer held to its quota) / calls per node CPU-s
    (the curve farms of the same run, their nodes held to theirs); the median over runs."""
    per_run = [f for f in (_balancer_run(rows, run) for run in sorted({r["run"] for r in rows})) if f is not None]
    if not per_run:
        return None
    ok = [f for f in per_run if f["ratio"] is not None]
    ratio = _median([f["ratio"] for f in ok])
    return {
        **per_run[0],
        "calls_per_s": _median([f["calls_per_s"] for f in per_run if f["calls_per_s"]]),
        "calls_per_balancer_cpu_s": _median([f["calls_per_balancer_cpu_s"] for f in ok]),
        "calls_per_node_cpu_s": _median([f["calls_per_node_cpu_s"] for f in ok]),
        "ratio": ratio,
        "ratio_min": min((f["ratio"] for f in ok), default=None),
        "ratio_max": max((f["ratio"] for f in ok), default=None),
        "meets_target": ratio is not None and ratio >= TARGET_BALANCER_RATIO,
        "runs": per_run,
    }


def _balancer_run(rows: Sequence[Mapping[str, Any]], run: int) -> dict[str, Any] | None:
    """The node's figure: the median over the run's curve farms at their call max (each node
    at its quota there; one farm alone moves with the machine's load)."""
    lb = next((r for r in rows if r["role"] == "balancer" and r["run"] == run), None)
    nodes = [r for r in rows if r["role"] == "curve" and r["run"] == run and not r["error"]
             and r["call"]["per_node_cpu_s"]]
    if lb is None:
        return None
    per_lb = lb["call"]["per_balancer_cpu_s"] if not lb["error"] else None
    per_node = _median([r["call"]["per_node_cpu_s"] for r in nodes])
    ratio = _ratio(per_lb, per_node)
    return {
        "run": run, "farm": lb["name"], "balancer_cpu": lb["balancer_cpu"], "nodes": lb["nodes"],
        "error": lb["error"],
        "calls_per_s": lb["call"]["max_rate"], "first_failing_rate": lb["call"]["first_failing_rate"],
        "calls_per_balancer_cpu_s": per_lb,
        "node_farms": [r["name"] for r in nodes],
        "calls_per_node_cpu_s_by_farm": [r["call"]["per_node_cpu_s"] for r in nodes],
        "calls_per_node_cpu_s": per_node,
        "ratio": ratio,
        "meets_target": ratio is not None and ratio >= TARGET_BALANCER_RATIO,
        "at_max": lb["call"]["at_max"],
        "at_first_failure": lb["call"]["at_first_failure"],
    }


def build_summary(*, settings: Settings, machine: Mapping[str, Any], results: Sequence[TargetResult],
                  shapes: Sequence[FarmShape], throttled: Mapping[str, Mapping[str, Mapping[str, int]]],
                  machine_cpu: Mapping[str, Mapping[str, Mapping[str, float]]], notes: Sequence[str],
                  command: str, elapsed_s: float, interrupted: bool, started_utc: str) -> dict[str, Any]:
    from benchmarks import report  # noqa: PLC0415

    targets = {r.name: report.target_summary(r) for r in results}
    rows = [farm_row(targets[s.name], s, throttled.get(s.name, {}), machine_cpu.get(s.name, {}))
            for s in shapes if s.name in targets]
    return {
        "schema": 1,
        "kind": "scaling",
        "command": command,
        "started_utc": started_utc,
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "machine": dict(machine),
        "settings": asdict(settings),
        "shapes": [asdict(s) for s in shapes],
        "farms": rows,
        "curve": curve(rows),
        "balancer": balancer_figures(rows),
        "targets": targets,
        "notes": list(notes),
    }


def _f(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _limits(u: Mapping[str, Any] | None) -> str:
    """`node1 98% of 0.1 core (throttled 1,200 ms), balancer 41%...`, nearest its limit first."""
    if not u:
        return "-"
    parts = []
    for label, r in sorted(u["roles"].items(), key=lambda kv: -kv[1]["of_limit_pct"]):
        if label.startswith("sipp-uac") and r["of_limit_pct"] < 20:
            continue
        limit = f"{r['quota_cores']:g} core" if r["quota_cores"] else "1 core"
        throttled = f", throttled {r['throttled_ms']:,} ms" if r["throttled_ms"] else ""
        parts.append(f"{label} {r['of_limit_pct']:.0f}% of {limit}{throttled}")
    machine = u.get("machine")
    if machine:
        parts.append(f"machine {machine['busy_pct']:.0f}% of {machine['cores'] * 100}% "
                     f"(others {machine['other_pct']:.0f}%)")
    return "; ".join(parts)


def markdown(summary: Mapping[str, Any]) -> str:
    m, s = summary["machine"], summary["settings"]
    shapes = summary["shapes"]
    node_cpu = next((sh["node_cpu"] for sh in shapes if sh["role"] == "curve"), 0.0)
    lb = summary["balancer"]
    runs = max((sh["run"] for sh in shapes), default=1)
    points = {kind: {p["nodes"]: p for p in summary["curve"][kind]["points"]} for kind in KINDS}
    lines = [
        "# sipfarm scaling: max calls/s and REGISTER/s for N nodes of a fixed CPU quota each, against linear",
        "",
        f"`{summary['command']}`, {summary['started_utc']} UTC, {summary['elapsed_s']:.0f} s"
        + (" **(interrupted)**" if summary["interrupted"] else ""),
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, SIPp {m.get('sipp')}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. sipfarm build: "
        f"{s['build_used']}; {s['workers']} worker(s) per node, {s['users']:,} users, hold {s['hold_ms']} ms, "
        f"steps of {s['step_s']:g} s, precision {s['precision']:g}.",
        "",
        f"Each node process is held to **{node_cpu:g} core** by a cgroup v1 CPU quota (`cpu.cfs_quota_us`, "
        "period 10 ms); the balancer, Redis and SIPp run without a quota. Each farm is fresh; max = the "
        "highest step with < 1% failed, >= 90% of the offered rate sent and completed"
        + (f", p99 <= {s['max_p99_ms']:g} ms" if s.get("max_p99_ms") else "")
        + " (in brackets the lowest failing step above it). Linear = N x the 1-node max; "
        f"target >= {TARGET_EFFICIENCY:g} x linear.",
        "",
        f"Runs: {runs} (each every farm in turn, one run after the other); figures are the median over runs, "
        "min-max in brackets.",
        "",
        "| nodes | calls/s | linear | x linear | x linear, each run | REGISTER/s | linear | x linear "
        "| x linear, each run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in points["call"]:
        cells = [str(n)]
        for kind in ("call", "register"):
            p = points[kind][n]
            spread = f" ({_f(p['min'])}-{_f(p['max'])})" if runs > 1 and p["min"] is not None else ""
            cells += [_f(p["max_rate"]) + spread, _f(p["linear"]), _f(p["efficiency"], ".2f"),
                      " / ".join(_f(e, ".2f") for e in p["efficiency_by_run"])]
        lines.append("| " + " | ".join(cells) + " |")
    c = summary["curve"]
    lines += [
        "",
        f"Lowest x linear above 1 node (medians): calls {_f(c['call']['min_efficiency'], '.2f')}, "
        f"REGISTER {_f(c['register']['min_efficiency'], '.2f')} (target {TARGET_EFFICIENCY:g}: "
        f"calls {'met' if c['call']['meets_target'] else 'not met'}, "
        f"REGISTER {'met' if c['register']['meets_target'] else 'not met'}).",
        "",
        "Every farm (in brackets the lowest failing step above the max):",
        "",
        "| farm | nodes | calls/s | REGISTER/s | call p50/p99 ms | REG p50/p99 ms | calls per node CPU-s "
        "| calls per balancer CPU-s | REG per node CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["farms"]:
        if row["error"]:
            lines.append(f"| {row['name']} | {row['nodes']} | failed: {row['error'].splitlines()[0][:80]} ||||||")
            continue
        cells = [row["name"], str(row["nodes"])]
        for kind in ("call", "register"):
            e = row[kind]
            fail = e["first_failing_rate"]
            cells.append(_f(e["max_rate"]) + (f" ({fail:,.0f})" if fail and e["max_rate"] is not None else ""))
        for kind in ("call", "register"):
            cells.append(f"{_f(row[kind]['p50_ms'])}/{_f(row[kind]['p99_ms'])}")
        cells += [_f(row["call"]["per_node_cpu_s"]), _f(row["call"]["per_balancer_cpu_s"]),
                  _f(row["register"]["per_node_cpu_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if lb is not None:
        each = ", ".join(f"run {f['run']}: {_f(f['calls_per_s'])} calls/s, {_f(f['calls_per_balancer_cpu_s'])} "
                         f"vs {_f(f['calls_per_node_cpu_s'])} = {_f(f['ratio'], '.2f')} x" for f in lb["runs"])
        lines += [
            "## The balancer alone",
            "",
            f"{lb['nodes']} nodes without a quota, the balancer held to **{lb['balancer_cpu']:g} core**; calls per "
            "balancer CPU-s (successful calls / the balancer's CPU seconds at its max step) against calls per node "
            "CPU-s (the median over the same run's farms above, each at its call max, nodes at their quota): "
            + (f"max **{_f(lb['calls_per_s'])} calls/s**, **{_f(lb['calls_per_balancer_cpu_s'])} calls per balancer "
               f"CPU-s** against {_f(lb['calls_per_node_cpu_s'])} per node CPU-s: **{_f(lb['ratio'], '.2f')} x** "
               f"(target {TARGET_BALANCER_RATIO:g} x: {'met' if lb['meets_target'] else 'not met'})"
               if lb["ratio"] is not None else "not measured")
            + (f". Each run: {each}." if runs > 1 else "."),
            "",
        ]
    lines += ["## Which process saturated", "",
              "CPU per role against its limit (its quota; one core for the busiest process of an unlimited role), "
              "nearest first, at each farm's max and at the first failing step above it; *machine* is the whole "
              "machine's CPU during the step, *others* what processes outside the farm and SIPp used.", ""]
    for row in summary["farms"]:
        if row["error"]:
            continue
        for kind in KINDS:
            e = row[kind]
            if e["at_max"] is None:
                continue
            lines.append(f"- {row['name']} {kind} at {_f(e['max_rate'])}/s: {_limits(e['at_max'])}")
            if e["at_first_failure"] is not None:
                lines.append(f"  - failing at {_f(e['first_failing_rate'])}/s: {_limits(e['at_first_failure'])}")
    lines.append("")
    if summary.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in summary["notes"]), ""]
    lines += ["Raw SIPp statistics: `raw/<farm>/<NNN-step>/`. The curve: `scaling.png`.", ""]
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    node_cpu = next((sh["node_cpu"] for sh in summary["shapes"] if sh["role"] == "curve"), 0.0)
    for ax, kind, title in ((axes[0], "call", "calls/s"), (axes[1], "register", "REGISTER/s (digest)")):
        points = [p for p in summary["curve"][kind]["points"] if p["max_rate"]]
        xs = [p["nodes"] for p in points]
        if points and points[0]["linear"]:
            top = max(xs)
            per_node = points[0]["linear"] / points[0]["nodes"]
            ax.plot([0, top], [0, per_node * top], "-", color="grey", label="linear (N x 1 node)")
            ax.plot([0, top], [0, TARGET_EFFICIENCY * per_node * top], ":", color="grey",
                    label=f"{TARGET_EFFICIENCY:g} x linear")
        runs = max((len(p["by_run"]) for p in points), default=1)
        ax.plot(xs, [p["max_rate"] for p in points], "o-", color="C0",
                label="sipfarm, measured" + (f" (median of {runs} runs)" if runs > 1 else ""))
        if runs > 1:
            each = [(p["nodes"], v) for p in points for v in p["by_run"] if v]
            ax.scatter([x for x, _ in each], [v for _, v in each], marker="_", s=120, color="C0", alpha=0.6,
                       label="each run")
        for p in points:
            if p["efficiency"] is not None and p["nodes"] > 1:
                ax.annotate(f"{p['efficiency']:.2f}x", (p["nodes"], p["max_rate"]), textcoords="offset points",
                            xytext=(6, -12), fontsize="small")
        ax.set_title(f"max {title} vs nodes ({node_cpu:g} core each)")
        ax.set_xlabel("nodes behind one balancer")
        p99 = summary["settings"]["max_p99_ms"]
        ax.set_ylabel("max sustained rate (< 1% failed" + (f", p99 <= {p99:g} ms)" if p99 else ")"))
        ax.set_xticks(xs or [1])
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    ax = axes[2]
    lb = summary["balancer"]
    if lb is not None and not lb["error"]:
        values = [lb["calls_per_node_cpu_s"] or 0, lb["calls_per_balancer_cpu_s"] or 0]
        ax.bar(["node", "balancer"], values, color=["C0", "C1"])
        for i, key in enumerate(("calls_per_node_cpu_s", "calls_per_balancer_cpu_s")):
            each = [f[key] for f in lb["runs"] if f[key]]
            if len(each) > 1:
                ax.scatter([i] * len(each), each, marker="_", s=300, color="black", alpha=0.6)
        if lb["calls_per_node_cpu_s"]:
            ax.axhline(TARGET_BALANCER_RATIO * lb["calls_per_node_cpu_s"], linestyle=":", color="grey",
                       label=f"{TARGET_BALANCER_RATIO:g} x node (target)")
            ax.legend(fontsize="small")
        ratio = f"{lb['ratio']:.2f}" if lb["ratio"] else "-"
        if lb.get("ratio_min") is not None and len(lb["runs"]) > 1:
            ratio += f" ({lb['ratio_min']:.2f}-{lb['ratio_max']:.2f})"
        ax.set_title(f"calls per CPU-second\nbalancer {ratio} x node")
        ax.set_ylabel("successful calls / CPU-s at the max step")
        ax.grid(alpha=0.3, axis="y")
    else:
        ax.set_axis_off()
    m = summary["machine"]
    fig.suptitle(f"sipfarm scaling, {m['nproc']} CPUs, {summary['started_utc']} UTC ({summary['settings']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def headline(summary: Mapping[str, Any]) -> list[str]:
    out = []
    for kind, label in (("call", "calls/s"), ("register", "REGISTER/s")):
        pts = summary["curve"][kind]["points"]
        out.append(f"{label}: " + ", ".join(
            f"{p['nodes']}n {_f(p['max_rate'])}" + (f" ({_f(p['efficiency'], '.2f')}x)" if p["nodes"] > 1 else "")
            for p in pts))
    lb = summary["balancer"]
    if lb is not None:
        out.append(f"balancer: {_f(lb['calls_per_balancer_cpu_s'])} calls per CPU-s, node "
                   f"{_f(lb['calls_per_node_cpu_s'])}: {_f(lb['ratio'], '.2f')}x")
    return out


def write(out: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    paths = {"json": out / "scaling.json", "markdown": out / "scaling.md", "plot": out / "scaling.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(summary))
    plot(summary, paths["plot"])
    return paths


# -- entry point ----------------------------------------------------------------------------------


def scaling_settings(args: argparse.Namespace, args_list: Sequence[str] = ()) -> Settings:
    """The SIP benchmark's settings with the curve's node counts and searches sized for 7
    searches: quick ~6 minutes, full ~20."""
    settings = settings_from(args)
    mode = settings.mode
    nodes = args.nodes or ((1, 2) if mode == "tiny" else DEFAULT_NODES)
    searches = (2 * len(nodes) + 1) * max(1, args.scaling_runs)
    return replace(
        settings,
        nodes=nodes,
        kamailio=False,
        kamailio_redis=False,
        # quick: 4 s steps, not 3: a step fails below 90% of its rate completed, and on a loaded
        # machine SIPp's exit alone can take 0.3 s; more calls a step also steady the p99
        step_s=args.step_s or {"full": 5.0, "quick": 4.0, "tiny": 2.0}[mode],
        search_budget_s=args.search_budget_s or {"full": 100.0, "quick": 50.0, "tiny": 0.0}[mode],
        total_budget_s={"full": 120.0 * searches, "quick": 55.0 * searches, "tiny": 0.0}[mode],
        precision={"full": 0.05, "quick": 0.1, "tiny": 0.5}[mode],
        # everyone registered once at a rate one node at 0.1 core sustains
        register_all_rate=min(settings.register_all_rate, 250.0),
        max_p99_ms=settings.max_p99_ms if "--max-p99-ms" in args_list else MAX_P99_MS,
    )


def scaling_main(args: argparse.Namespace, args_list: Sequence[str]) -> int:
    """`sipfarm bench --scaling`: results/<timestamp>/scaling.json, scaling.md and scaling.png."""
    missing = [tool for tool in ("sipp", "redis-server") if shutil.which(tool) is None]
    if missing:
        print(f"sipfarm bench: --scaling needs {' and '.join(missing)} (apt-get install sip-tester redis-server)",
              file=sys.stderr)
        return EXIT_MISSING_TOOL
    if (reason := CpuLimit.unavailable()) is not None:
        print(f"sipfarm bench: --scaling gives each node a CPU quota and cannot here: {reason}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    node_cpu: float = args.scaling_node_cpu
    balancer_cpu: float = args.scaling_balancer_cpu
    if not 0 < node_cpu <= 1 or not 0 <= balancer_cpu <= 1:
        print("sipfarm bench: --scaling-node-cpu must be in (0, 1], --scaling-balancer-cpu in [0, 1]",
              file=sys.stderr)
        return EXIT_MISSING_TOOL
    settings = scaling_settings(args, args_list)
    run = ModeRun.start(settings, args.out)
    if run is None:
        return EXIT_MISSING_TOOL
    settings, out, machine, started = run.settings, run.out, run.machine, run.started
    shapes = farm_shapes(settings.nodes, node_cpu, balancer_cpu, KINDS, runs=max(1, args.scaling_runs))
    shares: int = args.scaling_shares if args.scaling_shares is not None else (
        0 if settings.mode == "tiny" else DEFAULT_SHARES)
    # Weighted up, this process and everything it starts (Redis, balancer, nodes, SIPp) are one
    # group; each node's quota group is nested in it.
    priority = CpuLimit("sipfarm-scaling-bench", 0, shares=shares) if shares > 0 else None
    harness = ScalingHarness(settings, out, mode_log, shapes, priority.path if priority else CGROUP_CPU)
    harness.notes.extend(run.build_note())
    cores = machine.get("nproc") or 1
    need = max(settings.nodes) * node_cpu
    harness.notes.append(
        f"{max(settings.nodes)} nodes x {node_cpu:g} core = {need:g} of {cores} cores; the rest is for the "
        "balancer, Redis, both SIPp and anything else on the machine")
    if priority is not None:
        harness.notes.append(
            f"the benchmark and every process it started ran in one cgroup of cpu.shares {shares} (an ordinary "
            "process weighs 1024), so that other load on the machine does not take the nodes' quota from them")
    with priority or contextlib.nullcontext():
        if priority is not None:
            priority.add(os.getpid())
        results, interrupted = ModeRun.guarded(harness.run, lambda: harness.results)
    summary = build_summary(
        settings=settings, machine=machine, results=results, shapes=shapes, throttled=harness.throttled_ms,
        machine_cpu=harness.machine_cpu, notes=harness.notes, command="sipfarm bench " + " ".join(args_list),
        elapsed_s=time.monotonic() - started, interrupted=interrupted, started_utc=run.started_utc,
    )
    paths = write(out, summary)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    for line in headline(summary):
        print(line)
    if interrupted:
        return EXIT_INTERRUPTED
    if not results or any(r.error for r in results):
        return EXIT_FAILED
    return EXIT_OK
