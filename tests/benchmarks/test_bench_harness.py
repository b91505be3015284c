"""The benchmark harness end to end at a tiny rate: real redis-server, balancer, node and SIPp
(Kamailio too when installed), one fixed low-rate step of each kind, then the result files.

The full and --quick runs take minutes and are `slow`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness

pytestmark = pytest.mark.skipif(shutil.which("sipp") is None or shutil.which("redis-server") is None,
                                reason="needs sipp and redis-server")

SUMMARY_KEYS = {"schema", "command", "elapsed_s", "interrupted", "machine", "settings", "notes", "targets",
                "comparison", "model"}
TARGET_KEYS = {"name", "kind", "nodes", "workers", "error", "max_rate", "best", "efficiency", "saturation",
               "peak_rss_mb", "redis", "runs"}
RUN_KEYS = {"target_rate", "succeeded", "failed", "failure_pct", "retransmissions", "responses_5xx", "p50_ms",
            "p95_ms", "p99_ms", "cpu_s", "cpu_pct", "hottest_pct", "udp_drops", "redis_commands"}


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.timeout(60)
def test_tiny_run_writes_json_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = harness.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    assert code == 0, capsys.readouterr()
    run = only_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    farm = summary["targets"]["sipfarm-1n"]
    assert farm.keys() >= TARGET_KEYS
    assert farm["error"] is None
    assert farm["max_rate"] == {"register": 25.0, "call": 5.0}
    for kind in ("register", "call"):
        best = farm["best"][kind]
        assert best.keys() >= RUN_KEYS
        assert best["succeeded"] > 0 and best["failed"] == 0
        assert {"node1", "balancer", "redis", "sipp-uas"} <= best["cpu_s"].keys()
        assert farm["efficiency"][kind]["per_server_cpu_s"] > 0
        assert farm["efficiency"][kind]["redis_cmds_per_op"] > 0
        assert farm["saturation"][kind]["process"]
    assert {"node1", "balancer", "redis"} <= farm["peak_rss_mb"].keys()
    assert summary["model"] is not None and summary["model"]["components"]
    if "kamailio" in summary["targets"]:
        assert summary["comparison"]["ratios"]["sipfarm-1n"]["register_rate"] == 1.0
    markdown = (run / "summary.md").read_text()
    assert "| sipfarm-1n | 25 | 5 |" in markdown  # no failing step: no bracket
    assert "Capacity model" in markdown
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "raw" / "sipfarm-1n").glob("*/stats.csv"))


@pytest.mark.timeout(60)
def test_tiny_run_measures_the_node_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--node-alone: one node with SIPp straight at it, no balancer (as Kamailio is measured)."""
    code = harness.main(["--tiny", "--node-alone", "--no-kamailio", "--out", str(tmp_path), "--no-progress"])
    assert code == 0, capsys.readouterr()
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    alone = summary["targets"]["sipfarm-node"]
    assert alone["error"] is None and alone["max_rate"] == {"register": 25.0, "call": 5.0}
    assert alone["kind"] == "sipfarm-node"  # not a farm of the scaling, the plot or the model
    assert "sipfarm-node" not in json.dumps(summary["model"])  # the model reads sipfarm-1n
    for kind in ("register", "call"):
        best = alone["best"][kind]
        assert best["succeeded"] > 0 and best["failed"] == 0
        assert "node1" in best["cpu_s"] and "balancer" not in best["cpu_s"]
        assert alone["efficiency"][kind]["per_server_cpu_s"] > 0


def test_missing_sipp_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    real_which = shutil.which
    monkeypatch.setattr(harness.shutil, "which", lambda name, *a, **k: None if name == "sipp" else real_which(name))
    assert harness.main(["--tiny", "--out", str(tmp_path)]) == harness.EXIT_MISSING_TOOL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install sip-tester" in err[0]
    assert not list(tmp_path.iterdir())


def test_bad_node_list_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        harness.main(["--nodes", "1,x"])
    assert exc.value.code == 2


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_run_under_five_minutes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert summary["elapsed_s"] < 300
    assert summary["targets"]["sipfarm-1n"]["max_rate"]["register"]
