"""fixtures.startup.wait_started, the wait for a test process's first sign of life: it returns
once ready, stops as soon as the process exits, and says what it awaited, the process's state
and the tail of its log."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
from fixtures.startup import StartupError, udp_bound, wait_started


def shell(script: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT)


def test_ready_returns(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    proc = shell("echo started; exec sleep 30", log)
    try:
        waited = wait_started("p", proc, lambda: "started" in log.read_text(), "logs started", log=log)
        assert waited < 10
    finally:
        proc.kill()
        proc.wait()


def test_ready_just_before_exiting_counts(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    proc = shell("echo started", log)
    proc.wait()
    wait_started("p", proc, lambda: "started" in log.read_text(), "logs started", log=log)


def test_an_exit_ends_the_wait_with_status_and_log(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    proc = shell("echo 'bad option --frobnicate'; exit 3", log)
    began = time.monotonic()
    with pytest.raises(StartupError) as failed:
        wait_started("p", proc, lambda: False, "answers OPTIONS on 127.0.0.1:5060", log=log, timeout=30)
    assert time.monotonic() - began < 10  # not the whole allowance
    text = str(failed.value)
    assert "exited with status 3" in text and "answers OPTIONS on 127.0.0.1:5060" in text
    assert "bad option --frobnicate" in text


def test_the_allowance_running_out_stops_it_and_says_it_ran(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    proc = shell("echo 'still loading'; exec sleep 30", log)
    with pytest.raises(StartupError) as failed:
        wait_started("p", proc, lambda: False, "logs ready", log=log, timeout=0.5)
    text = str(failed.value)
    assert "within its 0.5 s start-up allowance" in text and f"running (pid {proc.pid})" in text
    assert "still loading" in text
    assert proc.poll() is not None  # stopped


def test_udp_bound_reads_the_kernels_table() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert udp_bound("127.0.0.1", port)
    assert not udp_bound("127.0.0.1", port)
