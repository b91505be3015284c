"""The node's per-call cost in process: parse, transaction layer, proxy, timers, in memory.

    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled .venv/bin/python benchmarks/node_call_bench.py
    .venv/bin/python benchmarks/node_call_bench.py                  # the source tree, interpreted
    ... --calls 3000 --rounds 3 --breakdown                        # per kind of message too

Runs SIPp's call (INVITE, 407, ACK; INVITE with credentials, 100, 180, 200; ACK; BYE, 200)
between phones of the in-memory test tier (``tests/node/memfarm.py``) through one
:class:`~sipfarm.node.core.NodeCore` whose store is a dict, with a fake clock advanced by
1/``--rate`` s per call, so the transaction timers fire in the proportion they do at that rate
(each call's transactions end 5 and 32 s later) and the transaction table holds 33 s of calls.
Only the node's own work is timed (``time.process_time``): what the transport does with a
datagram (parse, Via stamping, ``NodeCore.on_message``, the drain) and what its timer does
(``next_deadline``, ``handle_timer``, the drain); the phones' work is not.  The cyclic GC is
tuned as in a node process.  Prints the best round's microseconds of node CPU per call: a
change measured without the kernel, uvloop and Redis, which a loaded VM makes noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "node"))

from memfarm import DOMAIN, MemFarm

import sipfarm.sip.transaction
from sipfarm.transport.loop import tune_gc


class _Timed:
    """The node's work, summed, and per kind of input (``INVITE``, ``180 INVITE``, timers...)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self.by_kind: dict[str, list[float]] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.seconds += seconds
        entry = self.by_kind.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds

    def wrap(self, deliver: Callable[[bytes, object], None]) -> Callable[[bytes, object], None]:
        def timed(data: bytes, source: object) -> None:
            if not self.on:
                deliver(data, source)
                return
            t0 = time.process_time()
            deliver(data, source)
            spent = time.process_time() - t0
            first = data[: data.find(b"\r\n")].split(b" ")
            method = data[data.find(b"CSeq: ") :].split(b"\r\n", 1)[0].split(b" ")[-1]
            status = first[1] + b" " if data.startswith(b"SIP/") else b""
            kind = status + method
            if not status:
                # the two INVITEs and the two ACKs of a call apart
                kind += b" (credentials)" if data.find(b"\r\nProxy-Authorization:") >= 0 else b""
                kind += b" (route)" if data.find(b"\r\nRoute:") >= 0 else b""
            self.add(kind.decode(), spent)

        return timed


def run(calls: int, rate: float, *, breakdown: bool = False) -> float:
    """Node CPU seconds per call, over ``calls`` calls after 33 s of them at ``rate``."""
    callers = [f"user{i}" for i in range(50)]
    farm = MemFarm(users={**{u: f"{u}-pw" for u in callers}, "bob": "bob-pw"})
    timed = _Timed()
    node, addr = farm.nodes[0], farm.node_addresses[0]
    farm.endpoints[(addr.host, addr.port)] = timed.wrap(farm.endpoints[(addr.host, addr.port)])

    def tick() -> None:
        """What the node's loop timer does as the clock moves on by one call."""
        t0 = time.process_time()
        farm.clock.mono += 1.0 / rate
        deadline = node.next_deadline()
        if deadline is not None and deadline <= farm.clock.mono:
            node.handle_timer(farm.clock.mono)
            farm._drain(node, addr)  # the glue's drain, as MemFarm.advance does
        if timed.on:
            timed.add("timers", time.process_time() - t0)

    bob = farm.phone("bob", "10.0.0.2")
    assert bob.register().status == 200  # type: ignore[union-attr]
    bob.answer = 200
    phones = [farm.phone(u, f"10.0.1.{i + 1}") for i, u in enumerate(callers)]
    for phone in phones:
        assert phone.register().status == 200  # type: ignore[union-attr]
    warm = int(rate * 33)  # the transaction table at its steady size (Timers J, L, M: 32 s)
    for n in range(warm + calls):
        if n == warm:
            tune_gc()  # as a node process does once started
            timed.on = True
        phone = phones[n % len(phones)]
        phone.inbox.clear()
        phone.sent.clear()  # the phone looks its INVITE up there (to ACK the 407)
        farm.log.clear()
        answer = phone.authenticated(phone.request("INVITE", f"sip:bob@{DOMAIN}"))
        assert answer is not None and answer.status == 200, answer
        phone.ack(answer)
        bye = phone.in_dialog("BYE", answer)
        phone.send(bye, phone.first_hop(bye))
        assert phone.last(method=b"BYE") is not None
        bob.inbox.clear()
        tick()
    assert not farm.stray, farm.stray[:1]
    if breakdown:
        for kind, (count, spent) in sorted(timed.by_kind.items(), key=lambda kv: -kv[1][1]):
            print(f"{kind:28s} {count / calls:5.2f} per call {spent / calls * 1e6:7.1f} us per call", file=sys.stderr)
    return timed.seconds / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0, help="calls per (fake) second")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="per kind of message, first round (stderr)")
    args = ap.parse_args(argv)
    source = sipfarm.sip.transaction.__file__ or ""
    results = [run(args.calls, args.rate, breakdown=args.breakdown and i == 0) for i in range(args.rounds)]
    out = {
        "build": "interpreted" if source.endswith(".py") else "compiled",
        "calls": args.calls,
        "rate": args.rate,
        "us_per_call_best": round(min(results) * 1e6, 1),
        "us_per_call_all": [round(r * 1e6, 1) for r in results],
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
