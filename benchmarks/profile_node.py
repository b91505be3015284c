"""Profile one sipfarm node alone (no balancer) under a fixed SIPp load.

    .venv/bin/python -m benchmarks.profile_node --kind call --rate 300 --seconds 10 [--py-spy]
    ... --build interpreted|compiled    # default: compiled when `make compiled` is fresh

Starts Redis, provisions users, one node (1 worker), a SIPp UAS registered as the callee, then
runs REGISTERs (`--kind register`) or calls (`--kind call`) straight at the node at `--rate`, and
prints the node's CPU per registration / call from /proc (user + system). With `--py-spy`, also
records the node with py-spy (`--native` off, `--idle` off) into `--out` as a speedscope/raw file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.kamailio import DEFAULT_DOMAIN, RedisServer, make_users, write_calls_csv, write_users_csv
from benchmarks.process import ManagedProcess, cpu_seconds, free_port, sipfarm_env, wait_until
from benchmarks.sipp import REGISTER_AUTH, UAC_CALL, SippServer, run_sipp
from benchmarks.targets import _provision, _sip_ping

HOST = "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("register", "call"), default="call")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--hold-ms", type=int, default=100)
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--build", choices=("auto", "compiled", "interpreted"), default="auto")
    ap.add_argument("--out", default=".run/profile-node")
    args = ap.parse_args(argv)
    work = Path(args.out).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    users = make_users(args.users)
    env, build_used = sipfarm_env(args.build)
    print(f"node build: {build_used}", flush=True)
    redis = RedisServer(work / "redis")
    node: ManagedProcess | None = None
    uas: SippServer | None = None
    try:
        asyncio.run(_provision(redis.url, users, DEFAULT_DOMAIN))
        port = free_port(HOST)
        # SIPp's UAS sits on loopback, which a node refuses as a destination unless allowed
        env = {**env, "SIPFARM_ALLOW_DESTINATIONS": "127.0.0.0/8"}
        node = ManagedProcess(
            "node",
            [sys.executable, "-m", "sipfarm", "node", "--listen", f"udp:{HOST}:{port}", "--redis", redis.url,
             "--domain", DEFAULT_DOMAIN, "--node-id", "node1", "--log-level", "warning"],
            work / "node.log", cwd=work, env=env,
        )
        if not wait_until(lambda: _sip_ping(port), 20):
            print(node.log_tail(20), file=sys.stderr)
            return 1
        target = f"{HOST}:{port}"
        uas = SippServer(work / "uas")
        # Register the callee (user 0) at the UAS, and every caller too (a realistic location table).
        reg = run_sipp(REGISTER_AUTH, target, workdir=work / "reg0", rate=500, calls=len(users),
                       injection=write_users_csv(work / "users.csv", users),
                       variables={"domain": DEFAULT_DOMAIN, "contact": uas.contact, "expires": "3600"})
        print(f"pre-registration: {reg.calls_succeeded}/{reg.calls_attempted} ok; node pid {node.proc.pid}",
              flush=True)
        count = round(args.rate * args.seconds)
        if args.kind == "register":
            picked = [users[i % len(users)] for i in range(count)]
            injection = write_users_csv(work / "users-run.csv", picked)
            scenario, variables = REGISTER_AUTH, {"domain": DEFAULT_DOMAIN, "contact": uas.contact,
                                                  "expires": "3600"}
            hold = 0
        else:
            callers = users[1:]
            picked = [callers[i % len(callers)] for i in range(count)]
            injection = write_calls_csv(work / "calls.csv", picked, users[0].name)
            scenario, variables = UAC_CALL, {"domain": DEFAULT_DOMAIN}
            hold = args.hold_ms
        spy = None
        if args.py_spy:
            exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen([exe, "record", "-p", str(node.proc.pid), "-o", str(work / "profile.txt"),
                                    "-f", "raw", "-r", "200", "-d", str(int(args.seconds + 5))],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            time.sleep(1.0)
        cpu0 = cpu_seconds(node.proc.pid)
        times0 = psutil.Process(node.proc.pid).cpu_times()
        t0 = time.monotonic()
        res = run_sipp(scenario, target, workdir=work / "run", rate=args.rate, calls=count, injection=injection,
                       variables=variables, call_length_ms=hold)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(node.proc.pid) - cpu0
        times1 = psutil.Process(node.proc.pid).cpu_times()
        system_share = (times1.system - times0.system) / max(cpu, 1e-9)
        if spy is not None:
            spy.wait(60)
        per = cpu / max(res.calls_succeeded, 1)
        out = {"build": build_used, "kind": args.kind, "rate": args.rate, "ok": res.calls_succeeded,
               "failed": res.calls_failed,
               "wall_s": round(wall, 2), "node_cpu_s": round(cpu, 3), "node_cpu_us_per": round(per * 1e6, 1),
               "node_cpu_pct": round(100 * cpu / wall, 1),
               "system_pct": round(100 * system_share, 1), "retransmissions": res.retransmissions,
               "p99_ms": res.p99_ms}
        print(json.dumps(out), flush=True)
        return 0
    finally:
        if uas is not None:
            uas.stop()
        if node is not None:
            node.stop()
        redis.stop()


if __name__ == "__main__":
    raise SystemExit(main())
