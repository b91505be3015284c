"""The balancer's per-call cost in process: parse, front door, forwarding core, send glue.

    .venv/bin/python -m benchmarks.balancer_bench                  # source tree
    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled .venv/bin/python -m benchmarks.balancer_bench
    ... --calls 20000 --profile                                   # cProfile's top entries too

Replays one SIPp call as the balancer saw it under ``sipfarm bench`` (captured with strace from a
real farm: ``scenarios/balancer_call.json``, 16 datagrams in and 16 out: UAC -> balancer -> node
-> balancer -> UAS and back) through the balancer's own pieces wired as ``sipfarm balancer``
wires them (``TransportManager.deliver`` with the front door's screen, ``BalancerCore`` with the
front door, admission control and keepalive table; the garbage collector tuned as there), with
the UDP socket replaced by a counter.
So it measures everything the balancer does per message except the kernel's recvmsg/sendmsg and
uvloop's event loop: the part this code can change.

The capture's balancer signed its branches and flow tokens with its own secret; the replay uses
a fixed one, so the tokens in the recorded messages are re-signed (flow tokens carry their
flow) and the branches mapped from what this run's balancer wrote into the message it sent
before (responses carry it back).  Each replayed call gets a Call-ID of its own.  The run
checks that every message was forwarded where the capture's balancer sent it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import re
import sys
import time
from pathlib import Path
from typing import Any

from sipfarm.balancer.core import BalancerCore
from sipfarm.balancer.frontdoor import ClientScreen, FrontDoor
from sipfarm.balancer.keepalive import RegisteredFlows
from sipfarm.balancer.main import front_door_policy, overload_policy, source_matcher, transport_config
from sipfarm.balancer.nodes import NodeSet
from sipfarm.balancer.overload import AdmissionControl
from sipfarm.cluster.membership import Member, Role
from sipfarm.config import BalancerConfig
from sipfarm.edge import FlowTokens
from sipfarm.sip.address import Address
from sipfarm.transport.destinations import DestinationPolicy
from sipfarm.transport.loop import tune_gc
from sipfarm.transport.manager import TransportManager
from sipfarm.transport.udp import UdpEndpoint

CAPTURE = Path(__file__).with_name("scenarios") / "balancer_call.json"
SECRET = b"balancer-bench-secret-0123456789"
HOST = "127.0.0.1"
_TOKEN = re.compile(rb"sip:([0-9a-f]{32})@([0-9.]+):([0-9]+)")
_BRANCH = re.compile(rb"z9hG4bKlb-[0-9a-f]{36}")


class _CountingTransport:
    """What ``UdpEndpoint.send`` needs of a datagram transport; keeps the last datagram."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.count = 0
        self.keep = True

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (HOST, 0) if name == "sockname" else default

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.count += 1
        if self.keep:
            self.sent.append((data, addr))


