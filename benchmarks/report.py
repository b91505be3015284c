"""Results of a benchmark run: summary.json, summary.md and plot.png in results/<timestamp>/.

`build_summary` turns the harness's measurements into plain data: per target the max
sustained REG/s and calls/s, the run at that rate (percentiles, retransmissions, 5xx, CPU
per process), work per CPU-second, the process that saturates first, peak memory; then the
sipfarm/Kamailio ratios, the 1 -> 2 node scaling and the capacity model (`benchmarks.model`).

The Kamailio references are its in-memory targets (`kamailio`, Debian's memory manager qm, and
`kamailio-tlsf` with `--kamailio-memory tlsf|both`): every other target gets its ratios against
each; `comparison.reference` and `comparison.ratios` are those against the first (qm when run).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import model

if TYPE_CHECKING:
    from benchmarks.harness import Measurement, TargetResult

SIPP_PREFIX = "sipp-"
KINDS = ("register", "call")


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def efficiency(result: TargetResult, m: Measurement) -> dict[str, Any]:
    """Work per CPU-second of the server processes (and of everything but SIPp) in run `m`."""
    server_cpu = sum(m.cpu_s.get(label, 0.0) for label in result.server_labels)
    all_cpu = sum(v for k, v in m.cpu_s.items() if not k.startswith(SIPP_PREFIX))
    out: dict[str, Any] = {
        "rate": m.target_rate,
        "succeeded": m.succeeded,
        "server_processes": result.server_labels,
        "server_cpu_s": round(server_cpu, 3),
        "per_server_cpu_s": round(m.succeeded / server_cpu, 1) if server_cpu > 0 else None,
        "all_server_side_cpu_s": round(all_cpu, 3),
        "per_all_server_side_cpu_s": round(m.succeeded / all_cpu, 1) if all_cpu > 0 else None,
        "per_role_cpu_s": {k: round(m.succeeded / v, 1) for k, v in m.cpu_s.items() if v > 0},
    }
    if m.redis_commands and m.succeeded:
        out["redis_cmds_per_op"] = round(m.redis_total / m.succeeded, 2)
        out["redis_cmds_breakdown_per_op"] = {k: round(v / m.succeeded, 2) for k, v in m.redis_commands.items()}
        redis_cpu = m.cpu_s.get("redis", 0.0)
        out["redis_cmds_per_redis_cpu_s"] = round(m.redis_total / redis_cpu) if redis_cpu > 0 else None
    return out


def saturation(best: Measurement, failure: Measurement | None) -> dict[str, Any]:
    """The busiest process at the max sustained rate, and what the next step up broke on.

    CPU% is read at the max-rate step: in a failing step SIPp waits out retransmissions and
    timeouts, which dilutes every process's CPU% over a longer wall time.
    """
    ranked = sorted(best.hottest_pct.items(), key=lambda kv: kv[1], reverse=True)
    out: dict[str, Any] = {
        "at_rate": best.target_rate,
        "process": ranked[0][0] if ranked else None,
        "busiest_process_cpu_pct": ranked[0][1] if ranked else None,
        "ranking": [{"role": k, "busiest_process_cpu_pct": v, "role_cpu_pct": best.cpu_pct.get(k)}
                    for k, v in ranked],
        "first_failure": None,
    }
    if failure is not None:
        drops = failure.udp_drops_by_role
        out["first_failure"] = {
            "rate": failure.target_rate,
            "failure_pct": failure.failure_pct,
            "p99_ms": failure.p99_ms,
            "retransmissions": failure.retransmissions,
            "responses_5xx": failure.responses_5xx,
            "udp_drops": failure.udp_drops,
            "udp_drops_by_role": drops,
            "most_drops": max(drops, key=lambda k: drops[k]) if drops else None,
        }
    return out


def _run_dict(m: Measurement | None) -> dict[str, Any] | None:
    return asdict(m) if m is not None else None


def target_summary(r: TargetResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": r.name, "kind": r.kind, "nodes": r.nodes, "workers": r.workers, "note": r.note,
        "error": r.error or None,
        "max_rate": {"register": r.register_max, "call": r.call_max},
        "stopped_by": {"register": r.register_stopped_by, "call": r.call_stopped_by},
        "best": {}, "first_failure": {}, "efficiency": {}, "saturation": {},
        "peak_rss_mb": r.peak_rss_mb, "redis": r.redis_memory or None,
        "runs": [asdict(m) for m in r.runs],
    }
    for kind in KINDS:
        best, failure = r.best(kind), r.first_failure(kind)
        out["best"][kind] = _run_dict(best)
        out["first_failure"][kind] = _run_dict(failure)
        out["efficiency"][kind] = efficiency(r, best) if best is not None else None
        out["saturation"][kind] = saturation(best, failure) if best is not None else None
    return out


def references(targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The Kamailio targets the others are compared with: in memory (not `kamailio-redis*`), run
    without error, `kamailio` (qm) first."""
    names = [name for name, t in targets.items() if t["kind"] == "kamailio" and not t["error"]
             and not name.startswith("kamailio-redis")]
    return sorted(names, key=lambda name: name != "kamailio")


