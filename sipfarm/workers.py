"""Worker processes sharing a process's ports (SO_REUSEPORT), like Kamailio's children.

The supervisor starts N copies of the process's own command with ``--worker-index i``, restarts
one that dies, serves their summed Prometheus metrics (prometheus-client multiprocess mode, one
directory per supervisor), and on SIGTERM/SIGINT stops them all.  Each worker binds the shared
listeners with SO_REUSEPORT and one private UDP port of its own, which it writes into its Via
(and, for the balancer, Path/Record-Route), so replies come back to the worker that holds the
transaction or the client's connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("sipfarm.workers")

SUPERVISOR_ENV = "SIPFARM_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """In a worker: get SIGTERM when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no orphaned worker keeps the ports; exit now if it is already gone."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if str(os.getppid()) != supervisor:
        log.warning("event=supervisor_gone supervisor=%s", supervisor)
        raise SystemExit(0)


def supervise(argv: list[str], workers: int, metrics: str = "") -> int:
    """Run ``argv + ["--worker-index", i]`` for i in range(workers) until told to stop."""
    multiproc_dir = tempfile.mkdtemp(prefix="sipfarm-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=multiproc_dir, **{SUPERVISOR_ENV: str(os.getpid())})
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    if metrics:
        from sipfarm.metrics import multiprocess_registry, serve_metrics  # noqa: PLC0415

        serve_metrics(metrics, multiprocess_registry())
    children: dict[int, subprocess.Popen[bytes]] = {}

    def start(i: int) -> None:
        children[i] = subprocess.Popen([*argv, "--worker-index", str(i)], env=env)

    for i in range(workers):
        start(i)
    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def forward(sig: int, _frame: object) -> None:
        for proc in children.values():  # SIGHUP: each worker reloads what it reloads
            if proc.poll() is None:
                proc.send_signal(sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, forward)
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in list(children.items()):
                if proc.poll() is not None and not stopping:
                    log.warning("event=worker_died worker=%d status=%s", i, proc.returncode)
                    start(i)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in Path(multiproc_dir).glob("*"):
            f.unlink()
        with contextlib.suppress(OSError):
            os.rmdir(multiproc_dir)
    return 0
