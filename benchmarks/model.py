"""Capacity model: from measured per-process figures to the size of a large farm.

Theory of operation. A benchmark measures, for each sipfarm component, how much work one
CPU-second does: registrations and calls per CPU-second of the node processes and of the
balancer, Redis commands per REGISTER and per call (INFO commandstats deltas, commands run
inside Lua scripts included) and Redis commands per Redis CPU-second, and Redis memory per
registered user. CPU-seconds per unit of work are additive, so a workload (REG/s + calls/s)
needs `reg_rate / regs_per_cpu_s + call_rate / calls_per_cpu_s` cores of each component.
Nodes scale out; a balancer process and a Redis shard are single-threaded, so each of those
is sized in cores of one process. The first bottleneck is the single-instance component with
the least headroom when the farm is scaled by adding nodes.

    .venv/bin/python -m benchmarks.model results/<timestamp>/summary.json
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Workload:
    users: int = 1_000_000
    register_interval_s: float = 3600.0
    register_peak_factor: float = 3.0
    """Peak over average REGISTER rate: clustered refreshes (morning, after a network flap)."""
    busy_hour_cps: float = 500.0
    target_utilisation: float = 0.6
    """Of a core, per process, at the peak: headroom for bursts, GC and one failed instance."""
    redis_memory_per_shard_gb: float = 8.0

    @property
    def average_reg_rate(self) -> float:
        return self.users / self.register_interval_s

    @property
    def peak_reg_rate(self) -> float:
        return self.average_reg_rate * self.register_peak_factor


@dataclass(frozen=True, slots=True)
class Measured:
    """Per-CPU-second figures of one benchmark run (sipfarm, 1 node)."""

    source: str
    node_regs_per_cpu_s: float
    node_calls_per_cpu_s: float
    balancer_regs_per_cpu_s: float | None
    balancer_calls_per_cpu_s: float | None
    redis_cmds_per_register: float | None
    redis_cmds_per_call: float | None
    redis_cmds_per_cpu_s: float | None
    redis_bytes_per_user: float | None
    workers_per_node: int = 1
    kamailio_regs_per_cpu_s: float | None = None
    kamailio_calls_per_cpu_s: float | None = None


@dataclass(frozen=True, slots=True)
class Component:
    name: str
    cores: float
    """Cores of CPU the workload needs from this component, at the peak."""
    instances: int
    scales_out: bool
    headroom: float | None
    """For a single instance: how many times the workload it could carry at 100% of one core."""


@dataclass(frozen=True, slots=True)
class Projection:
    workload: Workload
    measured: Measured
    reg_rate: float
    call_rate: float
    components: tuple[Component, ...]
    redis_memory_gb: float | None
    redis_ops_per_s: float | None
    first_bottleneck: str
    kamailio_cores: float | None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["workload"]["average_reg_rate"] = round(self.workload.average_reg_rate, 1)
        out["workload"]["peak_reg_rate"] = round(self.workload.peak_reg_rate, 1)
        return out


def _cores(reg_rate: float, call_rate: float, per_reg: float | None, per_call: float | None) -> float | None:
    if not per_reg or not per_call:
        return None
    return reg_rate / per_reg + call_rate / per_call


def project(measured: Measured, workload: Workload | None = None) -> Projection:
    w = workload or Workload()
    reg, cps = w.peak_reg_rate, w.busy_hour_cps
    # Both peaks at once: the conservative case (a re-registration storm in the busy hour).
    util = w.target_utilisation
    components: list[Component] = []
    node_cores = reg / measured.node_regs_per_cpu_s + cps / measured.node_calls_per_cpu_s
    per_node = util * measured.workers_per_node
    components.append(Component("node", round(node_cores, 2), math.ceil(node_cores / per_node) + 1, True, None))
    bal = _cores(reg, cps, measured.balancer_regs_per_cpu_s, measured.balancer_calls_per_cpu_s)
    if bal is not None:
        # One balancer process is one core; a second one for availability (DNS SRV / VIP).
        components.append(Component("balancer", round(bal, 2), max(2, math.ceil(bal / util) + 1), False,
                                    round(1 / bal, 2) if bal else None))
    ops: float | None = None
    if measured.redis_cmds_per_register is not None and measured.redis_cmds_per_call is not None:
        ops = reg * measured.redis_cmds_per_register + cps * measured.redis_cmds_per_call
    mem_gb = (w.users * measured.redis_bytes_per_user / 1e9) if measured.redis_bytes_per_user else None
    if ops is not None and measured.redis_cmds_per_cpu_s:
        redis_cores = ops / measured.redis_cmds_per_cpu_s
        shards = max(math.ceil(redis_cores / util), 1)
        if mem_gb is not None:
            shards = max(shards, math.ceil(mem_gb / w.redis_memory_per_shard_gb))
        components.append(Component("redis shard", round(redis_cores, 2), shards, False,
                                    round(1 / redis_cores, 2) if redis_cores else None))
    single = [c for c in components if not c.scales_out and c.headroom is not None]
    if single:
        first = min(single, key=lambda c: c.headroom or math.inf)
        first_text = (f"{first.name}: one instance carries {first.headroom:g}x this workload at 100% of a core; "
                      "nodes scale out, so it is the first limit of a farm with one of it")
    else:
        first_text = "nodes (no balancer/Redis figures measured)"
    kam = _cores(reg, cps, measured.kamailio_regs_per_cpu_s, measured.kamailio_calls_per_cpu_s)
    return Projection(w, measured, round(reg, 1), cps, tuple(components),
                      round(mem_gb, 2) if mem_gb is not None else None,
                      round(ops) if ops is not None else None, first_text,
                      round(kam, 2) if kam is not None else None)


def _get(d: Mapping[str, Any], *path: str) -> Any:
    cur: Any = d
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def measured_from_summary(summary: Mapping[str, Any]) -> Measured | None:
    """Figures of the 1-node sipfarm run (else the smallest farm measured) of a summary.json."""
    targets: Mapping[str, Any] = summary.get("targets", {})
    farms = sorted((t for t in targets.values() if t.get("kind") == "sipfarm" and not t.get("error")),
                   key=lambda t: t.get("nodes", 0))
    if not farms:
        return None
    farm = farms[0]
    node_reg = _get(farm, "efficiency", "register", "per_server_cpu_s")
    node_call = _get(farm, "efficiency", "call", "per_server_cpu_s")
    if not node_reg or not node_call:
        return None
    kam = targets.get("kamailio", {})
    return Measured(
        source=str(farm.get("name")),
        node_regs_per_cpu_s=float(node_reg),
        node_calls_per_cpu_s=float(node_call),
        balancer_regs_per_cpu_s=_get(farm, "efficiency", "register", "per_role_cpu_s", "balancer"),
        balancer_calls_per_cpu_s=_get(farm, "efficiency", "call", "per_role_cpu_s", "balancer"),
        redis_cmds_per_register=_get(farm, "efficiency", "register", "redis_cmds_per_op"),
        redis_cmds_per_call=_get(farm, "efficiency", "call", "redis_cmds_per_op"),
        redis_cmds_per_cpu_s=_get(farm, "efficiency", "register", "redis_cmds_per_redis_cpu_s"),
        redis_bytes_per_user=_get(farm, "redis", "bytes_per_user_total"),
        workers_per_node=int(farm.get("workers", 1)),
        kamailio_regs_per_cpu_s=_get(kam, "efficiency", "register", "per_server_cpu_s"),
        kamailio_calls_per_cpu_s=_get(kam, "efficiency", "call", "per_server_cpu_s"),
    )


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def to_markdown(p: Projection) -> str:
    w, m = p.workload, p.measured
    lines = [
        f"Workload: {w.users:,} registered users re-registering every {w.register_interval_s:g} s "
        f"({w.average_reg_rate:,.0f} REG/s average, peak factor {w.register_peak_factor:g} -> "
        f"**{p.reg_rate:,.0f} REG/s**) and **{p.call_rate:,.0f} calls/s** in the busy hour, both at once.",
        "",
        f"From `{m.source}`: node {_fmt(m.node_regs_per_cpu_s)} REG and {_fmt(m.node_calls_per_cpu_s)} calls "
        f"per CPU-s; balancer {_fmt(m.balancer_regs_per_cpu_s)} REG and {_fmt(m.balancer_calls_per_cpu_s)} calls "
        f"per CPU-s; Redis {_fmt(m.redis_cmds_per_register, '.1f')} commands per REGISTER, "
        f"{_fmt(m.redis_cmds_per_call, '.1f')} per call, {_fmt(m.redis_cmds_per_cpu_s)} commands per CPU-s, "
        f"{_fmt(m.redis_bytes_per_user)} bytes per user (account + binding).",
        "",
        "| component | cores at peak | instances | note |",
        "|---|---|---|---|",
    ]
    for c in p.components:
        if c.scales_out:
            note = (f"{m.workers_per_node} worker(s) per node at {w.target_utilisation:.0%} of a core, "
                    "+1 for failure")
        else:
            per = ("per process (`sipfarm balancer --workers N` or more balancers add processes)"
                   if c.name == "balancer" else "single-threaded")
            note = (f"{per}; {w.target_utilisation:.0%} target, headroom {c.headroom:g}x per instance"
                    if c.headroom is not None else "")
        lines.append(f"| {c.name} | {c.cores:g} | {c.instances} | {note} |")
    if p.redis_memory_gb is not None:
        lines.append(f"| Redis memory | {p.redis_memory_gb:g} GB | | "
                     f"at most {w.redis_memory_per_shard_gb:g} GB a shard |")
    lines += ["", f"Redis load at peak: {_fmt(p.redis_ops_per_s)} commands/s. First bottleneck: {p.first_bottleneck}."]
    if p.kamailio_cores is not None:
        lines.append(f"Kamailio (measured per CPU-s) would need {p.kamailio_cores:g} cores for the same workload.")
    lines += [
        "",
        "Assumptions: CPU per operation is constant (measured at the highest sustained rate on this machine, "
        "which is shared and noisy); the peak REGISTER rate and the busy hour coincide; every REGISTER "
        "is a digest round trip (401 then 200, no nonce reuse) and every call is challenged once (407); "
        "Redis commands counted by INFO commandstats include those run inside Lua scripts; no TCP/TLS, "
        "NAT keep-alives, presence or media relay; Redis shards split the keyspace evenly (hash tags per "
        "AOR) and a replica per shard is not counted.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.model results/<timestamp>/summary.json", file=sys.stderr)
        return 2
    summary = json.loads(Path(args[0]).read_text())
    measured = measured_from_summary(summary)
    if measured is None:
        print("benchmarks.model: the summary has no complete sipfarm run to project from", file=sys.stderr)
        return 1
    print(to_markdown(project(measured)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