def build(ports: dict[str, int]) -> tuple[TransportManager, BalancerCore, _CountingTransport]:
    """A balancer wired as ``sipfarm.balancer.main.serve`` wires one (UDP only, defaults)."""
    nodes = NodeSet()  # probes are not run: the node stays up
    holder: list[BalancerCore] = []

    def on_message(msg: object, source: Address, local: Address) -> None:
        holder[0].on_message(msg, source, local)  # type: ignore[arg-type]

    cfg = BalancerConfig()  # the shipped defaults: front door on (loopback exempt), shedding on
    transports = TransportManager(on_message, config=transport_config(cfg))
    transports.limit_exempt = source_matcher(cfg.exempt)
    front = FrontDoor(front_door_policy(cfg))
    transports.screen = ClientScreen(front, nodes, time.monotonic)
    local = Address("udp", HOST, ports["balancer"])
    endpoint = UdpEndpoint(transports)
    fake = _CountingTransport()
    endpoint.connection_made(fake)  # type: ignore[arg-type]
    endpoint.local = local
    transports._udp[local] = endpoint
    transports._udp_v4 = endpoint
    core = BalancerCore(
        nodes,
        FlowTokens(SECRET),
        public={"udp": local},
        internal=local,
        send=transports.send_request,
        send_response=transports.send_on_flow,
        destinations=DestinationPolicy(allow=["127.0.0.0/8"], own=[local]),
        hop_secret=SECRET,
        registrations=RegisteredFlows(interval=cfg.keepalive_interval, failures=cfg.keepalive_failures),
        front=front,
        retry_after=cfg.retry_after,
        hold_max=cfg.flow_hold_max,
        admission=AdmissionControl(overload_policy(cfg)),
        shed_retry_after=(cfg.shed_retry_after_min, cfg.shed_retry_after_max),
        # as main.serve: the core stamps clients' requests when the transport does not (a
        # build from before that change stamps in the transport, and its core has no option)
        **({} if transports.config.stamp_via else {"stamp_via": True}),
    )
    holder.append(core)
    transports.on_message = core.on_message
    if hasattr(core, "response_fast_path"):  # as main.serve (a build from before it has none)
        transports.fast_response = core.response_fast_path()
    if hasattr(core, "request_fast_path"):
        transports.fast_request = core.request_fast_path()
    nodes.update_members([Member(id="node1", role=Role.NODE, addresses=(f"udp:{HOST}:{ports['node']}",))])
    return transports, core, fake


def _resign_tokens(data: bytes, tokens: FlowTokens) -> bytes:
    """The flow tokens in ``data`` signed with ``tokens``' secret (each names its own flow, at
    the host and port of its URI)."""
    from sipfarm.edge import unpack_flow  # noqa: PLC0415

    def sub(m: re.Match[bytes]) -> bytes:
        flow = unpack_flow(bytes.fromhex(m.group(1)[16:].decode()))
        assert flow is not None
        host, port = m.group(2), m.group(3)
        return b"sip:%s@%s:%s" % (tokens.encode(flow, host.decode(), int(port)).encode(), host, port)

    return _TOKEN.sub(sub, data)


def prepare(capture: dict[str, Any]) -> tuple[list[tuple[bytes, Address]], list[tuple[bytes, int]]]:
    """The call's incoming datagrams re-signed for ``SECRET`` (a first replay maps the
    capture's branches to this balancer's), and the captured outgoing (first line, port)."""
    ports = {k: int(v) for k, v in capture.items() if k != "messages"}
    transports, core, fake = build(ports)
    local = Address("udp", HOST, ports["balancer"])
    branches: dict[bytes, bytes] = {}
    incoming: list[tuple[bytes, Address]] = []
    expected: list[tuple[bytes, int]] = []
    for m in capture["messages"]:
        data = m["data"].encode("latin-1")
        if m["dir"] == "in":
            data = _resign_tokens(data, core.tokens)
            for old, new in branches.items():
                data = data.replace(old, new)
            source = Address("udp", HOST, int(m["peer"]))
            incoming.append((data, source))
            before = len(fake.sent)
            transports.deliver(data, source, local)
            if len(fake.sent) != before + 1:
                raise SystemExit(f"replay: {data.split(b' ', 2)[:2]} was not forwarded")
        else:
            expected.append((data.split(b"\r\n", 1)[0], int(m["peer"])))
            mine = fake.sent[-1][0]
            branches.update(zip(_BRANCH.findall(data), _BRANCH.findall(mine), strict=True))
    return incoming, expected


