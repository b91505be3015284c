"""Fuzz target for the SIP parser: accepts only "parsed" or SipError.

    python tests/sip/fuzz_parser.py --seconds 30            # atheris (libFuzzer) when installed
    python tests/sip/fuzz_parser.py --seconds 30 --engine random

Each input goes to :func:`parse_message` whole, and to a :class:`StreamFramer` whole and byte by
byte (h11's harness does the same).  Allowed outcomes: a message, or a ``SipError``.  For a parsed
message, its serialization must parse back to the same message and every accessor a handler
calls may raise only ``SipError``; the framer must give the same events (or the same typed error)
however the bytes were chunked.  Anything else is a crash: the input is saved under
``--artifacts`` and the process exits non-zero.

The name starts with ``fuzz_`` so pytest does not collect it; ``test_fuzz_parser_runs`` in
test_properties.py runs it as a subprocess for ~3 s.  Re-run saved inputs with
``python tests/sip/fuzz_parser.py CRASH_FILE...``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # pragma: no cover - atheris is optional
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["sipfarm"]):
        from sip_support import exercise  # the accessor walk the property tests use too

        from sipfarm.sip.errors import SipError
        from sipfarm.sip.message import SipMessage
        from sipfarm.sip.parser import StreamFramer, parse_message
else:  # pragma: no cover
    from sip_support import exercise

    from sipfarm.sip.errors import SipError
    from sipfarm.sip.message import SipMessage
    from sipfarm.sip.parser import StreamFramer, parse_message

MAX_LEN = 8192

SEEDS: list[bytes] = [
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.example.com;rport;branch=z9hG4bK776asdhds\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@example.com>\r\n"
    b'From: "Alice \\"A\\"" <sip:alice@example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@[2001:db8::1]:5060;transport=tcp>;expires=60, sip:x@y;q=0.5\r\n"
    b"Route: <sip:p1.example.com;lr>,\r\n <sip:p2.example.com;lr>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 13\r\n\r\n"
    b"v=0\r\ns=-\r\nt=0",
    b"SIP/2.0 200 OK\r\n"
    b"v: SIP/2.0/TCP a.example.com;branch=z9hG4bKa;received=192.0.2.1, SIP/2.0/UDP b\r\n"
    b"t: <sip:bob@example.com>;tag=x\r\nf: <sip:alice@example.com>;tag=y\r\n"
    b"i: cid\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n",
    b"REGISTER sips:example.com SIP/2.0\n"
    b"Via: SIP / 2.0 / TLS 192.0.2.1:5061;branch=z9hG4bKr\n"
    b"To: sip:%61lice@example.com\nFrom: sip:alice@example.com;tag=1\n"
    b"Call-ID: r1\nCSeq: 2 REGISTER\nContact: *\nExpires: 0\n"
    b'Authorization: Digest username="alice", realm="example.com", nonce="n", uri="sips:example.com"\n'
    b"Content-Length: 0\n\n",
    b"\r\n\r\nOPTIONS tel:+15551234;phone-context=example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP h;branch=z9hG4bKo\r\nTo: <tel:+15551234>\r\nFrom: <sip:a@b>;tag=2\r\n"
    b"Call-ID: o\r\nCSeq: 9 OPTIONS\r\n\r\n",
]


def _rfc4475_seeds() -> list[bytes]:
    """The test suite's vector files and built-in RFC 4475 vectors, when present."""
    here = Path(__file__).resolve().parent
    out: list[bytes] = []
    out += [p.read_bytes()[:MAX_LEN] for p in sorted((here / "vectors").rglob("*.sip"))]
    try:
        sys.path.insert(0, str(here))
        vectors = importlib.import_module("test_rfc4475").VECTORS
        out += [v.data[:MAX_LEN] for v in vectors]
    except ImportError:  # seeds are a bonus; pytest may be missing
        pass
    finally:
        sys.path.remove(str(here))
    return out


# -- the property checked on each input ------------------------------------------------------------


def _semantic(msg: SipMessage) -> tuple[object, ...]:
    return (msg.method, msg.uri, msg.status, msg.reason,
            [(k, v) for k, _, v in msg.headers], msg.body, msg.cseq)


def _frame(chunks: list[bytes]) -> tuple[list[bytes], tuple[type, int] | None]:
    framer = StreamFramer(max_size=4096)
    events: list[bytes] = []
    try:
        for chunk in chunks:
            framer.receive_data(chunk)
            while (event := framer.next_event()) is not None:
                events.append(event)
    except SipError as exc:
        return events, (type(exc), exc.status)
    return events, None


