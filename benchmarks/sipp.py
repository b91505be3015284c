"""Run SIPp scenarios and read their results.

`run_sipp` runs one bounded load (a call count at a rate, capped in time) of a client scenario
and parses SIPp's own trace files into a `SippResult`:

- `-trace_stat` (`stats.csv`, `;`-separated, one line a second): cumulative counters, the last
  line gives created / successful / failed calls and retransmissions;
- `-trace_rtt` (`*_rtt.csv`): one response time per call and response-time id, read for the
  p50/p95/p99 of response time 1 (see each scenario for what it measures);
- `-trace_err` (`errors.log`): unexpected messages, its tail is kept for the report.

`SippServer` is the long-lived side: a SIPp UAS (scenarios/uas_answer.xml) listening on a
loopback port until stopped.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.process import ManagedProcess, Stoppable, free_port, wait_until
from sipfarm import ports

SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
REGISTER_AUTH = SCENARIOS_DIR / "register_auth.xml"
UAC_CALL = SCENARIOS_DIR / "uac_call.xml"
UAC_CALL_RTP = SCENARIOS_DIR / "uac_call_rtp.xml"
UAC_CALL_SHED = SCENARIOS_DIR / "uac_call_shed.xml"  # a 503 ends the call as "shed" (overload)
UAS_ANSWER = SCENARIOS_DIR / "uas_answer.xml"
G711A_PCAP = Path("/usr/share/sip-tester/g711a.pcap")
# Socket buffers asked of SIPp; the kernel caps them at net.core.rmem_max / wmem_max.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024

# SIPp exit statuses (sipp(1)): 0 all calls succeeded, 1 some failed, 97 stopped by an
# internal command, 99 normal exit without any call processed; 254/255 are fatal errors.
_EXIT_OK = {0, 1, 97, 99}


# SIPp binds its RTP echo sockets at -mp (audio) and -mp + 2 (video), RTCP beside each; with
# -mp given it tries no other port and dies with "Unable to bind ... RTP socket" (exit 254).
_MEDIA_PORTS = 4
_BIND_FAILED = "Unable to bind"
_BIND_ATTEMPTS = 3


def free_media_port(host: str = "127.0.0.1") -> int:
    """A UDP port ``p`` for SIPp's ``-mp`` with ``p`` .. ``p + 3`` all free on ``host``."""
    for _ in range(200):
        port = ports.free_port(host, udp=True, tcp=False)
        if all(ports.is_free(host, port + k, udp=True, tcp=False) for k in range(1, _MEDIA_PORTS)):
            return port
    raise SippError(f"no block of {_MEDIA_PORTS} free UDP ports on {host} for SIPp's media")


class SippError(RuntimeError):
    """SIPp is missing, refused its arguments or died; the message says which and shows its output."""


def find_sipp(binary: str | None = None) -> str:
    """Path of the sipp binary, or a `SippError` telling how to install it."""
    path = shutil.which(binary or "sipp")
    if path is None:
        raise SippError(
            f"SIPp executable {binary or 'sipp'!r} not found on PATH: install it with "
            "'apt-get install sip-tester' (Debian/Ubuntu) or pass sipp_bin=/path/to/sipp"
        )
    return path


