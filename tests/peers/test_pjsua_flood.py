"""A flood at the front door while real softphones use the farm (issue 12).

The farm is made small on purpose where a cgroup v1 CPU quota can be set (root): its node gets
a tenth of a core. Its capacity is measured first, without overloading it: SIPp (from the
exempt 127.0.0.1) registers at a modest rate, and the node's CPU per registration gives the
registrations per second its quota allows. SIPp then floods REGISTERs over TCP and OPTIONS over
UDP (two processes, 2,000 requests/s each: at least ten times that capacity, checked from the
balancer's own counts, and two hundred times the per-source REGISTER budget) from 127.0.0.2 for
20 s (over TCP: only a connection proves its source address, so only its excess bans; once
banned, the source's UDP is dropped too), through the balancer every phone uses. Meanwhile two
pjsua2 softphones, alice on 127.0.0.3 and bob on 127.0.0.4 (other loopback "hosts": not exempt
from the limits, unlike the default loopback), register, alice refreshes her registration
every second, and alice calls bob:

* the flooder is banned within 5 s of the flood's start, over budget for rate_ban_after (3 s)
  (the ban in Redis, with the balancer's reason; the balancer counts the rate excess and the
  banned datagrams it dropped);
* every registration of alice during the flood (the digest round trip) completes in under 1 s;
* the call connects and each side hears the other's tone (frequency detected in a recording),
  and hangs up cleanly, all while the flood lasts.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from fixtures.farm import DOMAIN, BalancerProcess, NodeProcess, free_udp_tcp_port, wait_nodes_usable
from fixtures.protect import bans, protect_metrics
from fixtures.startup import START_TIMEOUT_S

from benchmarks.cpulimit import CpuLimit
from benchmarks.sipp import REGISTER_AUTH, find_sipp, run_sipp

from .netns import skip_reason
from .softphone import Softphone
from .test_pjsua_media import ALICE_HZ, BOB_HZ, EVENT_S, assert_tone, connect, hang_up, listen

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed (apt-get install sip-tester)"),
    pytest.mark.timeout(START_TIMEOUT_S + 120),
]

HERE = Path(__file__).resolve().parent
REGISTER_FLOOD = HERE.parent / "e2e" / "scenarios" / "register_flood.xml"
OPTIONS_FLOOD = HERE / "scenarios" / "options_flood.xml"
FLOODER, ALICE_HOST, BOB_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.4"
FLOOD_RATE = 2000  # requests/s per SIPp process
FLOOD_S = 20.0
BANNED_WITHIN_S = 5.0
REGISTER_WITHIN_S = 1.0
PHONE_LIFETIME_S = 80.0
NODE_CORES = 0.1  # the farm's node, made small (cgroup v1 CPU quota) where it can be
CALIBRATE_RATE = 40  # registrations/s while the node's CPU per registration is measured
CALIBRATE_S = 2.0


@dataclass
class FloodFarm:
    node: NodeProcess
    balancer: BalancerProcess
    metrics_port: int
    accounts: dict[str, str]
    redis_url: str
    domain: str = DOMAIN

    def proxy(self, transport: str) -> str:
        return f"127.0.0.1:{self.balancer.port}"

    def logs(self) -> str:
        return f"--- node log\n{self.node.log()[-3000:]}\n--- balancer log\n{self.balancer.log()[-3000:]}"


@pytest.fixture
def flood_farm(redis_url, accounts, start_node, start_balancer, monkeypatch) -> Iterator[FloodFarm]:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SIPFARM_EXEMPT", "127.0.0.1/32")  # the test's own tools; not the phones
    monkeypatch.setenv("SIPFARM_DOMAINS", DOMAIN)
    monkeypatch.setenv("SIPFARM_BAN_TIME", "120")
    node = start_node(redis_url)
    metrics_port = free_udp_tcp_port()
    balancer = start_balancer(redis_url, allow_loopback=True, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    wait_nodes_usable(balancer, 1)
    with contextlib.ExitStack() as stack:
        if CpuLimit.unavailable() is None:
            stack.enter_context(CpuLimit("sipfarm-test-flood", NODE_CORES)).add(node.process.pid)
        yield FloodFarm(node, balancer, metrics_port, dict(accounts), redis_url)


def farm_capacity(farm: FloodFarm, tmp_path: Path, cores: float) -> float:
    """Registrations (REGISTER, 401, REGISTER with digest, 200) per second the node can complete
    with ``cores`` of CPU: its CPU per registration (above its idle CPU) at a rate well under
    that (no overload)."""
    injection = tmp_path / "carol.csv"
    injection.write_text(f"SEQUENTIAL\ncarol;{farm.accounts['carol']}\n")
    node = psutil.Process(farm.node.process.pid)
    idle = node.cpu_times()
    time.sleep(CALIBRATE_S)  # what the node spends doing nothing (timers, probes, heartbeats)
    before = node.cpu_times()
    result = run_sipp(
        REGISTER_AUTH, f"127.0.0.1:{farm.balancer.port}", workdir=tmp_path / "calibrate", rate=CALIBRATE_RATE,
        duration_s=CALIBRATE_S, injection=injection, timeout_s=CALIBRATE_S + 15,
        variables={"domain": DOMAIN, "contact": "127.0.0.1:5999", "expires": "300"},
    )  # fmt: skip
    after = node.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    used -= (before.user - idle.user) + (before.system - idle.system)
    assert result.calls_succeeded >= 0.9 * CALIBRATE_RATE * CALIBRATE_S, result.summary()
    return cores * result.calls_succeeded / max(used, 1e-3)


@contextlib.contextmanager
def flood(farm: FloodFarm, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = []
    try:
        for scenario, transport in ((REGISTER_FLOOD, "t1"), (OPTIONS_FLOOD, "u1")):
            argv = [
                find_sipp(None), f"127.0.0.1:{farm.balancer.port}", "-sf", str(scenario), "-i", FLOODER,
                "-t", transport, "-p", "0", "-set", "domain", DOMAIN, "-r", str(FLOOD_RATE),
                "-m", str(int(FLOOD_RATE * FLOOD_S)),
                "-l", "2000", "-recv_timeout", "300", "-timeout", str(int(FLOOD_S) + 5), "-nostdin",
            ]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)


def test_flooder_banned_while_softphones_register_and_talk(flood_farm: FloodFarm, tmp_path: Path) -> None:
    farm = flood_farm
    with contextlib.ExitStack() as stack:
        alice = stack.enter_context(Softphone("alice", max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path))
        bob = stack.enter_context(Softphone("bob", max_lifetime=PHONE_LIFETIME_S, log_dir=tmp_path))
        for phone, host, hz in ((alice, ALICE_HOST, ALICE_HZ), (bob, BOB_HOST, BOB_HZ)):
            phone.start(bind=host)
            code = phone.register(farm.proxy("udp"), phone.name, DOMAIN, farm.accounts[phone.name], timeout=EVENT_S)
            assert code == 200, f"{phone.name} REGISTER: {code}\n{farm.logs()}"
            phone.auto_answer(True, 200)
            phone.play_tone(hz, next_call=True)

        limited = CpuLimit.unavailable() is None
        capacity = farm_capacity(farm, tmp_path, NODE_CORES if limited else 1.0)

        stack.enter_context(flood(farm, tmp_path))
        started = time.monotonic()
        banned: list[float] = []

        def watch() -> None:  # the ban in Redis, looked for every 50 ms
            while time.monotonic() - started < 7 and not banned:
                if FLOODER in bans(farm.redis_url):
                    banned.append(time.monotonic() - started)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        register_times: list[float] = []
        call = None
        heard = None
        while time.monotonic() - started < FLOOD_S - 2:
            t0 = time.monotonic()
            code = alice.reregister(timeout=EVENT_S)
            register_times.append(time.monotonic() - t0)
            assert code == 200, f"alice's refresh {len(register_times)}: {code}\n{farm.logs()}"
            if call is None and time.monotonic() - started > 3:
                call = connect(farm, alice, bob)  # type: ignore[arg-type]
                heard = listen(alice, bob, call, tmp_path, "flood")
                hang_up(alice, bob, call)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        flooding = time.monotonic() - started
        watcher.join(timeout=6)

        assert banned and banned[0] < BANNED_WITHIN_S, (banned, farm.logs())
        banned_after = banned[0]
        assert bans(farm.redis_url).get(FLOODER) in ("balancer:rate_register", "balancer:rate_other")
        assert len(register_times) >= 12 and max(register_times) < REGISTER_WITHIN_S, register_times
        assert call is not None and heard is not None
        assert_tone(heard[0], BOB_HZ, "alice")
        assert_tone(heard[1], ALICE_HZ, "bob")
        assert flooding < FLOOD_S + 5
        metrics = protect_metrics(farm.metrics_port)
        assert metrics.get("banned", 0) > 1000, metrics  # the flood went on, dropped unparsed
        assert metrics.get("rate_register", 0) + metrics.get("rate_other", 0) >= 1, metrics
        # the flood's rate, from what the balancer dropped (the few requests before the ban aside:
        # its excess over the budget until the ban, then everything), against the farm's capacity
        # in REGISTER requests (two a registration)
        dropped = metrics["banned"] + metrics.get("rate_register", 0) + metrics.get("rate_other", 0)
        flood_rate = dropped / flooding
        ratio = flood_rate / (2 * capacity)
        print(
            f"farm capacity {capacity:.0f} registrations/s (node limited to {NODE_CORES} core: {limited}); "
            f"flood {flood_rate:.0f} requests/s = {ratio:.1f}x its REGISTER requests/s; flooder banned after "
            f"{banned_after:.2f} s; alice's refreshes: max {max(register_times) * 1000:.0f} ms"
        )
        if limited:
            assert ratio >= 10, (flood_rate, capacity)