def check(data: bytes) -> None:
    """Raise anything but SipError on a bug (AssertionError for a broken property)."""
    try:
        msg = parse_message(data, max_size=4096)
    except SipError:
        pass
    else:
        again = parse_message(msg.to_bytes())
        assert _semantic(again) == _semantic(msg), "serialization does not parse back the same"
        exercise(msg)
    whole = _frame([data])
    bytewise = _frame([data[i : i + 1] for i in range(len(data))])
    assert whole == bytewise, "framer depends on chunking"


# -- engines --------------------------------------------------------------------------------------


def save_crash(data: bytes, artifacts: Path) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"  # a file name, not security
    path.write_bytes(data)
    return path


MUTATION_TOKENS = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b":", b" ", b"\t", b",", b";", b"<",
                   b">", b'"', b"\\", b"@", b"[", b"]", b"%", b"=", b"\xff", b"\r\n ", b"0", b"9" * 12]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        i = rng.randint(0, len(buf))
        if op == 0:
            del buf[i:]
        elif op == 1 and buf:
            buf[min(i, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[i:i] = rng.choice(MUTATION_TOKENS)
        elif op == 3:
            del buf[i : i + rng.randint(1, 16)]
        elif op == 4:
            j = rng.randint(i, min(len(buf), i + 64))
            buf[j:j] = buf[i:j]
        elif op == 5:
            other = rng.choice(corpus)
            k = rng.randint(0, len(other))
            buf[i:i] = other[k : k + rng.randint(1, 80)]
        else:
            j = rng.randint(i, min(len(buf), i + 32))
            buf[i:j] = buf[i:j].swapcase()
    return bytes(buf[:MAX_LEN])


def run_random(seconds: float, artifacts: Path, seed: int) -> int:
    rng = random.Random(seed)
    corpus = SEEDS + _rfc4475_seeds()
    deadline = time.monotonic() + seconds
    runs = 0
    for data in corpus:
        if not _run_one(data, artifacts):
            return 1
    while time.monotonic() < deadline:
        data = mutate(rng, rng.choice(corpus), corpus)
        runs += 1
        if not _run_one(data, artifacts):
            return 1
        if runs % 50 == 0 and len(corpus) < 2000:
            corpus.append(data)  # keep some mutants to mutate further
    print(f"fuzz_parser: {runs} random mutants in {seconds:.0f}s, no crash")
    return 0


def _run_one(data: bytes, artifacts: Path) -> bool:
    try:
        check(data)
    except Exception:  # anything but SipError is the finding
        path = save_crash(data, artifacts)
        traceback.print_exc()
        print(f"fuzz_parser: CRASH, input saved to {path}", file=sys.stderr)
        return False
    return True


def run_atheris(seconds: float, artifacts: Path, seed: int) -> int:  # pragma: no cover - subprocess
    assert atheris is not None
    corpus_dir = Path(tempfile.mkdtemp(prefix="sipfarm-fuzz-corpus-"))
    for n, data in enumerate(SEEDS + _rfc4475_seeds()):
        (corpus_dir / f"seed-{n}").write_bytes(data)
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        f"-max_total_time={max(1, int(seconds))}",
        f"-max_len={MAX_LEN}",
        "-timeout=10",
        f"-seed={seed}",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
        str(corpus_dir),
    ]

    def one_input(data: bytes) -> None:
        check(data)  # libFuzzer saves the input and exits non-zero on any exception

    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fuzz the SIP parser for a bounded time")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    parser.add_argument("--artifacts", type=Path, default=Path(tempfile.gettempdir()) / "sipfarm-fuzz")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("inputs", nargs="*", type=Path, help="re-run saved inputs instead of fuzzing")
    args = parser.parse_args(argv)
    if args.inputs:
        ok = all(_run_one(path.read_bytes(), args.artifacts) for path in args.inputs)
        print("fuzz_parser: all inputs parsed or raised SipError" if ok else "fuzz_parser: crash")
        return 0 if ok else 1
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if atheris is not None else "random"
    if engine == "atheris":
        if atheris is None:
            parser.error("atheris is not installed")
        return run_atheris(args.seconds, args.artifacts, args.seed)
    return run_random(args.seconds, args.artifacts, args.seed)


if __name__ == "__main__":
    raise SystemExit(main())
