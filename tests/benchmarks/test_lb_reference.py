"""`python -m benchmarks.lb_reference`: the Kamailio stateless balancer config it writes is one
Kamailio accepts, the summary's ratios come from the steps' CPU; then a `--tiny` run end to end
(real redis-server, sipfarm balancer and node, Kamailio, SIPp and the floor forwarders; a smoke
test, no speed asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import lb_reference
from benchmarks.kamailio import KAMAILIO_BIN

HAVE_KAMAILIO = Path(KAMAILIO_BIN).exists()


@pytest.mark.skipif(not HAVE_KAMAILIO, reason="needs kamailio")
def test_kamailio_accepts_the_stateless_balancer_config(tmp_path: Path) -> None:
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(lb_reference.render_lb_config(host="127.0.0.1", port=5099, node="127.0.0.1:5098", children=1,
                                                 ctl_port=5097))
    check = subprocess.run([KAMAILIO_BIN, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    text = cfg.read_text()
    # stateless: no transaction module, no authentication, no location
    assert all(f'"{module}.so"' not in text for module in ("tm", "auth", "usrloc", "registrar"))


@pytest.mark.skipif(shutil.which("sipp") is None or shutil.which("redis-server") is None or not HAVE_KAMAILIO,
                    reason="needs sipp, redis-server and kamailio")
@pytest.mark.timeout(150)
def test_tiny_run_measures_both_balancers_and_the_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = lb_reference.main(["--tiny", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr()
    [run] = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "lb_reference.json").read_text())
    assert summary["kind"] == "lb_reference" and not summary["interrupted"]
    rows = {r["name"]: r for r in summary["targets"]}
    assert set(rows) == {"sipfarm", "kamailio-lb"}
    for row in rows.values():
        assert row["error"] is None, row["error"]
        for kind in ("register", "call"):
            assert row[kind]["passed"] and row[kind]["succeeded"] > 0, (row["name"], kind)
    # every call crossed Kamailio as it crosses sipfarm's balancer: 16 datagrams in (REGISTER: 4)
    assert rows["kamailio-lb"]["call"]["kamailio_messages_in_per_op"] == lb_reference.DATAGRAMS_PER_CALL
    assert rows["kamailio-lb"]["register"]["kamailio_messages_in_per_op"] == 4
    floors = {f["mode"]: f for f in summary["floor"]}
    assert set(floors) == set(lb_reference.FLOOR_MODES)
    for floor in floors.values():
        assert floor["datagrams_back"] == floor["datagrams_sent"] == floor["calls"] * lb_reference.DATAGRAMS_PER_CALL
    assert "Floor (no SIP" in (run / "lb_reference.md").read_text()
