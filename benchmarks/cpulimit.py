"""A CPU quota for one process, through a cgroup v1 ``cpu`` controller (root only).

Overload tests and the overload benchmark make a node small on purpose, so that on a 2-core
machine the node saturates while the balancer and SIPp still have CPU to spare:

    with CpuLimit("sipfarm-overload", 0.1) as limit:   # 10% of one core
        limit.add(node_pid)
        ...

The cgroup is made under ``/sys/fs/cgroup/cpu`` (``cpu.cfs_period_us`` 10 ms, so a starved
process waits at most ~9 ms per period rather than 90 ms) and removed on exit, its processes
moved back to the root group first.  ``CpuLimit.unavailable()`` says why it cannot be used
(not root, no cgroup v1 cpu controller), for a test to skip with that reason.

A quota is a ceiling, not a reservation: on a machine others load too, a limited process may
get less.  ``shares`` (``cpu.shares``, 1024 = one ordinary process) weights the group against
its siblings when the CPUs are contended; ``cores=0`` sets no quota (a group for its weight
only), and ``root`` nests a group in another (`benchmarks.scaling_bench`: the benchmark's
processes weighted up as one group, each node held to its quota inside it).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 10_000


class CpuLimitError(RuntimeError):
    """The cgroup could not be made or written."""


class CpuLimit:
    def __init__(self, name: str, cores: float, root: Path = CGROUP_CPU, shares: int | None = None) -> None:
        self.root = root
        self.path = root / f"{name}-{os.getpid()}"
        self.cores = cores
        self.shares = shares

    @staticmethod
    def unavailable(root: Path = CGROUP_CPU) -> str | None:
        """None when a CPU quota can be set here, else the reason."""
        if not (root / "cpu.cfs_quota_us").exists():
            return f"no cgroup v1 cpu controller at {root}"
        if not os.access(root, os.W_OK):
            return f"{root} is not writable (needs root)"
        return None

    def __enter__(self) -> CpuLimit:
        try:
            self.path.mkdir(exist_ok=True)
            if self.cores > 0:
                (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, round(PERIOD_US * self.cores))))
            if self.shares is not None:
                (self.path / "cpu.shares").write_text(str(self.shares))
        except OSError as exc:
            self.remove()
            raise CpuLimitError(f"cgroup {self.path}: {exc}") from exc
        return self

    def add(self, pid: int) -> None:
        """Move ``pid`` (a process: all its threads) into the limited group."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CpuLimitError(f"cgroup {self.path}: cannot add {pid}: {exc}") from exc

    def throttled_us(self) -> int:
        """Total time the group's processes were throttled (cpu.stat throttled_time, ns -> us)."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "throttled_time":
                    return int(value) // 1000
        return 0

    def remove(self) -> None:
        if not self.path.exists():
            return
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.root / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
