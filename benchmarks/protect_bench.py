"""`sipfarm bench --protect`: what the balancer's front door costs on the forwarding path.

Theory of operation. The SIP benchmark's searches (`harness.Harness`: the max sustained REGISTER
and call rates, same SIPp scenarios, same pass criteria) run against the same farm (Redis, one
balancer, one node) in several configurations of the balancer's front-end protection
(`sipfarm/balancer/frontdoor.py`), one after the other in the same run, each a fresh farm:

- ``off``: ``protect = false``: the balancer screens nothing (the figure the others are compared
  with);
- ``default``: the front door as shipped: loopback is exempt, so SIPp on 127.0.0.1 pays only the
  exempt look-up (and the node-address check) per message;
- ``full``: nothing exempt, ``domains`` = the benchmark's domain, every rate budget far above any
  offered rate, an ``allow`` list holding loopback and a ``deny`` list holding TEST-NET-1: every
  message pays the allow/deny verdict, the ban look-up and the rate counting before parsing,
  every request from SIPp the User-Agent scan (the scenarios send ``User-Agent: sipfarm-bench``)
  and every out-of-dialog one the domain check.

Overload shedding (``shed``, sipfarm/balancer/overload.py) stays as shipped in every
configuration: it is not the front door (``sipfarm bench --overload`` measures it).

The balancer gets these as ``[balancer]`` keys in its ``--config`` file; ``SIPFARM_*`` variables
of the same keys are removed from the farm's environment (they would override the file).

After a configuration's searches, while its farm still runs:

1. an **equal-load step** per kind, at ``EQUAL_LOAD_FRACTION`` of the first configuration's max
   rate (normally ``off``'s): CPU per operation compared at the same offered rate (at each
   configuration's own max rate it also moves with the rate itself);
2. with ``domains`` set, a **probe**: one out-of-dialog OPTIONS for an unserved domain from
   127.0.0.2, which the front door must drop (``unknown_domain``): the checks really ran on
   loopback sources;
3. the balancer's ``sipfarm_balancer_protect_total`` read from its ``/metrics``: a ban or a rate
   drop there means SIPp's own source was screened out and the configuration's figures are void.

Balancer (node) CPU per operation = user+system seconds of the balancer's (node's) process
during the step / successful REGISTERs or calls.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import socket
import sys
import time
import urllib.request
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
    ModeRun,
    Settings,
    TargetResult,
    mode_log,
    settings_from,
)
from benchmarks.kamailio import User
from benchmarks.process import free_port
from benchmarks.targets import HOST, SipfarmTarget, Target

#: requests per source and class in one 1 s window: far above any rate this box can offer
#: (a call is 2 INVITEs + 3 other requests, a registration 2 REGISTERs), so SIPp is never banned
FAR_RATE = 1_000_000
#: the equal-load step's rate, as a fraction of the first configuration's max rate
EQUAL_LOAD_FRACTION = 0.5
#: the equal-load step lasts at least this long (quick steps are 3 s: too few calls)
EQUAL_LOAD_MIN_S = 5.0
ALLOWED_NETWORK = "127.0.0.0/8"
DENIED_NETWORK = "192.0.2.0/24"  # TEST-NET-1 (RFC 5737)
PROBE_SOURCE = "127.0.0.2"  # not SIPp's 127.0.0.1: its one dropped request must not touch SIPp
PROBE_DOMAIN = "unserved.invalid"
#: [balancer] keys of the front door; SIPFARM_<KEY> in the environment would override the file
PROTECT_KEYS = (
    "protect", "rate_register", "rate_invite", "rate_other", "rate_suspect", "rate_window", "ban_time",
    "ban_refresh", "scanner_agents", "exempt", "domains", "allow", "deny",
)  # fmt: skip
#: protect counter reasons that mean SIPp's traffic was screened out
VOIDING_REASONS = (
    "ban_started", "banned", "rate_register", "rate_invite", "rate_other", "rate_suspect", "scanner", "denied",
    "not_allowed",
)  # fmt: skip
KINDS = ("register", "call")


@dataclass(frozen=True, slots=True)
class ProtectConfig:
    name: str
    description: str
    protect: bool = True
    everything_checked: bool = False  # nothing exempt, domains set, budgets far above the load


CONFIGS: Mapping[str, ProtectConfig] = {
    c.name: c
    for c in (
        ProtectConfig("off", "protect = false: the balancer screens nothing", protect=False),
        ProtectConfig("default", "as shipped: loopback exempt (SIPp pays the exempt look-up only)"),
        ProtectConfig(
            "full",
            "nothing exempt, domains = the benchmark's, budgets far above the load, allow and deny lists: "
            "list verdict, ban look-up, rate counting, User-Agent scan and domain check on every message",
            everything_checked=True,
        ),
    )
}
DEFAULT_CONFIGS = ("off", "default", "full")


def balancer_settings(config: ProtectConfig, domain: str) -> dict[str, Any]:
    """The `[balancer]` keys `config` sets (nothing: the shipped defaults)."""
    if not config.protect:
        return {"protect": False}
    if not config.everything_checked:
        return {}
    return {
        "protect": True,
        "exempt": [],
        "domains": [domain],
        "rate_register": FAR_RATE,
        "rate_invite": FAR_RATE,
        "rate_other": FAR_RATE,
        "rate_window": 1.0,
        "allow": [ALLOWED_NETWORK],  # SIPp's loopback: allowed, after the look-up
        "deny": [DENIED_NETWORK],  # a network no benchmark source is in
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_lines(settings: Mapping[str, Any]) -> str:
    """`key = value` lines for the `[balancer]` section, one a line."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items())


