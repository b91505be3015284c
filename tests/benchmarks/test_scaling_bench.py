"""`sipfarm bench --scaling --tiny`: farms of 1 and 2 nodes, each node held to a CPU quota (its own
cgroup), then a 2-node farm whose balancer is held to one, each at one low fixed rate. A smoke
test of the scaling benchmark, not a timed one: it checks the result files' shape, that the
quotas were set and that calls and REGISTERs went through; no rate and no ratio is asserted
(the curve itself is benchmarks/results-scaling.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.cpulimit import CGROUP_CPU, CpuLimit

pytestmark = pytest.mark.skipif(
    shutil.which("sipp") is None or shutil.which("redis-server") is None or CpuLimit.unavailable() is not None,
    reason="needs sipp, redis-server and a writable cgroup v1 cpu controller (root)",
)


def _our_cgroups() -> set[str]:
    return {p.name for p in CGROUP_CPU.glob("sipfarm-scaling-*")}


@pytest.mark.timeout(150)
def test_tiny_scaling_run_limits_each_node_and_the_balancer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _our_cgroups()
    code = harness.main(["--scaling", "--tiny", "--step-s", "1", "--out", str(tmp_path)])
    assert code == harness.EXIT_OK, capsys.readouterr().err[-3000:]
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "scaling.json").read_text())
    assert summary["kind"] == "scaling" and not summary["interrupted"]
    assert [(f["name"], f["nodes"], f["role"]) for f in summary["farms"]] == [
        ("sipfarm-1n", 1, "curve"),
        ("sipfarm-2n", 2, "curve"),
        ("balancer-alone", 2, "balancer"),
    ]
    for farm in summary["farms"]:
        assert farm["error"] is None, farm["error"]
        calls = farm["call"]["at_max"]
        assert calls is not None, farm["name"]  # the fixed call step passed (5 calls/s)
        roles = calls["roles"]
        if farm["role"] == "curve":
            nodes = [label for label in roles if label.startswith("node")]
            assert len(nodes) == farm["nodes"]
            assert all(roles[n]["quota_cores"] == farm["node_cpu"] for n in nodes), roles
            assert roles["balancer"]["quota_cores"] is None
            assert farm["register"]["at_max"] is not None
        else:
            assert roles["balancer"]["quota_cores"] == farm["balancer_cpu"] > 0, roles
            assert farm["register"]["max_rate"] is None  # calls only
    assert [p["nodes"] for p in summary["curve"]["call"]["points"]] == [1, 2]
    balancer = summary["balancer"]
    assert balancer["calls_per_balancer_cpu_s"] and balancer["calls_per_node_cpu_s"] and balancer["ratio"]
    markdown = (run / "scaling.md").read_text()
    assert "## The balancer alone" in markdown and "| 2 |" in markdown
    assert (run / "scaling.png").stat().st_size > 10_000
    assert _our_cgroups() <= before  # every cgroup it made is gone
