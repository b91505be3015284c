"""Which build a serving process runs (sipfarm.build): the compiled hot path whenever it is fresh.

In `make test`'s compiled stage (SIPFARM_TEST_COMPILED) the build is fresh: a node started from
the source tree with ``SIPFARM_BUILD=auto`` re-executes itself (same pid) into the build and says
so. In the first stage the build may be missing (a fresh clone) or fresh (a checkout where `make
run` built it): the node says which it runs and why, and ``SIPFARM_BUILD=compiled`` without a
fresh build refuses to start with a message. A bad SIPFARM_BUILD is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.farm import DOMAIN, free_udp_tcp_port, sip_options
from fixtures.startup import wait_started

from sipfarm import build
from sipfarm.logs import split_kv

ROOT = Path(__file__).resolve().parent.parent.parent


def start_node(redis_url: str, choice: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A node started from the source tree (cwd the checkout, no PYTHONPATH), as a user runs it."""
    port = free_udp_tcp_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["SIPFARM_BUILD"] = choice
    log_path = tmp_path / f"node-{choice}.log"
    argv = [sys.executable, "-m", "sipfarm", "node", "--listen", f"udp:127.0.0.1:{port}", "--redis", redis_url,
            "--domain", DOMAIN, "--node-id", f"build-{choice}"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    # ready when it answers, or once it has exited: the tests of a refused start check its status
    wait_started(
        f"node build-{choice}", proc, lambda: proc.poll() is not None or sip_options("127.0.0.1", port) is not None,
        f"answers OPTIONS on 127.0.0.1:{port} or exits", log=log_path,
    )  # fmt: skip
    return proc, log_path


def build_line(log_path: Path) -> str:
    return next((line for line in log_path.read_text().splitlines() if "event=build " in line), "")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


def test_auto_runs_the_compiled_build_when_fresh(redis_url: str, tmp_path: Path) -> None:
    state = build.compiled_build_state()
    if os.environ.get("SIPFARM_TEST_COMPILED"):
        assert state == "fresh"
    proc, log_path = start_node(redis_url, "auto", tmp_path)
    try:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        line = build_line(log_path)
        if state == "fresh":
            assert "build=compiled" in line, log_path.read_text()[-2000:]
        else:
            fields = split_kv(line)
            assert fields["build"] == "interpreted" and f"compiled build {state}" in fields["detail"], line
    finally:
        stop(proc)


def test_interpreted_on_request(redis_url: str, tmp_path: Path) -> None:
    proc, log_path = start_node(redis_url, "interpreted", tmp_path)
    try:
        assert proc.poll() is None, log_path.read_text()[-2000:]
        fields = split_kv(build_line(log_path))  # detail is quoted: it has spaces (sipfarm.logs)
        assert fields["build"] == "interpreted" and "SIPFARM_BUILD=interpreted" in fields["detail"], fields
    finally:
        stop(proc)


def test_compiled_required_without_a_fresh_build_refuses_to_start(redis_url: str, tmp_path: Path) -> None:
    if build.compiled_build_state() == "fresh":
        pytest.skip("the compiled build is fresh here: SIPFARM_BUILD=compiled runs it")
    proc, log_path = start_node(redis_url, "compiled", tmp_path)
    assert proc.wait(timeout=10) == 1
    assert "SIPFARM_BUILD=compiled but the compiled build is" in log_path.read_text()


def test_a_bad_choice_is_refused(redis_url: str, tmp_path: Path) -> None:
    proc, log_path = start_node(redis_url, "fastest", tmp_path)
    assert proc.wait(timeout=10) == 1
    assert "SIPFARM_BUILD='fastest': expected one of auto, compiled, interpreted" in log_path.read_text()


def test_build_state_of_a_copy(tmp_path: Path) -> None:
    source, copy = tmp_path / "src", tmp_path / "build"
    for root in (source, copy):
        for package in ("sipfarm", "media"):
            (root / package).mkdir(parents=True)
            (root / package / "a.py").write_text(f"X = {package!r}\n")
    assert build.compiled_build_state(copy, source) == "missing"  # no extension module
    (copy / "sipfarm" / "a.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert build.compiled_build_state(copy, source) == "fresh"
    (source / "media" / "a.py").write_text("X = 2\n")
    assert build.compiled_build_state(copy, source) == "stale"
    (source / "media" / "a.py").write_text("X = 'media'\n")
    (source / "sipfarm" / "new.py").write_text("")
    assert build.compiled_build_state(copy, source) == "stale"  # a module the build lacks
    (copy / "sipfarm" / "new.py").write_text("")
    assert build.compiled_build_state(copy, source) == "fresh"
    # a C extension's source counts like a module's
    (source / "sipfarm" / "fast.c").write_text("int x;\n")
    assert build.compiled_build_state(copy, source) == "stale"  # missing from the build
    (copy / "sipfarm" / "fast.c").write_text("int x;\n")
    assert build.compiled_build_state(copy, source) == "fresh"
    (source / "sipfarm" / "fast.c").write_text("int y;\n")
    assert build.compiled_build_state(copy, source) == "stale"  # changed since the build
