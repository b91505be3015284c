"""`sipfarm bench --routing`: calls/s of one node with its routing steps on, beside the plain figure.

Theory of operation. The SIP benchmark's call search (`harness.Harness`, same SIPp scenarios,
same pass criteria) runs against one node in several configurations, one after the other in
the same run, each a fresh farm (Redis, balancer, node) so no cache outlives its configuration:

- ``plain``: accounts in Redis, no routing section (the figure the others are compared with);
- ``ldap-cold``: every account only in LDAP (a private slapd, `benchmarks.slapd`), nothing in
  Redis; ``local_ttl = 0`` and ``cache_ttl`` 1 ms, so every lookup reads the (stale) Redis
  cache entry, then searches LDAP and writes the cache again;
- ``ldap-warm``: the same directory, ``local_ttl`` and ``cache_ttl`` an hour: after the
  registration of every user (which looks each one up) lookups are answered in process;
- ``helper``: accounts in Redis, a ``[[routing.rules]]`` of ``action = "helper"`` matching every
  callee, ``[routing.helper]`` running ``examples/route_helper.py`` (answers ``local``) with
  ``cache_ttl = 0``: one round trip to the helper program per INVITE.

The node is configured through its ``--config`` file (``[ldap]``, ``[routing]``), written into
the configuration's raw directory. Calls per node CPU-second count the node's process tree,
which holds the helper programs (its children); slapd's CPU is reported beside it.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

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
from benchmarks.measure import ProcessTree
from benchmarks.slapd import ATTRIBUTES, BASE, BIND_DN, BIND_PASSWORD, FILTER, Slapd
from benchmarks.targets import SipfarmTarget, Target

REPO = Path(__file__).resolve().parent.parent
ROUTE_HELPER = REPO / "examples" / "route_helper.py"


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """One configuration of the node: where accounts live and what routing asks per call."""

    name: str
    description: str
    ldap: str = ""  # "", "cold" or "warm"
    helper: bool = False
    helper_cache_ttl: float = 0.0


CONFIGS: Mapping[str, RoutingConfig] = {
    c.name: c
    for c in (
        RoutingConfig("plain", "accounts in Redis, no routing step"),
        RoutingConfig(
            "ldap-cold", "accounts only in LDAP; local_ttl 0, cache_ttl 1 ms: every lookup searches LDAP", ldap="cold"
        ),
        RoutingConfig("ldap-warm", "accounts only in LDAP; local and Redis caches hot (ttl 1 h)", ldap="warm"),
        RoutingConfig(
            "helper", "accounts in Redis; every INVITE asks examples/route_helper.py (no answer cache)", helper=True
        ),
        RoutingConfig("helper-cached", "as helper, answers cached 60 s by callee", helper=True, helper_cache_ttl=60.0),
    )
}
DEFAULT_CONFIGS = ("plain", "ldap-cold", "ldap-warm", "helper")


def node_config(config: RoutingConfig, domain: str, ldap_url: str | None) -> str:
    """The node's TOML config file for `config` (`sipfarm node --config`)."""
    lines: list[str] = []
    if config.ldap:
        assert ldap_url is not None
        cold = config.ldap == "cold"
        attributes = ", ".join(f'{k} = "{v}"' for k, v in ATTRIBUTES.items())
        lines += [
            "[ldap]",
            f'url = "{ldap_url}"',
            f'bind_dn = "{BIND_DN}"',
            f'bind_password = "{BIND_PASSWORD}"',
            f'base = "{BASE}"',
            f'filter = "{FILTER}"',
            "timeout = 2.0",
            # cold: a Redis entry is fresh for 1 ms, so each lookup goes on to LDAP
            f"cache_ttl = {0.001 if cold else 3600.0}",
            f"stale_ttl = {300.0 if cold else 3600.0}",
            f"local_ttl = {0 if cold else 3600.0}",
            f"attributes = {{ {attributes} }}",
            "",
        ]
    if config.helper:
        program = json.dumps([sys.executable, str(ROUTE_HELPER)])
        lines += [
            "[[routing.rules]]",
            'name = "bench-helper"',
            f'domain = "{domain}"',
            'action = "helper"',
            "",
            "[routing.helper]",
            f"program = {program}",
            f"cache_ttl = {config.helper_cache_ttl:g}",
            'cache_key = ["callee"]',
            "",
        ]
    return "\n".join(lines)