def without_protect_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the SIPFARM_* variables that would override the configuration's file."""
    drop = {"SIPFARM_" + key.upper() for key in PROTECT_KEYS}
    return {k: v for k, v in env.items() if k not in drop}


def protect_counts(metrics_text: str) -> dict[str, int]:
    """`sipfarm_balancer_protect_total{reason="..."} N` lines of a /metrics page, by reason."""
    counts: dict[str, int] = {}
    prefix = 'sipfarm_balancer_protect_total{reason="'
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            reason, _, rest = line[len(prefix) :].partition('"}')
            with contextlib.suppress(ValueError):
                counts[reason] = int(float(rest.split()[0]))
    return counts


def probe_request(balancer: str, source: str, domain: str) -> bytes:
    """An out-of-dialog OPTIONS for `domain`: what the domain check drops."""
    branch = f"z9hG4bK-protect-probe-{time.monotonic_ns()}"
    return (
        f"OPTIONS sip:probe@{domain} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {source}:5060;branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:probe@{source}>;tag=probe\r\n"
        f"To: <sip:probe@{domain}>\r\n"
        f"Call-ID: protect-probe-{branch}@{source}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "User-Agent: sipfarm-bench\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class ProtectTarget(SipfarmTarget):
    """A 1-node farm whose balancer runs `config`, its /metrics on a free loopback port."""

    def __init__(
        self, workdir: Path, users: Sequence[User], *, config: ProtectConfig, workers: int, env: Mapping[str, str]
    ) -> None:
        super().__init__(workdir, users, nodes=1, workers=workers, env=without_protect_env(env))
        self.config = config
        self.name = config.name
        self.note = config.description
        self.metrics_port = free_port(HOST)
        self.settings = balancer_settings(config, self.domain)
        self.balancer_config = toml_lines({**self.settings, "metrics": f"{HOST}:{self.metrics_port}"})

    def protect_counts(self) -> dict[str, int]:
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=3) as response:
            return protect_counts(response.read().decode())

    def probe(self) -> bool:
        """One request for an unserved domain from PROBE_SOURCE; True when it was counted as
        `unknown_domain` (dropped by the front door) within 3 s."""
        before = self.protect_counts().get("unknown_domain", 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((PROBE_SOURCE, 0))
            sock.sendto(probe_request(self.address, PROBE_SOURCE, PROBE_DOMAIN), (HOST, self.port))
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # the balancer copies its counters every 0.5 s
                if self.protect_counts().get("unknown_domain", 0) > before:
                    return True
                time.sleep(0.1)
        return False


class ProtectHarness(Harness):
    """The searches against one `ProtectTarget` per configuration, in order, then the
    equal-load steps, the probe and the protect counters of each."""

    def __init__(
        self, settings: Settings, out: Path, log: Callable[[str], None], configs: Sequence[ProtectConfig]
    ) -> None:
        super().__init__(settings, out, log, lambda _text, _frac: None)
        self.configs = list(configs)
        self.searches_left = len(self.configs) * len(settings.kinds) if settings.search else 0
        self.equal_rates: dict[str, float] = {}  # by kind, from the first configuration's max rates
        self.checks: dict[str, dict[str, Any]] = {}  # by configuration: equal-load runs, probe, counters

    def targets(self) -> Iterator[Callable[[], Target]]:
        for config in self.configs:
            yield functools.partial(
                ProtectTarget,
                self.out / "raw" / config.name,
                self.users,
                config=config,
                workers=self.settings.workers,
                env=self.env,
            )

    def run_target(self, target: Target) -> TargetResult:
        self.log(f"{target.name}: {target.note}")
        return super().run_target(target)

    def before_stop(self, bench: Bench, target: Target, result: TargetResult) -> None:
        assert isinstance(target, ProtectTarget)
        s = self.settings
        check: dict[str, Any] = {"settings": target.settings, "equal_load": {}, "probe": None, "counts": {}}
        self.checks[target.name] = check
        if s.search:
            for kind in s.kinds:
                found = result.register_max if kind == "register" else result.call_max
                if kind not in self.equal_rates and found:
                    self.equal_rates[kind] = float(max(1, round(found * EQUAL_LOAD_FRACTION)))
                rate = self.equal_rates.get(kind)
                if rate is None:
                    continue
                # passed stays None on the Measurement: the searches' best/first-failure ignore it
                m = bench.run(kind, f"equal-{kind}-{rate:g}", rate, duration_s=max(s.step_s, EQUAL_LOAD_MIN_S))
                time.sleep(s.settle_s)
                ok = m.failure_pct < 1.0
                check["equal_load"][kind] = {"rate": rate, "raw_dir": m.raw_dir, "passed": ok}
                self.log(f"  equal load {'PASS' if ok else 'FAIL'} {m.line()}")
        if target.config.protect:
            if target.config.everything_checked:
                check["probe"] = target.probe()
                self.log(
                    f"  probe from {PROBE_SOURCE} for {PROBE_DOMAIN}: "
                    + ("dropped (checks on)" if check["probe"] else "NOT dropped")
                )
            time.sleep(0.6)  # one more copy of the counters into /metrics
            check["counts"] = target.protect_counts()
            self.log(f"  protect counters: {check['counts'] or 'none'}")


# -- summary --------------------------------------------------------------------------------------


def _us_per(cpu_s: float | None, ops: int) -> float | None:
    return round(1e6 * cpu_s / ops, 1) if cpu_s and ops else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value and base else None


def _figures(run: Mapping[str, Any] | None) -> dict[str, Any]:
    """Rate, p99 and CPU per operation of the balancer and the node in one SIPp run."""
    if run is None:
        return {"rate": None, "passed": None, "p99_ms": None, "balancer_us_per_op": None, "node_us_per_op": None}
    ok = run["succeeded"]
    return {
        "rate": run["target_rate"],
        "passed": run["passed"],
        "p99_ms": run["p99_ms"],
        "balancer_us_per_op": _us_per(run["cpu_s"].get("balancer"), ok),
        "node_us_per_op": _us_per(run["cpu_s"].get("node1"), ok),
    }


RATIO_KEYS = ("balancer_us_per_op", "node_us_per_op", "p99_ms")


def protect_table(
    targets: Mapping[str, Mapping[str, Any]], checks: Mapping[str, Mapping[str, Any]], kinds: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (configuration, kind): max rate and the figures there, the equal-load step's
    figures, each against the first configuration (normally ``off``) as ratios, and whether
    SIPp's traffic was screened out (``void``)."""
    rows: list[dict[str, Any]] = []
    for name, t in targets.items():
        check = checks.get(name, {})
        counts = check.get("counts") or {}
        void = sorted(reason for reason in VOIDING_REASONS if counts.get(reason))
        for kind in kinds:
            row: dict[str, Any] = {
                "config": name,
                "kind": kind,
                "description": t["note"],
                "error": t["error"],
                "max_rate": t["max_rate"][kind],
                "first_failing_rate": None,
                "stopped_by": t["stopped_by"][kind],
                "at_max": _figures(None),
                "equal_load": _figures(None),
                "protect_counts": counts,
                "probe_dropped": check.get("probe"),
                "void": void,
            }
            if not t["error"]:
                failed = t["first_failure"].get(kind)
                row["first_failing_rate"] = failed and failed["target_rate"]
                row["at_max"] = _figures(t["best"].get(kind))
                equal = (check.get("equal_load") or {}).get(kind)
                if equal is not None:
                    run = next((r for r in t["runs"] if r["raw_dir"] == equal["raw_dir"]), None)
                    row["equal_load"] = {**_figures(run), "passed": equal["passed"]}
            rows.append(row)
    for kind in kinds:
        same = [r for r in rows if r["kind"] == kind]
        base = next((r for r in same if not r["error"]), None)
        for row in same:
            b = base or row
            row["ratio_to"] = b["config"] if base else None
            row["ratio"] = {
                "max_rate": _ratio(row["max_rate"], b["max_rate"]),
                **{f"at_max_{k}": _ratio(row["at_max"][k], b["at_max"][k]) for k in RATIO_KEYS},
                **{f"equal_{k}": _ratio(row["equal_load"][k], b["equal_load"][k]) for k in RATIO_KEYS},
            }
    return rows


def build_summary(
    *,
    settings: Settings,
    machine: Mapping[str, Any],
    results: Sequence[TargetResult],
    checks: Mapping[str, Mapping[str, Any]],
    notes: Sequence[str],
    command: str,
    elapsed_s: float,
    interrupted: bool,
    started_utc: str = "",
) -> dict[str, Any]:
    from benchmarks import report  # noqa: PLC0415

    targets = {r.name: report.target_summary(r) for r in results}
    rows = protect_table(targets, checks, settings.kinds)
    notes = list(notes)
    void = {r["config"]: r["void"] for r in rows if r["void"]}
    notes += [
        f"{name}: VOID: the front door screened SIPp's traffic out ({', '.join(why)})" for name, why in void.items()
    ]
    for name in dict.fromkeys(r["config"] for r in rows if r["probe_dropped"] is False):
        notes.append(f"{name}: the probe for an unserved domain was not dropped: the checks did not run")
    return {
        "schema": 1,
        "kind": "protect",
        "command": command,
        "started_utc": started_utc,
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "machine": dict(machine),
        "settings": asdict(settings),
        "equal_load_fraction": EQUAL_LOAD_FRACTION,
        "protect": rows,
        "targets": targets,
        "notes": notes,
    }


def _f(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


_NOUN = {"register": "REGISTERs", "call": "calls"}
_OP = {"register": "registration", "call": "call"}
_HEADING = {"register": "Registrations (REGISTER, 401, REGISTER, 200)", "call": "Calls"}


def markdown(summary: Mapping[str, Any]) -> str:
    m, s = summary["machine"], summary["settings"]
    rows = summary["protect"]
    lines = [
        "# sipfarm protect benchmark: the balancer's front door on the forwarding path",
        "",
        f"`{summary['command']}`, started {summary.get('started_utc') or '?'} UTC, {summary['elapsed_s']:.0f} s"
        + (" **(interrupted)**" if summary["interrupted"] else ""),
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, SIPp {m.get('sipp')}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. sipfarm build: "
        f"{s['build_used']}; 1 balancer, 1 node, {s['workers']} worker(s), {s['users']:,} users, "
        f"hold {s['hold_ms']} ms, steps of {s['step_s']:g} s.",
        "",
        "Each configuration is a fresh farm (Redis, balancer, 1 node) in the same run. Max rate: the highest "
        "step with < 1% failed, >= 90% of the offered rate sent and completed"
        + (f", p99 <= {s['max_p99_ms']:g} ms" if s.get("max_p99_ms") else "")
        + " (in brackets the lowest failing step above it). CPU per operation: user+system seconds of the "
        "balancer (node) process during the step / successful operations. p99: SIPp's response time "
        "(registration: both round trips; call: first INVITE to 200). x off: ratio to the first "
        "configuration of the run.",
        "",
    ]
    for kind in KINDS:
        same = [r for r in rows if r["kind"] == kind]
        if not same:
            continue
        base = same[0]["ratio_to"] or "off"
        lines += [
            f"## {_HEADING[kind]}: at each configuration's max rate",
            "",
            f"| config | max {_NOUN[kind]}/s | p99 ms | balancer us per {_OP[kind]} | node us per {_OP[kind]} "
            f"| x {base}: max rate | balancer CPU | node CPU | p99 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in same:
            if r["error"]:
                lines.append(f"| {r['config']} | failed: {r['error'].splitlines()[0][:80]} ||||||||")
                continue
            a, x = r["at_max"], r["ratio"]
            rate = _f(r["max_rate"]) + (f" (fail {r['first_failing_rate']:,.0f})" if r["first_failing_rate"] else "")
            lines.append(
                f"| {r['config']} | {rate} | {_f(a['p99_ms'])} | {_f(a['balancer_us_per_op'])} | "
                f"{_f(a['node_us_per_op'])} | {_x(x['max_rate'])} | {_x(x['at_max_balancer_us_per_op'])} | "
                f"{_x(x['at_max_node_us_per_op'])} | {_x(x['at_max_p99_ms'])} |"
            )
        equal = [r for r in same if r["equal_load"]["rate"] is not None]
        if equal:
            lines += [
                "",
                f"Equal load: every configuration at {_f(equal[0]['equal_load']['rate'])} {_NOUN[kind]}/s "
                f"({summary['equal_load_fraction']:g} x the first configuration's max), one step of "
                f"{max(s['step_s'], EQUAL_LOAD_MIN_S):g} s:",
                "",
                f"| config | passed | p99 ms | balancer us per {_OP[kind]} | node us per {_OP[kind]} "
                f"| x {base}: balancer CPU | node CPU | p99 |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in equal:
                e, x = r["equal_load"], r["ratio"]
                lines.append(
                    f"| {r['config']} | {'yes' if e['passed'] else 'NO'} | {_f(e['p99_ms'])} | "
                    f"{_f(e['balancer_us_per_op'])} | {_f(e['node_us_per_op'])} | "
                    f"{_x(x['equal_balancer_us_per_op'])} | {_x(x['equal_node_us_per_op'])} | "
                    f"{_x(x['equal_p99_ms'])} |"
                )
        lines.append("")
    lines += ["## Front door counters and checks", ""]
    for name in dict.fromkeys(r["config"] for r in rows):
        r = next(r for r in rows if r["config"] == name)
        probe = {None: "", True: "; probe for an unserved domain dropped (the checks ran)",
                 False: "; probe NOT dropped"}[r["probe_dropped"]]  # fmt: skip
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r["protect_counts"].items())) or "none"
        verdict = f"**VOID** ({', '.join(r['void'])})" if r["void"] else "no ban, no rate drop"
        lines.append(f"- {name} ({r['description']}): sipfarm_balancer_protect_total: {counts}; {verdict}{probe}")
    lines.append("")
    if summary.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in summary["notes"]), ""]
    return "\n".join(lines)


def headline(summary: Mapping[str, Any]) -> list[str]:
    out = []
    for r in summary["protect"]:
        if r["error"]:
            out.append(f"{r['config']} {r['kind']}: failed")
            continue
        x = r["ratio"]
        out.append(
            f"{r['config']} {r['kind']}: max {_f(r['max_rate'])}/s (x{_x(x['max_rate'])}), balancer "
            f"{_f(r['at_max']['balancer_us_per_op'])} us/op at max (x{_x(x['at_max_balancer_us_per_op'])}), "
            f"{_f(r['equal_load']['balancer_us_per_op'])} us/op at equal load (x{_x(x['equal_balancer_us_per_op'])})"
            + (" VOID" if r["void"] else "")
        )
    return out


def write(out: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    paths = {"json": out / "summary.json", "markdown": out / "summary.md"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(summary))
    return paths


# -- entry point ----------------------------------------------------------------------------------


def parse_configs(text: str) -> tuple[ProtectConfig, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise ValueError(f"--protect-configs: expected some of {','.join(CONFIGS)}, not {text!r}")
    return tuple(CONFIGS[name] for name in names)


def protect_main(args: argparse.Namespace, args_list: Sequence[str]) -> int:
    """`sipfarm bench --protect`: results/<timestamp>/summary.json (`protect` key) and summary.md."""
    try:
        configs = parse_configs(args.protect_configs)
    except ValueError as exc:
        print(f"sipfarm bench: {exc}", file=sys.stderr)
        return EXIT_MISSING_TOOL
    missing = [tool for tool in ("sipp", "redis-server") if shutil.which(tool) is None]
    if missing:
        print(
            f"sipfarm bench: --protect needs {' and '.join(missing)} (apt-get install sip-tester redis-server)",
            file=sys.stderr,
        )
        return EXIT_MISSING_TOOL
    kinds = ("call",) if args.protect_calls_only else KINDS
    settings = replace(settings_from(args), nodes=(1,), kamailio=False, kamailio_redis=False, kinds=kinds)
    run = ModeRun.start(settings, args.out)
    if run is None:
        return EXIT_MISSING_TOOL
    settings, out, machine, started = run.settings, run.out, run.machine, run.started
    harness = ProtectHarness(settings, out, mode_log, configs)
    harness.notes.extend(run.build_note())
    results, interrupted = ModeRun.guarded(harness.run, lambda: harness.results)
    summary = build_summary(
        settings=settings,
        machine=machine,
        results=results,
        checks=harness.checks,
        notes=harness.notes,
        command="sipfarm bench " + " ".join(args_list),
        elapsed_s=time.monotonic() - started,
        interrupted=interrupted,
        started_utc=run.started_utc,
    )
    paths = write(out, summary)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    for line in headline(summary):
        print(line)
    if interrupted:
        return EXIT_INTERRUPTED
    if not results or any(r.error for r in results) or any(r["void"] for r in summary["protect"]):
        return EXIT_FAILED
    return EXIT_OK