def run(
    incoming: list[tuple[bytes, Address]],
    expected: list[tuple[bytes, int]],
    calls: int,
    ports: dict[str, int],
    by_kind: dict[str, float] | None = None,
) -> dict[str, float]:
    """One timed replay; with ``by_kind``, each datagram is timed on its own (thread CPU time,
    adding the clock's own cost to each) and the microseconds per call summed per kind into it."""
    transports, _core, fake = build(ports)
    local = Address("udp", HOST, ports["balancer"])
    call_id = re.search(rb"Call-ID: (\S+)", incoming[0][0])
    assert call_id is not None
    old = b"Call-ID: " + call_id.group(1)
    # a Call-ID of its own per call (the pinning and admission tables see distinct calls)
    prepared = [
        [(data.replace(old, b"Call-ID: %d-%s" % (i, call_id.group(1))), source) for data, source in incoming]
        for i in range(calls)
    ]
    deliver = transports.deliver
    # first call checked: every datagram where the captured balancer sent it
    for data, source in prepared[0]:
        deliver(data, source, local)
    got = [(d.split(b"\r\n", 1)[0], addr[1]) for d, addr in fake.sent]
    if got != expected:
        raise SystemExit(f"replay diverged from the capture:\n{got}\n{expected}")
    fake.keep = False
    fake.count = 0
    start_cpu, start = time.process_time(), time.perf_counter()
    if by_kind is None:
        for batch in prepared[1:]:
            for data, source in batch:
                deliver(data, source, local)
    else:
        spent = [0] * len(incoming)
        clock = time.thread_time_ns
        for batch in prepared[1:]:
            for i, (data, source) in enumerate(batch):
                t0 = clock()
                deliver(data, source, local)
                spent[i] += clock() - t0
        for i, (data, source) in enumerate(incoming):
            kind = _kind(data, source, ports)
            by_kind[kind] = by_kind.get(kind, 0.0) + spent[i] / 1e3 / (calls - 1)
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    n = calls - 1
    if fake.count != n * len(expected):
        raise SystemExit(f"sent {fake.count} datagrams for {n} calls, expected {n * len(expected)}")
    return {
        "calls": n,
        "us_per_call": 1e6 * cpu / n,
        "us_per_message": 1e6 * cpu / (n * len(incoming)),
        "calls_per_cpu_s": n / cpu if cpu else 0.0,
        "wall_s": wall,
    }


def _kind(data: bytes, source: Address, ports: dict[str, int]) -> str:
    """A datagram's kind for --by-kind: "INVITE from client", "BYE routed from node" (with a
    Route: in a dialog), "ACK tagged from client" (To tag, no Route: a non-2xx's ACK),
    "180 (INVITE) from node"..."""
    first = data.split(b"\r\n", 1)[0].split(b" ")
    method = re.search(rb"\r\nCSeq: \d+ (\S+)", data)
    sender = "node" if source.port == ports["node"] else "client"
    tagged = re.search(rb"\r\nTo: [^\r]*;tag=", data) is not None
    routed = data.find(b"\r\nRoute: ") >= 0
    if first[0] == b"SIP/2.0":
        return f"{first[1].decode()} ({method.group(1).decode() if method else '?'}) from {sender}"
    return f"{first[0].decode()}{' routed' if routed else ' tagged' if tagged else ''} from {sender}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs; the best is reported with the others")
    ap.add_argument("--by-kind", action="store_true", help="one more run, each datagram timed: us per call by kind")
    ap.add_argument("--profile", action="store_true", help="cProfile one more run, top 30 by own time")
    args = ap.parse_args(argv)
    capture = json.loads(CAPTURE.read_text())
    ports = {k: int(v) for k, v in capture.items() if k != "messages"}
    incoming, expected = prepare(capture)
    tune_gc()  # as `sipfarm balancer` does once started
    import sipfarm.balancer.core as core_module  # noqa: PLC0415

    build_kind = "compiled" if (core_module.__file__ or "").endswith(".so") else "interpreted"
    results = [run(incoming, expected, args.calls, ports) for _ in range(args.repeat)]
    per_call = sorted(r["us_per_call"] for r in results)
    print(
        json.dumps(
            {
                "build": build_kind,
                "messages_per_call": len(incoming),
                "calls": args.calls,
                "us_per_call": [round(x, 1) for x in per_call],
                "us_per_message_best": round(per_call[0] / len(incoming), 2),
                "calls_per_cpu_s_best": round(1e6 / per_call[0]),
            }
        )
    )
    if args.by_kind:
        kinds: dict[str, float] = {}
        run(incoming, expected, args.calls, ports, kinds)
        print(
            json.dumps(
                {"us_per_call_by_kind": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}}
            )
        )
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(incoming, expected, max(1000, args.calls // 5), ports)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
