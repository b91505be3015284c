"""What the processes under test use while SIPp drives them: CPU, memory, Redis commands.

- `ProcessTree`: a role ("redis", "balancer", "node1", "kamailio", "sipp-uas") and the pid
  of its root process; `cpu_by_pid()` reads user+system seconds of the root and every live
  descendant (node workers, Kamailio children), so a step's CPU is a difference of two reads.
- `MemorySampler`: a daemon thread reading every tree's memory twice a second, and the
  SIPp clients this process starts (found among its own children). Peak memory of a role is
  the largest sampled sum of PSS over its processes (shared pages counted once: Kamailio's
  shared memory is mapped by every worker), or VmHWM for a single-process role when larger.
- `RedisStats`: `INFO commandstats` / `INFO memory` over a raw socket, for the commands per
  REGISTER and per call a model can project from.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil


def _proc_kb(pid: int, filename: str, key: str) -> int | None:
    """A `Key:   N kB` line of /proc/PID/<filename>, in kB."""
    try:
        with open(f"/proc/{pid}/{filename}", "rb") as handle:
            for line in handle:
                if line.startswith(key.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kb(pid: int) -> int | None:
    return _proc_kb(pid, "smaps_rollup", "Pss")


def hwm_kb(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process."""
    return _proc_kb(pid, "status", "VmHWM")


class ProcessTree:
    """One role under test: a root pid and its descendants."""

    def __init__(self, label: str, pid: int) -> None:
        self.label = label
        self.pid = pid

    def pids(self) -> list[int]:
        try:
            root = psutil.Process(self.pid)
            return [self.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds per process; the root's include the children it already reaped."""
        out: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = psutil.Process(pid).cpu_times()
                total = times.user + times.system
                if pid == self.pid:
                    total += times.children_user + times.children_system
                out[pid] = total
        return out


def udp_drops_by_inode() -> dict[int, int]:
    """Datagrams dropped per UDP socket inode (full receive buffer), from /proc/net/udp{,6}."""
    drops: dict[int, int] = {}
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(name) as handle:
            for line in handle.readlines()[1:]:
                parts = line.split()
                if len(parts) >= 13 and parts[9].isdigit() and parts[-1].isdigit():
                    drops[int(parts[9])] = int(parts[-1])
    return drops


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets the processes hold open."""
    inodes: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(int(link[8:-1]))
    return inodes


def udp_drops(tree: ProcessTree, table: Mapping[int, int]) -> int:
    """Datagrams the kernel dropped so far on the UDP sockets of a role's processes."""
    return sum(table.get(inode, 0) for inode in socket_inodes(tree.pids()))


@dataclass(frozen=True, slots=True)
class CpuUsage:
    """CPU a role used during one step."""

    cpu_s: float
    cpu_pct: float
    """Of one core, summed over the role's processes, over the step's wall time."""
    hottest_pct: float
    """The busiest single process of the role (a single-threaded process saturates at 100)."""


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float], wall_s: float) -> CpuUsage:
    deltas = [after[pid] - before.get(pid, 0.0) for pid in after]
    total = sum(d for d in deltas if d > 0)
    hottest = max(deltas, default=0.0)
    wall = max(wall_s, 1e-6)
    return CpuUsage(round(total, 3), round(100 * total / wall, 1), round(100 * hottest / wall, 1))


class MemorySampler:
    """Background sampling of peak memory per role (see the module docstring)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.trees: list[ProcessTree] = []
        self.client_label = "sipp-client"
        self.peak_kb: dict[str, int] = {}
        self.client_pids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def track(self, tree: ProcessTree) -> None:
        with self._lock:
            self.trees.append(tree)

    def untrack_all(self) -> None:
        with self._lock:
            self.trees.clear()

    def _note(self, label: str, kb: int) -> None:
        if kb > self.peak_kb.get(label, 0):
            self.peak_kb[label] = kb

    def sample(self) -> None:
        with self._lock:
            trees = list(self.trees)
            client_label = self.client_label
        known = {tree.pid for tree in trees}
        for tree in trees:
            pids = tree.pids()
            total = sum(pss_kb(pid) or 0 for pid in pids)
            if len(pids) == 1:
                total = max(total, hwm_kb(pids[0]) or 0)
            self._note(tree.label, total)
        # SIPp clients started by run_sipp are children of this process (one at a time).
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    if child.pid in known or child.name() != "sipp":
                        continue
                    self.client_pids.add(child.pid)
                    self._note(client_label, hwm_kb(child.pid) or 0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a sampler hiccup must not end the benchmark
                self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def kill_stray_clients(self) -> None:
        """SIGKILL SIPp clients this process started that are still running (interrupted run)."""
        for pid in self.client_pids:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                proc = psutil.Process(pid)
                if proc.ppid() == os.getpid() and proc.name() == "sipp":
                    os.kill(pid, signal.SIGKILL)

    def peaks_mb(self) -> dict[str, float]:
        return {label: round(kb / 1024, 1) for label, kb in self.peak_kb.items()}


def _redis_command(host: str, port: int, *args: str, timeout: float = 3.0) -> bytes:
    """One RESP command; the whole reply (bulk string payload for INFO)."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(payload.encode())
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(head[1:]) + 2:
                    return rest[: int(head[1:])]
            elif data.endswith(b"\r\n"):
                return data
    return data


class RedisStats:
    """Counters of one redis-server, read with INFO."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def info(self, section: str) -> dict[str, str]:
        text = _redis_command(self.host, self.port, "INFO", section).decode(errors="replace")
        out: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                out[key] = value
        return out

    def command_calls(self) -> dict[str, int]:
        """Calls per command name so far (commands run by Lua scripts are counted as well)."""
        calls: dict[str, int] = {}
        for key, value in self.info("commandstats").items():
            if not key.startswith("cmdstat_"):
                continue
            fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
            calls[key.removeprefix("cmdstat_")] = int(fields.get("calls", "0"))
        return calls

    def used_memory(self) -> int:
        return int(self.info("memory").get("used_memory", "0"))

    def dbsize(self) -> int:
        reply = _redis_command(self.host, self.port, "DBSIZE")
        return int(reply.strip().lstrip(b":") or 0)


def calls_delta(before: Mapping[str, int], after: Mapping[str, int],
                ignore: Iterable[str] = ("info", "dbsize")) -> dict[str, int]:
    skip = set(ignore)
    out = {name: after[name] - before.get(name, 0) for name in after if name not in skip}
    return {name: n for name, n in sorted(out.items()) if n > 0}