def _ratios(t: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, float | None]:
    return {
        "register_rate": _ratio(t["max_rate"]["register"], ref["max_rate"]["register"]),
        "call_rate": _ratio(t["max_rate"]["call"], ref["max_rate"]["call"]),
        "regs_per_cpu_s": _ratio(_eff(t, "register"), _eff(ref, "register")),
        "calls_per_cpu_s": _ratio(_eff(t, "call"), _eff(ref, "call")),
    }


def build_summary(*, settings: Mapping[str, Any], machine: Mapping[str, Any], results: Sequence[TargetResult],
                  notes: Sequence[str], command: str, elapsed_s: float, interrupted: bool) -> dict[str, Any]:
    targets = {r.name: target_summary(r) for r in results}
    refs = references(targets)
    by_reference = {ref: {name: _ratios(t, targets[ref]) for name, t in targets.items()
                          if name != ref and not t["error"]} for ref in refs}
    comparison: dict[str, Any] = {
        "reference": refs[0] if refs else None,
        "ratios": by_reference[refs[0]] if refs else {},
        "references": refs,
        "ratios_by_reference": by_reference,
    }
    farms = {t["nodes"]: t for t in targets.values() if t["kind"] == "sipfarm" and not t["error"]}
    if 1 in farms and 2 in farms:
        comparison["scaling_1_to_2_nodes"] = {
            "register_rate": _ratio(farms[2]["max_rate"]["register"], farms[1]["max_rate"]["register"]),
            "call_rate": _ratio(farms[2]["max_rate"]["call"], farms[1]["max_rate"]["call"]),
        }
    summary: dict[str, Any] = {
        "schema": 1,
        "command": command,
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "machine": dict(machine),
        "settings": dict(settings),
        "notes": list(notes),
        "targets": targets,
        "comparison": comparison,
        "model": None,
    }
    measured = model.measured_from_summary(summary)
    if measured is not None:
        projection = model.project(measured)
        summary["model"] = {**projection.as_dict(), "markdown": model.to_markdown(projection)}
    return summary


def _eff(t: Mapping[str, Any], kind: str) -> float | None:
    eff = t["efficiency"].get(kind)
    return eff.get("per_server_cpu_s") if eff else None


