"""What the balancer's two fast-path parity tests (test_request_fast_path.py,
test_response_fast_path.py) share: their Hypothesis settings and addresses, and byte-level
mutations of a SIP message.  Each mutation applies one ``op`` to one
header line (chosen by ``at``) or to the bytes at a position (chosen by ``pick``), so that
Hypothesis explores the shapes next to the common one the C reader takes or declines.

Common ops: pad, trail, name, dup, drop, fold, bare, byte, truncate, leading.  A test adds its
own in ``line_ops``: a function given the message's lines, the chosen header line's index and
``pick``, editing the lines in place."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from hypothesis import HealthCheck, settings

from sipfarm.sip.address import Address

SCALE = float(os.environ.get("SIPFARM_PROPERTY_SCALE", "1"))
PROPERTY = settings(
    max_examples=int(500 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SECRET = b"fast-path-test-secret-0123456789"
LB = Address("udp", "127.0.0.1", 5060)
NODE = Address("udp", "127.0.0.1", 5070)
CLIENT = Address("udp", "127.0.0.2", 5062)
ATTACKER = Address("udp", "127.0.0.66", 5099)

LineOp = Callable[[list[bytes], int, int], None]

# what "bare" inserts at a position: line-break parts and the characters quoting or URIs use
BARE: tuple[bytes, ...] = (b"\r", b"\n", b"\x00", b'"', b",", b"<", b"[")


def mutate(
    data: bytes, op: str, at: int, pick: int, *, bare: tuple[bytes, ...] = BARE,
    line_ops: Mapping[str, LineOp] | None = None,
) -> bytes:  # fmt: skip
    lines = data.split(b"\r\n")
    if b"" not in lines or len(lines) < 3:
        return data + b"x" if op != "truncate" else data[:-1]
    head_end = lines.index(b"")
    i = 1 + at % max(1, head_end - 1)  # a header line
    line = lines[i]
    name, colon, value = line.partition(b":")
    extra = line_ops.get(op) if line_ops is not None else None
    if extra is not None:
        extra(lines, i, pick)
    elif op == "pad":
        lines[i] = name + colon + [b"  ", b"\t", b"", b" \t ", b"   "][pick % 5] + value.lstrip(b" ")
    elif op == "trail":
        lines[i] = line + [b" ", b"\t", b"\x0b", b"\x0c", b" ,"][pick % 5]
    elif op == "name":
        lines[i] = [name.upper(), name.lower(), name + b" ", name[:1]][pick % 4] + colon + value
    elif op == "dup":
        lines.insert(i, line if pick % 2 else name + colon + value + b"x")
    elif op == "drop":
        del lines[i]
    elif op == "fold":
        cut = len(line) // 2
        lines[i] = line[:cut] + b"\r\n " + line[cut:]
    elif op == "bare":
        pos = (pick * 7919) % max(1, len(data))
        return data[:pos] + bare[pick % len(bare)] + data[pos:]
    elif op == "byte":
        pos = (pick * 104729) % max(1, len(data))
        return data[:pos] + bytes([pick % 256]) + data[pos + 1 :]
    elif op == "truncate":
        return data[: (pick * 31) % max(1, len(data))]
    elif op == "leading":
        return b"\r\n" + data
    return b"\r\n".join(lines)


def replace_header(lines: list[bytes], prefix: bytes, choices: list[bytes], pick: int) -> None:
    """Every line starting with ``prefix`` (lower case) becomes ``choices[pick % len]``."""
    for j, other in enumerate(lines):
        if other.lower().startswith(prefix):
            lines[j] = choices[pick % len(choices)]
