"""benchmarks.report with several Kamailio references (`sipfarm bench --kamailio-memory both`):
ratios against each, the model against the first, summary.md and the headline, no processes."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness, report
from benchmarks.harness import Measurement, TargetResult

MACHINE = {"nproc": 2, "cpu_model": "test", "kernel": "6", "loadavg_at_start": [0.0, 0.0, 0.0],
           "sipp": "sipp", "kamailio": "kamailio 5.6.3", "redis": "redis"}


def run(kind: str, rate: float, server: str, cpu_s: float) -> Measurement:
    done = int(rate * 3)
    return Measurement(
        name=f"{kind}-{rate:g}", kind=kind, target_rate=rate, achieved_rate=rate, throughput=rate, attempted=done,
        succeeded=done, failed=0, failure_pct=0.0, retransmissions=0, responses_5xx=0, p50_ms=1.0, p95_ms=2.0,
        p99_ms=3.0, wall_s=3.0, udp_drops=0, udp_drops_by_role={}, cpu_s={server: cpu_s, "sipp-uas": 1.0},
        cpu_pct={server: cpu_s / 3 * 100}, hottest_pct={server: cpu_s / 3 * 100}, redis_commands={}, passed=True)


def target(name: str, kind: str, server: str, reg: float, call: float, reg_cpu: float, call_cpu: float,
           note: str = "") -> TargetResult:
    return TargetResult(name, kind, 1, 1, note=note, server_labels=[server],
                        runs=[run("register", reg, server, reg_cpu), run("call", call, server, call_cpu)],
                        register_max=reg, call_max=call)


def summary() -> dict[str, object]:
    results = [
        target("sipfarm-1n", "sipfarm", "node1", 400, 100, 1.2, 1.5),
        target("kamailio", "kamailio", "kamailio", 800, 200, 1.2, 1.5, "memory manager qm"),
        target("kamailio-tlsf", "kamailio", "kamailio", 800, 200, 0.6, 0.5, "memory manager tlsf"),
        target("kamailio-redis", "kamailio", "kamailio", 200, 100, 1.2, 1.5),
    ]
    return report.build_summary(settings={"mode": "quick", "users": 2000, "workers": 1, "hold_ms": 500,
                                          "step_s": 3.0, "max_p99_ms": 200.0, "build_used": "compiled"},
                                machine=MACHINE, results=results, notes=[], command="sipfarm bench",
                                elapsed_s=1.0, interrupted=False)


def test_ratios_against_each_in_memory_kamailio_qm_first() -> None:
    comp = summary()["comparison"]
    assert isinstance(comp, dict)
    assert comp["references"] == ["kamailio", "kamailio-tlsf"]
    assert comp["reference"] == "kamailio"
    assert comp["ratios"] is comp["ratios_by_reference"]["kamailio"]
    vs_qm = comp["ratios_by_reference"]["kamailio"]["sipfarm-1n"]
    vs_tlsf = comp["ratios_by_reference"]["kamailio-tlsf"]["sipfarm-1n"]
    assert (vs_qm["regs_per_cpu_s"], vs_qm["calls_per_cpu_s"]) == (0.5, 0.5)
    assert (vs_tlsf["regs_per_cpu_s"], vs_tlsf["calls_per_cpu_s"]) == (0.25, 0.167)
    assert comp["ratios_by_reference"]["kamailio"]["kamailio-tlsf"]["regs_per_cpu_s"] == 2.0
    assert "kamailio-tlsf" not in comp["ratios_by_reference"]["kamailio-tlsf"]


def test_model_markdown_and_headline_with_two_references(tmp_path: Path) -> None:
    s = summary()
    model = s["model"]
    assert isinstance(model, dict)
    assert model["measured"]["kamailio_regs_per_cpu_s"] == 2000.0  # qm's: the first reference
    text = report.markdown(s)
    assert "## sipfarm / kamailio (memory manager qm)" in text
    assert "## sipfarm / kamailio-tlsf (memory manager tlsf)" in text
    assert "| sipfarm-1n | 0.50 | 0.50 | 0.25 | 0.17 |" in text
    lines = report.headline(s)
    assert "sipfarm-1n / kamailio-tlsf: per CPU-s REG 0.25, calls 0.17; max rate REG 0.50, calls 0.50" in lines
    paths = report.write_all(tmp_path, s)
    assert json.loads(paths["json"].read_text())["comparison"]["references"] == ["kamailio", "kamailio-tlsf"]


def test_only_tlsf_is_the_reference() -> None:
    results = [target("sipfarm-1n", "sipfarm", "node1", 400, 100, 1.2, 1.5),
               target("kamailio-tlsf", "kamailio", "kamailio", 800, 200, 0.6, 0.5)]
    s = report.build_summary(settings={}, machine=MACHINE, results=results, notes=[], command="c", elapsed_s=1.0,
                             interrupted=False)
    assert s["comparison"]["reference"] == "kamailio-tlsf"
    assert s["model"]["measured"]["kamailio_calls_per_cpu_s"] == 1200.0
    assert "## sipfarm / Kamailio\n" in report.markdown({**s, "settings": {
        "mode": "quick", "users": 1, "workers": 1, "hold_ms": 1, "step_s": 1.0, "max_p99_ms": None}})


def test_kamailio_memory_option(tmp_path: Path) -> None:
    parse = harness.build_parser().parse_args
    default = harness.settings_from(parse(["--quick"]))
    both = harness.settings_from(parse(["--quick", "--kamailio-memory", "both"]))
    assert default.kamailio_memory == ("qm",)
    assert both.kamailio_memory == ("qm", "tlsf")
    if both.kamailio:
        assert both.target_count == default.target_count + 1
        assert both.total_budget_s == default.total_budget_s + 2 * both.search_budget_s
        names = [make().name for make in harness.Harness(both, tmp_path, print,
                                                          lambda _t, _f: None).targets()]
        assert names == ["sipfarm-1n", "sipfarm-2n", "kamailio", "kamailio-tlsf", "kamailio-redis"]
    assert harness.settings_from(parse(["--kamailio-memory", "tlsf"])).kamailio_memory == ("tlsf",)
