"""The parser's and serialiser's cost per message, in CPU time (best of several rounds).

    PYTHONSAFEPATH=1 PYTHONPATH=build/compiled:. .venv/bin/python -m benchmarks.parse_cost

For the typical messages of ``tests/sip/vectors/typical`` and parse_bench's INVITE and REGISTER:
``parse_message`` alone, ``to_bytes`` alone, both; and ``parse_message_reference`` (the Python
parse, what the interpreted build runs and what the compiled build falls back to) beside it, so
that one run shows what sipfarm/sip/_fastparse.c saves.  ``time.process_time``, best of
``--rounds`` rounds of ``--n`` operations: the figure least disturbed by other load.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.parse_bench import INVITE, REGISTER
from sipfarm.sip import parser
from sipfarm.sip.parser import parse_message, parse_message_reference

TYPICAL = Path(__file__).resolve().parent.parent / "tests" / "sip" / "vectors" / "typical"


def best(func: Callable[[], object], n: int, rounds: int) -> float:
    """Best CPU microseconds per call."""
    func()
    out = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            func()
        out = min(out, time.process_time() - start)
    return out / n * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    messages = {"bench_invite": INVITE, "bench_register": REGISTER}
    if TYPICAL.is_dir():
        messages |= {p.stem: p.read_bytes() for p in sorted(TYPICAL.glob("*.sip"))}
    print(f"parser: {parser.__file__}; C common case: {getattr(parser, 'HAVE_FASTPARSE', False)}")
    print(f"{'message':22s} {'parse':>7s} {'py parse':>8s} {'to_bytes':>8s} {'py join':>7s} {'both':>6s}  (us)")
    for name, data in messages.items():
        msg = parse_message(data)
        row = [
            best(lambda d=data: parse_message(d), args.n, args.rounds),
            best(lambda d=data: parse_message_reference(d), args.n, args.rounds),
            best(msg.to_bytes, args.n, args.rounds),
            best(msg.to_bytes_reference, args.n, args.rounds),
            best(lambda d=data: parse_message(d).to_bytes(), args.n, args.rounds),
        ]
        print(f"{name:22s} {row[0]:7.2f} {row[1]:8.2f} {row[2]:8.2f} {row[3]:7.2f} {row[4]:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
