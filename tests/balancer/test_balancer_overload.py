"""Overload through the balancer, real processes: a node made small on purpose (a cgroup CPU
quota of 10% of a core), calls offered by SIPp at about 3x what it completes.

The balancer sheds the excess (503 + Retry-After, answered itself), the calls it admits
complete with < 1% failures, and its OPTIONS answer stays fast during the flood.  The node's
capacity is measured first, in the same conditions (a short saturating run).  The figures are
printed (``pytest -s``).  Skipped where a cgroup v1 CPU quota cannot be set (not root).
"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from fixtures.farm import DOMAIN, SipClient, free_udp_tcp_port, options_request, wait_nodes_usable
from fixtures.startup import START_TIMEOUT_S
from lbhelpers import loopback_peers

from benchmarks.cpulimit import CpuLimit
from benchmarks.sipp import REGISTER_AUTH, UAC_CALL_SHED, UAS_ANSWER, SippServer, read_call_outcomes, run_sipp

pytestmark = pytest.mark.timeout(START_TIMEOUT_S + 120)

NODE_CORES = 0.1  # the node's CPU quota
CALIBRATE_RATE = 300  # calls/s offered to measure the node's capacity (well above it)
CALIBRATE_S = 3.0
OVERLOAD = 3.0  # x the measured capacity
FLOOD_S = 10.0
MAX_RATE = 500  # SIPp and the balancer must keep their CPU to spare
HOLD_MS = 200


def write_injection(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("SEQUENTIAL\n" + "".join(";".join(row) + "\n" for row in rows))
    return path


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class OptionsProbe(threading.Thread):
    """OPTIONS to the balancer every 0.1 s during the flood: its answer times (seconds).

    Each answer is matched to its request by Call-ID (a late answer to one probe is skipped,
    not taken for the next one's), and waited for up to ``LOST_AFTER`` s before it counts as
    lost."""

    LOST_AFTER = 2.0

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.times: list[float] = []
        self.lost = 0
        self.done = threading.Event()

    def run(self) -> None:
        client = SipClient()
        try:
            while not self.done.wait(0.1):
                request = options_request(*self.address, client.port)
                call_id = request.split(b"Call-ID: ", 1)[1].split(b"\r\n", 1)[0]
                t0 = time.monotonic()
                client.send(request, self.address)
                reply = client.recv_final(self.LOST_AFTER, call_id=call_id)
                if reply is None:
                    self.lost += 1
                else:
                    self.times.append(time.monotonic() - t0)
        finally:
            client.close()


def calls(target: str, workdir: Path, rate: float, seconds: float, injection: Path):  # type: ignore[no-untyped-def]
    count = round(rate * seconds)
    result = run_sipp(UAC_CALL_SHED, target, workdir=workdir, rate=rate, calls=count, call_length_ms=HOLD_MS,
                      injection=injection, variables={"domain": DOMAIN}, timeout_s=seconds + 12,
                      extra_args=["-trace_logs", "-recv_timeout", "8000"])
    return result, read_call_outcomes(workdir)


def test_excess_calls_are_shed_with_retry_after_and_admitted_calls_complete(
    redis_url, accounts, start_node, start_balancer, tmp_path: Path
):
    reason = CpuLimit.unavailable()
    if reason is not None:
        pytest.skip(f"a CPU quota for the node cannot be set: {reason}")
    node = start_node(redis_url, "node1")
    metrics_port = free_udp_tcp_port()
    lb = start_balancer(redis_url, extra=[*loopback_peers(tmp_path), "--metrics", f"127.0.0.1:{metrics_port}"])
    wait_nodes_usable(lb, 1)
    target = f"127.0.0.1:{lb.port}"
    with CpuLimit("sipfarm-test-overload", NODE_CORES) as limit, SippServer(tmp_path / "uas",
                                                                            scenario=UAS_ANSWER) as uas:
        limit.add(node.process.pid)
        reg = run_sipp(REGISTER_AUTH, target, workdir=tmp_path / "reg-bob", rate=10, calls=1,
                       injection=write_injection(tmp_path / "bob.csv", [("bob", accounts["bob"])]),
                       variables={"domain": DOMAIN, "contact": uas.contact, "expires": "300"}, timeout_s=15)
        assert reg.calls_succeeded == 1, reg.errors_tail
        injection = write_injection(tmp_path / "calls.csv", [("bob", "alice", accounts["alice"])])

        cal, cal_out = calls(target, tmp_path / "calibrate", CALIBRATE_RATE, CALIBRATE_S, injection)
        capacity = len(cal_out.get("end", ())) / CALIBRATE_S
        assert capacity > 3, f"the node completed almost nothing: {cal.summary()}\n{lb.log()[-1500:]}"
        rate = min(MAX_RATE, round(OVERLOAD * capacity))
        time.sleep(2.0)  # the calibration's last calls end; the node's queue drains

        shed0 = metric(metrics_port, "sipfarm_balancer_shed_total")
        probe = OptionsProbe(lb.address)
        probe.start()
        try:
            flood, out = calls(target, tmp_path / "flood", rate, FLOOD_S, injection)
        finally:
            probe.done.set()
            probe.join(3)
        time.sleep(1.2)  # the balancer syncs its counters every 0.5 s
        shed_metric = metric(metrics_port, "sipfarm_balancer_shed_total") - shed0

    shed = out.get("shed", set())
    admitted = flood.calls_attempted - len(shed)
    completed = len(out.get("end", ()))
    retry_after = []
    for path in (tmp_path / "flood").glob("*_logs.log"):
        retry_after += [int(line.split()[2]) for line in path.read_text().splitlines() if line.startswith("shed ")]
    answer_ms = sorted(t * 1000 for t in probe.times)
    print(
        f"\nOVERLOAD: node capacity ~{capacity:.0f} calls/s at {NODE_CORES:.0%} of a core "
        f"(calibration: {cal.summary()})\n"
        f"OVERLOAD: offered {rate} calls/s for {FLOOD_S:.0f} s: {flood.calls_attempted} calls, shed {len(shed)} "
        f"(balancer metric {shed_metric:.0f}), admitted {admitted}, completed {completed}, "
        f"failed {flood.calls_failed} ({100 * flood.calls_failed / max(admitted, 1):.2f}% of admitted), "
        f"admitted calls/s {completed / FLOOD_S:.1f}; setup p50/p99 {flood.p50_ms}/{flood.p99_ms} ms\n"
        f"OVERLOAD: balancer OPTIONS answers: {len(answer_ms)}, lost {probe.lost}, "
        f"median {statistics.median(answer_ms) if answer_ms else float('nan'):.1f} ms, "
        f"max {max(answer_ms, default=float('nan')):.1f} ms"
    )
    # the excess got 503 with Retry-After (1-5 s, randomized), from the balancer
    assert len(shed) >= 0.3 * flood.calls_attempted, (flood.summary(), lb.log()[-2000:])
    assert retry_after and all(1 <= r <= 5 for r in retry_after) and len(set(retry_after)) > 1
    assert shed_metric >= 0.95 * len(shed)
    # the admitted calls complete
    assert admitted >= 0.5 * capacity * FLOOD_S, flood.summary()
    assert flood.calls_failed < 0.01 * admitted, (flood.summary(), flood.errors_tail)
    assert completed == admitted - flood.calls_failed
    # the balancer itself stayed responsive
    assert probe.lost == 0 and len(answer_ms) >= FLOOD_S * 5
    # typical answer fast, and nearly all under 250 ms: a stalled balancer shows in many probes,
    # a loaded CI machine stalling this process (or the balancer) for a second in one or two
    # (the max was asserted < 250 ms; answers over 2 s count as lost above)
    assert statistics.median(answer_ms) < 20, answer_ms
    assert sum(t >= 250 for t in answer_ms) <= max(2, len(answer_ms) // 20), answer_ms
