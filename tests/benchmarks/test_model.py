"""The capacity model (benchmarks/model.py) in memory: arithmetic a reader can check by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import model

MEASURED = model.Measured(
    source="test",
    node_regs_per_cpu_s=2_000.0,
    node_calls_per_cpu_s=1_000.0,
    balancer_regs_per_cpu_s=4_000.0,
    balancer_calls_per_cpu_s=2_000.0,
    redis_cmds_per_register=9.0,
    redis_cmds_per_call=4.0,
    redis_cmds_per_cpu_s=100_000.0,
    redis_bytes_per_user=1_500.0,
    relay_pps_per_cpu_s=200_000.0,
    keepalives_per_cpu_s=100_000.0,
)


def test_ten_million_users_are_sized_per_component() -> None:
    w = model.Workload(users=10_000_000)
    assert w.peak_reg_rate == pytest.approx(10_000_000 / 3600 * 3)
    assert w.busy_hour_cps == pytest.approx(5_000.0)
    assert w.concurrent_calls == pytest.approx(600_000.0)
    assert w.relay_pps == pytest.approx(60_000_000.0)  # 600,000 calls x 2 phones x 50 packets/s
    p = model.project(MEASURED, w)
    parts = {c.name: c for c in p.components}
    node_cores = w.peak_reg_rate / 2_000 + 5_000 / 1_000
    assert parts["node"].cores == pytest.approx(node_cores, rel=1e-3)
    balancer_cores = w.peak_reg_rate / 4_000 + 5_000 / 2_000 + w.keepalive_rate / 100_000
    assert parts["balancer"].cores == pytest.approx(balancer_cores, rel=1e-3)
    # 3 M connections at 50,000 a balancer outnumber the processes CPU asks for
    assert parts["balancer"].instances == 60
    assert parts["relay"].cores == pytest.approx(300.0)
    assert parts["relay"].instances == 501  # 300 / 0.6 + 1
    # 15 GB of state over 8 GB masters: 2 masters, each with two replicas
    assert parts["redis shard"].instances == 6
    assert p.first_bottleneck.startswith("relay")
    text = model.to_markdown(p)
    assert "| relay | 300 | 501 |" in text and "Redis Cluster: 2 master(s)" in text


def test_without_media_or_keepalive_figures_those_rows_are_left_out() -> None:
    bare = model.Measured("test", 2_000.0, 1_000.0, None, None, None, None, None, None)
    p = model.project(bare)
    assert [c.name for c in p.components] == ["node"]
    assert "n/a" in model.to_markdown(p)


def test_cli_reads_the_media_benchmarks_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = {"targets": {"s": {"kind": "sipfarm", "name": "s", "nodes": 1, "efficiency": {
        "register": {"per_server_cpu_s": 2000.0}, "call": {"per_server_cpu_s": 1000.0}}}}}
    media = {"relays": {"sipfarm": {"calls": {"packets_per_cpu_s": 150_000}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "media.json").write_text(json.dumps(media))
    assert model.main([str(tmp_path / "summary.json"), "--users", "10000000",
                       "--media", str(tmp_path / "media.json")]) == 0
    assert "relay 150,000 packets per CPU-s" in capsys.readouterr().out
