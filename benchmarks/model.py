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

    .venv/bin/python -m benchmarks.model results/<timestamp>/summary.json \\
        [--users 10000000] [--media results/<t>/media.json] [--keepalives N]

Beyond signalling it sizes the relays (RTP packets/s of the calls up at the busy hour over the
relay's packets per CPU-second) and the balancers' share of NAT keep-alives and connections.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

DEFAULT_USERS = 1_000_000


@dataclass(frozen=True, slots=True)
class Workload:
    users: int = DEFAULT_USERS
    register_interval_s: float = 3600.0
    register_peak_factor: float = 3.0
    """Peak over average REGISTER rate: clustered refreshes (morning, after a network flap)."""
    calls_per_user_busy_hour: float = 1.8
    """Call attempts per user in the busy hour (1.8: 500 calls/s for a million users)."""
    mean_hold_s: float = 120.0
    relayed_share: float = 1.0
    """Of calls whose media goes through a relay (sipfarm anchors every call by default)."""
    rtp_pps_each_way: float = 50.0
    """20 ms packetisation (G.711, Opus): 50 packets/s from each phone."""
    udp_share: float = 0.7
    """Of phones on UDP (STUN keep-alive every 24-29 s); the rest hold a TCP, TLS or WebSocket
    connection to a balancer (CRLFCRLF every 95-120 s), RFC 5626 4.4.1."""
    connections_per_balancer: int = 50_000
    """Open connections per balancer process: ``[balancer] max_connections`` raised from its
    default of 10,000 (the file-descriptor limit raised to match; memory per idle connection
    not measured)."""
    target_utilisation: float = 0.6
    """Of a core, per process, at the peak: headroom for bursts, GC and one failed instance."""
    redis_memory_per_shard_gb: float = 8.0
    redis_replicas: int = 2
    """Replicas per Redis Cluster master: two, so that after a failover the promoted master still
    has one and ``[node] replicas_ack = 1`` keeps answering (README, Redis Cluster)."""

    @property
    def average_reg_rate(self) -> float:
        return self.users / self.register_interval_s

    @property
    def peak_reg_rate(self) -> float:
        return self.average_reg_rate * self.register_peak_factor

    @property
    def busy_hour_cps(self) -> float:
        return self.users * self.calls_per_user_busy_hour / 3600.0

    @property
    def concurrent_calls(self) -> float:
        return self.busy_hour_cps * self.mean_hold_s

    @property
    def relay_pps(self) -> float:
        """RTP packets/s the relays receive (and forward) at the busy hour."""
        return self.concurrent_calls * self.relayed_share * 2 * self.rtp_pps_each_way

    @property
    def connections(self) -> float:
        return round(self.users * (1.0 - self.udp_share))

    @property
    def keepalive_rate(self) -> float:
        """NAT keep-alives/s at the balancers: UDP every 26.5 s, connections every 107.5 s on average."""
        return self.users * self.udp_share / 26.5 + self.connections / 107.5


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
    relay_pps_per_cpu_s: float | None = None
    """RTP packets one relay forwards per CPU-second (``sipfarm bench --media``)."""
    keepalives_per_cpu_s: float | None = None
    """STUN keep-alives one balancer answers per CPU-second (``benchmarks.keepalive_cost``)."""


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
        out["workload"]["concurrent_calls"] = round(self.workload.concurrent_calls)
        out["workload"]["relay_pps"] = round(self.workload.relay_pps)
        out["workload"]["keepalive_rate"] = round(self.workload.keepalive_rate)
        return out


def _sig(value: float) -> float:
    """``value`` to 2 significant digits (a headroom of 0.0033 must not print as 0)."""
    return float(f"{value:.2g}")


def _ceil(value: float) -> int:
    """``math.ceil`` that does not turn 500.0000000001 (float noise) into 501."""
    return math.ceil(round(value, 6))


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
    components.append(Component("node", round(node_cores, 2), _ceil(node_cores / per_node) + 1, True, None))
    bal = _cores(reg, cps, measured.balancer_regs_per_cpu_s, measured.balancer_calls_per_cpu_s)
    if bal is not None:
        if measured.keepalives_per_cpu_s:
            bal += w.keepalive_rate / measured.keepalives_per_cpu_s
        # A balancer process is one core; balancers scale out behind DNS SRV or a VIP, at least
        # two for availability, and enough to hold every phone's connection.
        processes = max(2, _ceil(bal / util) + 1, _ceil(w.connections / w.connections_per_balancer))
        components.append(Component("balancer", round(bal, 2), processes, True, _sig(1 / bal) if bal else None))
    if measured.relay_pps_per_cpu_s and w.relay_pps:
        relay_cores = w.relay_pps / measured.relay_pps_per_cpu_s
        components.append(Component("relay", round(relay_cores, 2), _ceil(relay_cores / util) + 1, True,
                                    _sig(1 / relay_cores)))
    ops: float | None = None
    if measured.redis_cmds_per_register is not None and measured.redis_cmds_per_call is not None:
        ops = reg * measured.redis_cmds_per_register + cps * measured.redis_cmds_per_call
    mem_gb = (w.users * measured.redis_bytes_per_user / 1e9) if measured.redis_bytes_per_user else None
    if ops is not None and measured.redis_cmds_per_cpu_s:
        redis_cores = ops / measured.redis_cmds_per_cpu_s
        masters = max(_ceil(redis_cores / util), 1)
        if mem_gb is not None:
            masters = max(masters, _ceil(mem_gb / w.redis_memory_per_shard_gb))
        components.append(Component("redis shard", round(redis_cores, 2), masters * (1 + w.redis_replicas), False,
                                    _sig(1 / redis_cores) if redis_cores else None))
    single = [c for c in components if c.name != "node" and c.headroom is not None]
    if single:
        first = min(single, key=lambda c: c.headroom if c.headroom is not None else math.inf)
        first_text = (f"{first.name}: one process carries {first.headroom:g}x this workload at 100% of a core, "
                      "so it is the first to saturate in a farm with one of it")
    else:
        first_text = "nodes (no balancer/Redis figures measured)"
    kam = _cores(reg, cps, measured.kamailio_regs_per_cpu_s, measured.kamailio_calls_per_cpu_s)
    return Projection(w, measured, round(reg, 1), round(cps, 1), tuple(components),
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
    # The reference of the comparison (qm's when both memory managers ran; summaries without one: "kamailio").
    kam = targets.get(_get(summary, "comparison", "reference") or "kamailio", {})
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
        f"**{p.reg_rate:,.0f} REG/s**) and **{p.call_rate:,.0f} calls/s** in the busy hour "
        f"({w.calls_per_user_busy_hour:g} call attempts per user), both at once; "
        f"{w.concurrent_calls:,.0f} calls up (mean hold {w.mean_hold_s:g} s), "
        f"{w.relayed_share:.0%} of them relayed at {w.rtp_pps_each_way:g} packets/s each way "
        f"(**{w.relay_pps:,.0f} RTP packets/s**); {w.udp_share:.0%} of phones on UDP, "
        f"{w.connections:,.0f} holding a connection; **{w.keepalive_rate:,.0f} NAT keep-alives/s**.",
        "",
        f"From `{m.source}`: node {_fmt(m.node_regs_per_cpu_s)} REG and {_fmt(m.node_calls_per_cpu_s)} calls "
        f"per CPU-s; balancer {_fmt(m.balancer_regs_per_cpu_s)} REG, {_fmt(m.balancer_calls_per_cpu_s)} calls "
        f"and {_fmt(m.keepalives_per_cpu_s)} keep-alives per CPU-s; relay {_fmt(m.relay_pps_per_cpu_s)} packets "
        f"per CPU-s; Redis {_fmt(m.redis_cmds_per_register, '.1f')} commands per REGISTER, "
        f"{_fmt(m.redis_cmds_per_call, '.1f')} per call, {_fmt(m.redis_cmds_per_cpu_s)} commands per CPU-s, "
        f"{_fmt(m.redis_bytes_per_user)} bytes per user (account + binding).",
        "",
        "| component | cores at peak | processes | note |",
        "|---|---|---|---|",
    ]
    for c in p.components:
        if c.name == "node":
            note = (f"{m.workers_per_node} worker(s) per node at {w.target_utilisation:.0%} of a core, "
                    "+1 for failure")
        elif c.name == "balancer":
            note = (f"one core each at {w.target_utilisation:.0%}, +1, at least 2, and at most "
                    f"{w.connections_per_balancer:,} connections each; behind DNS SRV or a VIP")
        elif c.name == "relay":
            note = f"one core each at {w.target_utilisation:.0%}, +1; chosen by load from the membership"
        else:
            masters = c.instances // (1 + w.redis_replicas)
            note = (f"Redis Cluster: {masters} master(s) x (1 + {w.redis_replicas} replicas), single-threaded, "
                    f"{w.target_utilisation:.0%} target, at most {w.redis_memory_per_shard_gb:g} GB each")
        if c.headroom is not None and c.name != "node":
            note += f"; one process carries {c.headroom:g}x the workload"
        lines.append(f"| {c.name} | {c.cores:g} | {c.instances} | {note} |")
    if p.redis_memory_gb is not None:
        lines.append(f"| Redis memory | {p.redis_memory_gb:g} GB | | over the masters (replicas hold as much again) |")
    lines += ["", f"Redis load at peak: {_fmt(p.redis_ops_per_s)} commands/s. First bottleneck: {p.first_bottleneck}."]
    if p.kamailio_cores is not None:
        lines.append(f"Kamailio (measured per CPU-s) would need {p.kamailio_cores:g} cores for the same signalling.")
    lines += [
        "",
        "Assumptions: CPU per operation is constant (measured at the highest sustained rate on this machine, "
        "which is shared and noisy); the peak REGISTER rate and the busy hour coincide; every REGISTER "
        "is a digest round trip (401 then 200, no nonce reuse) and every call is challenged once (407); "
        "Redis commands counted by INFO commandstats include those run inside Lua scripts; Redis shards "
        "split the keyspace evenly (hash tags per AOR); TLS handshakes, presence and messaging are not "
        "counted; keep-alives cost what a STUN Binding over UDP costs; a relay's packets per CPU-second "
        "hold at any number of calls (the benchmark measured up to a few thousand per relay).",
    ]
    return "\n".join(lines)


def _media_pps_per_cpu_s(path: Path) -> float | None:
    """sipfarm's relay's packets per CPU-second from a ``sipfarm bench --media`` media.json."""
    data = json.loads(path.read_text())
    relay = _get(data, "relays", "sipfarm")
    if not isinstance(relay, Mapping):
        return None
    value = _get(relay, "calls", "packets_per_cpu_s") or _get(relay, "pps", "packets_per_cpu_s")
    return float(value) if value else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.model",
        description="Project a benchmark's per-CPU-second figures to the processes a farm of N users needs.",
    )
    parser.add_argument("summary", type=Path, help="results/<timestamp>/summary.json of `sipfarm bench`")
    parser.add_argument("--users", type=int, default=DEFAULT_USERS)
    parser.add_argument("--media", type=Path, help="media.json of `sipfarm bench --media` (relay packets per CPU-s)")
    parser.add_argument("--relay-pps", type=float, help="relay packets per CPU-s (instead of --media)")
    parser.add_argument("--keepalives", type=float, help="keep-alives per balancer CPU-s (benchmarks.keepalive_cost)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    summary = json.loads(args.summary.read_text())
    measured = measured_from_summary(summary)
    if measured is None:
        print("benchmarks.model: the summary has no complete sipfarm run to project from", file=sys.stderr)
        return 1
    relay_pps = args.relay_pps if args.relay_pps else (_media_pps_per_cpu_s(args.media) if args.media else None)
    measured = replace(measured, relay_pps_per_cpu_s=relay_pps, keepalives_per_cpu_s=args.keepalives)
    print(to_markdown(project(measured, Workload(users=args.users))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
