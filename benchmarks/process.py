"""Child processes for benchmarks: start on loopback, measure CPU, always stop.

Every server a benchmark starts (Kamailio, redis-server, a SIPp UAS) is a `ManagedProcess`:
started in its own session so it never receives the terminal's signals, stopped by its own
pid (SIGTERM, then SIGKILL of its own process group after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil

from sipfarm import ports
from sipfarm.build import COMPILED_DIR, compiled_build_state


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host`, below the ephemeral range (sipfarm.ports)."""
    return ports.free_port(host, udp=True, tcp=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, its live descendants and the children it reaped."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True)
        # Children already reaped (a worker that exited) are counted in the root's children_* times.
        times = root.cpu_times()
        total: float = times.user + times.system + times.children_user + times.children_system
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


class Stoppable:
    """``with X(...) as x:`` stops ``x`` on the way out, whatever happens inside."""

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ManagedProcess(Stoppable):
    """A long-lived child process with its output in a log file; a context manager that stops it."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the process and its children (Kamailio forks its workers)."""
        return cpu_seconds(self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> int | None:
        """Signal the process, wait up to `grace` seconds, then kill its process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # Children that outlived their parent (forked workers) are in the same process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode



def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll a zero-argument callable until it returns true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def udp_receive_buffer_errors() -> int:
    """Datagrams the kernel dropped because a socket's receive buffer was full (all sockets).

    Read before and after a step: on loopback this is the usual cause of SIP retransmissions
    and "failures" before any CPU runs out.
    """
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [line.split()[1:] for line in lines if line.startswith("Udp:")]
    if len(udp) < 2 or "RcvbufErrors" not in udp[0]:
        return 0
    return int(udp[1][udp[0].index("RcvbufErrors")])


REPO = Path(__file__).resolve().parent.parent


def sipfarm_env(build: str) -> tuple[dict[str, str], str]:
    """The environment sipfarm processes run with, and which build that is.

    `build`: 'compiled' (fails unless `make compiled` is fresh), 'interpreted', or 'auto'
    (compiled when fresh, else interpreted).
    """
    env = dict(os.environ)
    # interpreted: this checkout's sources, whatever copy is installed (a git worktree's
    # processes would import the main checkout's otherwise: they run from their workdir)
    env["PYTHONPATH"] = str(REPO)
    env["SIPFARM_BUILD"] = "interpreted"  # the processes run what is chosen here, never re-exec
    if build == "interpreted":
        return env, "interpreted"
    state = compiled_build_state()
    if state != "fresh":
        if build == "compiled":
            raise RuntimeError(f"compiled build is {state}: run 'make compiled' first")
        return env, f"interpreted (compiled build {state})"
    env["PYTHONPATH"] = str(COMPILED_DIR)
    return env, "compiled"