class RoutingTarget(SipfarmTarget):
    """A 1-node farm whose node runs `config`; with LDAP, a slapd holding every user (and Redis
    holding none)."""

    def __init__(
        self,
        workdir: Path,
        users: Sequence[User],
        *,
        config: RoutingConfig,
        workers: int,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_file = workdir.resolve() / "node.toml"
        super().__init__(
            workdir,
            users,
            nodes=1,
            workers=workers,
            env=env,
            node_args=("--config", str(self.config_file)),
            provision=not config.ldap,
        )
        self.config = config
        self.name = config.name
        self.note = config.description
        self.slapd: Slapd | None = None
        #: searches slapd completed during each SIPp run, by the run's raw directory
        self.ldap_searches: dict[str, int] = {}

    def start(self) -> RoutingTarget:
        try:
            if self.config.ldap:
                self.slapd = Slapd(self.workdir / "slapd", self.users, self.domain)
            self.config_file.write_text(node_config(self.config, self.domain, self.slapd.url if self.slapd else None))
            super().start()
        except BaseException:
            self.stop()
            raise
        return self

    def trees(self) -> list[ProcessTree]:
        trees = super().trees()
        if self.slapd is not None:
            trees.append(ProcessTree("slapd", self.slapd.process.pid))
        return trees

    def dead(self) -> str | None:
        if self.slapd is not None and not self.slapd.process.alive():
            return f"slapd exited:\n{self.slapd.process.log_tail(15)}"
        return super().dead()

    def stop(self) -> None:
        super().stop()
        if self.slapd is not None:
            self.slapd.stop()


class RoutingBench(Bench):
    """A `Bench` that also counts the LDAP searches slapd answered during each SIPp run."""

    def run(
        self, kind: str, name: str, rate: float, *, calls: int | None = None, duration_s: float | None = None
    ) -> Measurement:
        target = self.target
        slapd = target.slapd if isinstance(target, RoutingTarget) else None
        before = slapd.searches() if slapd is not None else 0
        m = super().run(kind, name, rate, calls=calls, duration_s=duration_s)
        if slapd is not None:
            assert isinstance(target, RoutingTarget)
            target.ldap_searches[m.raw_dir] = slapd.searches() - before - 1  # less the first counter read
        return m


class RoutingHarness(Harness):
    """The call search against one `RoutingTarget` per configuration, in order."""

    bench_class = RoutingBench

    def __init__(
        self, settings: Settings, out: Path, log: Callable[[str], None], configs: Sequence[RoutingConfig]
    ) -> None:
        super().__init__(settings, out, log, lambda _text, _frac: None)
        self.configs = list(configs)
        self.searches_left = len(self.configs) if settings.search else 0
        self.ldap_searches: dict[str, dict[str, int]] = {}  # by target, then by run's raw directory

    def targets(self) -> Iterator[Callable[[], Target]]:
        for config in self.configs:
            yield functools.partial(
                RoutingTarget,
                self.out / "raw" / config.name,
                self.users,
                config=config,
                workers=self.settings.workers,
                env=self.env,
            )

    def run_target(self, target: Target) -> TargetResult:
        self.log(f"{target.name}: {target.note}")
        try:
            return super().run_target(target)
        finally:
            if isinstance(target, RoutingTarget) and target.ldap_searches:
                self.ldap_searches[target.name] = target.ldap_searches


# -- summary --------------------------------------------------------------------------------------


def _per(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _ratio(value: float | None, plain: float | None) -> float | None:
    return round(value / plain, 3) if value and plain else None


def routing_table(targets: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: max calls/s and the figures at that step, ratios to plain."""
    rows: list[dict[str, Any]] = []
    for name, t in targets.items():
        best = t["best"].get("call") if not t["error"] else None
        failed = t["first_failure"].get("call") if not t["error"] else None
        row: dict[str, Any] = {
            "config": name,
            "description": t["note"],
            "error": t["error"],
            "calls_per_s": t["max_rate"]["call"],
            "first_failing_rate": failed and failed["target_rate"],
            "stopped_by": t["stopped_by"]["call"],
            "p50_ms": None,
            "p95_ms": None,
            "p99_ms": None,
            "calls_per_node_cpu_s": None,
            "calls_per_slapd_cpu_s": None,
            "cpu_pct": {},
            "redis_cmds_per_call": None,
            "ldap_searches_per_call": None,
        }
        if best is not None:
            row.update(
                p50_ms=best["p50_ms"],
                p95_ms=best["p95_ms"],
                p99_ms=best["p99_ms"],
                calls_per_node_cpu_s=_per(best["succeeded"], best["cpu_s"].get("node1", 0.0)),
                calls_per_slapd_cpu_s=_per(best["succeeded"], best["cpu_s"].get("slapd", 0.0)),
                cpu_pct=best["cpu_pct"],
            )
            eff = t["efficiency"].get("call") or {}
            row["redis_cmds_per_call"] = eff.get("redis_cmds_per_op")
            if best.get("ldap_searches") is not None and best["succeeded"]:
                row["ldap_searches_per_call"] = round(best["ldap_searches"] / best["succeeded"], 2)
        rows.append(row)
    plain: dict[str, Any] = next((r for r in rows if r["config"] == "plain" and not r["error"]), {})
    for row in rows:
        row["ratio_to_plain"] = {
            "calls_per_s": _ratio(row["calls_per_s"], plain.get("calls_per_s")),
            "calls_per_node_cpu_s": _ratio(row["calls_per_node_cpu_s"], plain.get("calls_per_node_cpu_s")),
        }
    return rows


def build_summary(
    *,
    settings: Settings,
    machine: Mapping[str, Any],
    results: Sequence[TargetResult],
    notes: Sequence[str],
    command: str,
    elapsed_s: float,
    interrupted: bool,
    ldap_searches: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    from benchmarks import report  # noqa: PLC0415

    targets = {r.name: report.target_summary(r) for r in results}
    for name, by_run in (ldap_searches or {}).items():
        # every run of a target with slapd gets the searches slapd answered meanwhile
        t = targets.get(name)
        for run in t["runs"] if t else []:
            run["ldap_searches"] = by_run.get(run["raw_dir"])
        for kind in ("best", "first_failure"):
            for run in (t or {}).get(kind, {}).values():
                if run is not None:
                    run["ldap_searches"] = by_run.get(run["raw_dir"])
    return {
        "schema": 1,
        "kind": "routing",
        "command": command,
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "machine": dict(machine),
        "settings": asdict(settings),
        "routing": routing_table(targets),
        "targets": targets,
        "notes": list(notes),
    }


def _f(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: Mapping[str, Any]) -> str:
    m, s = summary["machine"], summary["settings"]
    lines = [
        "# sipfarm routing benchmark: calls/s with LDAP and a helper in the path",
        "",
        f"`{summary['command']}`, {summary['elapsed_s']:.0f} s"
        + (" **(interrupted)**" if summary["interrupted"] else ""),
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, SIPp {m.get('sipp')}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. sipfarm build: "
        f"{s['build_used']}; 1 node, {s['workers']} worker(s), {s['users']:,} users, hold {s['hold_ms']} ms, "
        f"steps of {s['step_s']:g} s.",
        "",
        "Each configuration is a fresh farm (Redis, balancer, 1 node) in the same run; calls/s is the highest "
        "step with < 1% failed, >= 90% of the offered rate sent and completed"
        + (f", p99 <= {s['max_p99_ms']:g} ms" if s.get("max_p99_ms") else "")
        + " (in brackets the lowest failing step above it). Setup = first INVITE to 200 (with the 407 round "
        "trip). Calls per node CPU-s: the node's processes (the helper programs are its children); slapd's "
        "beside it.",
        "",
        "| config | calls/s | setup p50/p95/p99 ms | calls per node CPU-s | calls per slapd CPU-s "
        "| ratio to plain: calls/s | per node CPU-s | LDAP searches per call | Redis cmds per call | what |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["routing"]:
        if r["error"]:
            lines.append(f"| {r['config']} | failed: {r['error'].splitlines()[0][:80]} |||||||| {r['description']} |")
            continue
        rate = _f(r["calls_per_s"]) + (f" (fail {r['first_failing_rate']:,.0f})" if r["first_failing_rate"] else "")
        pct = "/".join(_f(r[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
        ratio = r["ratio_to_plain"]
        lines.append(
            f"| {r['config']} | {rate} | {pct} | {_f(r['calls_per_node_cpu_s'])} | "
            f"{_f(r['calls_per_slapd_cpu_s'])} | {_f(ratio['calls_per_s'], '.2f')} | "
            f"{_f(ratio['calls_per_node_cpu_s'], '.2f')} | {_f(r['ldap_searches_per_call'], '.2f')} | "
            f"{_f(r['redis_cmds_per_call'], '.1f')} | "
            f"{r['description']} |"
        )
    lines += ["", "CPU % per role at each configuration's max rate:", ""]
    for r in summary["routing"]:
        if not r["error"] and r["cpu_pct"]:
            lines.append(f"- {r['config']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_pct"].items()))
    lines.append("")
    if summary.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in summary["notes"]), ""]
    return "\n".join(lines)


def headline(summary: Mapping[str, Any]) -> list[str]:
    out = []
    for r in summary["routing"]:
        if r["error"]:
            out.append(f"{r['config']}: failed")
            continue
        ratio = r["ratio_to_plain"]
        out.append(
            f"{r['config']}: {_f(r['calls_per_s'])} calls/s ({_f(ratio['calls_per_s'], '.2f')} x plain), "
            f"{_f(r['calls_per_node_cpu_s'])} per node CPU-s ({_f(ratio['calls_per_node_cpu_s'], '.2f')} x)"
        )
    return out


def write(out: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    paths = {"json": out / "summary.json", "markdown": out / "summary.md"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(summary))
    return paths


# -- entry point ----------------------------------------------------------------------------------


def parse_configs(text: str) -> tuple[RoutingConfig, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise ValueError(f"--routing-configs: expected some of {','.join(CONFIGS)}, not {text!r}")
    return tuple(CONFIGS[name] for name in names)


def routing_main(args: argparse.Namespace, args_list: Sequence[str]) -> int:
    """`sipfarm bench --routing`: results/<timestamp>/summary.json (`routing` key) and summary.md."""
    from benchmarks import slapd  # noqa: PLC0415

    try:
        configs = parse_configs(args.routing_configs)
    except ValueError as exc:
        print(f"sipfarm bench: {exc}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    missing = [tool for tool in ("sipp", "redis-server") if shutil.which(tool) is None]
    if any(c.ldap for c in configs) and not slapd.available():
        missing.append("slapd")
    if missing:
        print(
            f"sipfarm bench: --routing needs {' and '.join(missing)} (apt-get install sip-tester redis-server slapd)",
            file=sys.stderr,
        )
        return EXIT_MISSING_TOOL
    settings = replace(settings_from(args), nodes=(1,), kamailio=False, kamailio_redis=False, kinds=("call",))
    run = ModeRun.start(settings, args.out)
    if run is None:
        return EXIT_MISSING_TOOL
    settings, out, machine, started = run.settings, run.out, run.machine, run.started
    harness = RoutingHarness(settings, out, mode_log, configs)
    harness.notes.extend(run.build_note())
    results, interrupted = ModeRun.guarded(harness.run, lambda: harness.results)
    summary = build_summary(
        settings=settings,
        machine=machine,
        results=results,
        notes=harness.notes,
        ldap_searches=harness.ldap_searches,
        command="sipfarm bench " + " ".join(args_list),
        elapsed_s=time.monotonic() - started,
        interrupted=interrupted,
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
