"""`python -m benchmarks.soak`: memory under calls and hostile datagrams. A smoke test of the
mode (seconds, not minutes: the measurement is the benchmark's), and of its made-up traffic."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from benchmarks import soak
from sipfarm.sip.parser import parse_message


def test_the_made_up_datagrams_are_what_they_claim() -> None:
    rng = random.Random(7)
    kinds = [parse_message(soak._made_up(kind, "farm.test", 10, rng, 5060, "127.2.0.1")) for kind in range(6)]
    assert [m.method or m.status for m in kinds] == [b"INVITE", b"REGISTER", 200, b"ACK", b"BYE", b"OPTIONS"]
    assert kinds[1].has("authorization") and kinds[3].to_tag.startswith(b"ch-")  # type: ignore[union-attr]
    assert isinstance(soak._made_up(6, "farm.test", 10, rng, 5060, "127.2.0.1"), bytes)


@pytest.mark.skipif(
    shutil.which("sipp") is None or shutil.which("redis-server") is None, reason="needs sipp and redis-server"
)
@pytest.mark.timeout(120)
def test_a_short_soak_writes_its_samples(tmp_path: Path) -> None:
    code = soak.main(["--seconds", "6", "--call-rate", "10", "--attack-rate", "200", "--users", "20",
                      "--sample-s", "1", "--max-growth", "1000", "--out", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0, result
    assert result["dead"] is None and result["calls_ok"] == 60 and result["calls_failed"] == 0
    assert result["attack_sent"] > 0 and result["attack_sources"] >= soak.SOURCES_PER_ROUND
    assert len(result["samples"]) >= 4 and all(s["node_mb"] > 0 for s in result["samples"])
    assert "| t (s) | node MB | balancer MB | Redis MB | Redis keys |" in (tmp_path / "soak.md").read_text()
