"""The common case of the SIP header split and serialisation: sipfarm/sip/_fastparse.c.

Built by scripts/build-compiled.sh into build/compiled/ only; the interpreted build has no such
module (sipfarm/sip/parser.py, message.py and auth.py then do it all in Python).
"""

def split_headers(
    data: bytes,
    key_cache: dict[bytes, str],
    watched: frozenset[str],
    single: frozenset[str],
    max_headers: int,
    /,
) -> (
    tuple[bytes, list[tuple[str, bytes, bytes]], dict[str, bytes], int, tuple[bytes, bytes, int, bytes] | None] | None
): ...
def join(start_line: bytes, headers: list[tuple[str, bytes, bytes]], body: bytes, /) -> bytes | None: ...
def digest_params(value: bytes, /) -> tuple[str, dict[str, str], frozenset[str]] | None: ...
def response_hop(
    data: bytes, prefixes: tuple[bytes, ...], hop_prefix: bytes, max_size: int, /
) -> tuple[bytes, bytes, bytes, bytes | None] | None: ...
def stamp_via(raw: bytes, source_host: bytes, source_port: int, /) -> bytes | bool | None: ...
def request_scan(
    data: bytes, max_size: int, /
) -> tuple[bytes, bytes, bytes, tuple[bytes, ...], bytes, bytes, bytes, int, bytes | None] | None: ...
def request_out(
    data: bytes, max_size: int, popped: int, max_forwards: bytes, via: bytes, top_via: bytes, record_route: bytes, /
) -> bytes | None: ...
def request_check(headers: list[tuple[str, bytes, bytes]], call_id: bytes, /) -> tuple[bytes, ...] | None: ...
