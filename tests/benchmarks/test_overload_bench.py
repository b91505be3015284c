"""`sipfarm bench --overload --tiny`: a 2-node farm (each node CPU-limited when a cgroup can be
set), one low fixed rate standing for the farm's max, then floods at 3x it with shedding on
and off. A smoke test of the overload benchmark, not a timed one: it checks the result files'
shape and that the calls went through; the shedding itself is tests/balancer/test_balancer_overload.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import harness

pytestmark = pytest.mark.skipif(
    shutil.which("sipp") is None or shutil.which("redis-server") is None, reason="needs sipp and redis-server"
)


@pytest.mark.timeout(120)
def test_tiny_overload_run_floods_with_shedding_on_and_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = harness.main(["--overload", "--tiny", "--overload-s", "2", "--out", str(tmp_path)])
    assert code == harness.EXIT_OK, capsys.readouterr().err[-3000:]
    (run,) = list(tmp_path.iterdir())
    summary = json.loads((run / "overload.json").read_text())
    assert summary["farm_max_calls_per_s"] == 5.0 and summary["overload_factor"] == 3.0
    floods = summary["floods"]
    assert [f["shedding"] for f in floods] == [True, False]
    for flood in floods:
        # a smoke test of the mode, not a measurement: on a loaded machine SIPp may fall
        # behind its rate, and with shedding off calls may time out
        assert flood["offered_rate"] == 15 and 0 < flood["attempted"] <= 30, flood
        assert flood["admitted"] + flood["shed_503"] == flood["attempted"], flood
    assert floods[0]["completed"] >= 0.9 * floods[0]["admitted"], floods[0]
    table = (run / "overload.md").read_text()
    assert "| on | 15 |" in table and "| off | 15 |" in table
