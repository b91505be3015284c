"""`sipfarm bench --media --tiny`: a real `sipfarm relay` (and rtpengine userspace when
installed) with rtpgen phones on loopback: calls set up over ng, RTP through the relay both
ways, the result files written.  A smoke test of the media benchmark, not a timed one: no
figure is asserted beyond "packets flowed"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.media_bench import rtpengine_available

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("redis-server") is None, reason="needs gcc (rtpgen) and redis-server"
)

RELAY_KEYS = {"name", "version", "error", "pps", "calls", "single_stream", "steps"}
STEP_KEYS = {
    "test",
    "rate",
    "sent",
    "received",
    "loss_pct",
    "relay_cpu_s",
    "relay_cpu_pct",
    "packets_per_cpu_s",
    "relay_socket_drops",
    "generator_limited",
    "passed",
}


@pytest.mark.timeout(90)
def test_tiny_media_run_forwards_packets_and_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    relays = "sipfarm,rtpengine" if rtpengine_available() else "sipfarm"
    code = harness.main(["--media", "--tiny", "--media-relays", relays, "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "media" and not summary["interrupted"]
    media = summary["media"]
    assert media == json.loads((run / "media.json").read_text())
    assert list(media["relays"]) == relays.split(",")
    for name, relay in media["relays"].items():
        assert relay.keys() >= RELAY_KEYS, name
        assert relay["error"] is None, relay["error"]
        assert {step["test"] for step in relay["steps"]} == {"pps", "calls", "single_stream"}
        for step in relay["steps"]:
            assert step.keys() >= STEP_KEYS
            assert step["sent"] > 0 and step["received"] > 0, (name, step)  # RTP went through the relay
        # whether a step passed (< 0.1% loss) depends on the machine's load: not asserted
        assert relay["pps"].keys() >= {"max_pps", "packets_per_cpu_s", "stopped_by"}
        assert relay["calls"].keys() >= {"max_calls", "stopped_by"}
        assert [s["rate"] for s in relay["single_stream"]] == [5000]
    if "rtpengine" in media["relays"]:
        assert media["ratio_sipfarm_to_rtpengine"].keys() >= {"packets_per_cpu_s", "max_pps", "calls_50pps"}
    markdown = (run / "summary.md").read_text()
    assert "| sipfarm |" in markdown