def scenario_path(name: str | Path) -> Path:
    """A scenario by path, or by name (`register_auth`, `uac_call`...) from benchmarks/scenarios."""
    path = Path(name)
    if path.exists():
        return path
    candidate = SCENARIOS_DIR / (path.name if path.suffix == ".xml" else f"{path.name}.xml")
    if not candidate.exists():
        raise SippError(f"scenario {name!s} not found (looked in {SCENARIOS_DIR})")
    return candidate


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear-interpolated percentile (0-100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class SippResult:
    """What one SIPp client run did, from its trace files."""

    scenario: str
    target_rate: float
    calls_attempted: int
    calls_succeeded: int
    calls_failed: int
    retransmissions: int
    elapsed_s: float
    creation_s: float
    wall_s: float
    call_length_ms: int
    response_times_ms: tuple[float, ...]
    sipp_cpu_s: float
    exit_code: int
    workdir: Path
    errors_tail: str = ""
    stats: Mapping[str, str] = field(default_factory=dict)

    @property
    def failure_pct(self) -> float:
        """Failed (or never completed) calls as a percentage of calls attempted; 100 if none ran."""
        if self.calls_attempted == 0:
            return 100.0
        return 100.0 * self.calls_failed / self.calls_attempted

    @property
    def achieved_rate(self) -> float:
        """Calls started per second while SIPp was starting them (falls below target when SIPp lags)."""
        return self.calls_attempted / self.creation_s if self.creation_s > 0 else 0.0

    @property
    def throughput(self) -> float:
        """Successful calls per second of wall time, less one hold time (the last call's).

        Below the target rate when the server fell behind and calls completed late (after
        retransmissions), even if none failed.
        """
        span = max(self.wall_s - self.call_length_ms / 1000.0, self.creation_s)
        return self.calls_succeeded / span if span > 0 else 0.0

    def rtt_percentile(self, pct: float) -> float | None:
        return percentile(self.response_times_ms, pct)

    @property
    def p50_ms(self) -> float | None:
        return self.rtt_percentile(50)

    @property
    def p95_ms(self) -> float | None:
        return self.rtt_percentile(95)

    @property
    def p99_ms(self) -> float | None:
        return self.rtt_percentile(99)

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f}"

        return (
            f"{self.scenario}: target {self.target_rate:g}/s achieved {self.achieved_rate:.1f}/s "
            f"throughput {self.throughput:.1f}/s, "
            f"{self.calls_succeeded}/{self.calls_attempted} ok, {self.calls_failed} failed "
            f"({self.failure_pct:.2f}%), {self.retransmissions} retrans, "
            f"rtt p50/p95/p99 {ms(self.p50_ms)}/{ms(self.p95_ms)}/{ms(self.p99_ms)} ms, "
            f"sipp cpu {self.sipp_cpu_s:.2f}s"
        )


def parse_duration(text: str) -> float:
    """SIPp's elapsed time `HH:MM:SS:uuuuuu` (or `HH:MM:SS`) in seconds."""
    parts = text.strip().split(":")
    if len(parts) < 3:
        raise ValueError(f"SIPp duration has fewer than three fields: {text!r}")
    hours, minutes, seconds = (int(p) for p in parts[:3])
    micros = int(parts[3]) if len(parts) > 3 and parts[3] else 0
    return hours * 3600 + minutes * 60 + seconds + micros / 1e6


def read_stat_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a SIPp `-trace_stat` file (header line, `;` separated, trailing `;`)."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    return [{h: v.strip() for h, v in zip(header, row, strict=False) if h} for row in rows[1:] if row]


def read_rtt(paths: Sequence[Path], rtd: int = 1) -> tuple[float, ...]:
    """Response times (ms) of response-time id `rtd` from `-trace_rtt` files (`date;ms;rtd_no`)."""
    values: list[float] = []
    for path in paths:
        with path.open(newline="") as handle:
            for row in csv.reader(handle, delimiter=";"):
                if len(row) < 3 or not row[1].strip().replace(".", "", 1).isdigit():
                    continue  # header
                if int(float(row[2])) == rtd:
                    values.append(float(row[1]))
    return tuple(values)


def read_call_outcomes(workdir: Path) -> dict[str, set[int]]:
    """The calls of a `-trace_logs` run by outcome logged by the scenario (uac_call_shed.xml:
    "ok N", "end N", "shed N"): outcome -> call numbers."""
    outcomes: dict[str, set[int]] = {}
    for path in workdir.glob("*_logs.log"):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                outcomes.setdefault(parts[0], set()).add(int(parts[1]))
    return outcomes


def _stat_int(row: Mapping[str, str], key: str) -> int:
    value = row.get(key, "")
    return int(value) if value.lstrip("-").isdigit() else 0


