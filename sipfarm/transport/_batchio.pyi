"""Batched UDP system calls (recvmmsg/sendmmsg): sipfarm/transport/_batchio.c.

Built by scripts/build-compiled.sh into build/compiled/ only; the interpreted build has no such
module (importers fall back to asyncio's datagram transport).
"""

MAX_BATCH: int
MAX_BUFSIZE: int

def recv_batch(fd: int, max_datagrams: int, bufsize: int, /) -> list[tuple[bytes, tuple[str, int]]]: ...
def send_batch(fd: int, datagrams: list[tuple[bytes, tuple[str, int] | None]], /) -> int: ...
def counters() -> tuple[int, int]: ...
