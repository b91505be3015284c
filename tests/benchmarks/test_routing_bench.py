"""`sipfarm bench --routing --tiny`: one node plain, with its accounts only in a real slapd
(caches cold and warm) and with a routing helper program asked per INVITE, each at one low
fixed call rate. A smoke test of the routing benchmark, not a timed one: it checks the result
files' shape and that every configuration's calls went through, no speed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import harness, slapd

pytestmark = pytest.mark.skipif(
    shutil.which("sipp") is None or shutil.which("redis-server") is None or not slapd.available(),
    reason="needs sipp, redis-server and slapd",
)

CONFIGS = ["plain", "ldap-cold", "ldap-warm", "helper"]
ROW_KEYS = {
    "config",
    "error",
    "calls_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "calls_per_node_cpu_s",
    "calls_per_slapd_cpu_s",
    "ldap_searches_per_call",
    "ratio_to_plain",
}


@pytest.mark.timeout(90)
def test_tiny_routing_run_places_calls_in_every_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = harness.main(["--routing", "--tiny", "--step-s", "1", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "routing" and not summary["interrupted"]
    assert [row["config"] for row in summary["routing"]] == CONFIGS
    for row in summary["routing"]:
        assert row.keys() >= ROW_KEYS, row["config"]
        assert row["error"] is None, row["error"]
        runs = summary["targets"][row["config"]]["runs"]
        registered = [r for r in runs if r["kind"] == "register"]
        calls = [r for r in runs if r["kind"] == "call"]
        assert registered and registered[0]["succeeded"] > 0, row["config"]  # LDAP users too
        assert calls and calls[-1]["succeeded"] > 0, row["config"]  # calls went through the routing step
        assert row["ratio_to_plain"].keys() == {"calls_per_s", "calls_per_node_cpu_s"}
    # the LDAP configurations ran a slapd, the others did not
    cpu = {row["config"]: summary["targets"][row["config"]]["runs"][-1]["cpu_s"] for row in summary["routing"]}
    assert "slapd" in cpu["ldap-cold"] and "slapd" in cpu["ldap-warm"] and "slapd" not in cpu["plain"]
    # cold: the callers' accounts come from LDAP during the calls; warm: from the caches
    searches = {row["config"]: row["ldap_searches_per_call"] for row in summary["routing"]}
    assert searches["ldap-cold"] is not None and searches["ldap-cold"] > 0
    assert searches["ldap-warm"] is not None and searches["plain"] is None
    markdown = (run / "summary.md").read_text()
    assert all(f"| {name} |" in markdown for name in CONFIGS)