def _wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for `proc` at most `timeout` s (then SIGTERM, SIGKILL); exit code and CPU seconds used."""
    deadline = time.monotonic() + timeout
    signalled = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code  # the Popen object must not wait for it again
            return code, usage.ru_utime + usage.ru_stime
        now = time.monotonic()
        if now > deadline and signalled == 0:
            proc.send_signal(signal.SIGUSR1)  # SIPp: stop placing calls, finish, write stats
            signalled, deadline = 1, now + 5
        elif now > deadline and signalled == 1:
            proc.terminate()
            signalled, deadline = 2, now + 3
        elif now > deadline:
            proc.kill()
            deadline = now + 3600
        time.sleep(0.02)


def _client_argv(
    binary: str,
    path: Path,
    target: str,
    *,
    transport: str,
    local_ip: str,
    local_port: int,
    media_port: int,
    rate: float,
    calls: int,
    call_length_ms: int,
    timeout_s: float,
    stat_file: Path,
    error_file: Path,
    max_concurrent: int | None,
    injection: Path | None,
    variables: Mapping[str, str] | None,
    extra_args: Sequence[str],
) -> list[str]:
    argv = [
        binary, target,
        "-sf", str(path),
        "-t", transport,
        "-i", local_ip,
        "-p", str(local_port),
        "-mp", str(media_port),
        "-r", f"{rate:g}", "-rp", "1000",
        "-m", str(calls),
        "-d", str(call_length_ms),
        "-timeout", f"{max(1, math.ceil(timeout_s - 3))}s",
        "-nostdin",
        "-trace_stat", "-stf", str(stat_file), "-fd", "1",
        "-trace_rtt", "-rtt_freq", "1",
        "-trace_err", "-error_file", str(error_file),
        "-max_recv_loops", "10000", "-max_sched_loops", "10000",
        # SIPp's default socket buffers (64 KB) overflow at a few hundred calls/s on loopback.
        "-buff_size", str(SOCKET_BUFFER_BYTES),
    ]  # fmt: skip
    if max_concurrent is not None:
        argv += ["-l", str(max_concurrent)]
    if injection is not None:
        argv += ["-inf", str(injection.resolve())]
    for name, value in (variables or {}).items():
        argv += ["-set", name, value]
    return argv + list(extra_args)


def run_sipp(
    scenario: str | Path,
    target: str,
    *,
    workdir: Path,
    rate: float,
    calls: int | None = None,
    duration_s: float | None = None,
    injection: Path | None = None,
    variables: Mapping[str, str] | None = None,
    call_length_ms: int = 0,
    max_concurrent: int | None = None,
    local_ip: str = "127.0.0.1",
    local_port: int | None = None,
    media_port: int | None = None,
    transport: str = "u1",
    timeout_s: float | None = None,
    extra_args: Sequence[str] = (),
    sipp_bin: str | None = None,
) -> SippResult:
    """Run a client scenario against `target` (host:port) at `rate` calls/s and parse its results.

    The run is bounded: `calls` calls (or `rate * duration_s`), and SIPp's own global timeout
    plus a hard wall-clock cap of `timeout_s` (default: the nominal duration + 30 s).
    Calls not completed when the run stops count as failed.
    """
    binary = find_sipp(sipp_bin)
    path = scenario_path(scenario)
    if calls is None:
        if duration_s is None:
            raise ValueError("run_sipp needs calls= or duration_s= to bound the run")
        calls = max(1, math.ceil(rate * duration_s))
    nominal_s = calls / rate + call_length_ms / 1000.0
    timeout_s = timeout_s if timeout_s is not None else nominal_s + 30.0
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("*_rtt.csv"):
        stale.unlink()
    stat_file = workdir / "stats.csv"
    error_file = workdir / "errors.log"
    for stale in (stat_file, error_file):
        stale.unlink(missing_ok=True)
    # Ports this function picks can be taken between the check and SIPp's bind (by another
    # process picking at random, or an outgoing connection): a bind failure is retried on new ones.
    for attempt in range(_BIND_ATTEMPTS):
        argv = _client_argv(
            binary, path, target, transport=transport, local_ip=local_ip,
            local_port=local_port or free_port(local_ip), media_port=media_port or free_media_port(local_ip),
            rate=rate, calls=calls, call_length_ms=call_length_ms, timeout_s=timeout_s,
            stat_file=stat_file, error_file=error_file, max_concurrent=max_concurrent,
            injection=injection, variables=variables, extra_args=extra_args,
        )  # fmt: skip
        with (workdir / "sipp.out").open("wb") as out:
            started = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=workdir, start_new_session=True)
            code, cpu = _wait_with_rusage(proc, timeout_s)
            wall_s = time.monotonic() - started
        output = (workdir / "sipp.out").read_text(errors="replace")
        chosen = local_port is None or media_port is None
        if code in _EXIT_OK or not chosen or _BIND_FAILED not in output or attempt == _BIND_ATTEMPTS - 1:
            break
        for stale in (stat_file, error_file):
            stale.unlink(missing_ok=True)
    if code not in _EXIT_OK:
        tail = "\n".join(output.splitlines()[-25:])
        raise SippError(f"sipp exited with {code} ({' '.join(argv)}):\n{tail}")
    rows = read_stat_rows(stat_file) if stat_file.exists() else []
    if not rows:
        raise SippError(f"sipp wrote no statistics to {stat_file}:\n{output[-2000:]}")
    last = rows[-1]
    created = _stat_int(last, "TotalCallCreated")
    succeeded = _stat_int(last, "SuccessfulCall(C)")
    failed = max(_stat_int(last, "FailedCall(C)"), created - succeeded)
    # When the last call was created: the first row whose cumulative count reached the total.
    creation_s = parse_duration(last["ElapsedTime(C)"])
    for row in rows:
        if _stat_int(row, "TotalCallCreated") >= created:
            creation_s = parse_duration(row["ElapsedTime(C)"])
            break
    creation_s = max(creation_s, (created - 1) / rate if created > 1 else 0.0)
    errors_tail = ""
    if error_file.exists():
        errors_tail = "\n".join(error_file.read_text(errors="replace").splitlines()[-20:])
    return SippResult(
        scenario=path.stem,
        target_rate=rate,
        calls_attempted=created,
        calls_succeeded=succeeded,
        calls_failed=failed,
        retransmissions=_stat_int(last, "Retransmissions(C)"),
        elapsed_s=parse_duration(last["ElapsedTime(C)"]),
        creation_s=creation_s,
        wall_s=wall_s,
        call_length_ms=call_length_ms,
        response_times_ms=read_rtt(sorted(workdir.glob("*_rtt.csv"))),
        sipp_cpu_s=cpu,
        exit_code=code,
        workdir=workdir,
        errors_tail=errors_tail,
        stats=last,
    )


class SippServer(Stoppable):
    """A long-lived SIPp UAS on `local_ip:port`, answering every call until `stop()`."""

    def __init__(
        self,
        workdir: Path,
        *,
        scenario: str | Path = UAS_ANSWER,
        local_ip: str = "127.0.0.1",
        port: int | None = None,
        media_port: int | None = None,
        transport: str = "u1",
        extra_args: Sequence[str] = (),
        sipp_bin: str | None = None,
    ) -> None:
        binary = find_sipp(sipp_bin)
        self.local_ip = local_ip
        workdir = workdir.resolve()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.stat_file = workdir / "uas_stats.csv"
        for _attempt in range(_BIND_ATTEMPTS):
            self.port = port or free_port(local_ip)
            self.stat_file.unlink(missing_ok=True)
            argv = [
                binary,
                "-sf", str(scenario_path(scenario)),
                "-t", transport,
                "-i", local_ip,
                "-p", str(self.port),
                "-mp", str(media_port or free_media_port(local_ip)),
                "-nostdin",
                "-trace_stat", "-stf", str(self.stat_file), "-fd", "1",
                "-trace_err", "-error_file", str(workdir / "uas_errors.log"),
                "-max_recv_loops", "10000", "-max_sched_loops", "10000",
                "-buff_size", str(SOCKET_BUFFER_BYTES),
                *extra_args,
            ]  # fmt: skip
            self.process = ManagedProcess("sipp-uas", argv, workdir / "uas.out", cwd=workdir)
            # Ready once its statistics file exists (written right after the sockets are bound).
            if wait_until(lambda: not self.process.alive() or self.stat_file.exists(), timeout=10) \
                    and self.process.alive():
                return
            self.process.stop()
            log = self.process.log_tail(400)
            if (port is not None and media_port is not None) or _BIND_FAILED not in log:
                break
        raise SippError(f"sipp UAS did not start on {local_ip}:{self.port}:\n{self.process.log_tail()}")

    @property
    def contact(self) -> str:
        """host:port to register as the Contact of the user this UAS answers for."""
        return f"{self.local_ip}:{self.port}"

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def stats(self) -> dict[str, str]:
        """The latest line of the UAS statistics (cumulative counters)."""
        rows = read_stat_rows(self.stat_file) if self.stat_file.exists() else []
        return rows[-1] if rows else {}

    def stop(self) -> int | None:
        """SIGUSR1 (SIPp's graceful quit), then SIGTERM/SIGKILL if it lingers."""
        if self.process.alive():
            with contextlib.suppress(ProcessLookupError):
                self.process.proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.proc.wait(timeout=3)
        return self.process.stop()