def _f(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: Mapping[str, Any]) -> str:
    m = summary["machine"]
    s = summary["settings"]
    lines = [
        "# sipfarm benchmark",
        "",
        f"`{summary['command']}` ({s['mode']}), {summary['elapsed_s']:.0f} s"
        + (" **(interrupted)**" if summary["interrupted"] else ""),
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; {m.get('sipp')}; {m.get('kamailio')}; "
        f"{m.get('redis')}.",
        f"sipfarm build: {s.get('build_used') or 'interpreted'}. "
        f"Users: {s['users']:,}; workers per node / Kamailio children: {s['workers']}; call hold {s['hold_ms']} ms; "
        f"steps of {s['step_s']:g} s; a step passes with < 1% failed, >= 90% of the offered rate sent and "
        f"completed" + (f", p99 <= {s['max_p99_ms']:g} ms" if s["max_p99_ms"] else "") + ".",
        "",
        "## Max sustained rates",
        "",
        "| target | REG/s | calls/s | REG p50/p95/p99 ms | call setup p50/p95/p99 ms | REG per server CPU-s "
        "| calls per server CPU-s | retrans (REG/call) | 5xx (REG/call) | saturates first (REG / calls) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in summary["targets"].values():
        if t["error"]:
            lines.append(f"| {t['name']} | failed: {t['error'].splitlines()[0][:80]} |||||||||")
            continue
        b = t["best"]
        cells = [t["name"]]
        for kind in KINDS:
            failed = t["first_failure"].get(kind)
            cells.append(_f(t["max_rate"][kind]) + (f" (fail {failed['target_rate']:,.0f})" if failed else ""))
        for kind in KINDS:
            run = b.get(kind)
            cells.append("/".join(_f(run and run[k], ".0f") for k in ("p50_ms", "p95_ms", "p99_ms")))
        cells += [_f(_eff(t, "register")), _f(_eff(t, "call"))]
        cells.append("/".join(_f((b.get(k) or {}).get("retransmissions")) for k in KINDS))
        cells.append("/".join(_f((b.get(k) or {}).get("responses_5xx")) for k in KINDS))
        sat = []
        for kind in KINDS:
            st = t["saturation"].get(kind)
            text = f"{st['process']} {st['busiest_process_cpu_pct']:.0f}%" if st else "-"
            failure = st and st["first_failure"]
            if failure and failure["most_drops"]:
                text += f", then UDP drops at {failure['most_drops']}"
            sat.append(text)
        cells.append(" / ".join(sat))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rates: the highest passing step, and in brackets the lowest failing one above it (the search "
        "bisects between them until its time budget runs out). "
        "Server CPU-s: sipfarm = its node processes (all workers); Kamailio = all its processes. "
        "\"Saturates first\": the busiest single process (% of one core) at the max sustained rate (the "
        "knee; SIPp itself counts), and whose UDP receive buffer overflowed most in the first failing "
        "step above it, if any.",
    ]
    comp = summary["comparison"]
    # Summaries written before there could be several references have only "ratios".
    by_reference = comp.get("ratios_by_reference") or ({comp["reference"]: comp["ratios"]} if comp.get("ratios")
                                                       else {})
    for ref, ratios in by_reference.items():
        if not ratios:
            continue
        title = "sipfarm / Kamailio" if len(by_reference) == 1 else (
            f"sipfarm / {ref} ({summary['targets'][ref]['note'] or ref})")
        lines += ["", f"## {title}", "", "| target | REG/s | calls/s | REG per CPU-s | calls per CPU-s |",
                  "|---|---|---|---|---|"]
        for name, r in ratios.items():
            lines.append(f"| {name} | {_f(r['register_rate'], '.2f')} | {_f(r['call_rate'], '.2f')} | "
                         f"{_f(r['regs_per_cpu_s'], '.2f')} | {_f(r['calls_per_cpu_s'], '.2f')} |")
    if comp.get("scaling_1_to_2_nodes"):
        sc = comp["scaling_1_to_2_nodes"]
        lines += ["", f"Scaling 1 -> 2 nodes: REG/s x{_f(sc['register_rate'], '.2f')}, "
                  f"calls/s x{_f(sc['call_rate'], '.2f')} (every process shares the same "
                  f"{m['nproc']} cores, SIPp included: per CPU-s figures are the robust ones)."]
    lines += ["", "## CPU and memory per process at the max rate", "",
              "| target | run | CPU % per role (busiest process) | peak memory MB |", "|---|---|---|---|"]
    for t in summary["targets"].values():
        if t["error"]:
            continue
        mem = ", ".join(f"{k} {v:g}" for k, v in sorted(t["peak_rss_mb"].items()))
        for kind in KINDS:
            run = t["best"].get(kind)
            if not run:
                continue
            cpu = ", ".join(f"{k} {run['cpu_pct'][k]:.0f} ({run['hottest_pct'][k]:.0f})" for k in run["cpu_pct"])
            shown = mem if kind == "register" else ""
            lines.append(f"| {t['name']} | {kind} {run['target_rate']:g}/s | {cpu} | {shown} |")
    redis_lines = []
    for t in summary["targets"].values():
        for kind in KINDS:
            eff = t["efficiency"].get(kind) if not t["error"] else None
            if eff and eff.get("redis_cmds_per_op") is not None:
                top = ", ".join(f"{k} {v:g}" for k, v in sorted(eff["redis_cmds_breakdown_per_op"].items(),
                                                               key=lambda kv: -kv[1])[:6])
                redis_lines.append(f"| {t['name']} | {kind} | {eff['redis_cmds_per_op']:g} | {top} |")
    if redis_lines:
        lines += ["", "## Redis commands per operation (INFO commandstats deltas)", "",
                  "| target | op | commands | top commands |", "|---|---|---|---|", *redis_lines]
    if summary.get("model"):
        lines += ["", "## Capacity model (benchmarks/model.py)", "", summary["model"]["markdown"]]
    if summary["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in summary["notes"])]
    lines += ["", "Raw SIPp statistics: `raw/<target>/<NNN-step>/` (stats.csv, *_rtt.csv, errors.log).", ""]
    return "\n".join(lines)


def plot(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    targets = [t for t in summary["targets"].values() if not t["error"]]
    farms = sorted((t for t in targets if t["kind"] == "sipfarm"), key=lambda t: t["nodes"])
    refs = [t for t in targets if t["kind"] == "kamailio"]
    styles = ["--", ":", "-."]
    for ax, kind, title in ((axes[0], "register", "REGISTER/s (digest) vs nodes"),
                            (axes[1], "call", "calls/s vs nodes")):
        xs = [t["nodes"] for t in farms]
        ys = [t["max_rate"][kind] or 0 for t in farms]
        ax.plot(xs, ys, "o-", label="sipfarm")
        for i, ref in enumerate(refs):
            if ref["max_rate"][kind]:
                ax.axhline(ref["max_rate"][kind], linestyle=styles[i % len(styles)], color=f"C{i + 1}",
                           label=f"{ref['name']} ({ref['workers']} children)")
        ax.set_title(title)
        ax.set_xlabel("sipfarm nodes")
        ax.set_ylabel("max sustained rate (< 1% failed)")
        ax.set_xticks(xs or [1])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    ax = axes[2]
    for i, t in enumerate(targets):
        for kind, marker in (("register", "o"), ("call", "s")):
            runs = sorted((r for r in t["runs"] if r["kind"] == kind and r["p99_ms"] is not None
                           and not r["name"].startswith("register-all")), key=lambda r: r["target_rate"])
            if runs:
                ax.plot([r["target_rate"] for r in runs], [max(r["p99_ms"], 0.5) for r in runs],
                        marker=marker, linestyle="-" if kind == "register" else "--", color=f"C{i}",
                        label=f"{t['name']} {kind} p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("p99 response time vs offered rate")
    ax.set_xlabel("offered rate (/s)")
    ax.set_ylabel("p99 ms (REGISTER: both round trips; call: INVITE to 200)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    fig.suptitle(f"sipfarm vs Kamailio, {summary['machine']['nproc']} CPUs ({summary['settings']['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "plot": out / "plot.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(summary))
    plot(summary, paths["plot"])
    return paths


def headline(summary: Mapping[str, Any]) -> list[str]:
    out = []
    for t in summary["targets"].values():
        if t["error"]:
            out.append(f"{t['name']}: failed ({t['error'].splitlines()[0][:100]})")
            continue
        out.append(f"{t['name']}: {_f(t['max_rate']['register'])} REG/s, {_f(t['max_rate']['call'])} calls/s; "
                   f"{_f(_eff(t, 'register'))} REG and {_f(_eff(t, 'call'))} calls per server CPU-s")
    for ref, ratios in (summary["comparison"].get("ratios_by_reference") or {}).items():
        for name, r in ratios.items():
            if summary["targets"][name]["kind"] in ("sipfarm", "sipfarm-node"):
                out.append(f"{name} / {ref}: per CPU-s REG {_f(r['regs_per_cpu_s'], '.2f')}, calls "
                           f"{_f(r['calls_per_cpu_s'], '.2f')}; max rate REG {_f(r['register_rate'], '.2f')}, "
                           f"calls {_f(r['call_rate'], '.2f')}")
    return out


def build_media_summary(*, media: Mapping[str, Any] | None, machine: Mapping[str, Any], command: str,
                        elapsed_s: float, interrupted: bool, farm: Sequence[TargetResult] = (),
                        notes: Sequence[str] = ()) -> dict[str, Any]:
    """summary.json of `sipfarm bench --media` (the media benchmark's data under `media`, the
    call search of a farm with a relay under `farm_with_relays`)."""
    return {
        "schema": 1,
        "kind": "media",
        "command": command,
        "elapsed_s": round(elapsed_s, 1),
        "interrupted": interrupted,
        "machine": dict(machine),
        "media": dict(media) if media is not None else None,
        "farm_with_relays": {r.name: target_summary(r) for r in farm},
        "notes": list(notes),
    }


def media_markdown(summary: Mapping[str, Any]) -> str:
    from benchmarks import media_bench  # noqa: PLC0415

    m = summary["machine"]
    lines = [
        "# sipfarm media benchmark",
        "",
        f"`{summary['command']}`, {summary['elapsed_s']:.0f} s" + (" **(interrupted)**" if summary["interrupted"]
                                                                    else ""),
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, kernel {m['kernel']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}.",
        "",
    ]
    media = summary.get("media")
    lines.append(media_bench.markdown(media) if media else "No media results (see the log).\n")
    farm = summary.get("farm_with_relays") or {}
    if farm:
        lines += ["## Calls/s of the farm with relays on (and off, same run)", "",
                  "SIPp UAC -> balancer -> node -> SIPp UAS (INVITE with SDP, 407, 200 with SDP, ACK, hold, BYE); "
                  "with a relay the node anchors every call on it (ng offer, answer, delete); no RTP flows. "
                  "Calls per node CPU-s: the node's processes only (the relay's CPU is in the last column).", "",
                  "| target | calls/s (< 1% failed) | call setup p50/p95/p99 ms | calls per node CPU-s "
                  "| CPU % per role at that rate |", "|---|---|---|---|---|"]
        for t in farm.values():
            if t["error"]:
                lines.append(f"| {t['name']} | failed: {t['error'].splitlines()[0][:80]} ||||")
                continue
            run = t["best"].get("call")
            failed = t["first_failure"].get("call")
            rate = _f(t["max_rate"]["call"]) + (f" (fail {failed['target_rate']:,.0f})" if failed else "")
            pct = "/".join(_f(run and run[k], ".0f") for k in ("p50_ms", "p95_ms", "p99_ms"))
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in run["cpu_pct"].items()) if run else "-"
            lines.append(f"| {t['name']} | {rate} | {pct} | {_f(_eff(t, 'call'))} | {cpu} |")
        lines.append("")
    if summary.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in summary["notes"]), ""]
    return "\n".join(lines)


def write_media(out: Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    paths = {"json": out / "summary.json", "markdown": out / "summary.md", "media": out / "media.json"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["media"].write_text(json.dumps(summary.get("media"), indent=2, default=str) + "\n")
    paths["markdown"].write_text(media_markdown(summary))
    return paths


def media_headline(summary: Mapping[str, Any]) -> list[str]:
    from benchmarks import media_bench  # noqa: PLC0415

    media = summary.get("media")
    out = media_bench.headline(media) if media else ["media: no results"]
    for t in (summary.get("farm_with_relays") or {}).values():
        out.append(f"{t['name']}: failed" if t["error"] else
                   f"{t['name']}: {_f(t['max_rate']['call'])} calls/s with the relay anchoring every call")
    return out
