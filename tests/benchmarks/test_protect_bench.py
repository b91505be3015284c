"""`sipfarm bench --protect`: the balancer configurations it writes (loaded by sipfarm's own
config loader and run through the real front door on a fake clock), the counters it reads, the
table and report it renders from measurements; then a `--tiny` run end to end (real
redis-server, balancer, node and SIPp; a smoke test, no speed)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from benchmarks import harness, protect_bench, report
from benchmarks.harness import Measurement, TargetResult
from benchmarks.kamailio import DEFAULT_DOMAIN
from sipfarm.balancer.frontdoor import FrontDoor
from sipfarm.balancer.main import front_door_policy
from sipfarm.config import BalancerConfig, load
from sipfarm.protect.netlist import NetList, Verdict
from sipfarm.sip.parser import parse_message

SIPP_SOURCE = "127.0.0.1"


def balancer_config(tmp_path: Path, name: str) -> BalancerConfig:
    """What `sipfarm balancer --config` reads for configuration `name`."""
    config = protect_bench.CONFIGS[name]
    path = tmp_path / f"{name}.toml"
    lines = protect_bench.toml_lines({**protect_bench.balancer_settings(config, DEFAULT_DOMAIN), "metrics": "x:1"})
    path.write_text('[balancer]\nallow_destinations = ["127.0.0.0/8"]\n' + lines)
    return load(BalancerConfig, path, section="balancer", environ={})


def test_off_turns_the_front_door_off(tmp_path: Path) -> None:
    assert balancer_config(tmp_path, "off").protect is False


def test_default_is_the_shipped_front_door_which_exempts_sipp(tmp_path: Path) -> None:
    cfg = balancer_config(tmp_path, "default")
    shipped = BalancerConfig()
    for key in protect_bench.PROTECT_KEYS:
        assert getattr(cfg, key) == getattr(shipped, key), key
    front = FrontDoor(front_door_policy(cfg))
    # far over the shipped INVITE budget, never limited: loopback is exempt
    assert all(front.screen(b"INVITE sip:a@x SIP/2.0\r\n", SIPP_SOURCE, 0.0) for _ in range(500))
    assert front.stats == {}


def test_full_checks_sipp_but_never_bans_it_at_far_more_than_any_offered_rate(tmp_path: Path) -> None:
    cfg = balancer_config(tmp_path, "full")
    assert cfg.protect and cfg.exempt == [] and cfg.domains == [DEFAULT_DOMAIN]
    lists = NetList(cfg.allow, cfg.deny)  # every message pays the verdict; SIPp and the probe pass it
    assert lists.active and lists.verdict(SIPP_SOURCE) is lists.verdict("127.0.0.2") is Verdict.ALLOWED
    front = FrontDoor(front_door_policy(cfg))
    # 20,000 REGISTERs, INVITEs and BYEs each within one window: 10x what this box offers
    for method in (b"REGISTER", b"INVITE", b"BYE"):
        for i in range(20_000):
            assert front.screen(method + b" sip:farm SIP/2.0\r\n", SIPP_SOURCE, i * 1e-5), method
    assert front.stats == {}
    # the checks after parsing run too: the probe's unserved domain is dropped, SIPp's is not
    probe = parse_message(protect_bench.probe_request("127.0.0.1:5060", "127.0.0.2", protect_bench.PROBE_DOMAIN))
    assert not front.inspect(probe, "127.0.0.2", lambda _uri: False, 1.0)
    ours = parse_message(protect_bench.probe_request("127.0.0.1:5060", SIPP_SOURCE, DEFAULT_DOMAIN))
    assert front.inspect(ours, SIPP_SOURCE, lambda _uri: False, 1.0)
    assert front.stats == {"unknown_domain": 1}  # not banned: one suspect request


def test_a_list_refusal_of_sipp_voids_the_configuration() -> None:
    assert fake_summary({"not_allowed": 7})["protect"][1]["void"] == ["not_allowed"]


def test_protect_variables_in_the_environment_are_dropped() -> None:
    env = {"SIPFARM_PROTECT": "false", "SIPFARM_EXEMPT": "0.0.0.0/0", "SIPFARM_DENY": "127.0.0.1", "SIPFARM_REDIS": "r",
           "PATH": "/bin"}  # fmt: skip
    assert protect_bench.without_protect_env(env) == {"SIPFARM_REDIS": "r", "PATH": "/bin"}


def test_protect_counts_from_a_metrics_page() -> None:
    text = (
        "# HELP sipfarm_balancer_protect_total Front-end protection decisions (drops, bans) by reason\n"
        "# TYPE sipfarm_balancer_protect_total counter\n"
        'sipfarm_balancer_protect_total{reason="unknown_domain"} 1.0\n'
        'sipfarm_balancer_protect_created{reason="unknown_domain"} 1.7e+09\n'
        'sipfarm_balancer_protect_total{reason="ban_started"} 3.0\n'
        'sipfarm_balancer_events_total{kind="x"} 9.0\n'
    )
    assert protect_bench.protect_counts(text) == {"unknown_domain": 1, "ban_started": 3}


def test_unknown_configuration_is_refused() -> None:
    assert [c.name for c in protect_bench.parse_configs("full, off")] == ["full", "off"]
    with pytest.raises(ValueError, match="--protect-configs"):
        protect_bench.parse_configs("off,paranoid")


def measurement(kind: str, rate: float, *, balancer_s: float, node_s: float, p99: float, passed: bool | None,
                raw_dir: str) -> Measurement:
    ok = int(rate * 5)
    return Measurement(
        name=f"{kind}-{rate:g}", kind=kind, target_rate=rate, achieved_rate=rate, throughput=rate, attempted=ok,
        succeeded=ok, failed=0, failure_pct=0.0, retransmissions=0, responses_5xx=0, p50_ms=1.0, p95_ms=p99,
        p99_ms=p99, wall_s=5.0, udp_drops=0, udp_drops_by_role={},
        cpu_s={"balancer": balancer_s, "node1": node_s, "redis": 0.1}, cpu_pct={}, hottest_pct={},
        redis_commands={}, passed=passed, raw_dir=raw_dir,
    )  # fmt: skip


def fake_summary(counts_full: dict[str, int]) -> dict[str, Any]:
    """off: 1,000 calls/s, 500 us of balancer and 1,000 us of node CPU a call; full: 800 calls/s,
    600 us and 1,000 us; both also at 500 calls/s (equal load)."""
    results, checks = [], {}
    for name, rate, bal_us in (("off", 1000.0, 500), ("full", 800.0, 600)):
        runs = [
            measurement("call", rate, balancer_s=rate * 5 * bal_us / 1e6, node_s=rate * 5 / 1e3, p99=40.0,
                        passed=True, raw_dir=f"{name}/1"),
            measurement("call", rate * 2, balancer_s=1.0, node_s=1.0, p99=900.0, passed=False, raw_dir=f"{name}/2"),
            measurement("call", 500.0, balancer_s=2500 * bal_us / 1e6, node_s=2.5, p99=8.0, passed=None,
                        raw_dir=f"{name}/3"),
        ]  # fmt: skip
        result = TargetResult(name, "sipfarm", 1, 1, note=name, server_labels=["node1"], runs=runs, call_max=rate)
        results.append(result)
        checks[name] = {
            "equal_load": {"call": {"rate": 500.0, "raw_dir": f"{name}/3", "passed": True}},
            "probe": True if name == "full" else None,
            "counts": counts_full if name == "full" else {},
        }
    settings = replace(
        harness.settings_from(harness.build_parser().parse_args(["--quick"])),
        nodes=(1,), kinds=("call",), build_used="compiled",
    )  # fmt: skip
    return protect_bench.build_summary(
        settings=settings,
        machine={"nproc": 2, "cpu_model": "test", "kernel": "6", "sipp": "3.6", "loadavg_at_start": [0.1, 0.2, 0.3]},
        results=results, checks=checks, notes=[], command="sipfarm bench --protect --quick", elapsed_s=1.0,
        interrupted=False, started_utc="2026-12-01 04:30",
    )  # fmt: skip


def test_table_ratios_to_off_at_max_and_at_equal_load() -> None:
    summary = fake_summary({"unknown_domain": 1})
    off, full = summary["protect"]
    assert off["ratio_to"] == "off" and off["ratio"]["max_rate"] == 1.0
    assert full["max_rate"] == 800.0 and full["first_failing_rate"] == 1600.0
    assert full["at_max"] == {"rate": 800.0, "passed": True, "p99_ms": 40.0, "balancer_us_per_op": 600.0,
                              "node_us_per_op": 1000.0}  # fmt: skip
    assert full["equal_load"]["balancer_us_per_op"] == 600.0 and full["equal_load"]["p99_ms"] == 8.0
    assert full["ratio"]["max_rate"] == 0.8
    assert full["ratio"]["at_max_balancer_us_per_op"] == 1.2
    assert full["ratio"]["equal_balancer_us_per_op"] == 1.2 and full["ratio"]["equal_node_us_per_op"] == 1.0
    assert full["void"] == [] and full["probe_dropped"] is True
    assert json.loads(json.dumps(summary))  # plain data


def test_markdown_shows_both_tables_and_the_checks() -> None:
    text = protect_bench.markdown(fake_summary({"unknown_domain": 1}))
    assert "| off | 1,000 (fail 2,000) | 40 | 500 | 1,000 | 1.00 | 1.00 | 1.00 | 1.00 |" in text
    assert "| full | 800 (fail 1,600) | 40 | 600 | 1,000 | 0.80 | 1.20 | 1.00 | 1.00 |" in text
    assert "every configuration at 500 calls/s" in text
    assert "| full | yes | 8 | 600 | 1,000 | 1.20 | 1.00 | 1.00 |" in text
    assert "- full (full): sipfarm_balancer_protect_total: unknown_domain 1; no ban, no rate drop; probe" in text
    assert "started 2026-12-01 04:30 UTC" in text


def test_a_ban_of_sipp_voids_the_configuration() -> None:
    summary = fake_summary({"ban_started": 1, "banned": 40, "rate_invite": 1, "unknown_domain": 1})
    full = summary["protect"][1]
    assert full["void"] == ["ban_started", "banned", "rate_invite"]
    assert any(note.startswith("full: VOID") for note in summary["notes"])
    assert "**VOID** (ban_started, banned, rate_invite)" in protect_bench.markdown(summary)


def test_report_target_summary_ignores_the_equal_load_step() -> None:
    # passed=None keeps the equal-load step out of the searches' best and first failure
    runs = [measurement("call", 500.0, balancer_s=1, node_s=1, p99=5.0, passed=None, raw_dir="e")]
    t = report.target_summary(TargetResult("x", "sipfarm", 1, 1, runs=runs, call_max=None))
    assert t["best"]["call"] is None and t["first_failure"]["call"] is None


@pytest.mark.skipif(shutil.which("sipp") is None or shutil.which("redis-server") is None,
                    reason="needs sipp and redis-server")
@pytest.mark.timeout(120)
def test_tiny_protect_run_registers_and_calls_in_every_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = harness.main(["--protect", "--tiny", "--step-s", "1", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "protect" and not summary["interrupted"]
    rows = {(r["config"], r["kind"]): r for r in summary["protect"]}
    assert set(rows) == {(c, k) for c in ("off", "default", "full") for k in ("register", "call")}
    for (config, kind), row in rows.items():
        assert row["error"] is None, row["error"]
        assert row["max_rate"], (config, kind)  # the fixed step passed: SIPp got through the front door
        assert row["at_max"]["balancer_us_per_op"] and row["at_max"]["node_us_per_op"], (config, kind)
        assert row["void"] == [], (config, kind)
    # the full configuration screened loopback (the probe was dropped), the default one nothing
    assert rows["full", "call"]["probe_dropped"] is True
    assert rows["full", "call"]["protect_counts"] == {"unknown_domain": 1}
    assert rows["default", "call"]["protect_counts"] == {} and rows["off", "call"]["probe_dropped"] is None
    assert "## Front door counters and checks" in (run / "summary.md").read_text()
