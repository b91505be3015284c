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
        assert relay["pps"]["max_pps"] and relay["pps"]["packets_per_cpu_s"]
        assert relay["calls"]["max_calls"] == 10
        assert relay["single_stream"][0]["rate"] == 5000
    if "rtpengine" in media["relays"]:
        assert media["ratio_sipfarm_to_rtpengine"]["packets_per_cpu_s"] is not None
    markdown = (run / "summary.md").read_text()
    assert "| sipfarm |" in markdown
