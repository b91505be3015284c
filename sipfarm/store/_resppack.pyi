"""One Redis command in RESP: sipfarm/store/_resppack.c.

Built by scripts/build-compiled.sh into build/compiled/ only; the interpreted build has no such
module (sipfarm/store/resp.py then packs with hiredis.pack_command).
"""

def pack(args: tuple[bytes | str | int | float, ...], /) -> bytes | None: ...
