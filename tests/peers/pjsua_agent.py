"""A pjsua2 softphone driven by JSON lines: the real SIP peer of sipfarm's integration tests.

Theory of operation
-------------------
One process holds one pjsua2 ``Endpoint`` (pjsua is a singleton per process, see PEERS.md), so two
softphones are two agents. The controller (``softphone.Softphone``) writes one JSON object per line on
our stdin and reads one JSON object per line from our stdout:

* a command ``{"cmd": "call", "id": 3, ...}`` is answered by exactly one reply
  ``{"reply": "call", "id": 3, "ok": true, ...}`` (or ``"ok": false, "error": "..."``);
* everything pjsip tells us arrives as an event ``{"event": "call_state", ...}`` at any time.

Everything runs on the main thread: pjsua has no worker thread (``threadCnt=0``), and the loop
alternates ``pjsua_handle_events(10 ms)`` (through ctypes: the binding lacks ``libHandleEvents``) with a
non-blocking read of stdin, so every pjsua2 callback runs on this thread between two commands. Audio
runs on pjsua's own media threads (null sound device clock, media ioqueue) and needs no polling.

What the binding (pjsua2-pybind11 0.1a3) lacks is reached through ctypes on the bundled libpjsua, the
very library instance the module uses: WAV player and recorder, conference connections, codec
priorities, call dumps (RTP statistics).

The agent never outlives its controller: it exits when stdin closes, on ``quit``, or after
``--max-lifetime`` seconds, and it always hangs up, finalises recordings and destroys the library.
Anything pjsip prints goes to stderr: fd 1 is moved to stderr at start and the protocol keeps a
private duplicate, so a stray C ``printf`` cannot corrupt the JSON stream.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import re
import select
import struct
import sys
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pjsua2 as pj

JsonObject = dict[str, Any]

POLL_MS = 10
STDIN_CHUNK = 65536
MAX_LINE = 1 << 20
SHUTDOWN_POLL_S = 2.0
STATS_SNAPSHOT_S = 0.2
TONE_RATE = 8000
TONE_SECONDS = 1  # integer seconds of an integer-Hz tone: the loop point is seamless
TONE_AMPLITUDE = 0.5
DUMP_BUF = 8192
# Codecs pjsua registers besides G.711; all are switched off so G.711 is what gets negotiated.
OTHER_CODECS = ("speex", "iLBC", "GSM", "G722", "G7221", "L16", "opus", "AMR", "G729", "BV", "SILK")
PJSUA_CALL_UNHOLD = 1  # pjsua_call_flag: the re-INVITE offers sendrecv again
CLONE_NEWUTS = 0x04000000
HOST_NAME_MAX = 64
SIP_LOG_LEVEL = 4  # pjsua logs whole messages at level 4
HOOK_SCAN_BYTES = 1 << 20  # pjsua_var is ~400 KB in PJSIP 2.14
PJSUA_MAX_CALLS = 32  # size of pjsua's call array (enum_calls never returns more)
ACC_CONFIG_BUF = 1 << 16  # pjsua_acc_config is a few KB in PJSIP 2.14
DEFAULT_RTP_PORT = 4000  # pjsua_acc_config_default's rtp_cfg.port, which pjsua2 keeps
# pjsua2's static callbacks in libpjsua2 (exported C++ symbols) that the agent swaps for its own,
# because the binding does not expose the Account/Call methods they would call (see PjsuaC.hook).
ON_PAGER2 = "_ZN2pj8Endpoint9on_pager2EiPK8pj_str_tS3_S3_S3_S3_P13pjsip_rx_datai"
ON_PAGER_STATUS2 = (
    "_ZN2pj8Endpoint16on_pager_status2EiPK8pj_str_tS3_Pv17pjsip_status_codeS3_P13pjsip_tx_dataP13pjsip_rx_datai"
)


class PjStr(ctypes.Structure):
    """``pj_str_t``: pointer + length, not NUL-terminated."""

    _fields_ = (("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t))


def pj_str(text: str) -> PjStr:
    raw = text.encode()
    return PjStr(raw, len(raw))


class PjStrView(ctypes.Structure):
    """``pj_str_t`` as pjsip hands it to a callback: read exactly ``slen`` bytes, no NUL expected."""

    _fields_ = (("ptr", ctypes.c_void_p), ("slen", ctypes.c_ssize_t))


def str_of(view: Any) -> str:
    """The text of a ``PjStrView`` pointer (empty for NULL)."""
    if not view:
        return ""
    value = view.contents
    if not value.ptr or value.slen <= 0:
        return ""
    return ctypes.string_at(value.ptr, value.slen).decode(errors="replace")


PjStrPtr = ctypes.POINTER(PjStrView)
# void on_pager2(call_id, from, to, contact, mime_type, body, rdata, acc_id)
OnPager2 = ctypes.CFUNCTYPE(
    None, ctypes.c_int, PjStrPtr, PjStrPtr, PjStrPtr, PjStrPtr, PjStrPtr, ctypes.c_void_p, ctypes.c_int
)
# void on_pager_status2(call_id, to, body, user_data, status, reason, tdata, rdata, acc_id)
OnPagerStatus2 = ctypes.CFUNCTYPE(
    None,
    ctypes.c_int,
    PjStrPtr,
    PjStrPtr,
    ctypes.c_void_p,
    ctypes.c_int,
    PjStrPtr,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int,
)


def own_hostname(hostname: str) -> str:
    """Give this process its own host name (a new UTS namespace, root only); returns the name in use.

    pjsua derives the RFC 5626 ``+sip.instance`` of every account from a hash of the host name,
    so two agents on one machine would claim to be one device, and a registrar rightly lets the
    second registration's flow replace the first (RFC 5626 6). Real phones have distinct
    instances: so do agents, when the namespace can be made. Must run before ``libCreate``
    (pjlib caches the name).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    raw = hostname.encode()[:HOST_NAME_MAX]
    if libc.unshare(CLONE_NEWUTS) == 0 and libc.sethostname(raw, len(raw)) == 0:
        return raw.decode()
    return os.uname().nodename


class AgentError(Exception):
    """A command that cannot be carried out; its message goes back in the reply."""


def _library_dir() -> Path:
    return Path(pj.__file__).resolve().parent / "pjsua2_pybind11.libs"


def _load(prefix: str) -> ctypes.CDLL:
    matches = sorted(_library_dir().glob(f"{prefix}-*.so*"))
    if not matches:
        raise AgentError(f"{prefix} not found in {_library_dir()}")
    # dlopen of the path the module already loaded returns the same handle: same globals.
    return ctypes.CDLL(str(matches[0]))


class PjsuaC:
    """The few libpjsua / libpj C functions pjsua2-pybind11 does not expose."""

    def __init__(self) -> None:
        self.pj = _load("libpj")
        self.lib = _load("libpjsua")
        lib = self.lib
        self.pj.pj_log_set_level.argtypes = (ctypes.c_int,)
        self.pj.pj_log_set_level.restype = None
        lib.pjsua_handle_events.argtypes = (ctypes.c_uint,)
        lib.pjsua_handle_events.restype = ctypes.c_int
        lib.pjsua_player_create.argtypes = (ctypes.POINTER(PjStr), ctypes.c_uint, ctypes.POINTER(ctypes.c_int))
        lib.pjsua_player_create.restype = ctypes.c_int
        lib.pjsua_player_get_conf_port.argtypes = (ctypes.c_int,)
        lib.pjsua_player_get_conf_port.restype = ctypes.c_int
        lib.pjsua_player_destroy.argtypes = (ctypes.c_int,)
        lib.pjsua_player_destroy.restype = ctypes.c_int
        lib.pjsua_recorder_create.argtypes = (
            ctypes.POINTER(PjStr),
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_ssize_t,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_int),
        )
        lib.pjsua_recorder_create.restype = ctypes.c_int
        lib.pjsua_recorder_get_conf_port.argtypes = (ctypes.c_int,)
        lib.pjsua_recorder_get_conf_port.restype = ctypes.c_int
        lib.pjsua_recorder_destroy.argtypes = (ctypes.c_int,)
        lib.pjsua_recorder_destroy.restype = ctypes.c_int
        lib.pjsua_conf_connect.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pjsua_conf_connect.restype = ctypes.c_int
        lib.pjsua_conf_disconnect.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pjsua_conf_disconnect.restype = ctypes.c_int
        lib.pjsua_codec_set_priority.argtypes = (ctypes.POINTER(PjStr), ctypes.c_uint8)
        lib.pjsua_codec_set_priority.restype = ctypes.c_int
        lib.pjsua_call_dump.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p)
        lib.pjsua_call_dump.restype = ctypes.c_int
        lib.pjsua_enum_calls.argtypes = (ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint))
        lib.pjsua_enum_calls.restype = ctypes.c_int
        lib.pjsua_im_send.argtypes = (
            ctypes.c_int,
            ctypes.POINTER(PjStr),
            ctypes.POINTER(PjStr),
            ctypes.POINTER(PjStr),
            ctypes.c_void_p,
            ctypes.c_void_p,
        )
        lib.pjsua_im_send.restype = ctypes.c_int
        lib.pjsua_get_var.argtypes = ()
        lib.pjsua_get_var.restype = ctypes.c_void_p
        lib.pjsua_pool_create.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t)
        lib.pjsua_pool_create.restype = ctypes.c_void_p
        lib.pjsua_acc_get_config.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        lib.pjsua_acc_get_config.restype = ctypes.c_int
        lib.pjsua_acc_modify.argtypes = (ctypes.c_int, ctypes.c_void_p)
        lib.pjsua_acc_modify.restype = ctypes.c_int
        self.pj.pj_pool_release.argtypes = (ctypes.c_void_p,)
        self.pj.pj_pool_release.restype = None
        self.pjsua2 = _load("libpjsua2")
        self.hooks: list[tuple[int, int, Any]] = []  # (slot address, original pointer, ctypes callback)

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise AgentError(f"{what} failed: pj_status_t {status}")

    def player_create(self, path: str) -> tuple[int, int]:
        pid = ctypes.c_int(-1)
        name = pj_str(path)
        self.check(self.lib.pjsua_player_create(ctypes.byref(name), 0, ctypes.byref(pid)), "pjsua_player_create")
        return pid.value, self.lib.pjsua_player_get_conf_port(pid.value)

    def recorder_create(self, path: str) -> tuple[int, int]:
        rid = ctypes.c_int(-1)
        name = pj_str(path)
        self.check(
            self.lib.pjsua_recorder_create(ctypes.byref(name), 0, None, 0, 0, ctypes.byref(rid)),
            "pjsua_recorder_create",
        )
        return rid.value, self.lib.pjsua_recorder_get_conf_port(rid.value)

    def codec_priority(self, codec_id: str, priority: int) -> int:
        name = pj_str(codec_id)
        return int(self.lib.pjsua_codec_set_priority(ctypes.byref(name), priority))

    def call_dump(self, call_id: int) -> str:
        buf = ctypes.create_string_buffer(DUMP_BUF)
        self.lib.pjsua_call_dump(call_id, 1, buf, DUMP_BUF, b"")
        return buf.value.decode(errors="replace")

    def call_ids(self) -> list[int]:
        ids = (ctypes.c_int * PJSUA_MAX_CALLS)()
        count = ctypes.c_uint(PJSUA_MAX_CALLS)
        self.check(self.lib.pjsua_enum_calls(ids, ctypes.byref(count)), "pjsua_enum_calls")
        return list(ids[: count.value])

    def im_send(self, acc_id: int, to: str, text: str, mime: str, token: int) -> None:
        uri, body, mime_type = pj_str(to), pj_str(text), pj_str(mime)
        self.check(
            self.lib.pjsua_im_send(acc_id, ctypes.byref(uri), ctypes.byref(mime_type), ctypes.byref(body), None, token),
            "pjsua_im_send",
        )

    def set_media_public_address(self, acc_id: int, address: str) -> None:
        """Make the account's calls name ``address`` in their SDP (c=) while RTP still goes out
        from the socket's own address: a phone behind NAT that believes its public address.

        The binding has no ``AccountConfig.mediaConfig``, so ``rtp_cfg.public_addr`` is set in
        C: copy the account's ``pjsua_acc_config`` out, patch it, ``pjsua_acc_modify``. Without
        headers, ``rtp_cfg`` (a ``pjsua_transport_config``: port, port_range, randomize_port,
        public_addr, bound_addr, ...) is found by value: port 4000, range 0, not randomised, both
        addresses empty, at one 8-aligned offset; anything else is refused, not guessed.
        """
        pool = self.lib.pjsua_pool_create(b"sipfarm-acc", 4096, 4096)
        if not pool:
            raise AgentError("pjsua_pool_create failed")
        try:
            cfg = ctypes.create_string_buffer(ACC_CONFIG_BUF)
            self.check(self.lib.pjsua_acc_get_config(acc_id, pool, cfg), "pjsua_acc_get_config")
            raw = cfg.raw
            header = struct.Struct("<III4xQqQq")  # port, range, randomize, public_addr, bound_addr
            matches = [
                offset
                for offset in range(0, ACC_CONFIG_BUF - header.size, 8)
                if raw[offset : offset + 12] == struct.pack("<III", DEFAULT_RTP_PORT, 0, 0)
                and header.unpack_from(raw, offset)[4] == 0
                and header.unpack_from(raw, offset)[6] == 0
            ]
            if len(matches) != 1:
                raise AgentError(f"cannot locate rtp_cfg in pjsua_acc_config ({len(matches)} candidates)")
            value = address.encode()
            keep = ctypes.create_string_buffer(value)  # pjsua_acc_modify copies it into the account's pool
            public = PjStr.from_buffer(cfg, matches[0] + 16)
            public.ptr = ctypes.cast(keep, ctypes.c_char_p)
            public.slen = len(value)
            self.check(self.lib.pjsua_acc_modify(acc_id, cfg), "pjsua_acc_modify")
        finally:
            self.pj.pj_pool_release(pool)

    def hook(self, symbol: str, callback: Any) -> None:
        """Point pjsua's callback slot that holds pjsua2's ``symbol`` at ``callback`` instead.

        pjsua2 fills ``pjsua_var.ua_cfg.cb`` with its own static functions, which call Account
        methods the binding does not expose (``onInstantMessage``...): nothing would reach Python.
        The slot is found by value (the exported function's address appears once in
        ``pjsua_var``, a global of libpjsua) inside the memory mapping that holds it.
        """
        target = ctypes.cast(getattr(self.pjsua2, symbol), ctypes.c_void_p).value
        base = self.lib.pjsua_get_var()
        if not target or not base:
            raise AgentError(f"cannot hook {symbol}")
        end = base
        with open("/proc/self/maps") as maps:  # .bss continues in an anonymous mapping: join them
            for line in maps:
                span, perms = line.split(None, 2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= end < hi and perms.startswith("rw"):
                    end = min(hi, base + HOOK_SCAN_BYTES)
        memory = ctypes.string_at(base, end - base)
        needle = struct.pack("<Q", target)
        offset = memory.find(needle)
        while offset >= 0 and offset % 8:
            offset = memory.find(needle, offset + 1)
        if offset < 0:
            raise AgentError(f"{symbol} not found in pjsua_var")
        slot = ctypes.c_void_p.from_address(base + offset)
        self.hooks.append((base + offset, target, callback))
        slot.value = ctypes.cast(callback, ctypes.c_void_p).value

    def unhook(self) -> None:
        for address, original, _callback in reversed(self.hooks):
            ctypes.c_void_p.from_address(address).value = original
        self.hooks.clear()


# pjsua_call_dump prints, per media line:
#   #0 audio PCMU @8kHz, sendrecv, peer=127.0.0.1:4002
#      RX pt=0, last update:00h:00m:01.234s ago
#         total 250pkt 40.0KB (50.0KB +IP hdr) @avg=64.0Kbps/80.0Kbps
#         pkt loss=0 (0.0%), discrd=0 (0.0%), dup=0 (0.0%), reord=0 (0.0%)
#      TX pt=0, ptime=20, last update:00h:00m:00.010s ago
#         total 250pkt 40.0KB (50.0KB +IP hdr) @avg=64.0Kbps/80.0Kbps
_DUMP_DIR = re.compile(r"^\s*(RX|TX)\b[^\n]*\n\s*total\s+(\d+)pkt", re.MULTILINE)
_DUMP_LOSS = re.compile(r"pkt loss=(\d+)")
_DUMP_CODEC = re.compile(r"#\d+\s+audio\s+(\S+)")
_DUMP_PEER = re.compile(r"#\d+\s+audio\b[^\n]*\bpeer=(\S+?)(?:,|\s|$)", re.MULTILINE)


def parse_call_dump(dump: str) -> JsonObject:
    """RX/TX packet totals (summed over media lines), RX loss and the codec from a call dump."""
    totals = {"RX": 0, "TX": 0}
    seen = False
    for direction, count in _DUMP_DIR.findall(dump):
        totals[direction] += int(count)
        seen = True
    rx_section = dump.split("RX", 1)[1] if "RX" in dump else ""
    loss = _DUMP_LOSS.search(rx_section)
    codec = _DUMP_CODEC.search(dump)
    return {
        "has_media": seen,
        "rx_packets": totals["RX"],
        "tx_packets": totals["TX"],
        "rx_lost": int(loss.group(1)) if loss else 0,
        "codec": codec.group(1) if codec else None,
    }


def call_dump_peer(dump: str) -> str | None:
    """Where the first audio stream's RTP last came from ("host:port", pjsua's ``src_rtp_name``;
    "-" before the first packet), from a call dump."""
    peer = _DUMP_PEER.search(dump)
    return peer.group(1) if peer else None


def write_tone_wav(path: str, hz: float, seconds: int = TONE_SECONDS, rate: int = TONE_RATE) -> None:
    """A 16-bit mono sine WAV, written with the standard ``wave`` module."""
    peak = TONE_AMPLITUDE * 32767
    frames = b"".join(
        struct.pack("<h", round(peak * math.sin(2 * math.pi * hz * n / rate))) for n in range(rate * seconds)
    )
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)


@dataclass
class CallMedia:
    """What the agent has plugged into one call's conference slot."""

    conf_slot: int = -1
    tone_hz: float | None = None
    tone_path: str | None = None
    player_id: int = -1
    player_slot: int = -1
    record_path: str | None = None
    recorder_id: int = -1
    recorder_slot: int = -1
    local_hold: bool = False  # we hold the call: our "microphone" (the tone) is off, as in pjsua's app
    defaults_applied: bool = False  # next_call tone and recording are taken once, at first media
    last_stats: JsonObject = field(default_factory=dict)


class AgentCall(pj.Call):
    def __init__(self, agent: Agent, acc: pj.Account, call_id: int | None = None) -> None:
        if call_id is None:
            super().__init__(acc)
        else:
            super().__init__(acc, call_id)
        self.agent = agent

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        self.agent.guard("onCallState", lambda: self.agent.on_call_state(self))

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        self.agent.guard("onCallMediaState", lambda: self.agent.on_call_media_state(self))

    def onCallSdpCreated(self, prm: pj.OnCallSdpCreatedParam) -> None:
        self.agent.guard("onCallSdpCreated", lambda: self.agent.on_call_sdp_created(self, prm))

    def onCallTsxState(self, prm: pj.OnCallTsxStateParam) -> None:
        self.agent.guard("onCallTsxState", lambda: self.agent.on_call_tsx_state(self, prm))


class AgentAccount(pj.Account):
    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent

    def onRegState(self, prm: pj.OnRegStateParam) -> None:
        self.agent.guard("onRegState", lambda: self.agent.on_reg_state(self, prm))

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        self.agent.guard("onIncomingCall", lambda: self.agent.on_incoming_call(self, prm))


class Agent:
    def __init__(self, out_fd: int, name: str, tmp_dir: str) -> None:
        self.out_fd = out_fd
        self.name = name
        self.tmp_dir = tmp_dir
        self.c = PjsuaC()
        self.ep: pj.Endpoint | None = None
        self.transport_id = -1
        self.transport = "udp"
        self.local_port = 0
        self.bound = "127.0.0.1"
        self.account: AgentAccount | None = None
        self.calls: dict[int, AgentCall] = {}
        self.media: dict[int, CallMedia] = {}
        self.auto_answer_code: int | None = None
        self.default_tone_hz: float | None = None
        self.default_record_path: str | None = None
        self.deferred: list[Callable[[], None]] = []
        self.quitting = False
        self.tone_files: set[str] = set()
        self.next_message_token = 1
        self.hostname = ""

    # -- output ---------------------------------------------------------------------------------

    def send(self, obj: JsonObject) -> None:
        obj.setdefault("t", round(time.monotonic(), 3))
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self.out_fd, view)
            view = view[written:]

    def event(self, kind: str, /, **fields: Any) -> None:
        self.send({"event": kind, **fields})

    def guard(self, where: str, body: Callable[[], None]) -> None:
        # An exception must not unwind into pjsip's C stack: report it as an event instead.
        try:
            body()
        except Exception as exc:
            self.event("error", where=where, error=f"{type(exc).__name__}: {exc}")

    # -- pjsua callbacks (all on the polling thread) -----------------------------------------------

    def on_reg_state(self, acc: AgentAccount, prm: pj.OnRegStateParam) -> None:
        info = acc.info
        self.event(
            "reg_state",
            code=int(prm.code),
            reason=prm.reason,
            expiration=int(prm.expiration),
            active=bool(info.regIsActive),
            uri=info.uri,
            status=int(prm.status),
            src=prm.rdata.srcAddress,
        )

    def on_incoming_call(self, acc: AgentAccount, prm: pj.OnIncomingCallParam) -> None:
        call = AgentCall(self, acc, prm.callId)
        self.calls[prm.callId] = call
        self.media[prm.callId] = CallMedia()
        info = call.info
        self.event(
            "incoming_call",
            call_id=prm.callId,
            remote_uri=info.remoteUri,
            local_uri=info.localUri,
            call_id_header=info.callIdString,
        )
        code = self.auto_answer_code
        op = pj.CallOpParam(True)
        op.statusCode = pj.StatusCode(code if code is not None else 180)
        call.answer(op)

    def on_call_state(self, call: AgentCall) -> None:
        info = call.info
        call_id = info.id
        state = info.state.name
        fields: JsonObject = {
            "call_id": call_id,
            "state": state,
            "code": int(info.lastStatusCode),
            "reason": info.lastReason,
            "role": info.role.name,
            "remote_uri": info.remoteUri,
            "call_id_header": info.callIdString,
        }
        if state == "DISCONNECTED":
            media = self.media.get(call_id)
            live = parse_call_dump(self.c.call_dump(call_id))
            if live["has_media"]:
                fields["stats"] = {**live, "source": "live"}
            elif media is not None and media.last_stats:
                fields["stats"] = {**media.last_stats, "source": "snapshot"}
            self.deferred.append(lambda: self.forget_call(call_id))
        self.event("call_state", **fields)

    def on_call_sdp_created(self, call: AgentCall, prm: pj.OnCallSdpCreatedParam) -> None:
        # Read-only: prm is a copy (PEERS.md), but a test can check which address we offer and
        # what the far side (or a media relay rewriting SDP) offered us.
        self.event("sdp", call_id=call.id, local_sdp=prm.sdp.wholeSdp, remote_sdp=prm.remSdp.wholeSdp)

    def on_call_tsx_state(self, call: AgentCall, prm: pj.OnCallTsxStateParam) -> None:
        """In-dialog transactions other than the INVITE's own: re-INVITE, REFER, NOTIFY, BYE...

        A NOTIFY received for a REFER carries the transfer's progress as a sipfrag
        (RFC 3515 2.4.5): reported as ``xfer_status`` with the status code it quotes.
        """
        tsx_event = prm.e.body.tsxState
        tsx = tsx_event.tsx
        state = tsx.state.name
        if state in ("COMPLETED", "TERMINATED"):
            fields: JsonObject = {
                "call_id": call.id,
                "method": tsx.method,
                "role": tsx.role.name,
                "state": state,
                "code": int(tsx.statusCode),
                "reason": tsx.statusText,
            }
            self.event("tsx", **fields)
        if tsx_event.type == pj.EventId.RX_MSG:
            # what the far side (or a media relay rewriting SDP) sent us in this transaction:
            # the answer in a 200 to our INVITE, an offer in a re-INVITE...
            head, sep, body = tsx_event.src.rdata.wholeMsg.partition("\r\n\r\n")
            if sep and body.startswith("v=0"):
                self.event(
                    "rx_sdp",
                    call_id=call.id,
                    method=tsx.method,
                    role=tsx.role.name,
                    start_line=head.split("\r\n", 1)[0],
                    sdp=body,
                )
        # the request itself is seen once, as the server transaction starts (state TRYING)
        if tsx.method == "NOTIFY" and tsx.role.name == "UAS" and tsx_event.type == pj.EventId.RX_MSG:
            whole = tsx_event.src.rdata.wholeMsg
            frag = whole.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in whole else ""
            match = re.match(r"SIP/2\.0\s+(\d{3})\s*([^\r\n]*)", frag)
            if match:
                self.event(
                    "xfer_status",
                    call_id=call.id,
                    code=int(match.group(1)),
                    reason=match.group(2),
                    final=int(match.group(1)) >= 200,
                )

    def on_pager(
        self, call_id: int, from_: Any, to: Any, contact: Any, mime: Any, body: Any, rdata: Any, acc_id: int
    ) -> None:
        self.event(
            "message",
            call_id=call_id,
            from_uri=str_of(from_),
            to_uri=str_of(to),
            contact=str_of(contact),
            mime=str_of(mime),
            body=str_of(body),
            acc_id=acc_id,
        )

    def on_pager_status(
        self,
        call_id: int,
        to: Any,
        body: Any,
        user_data: int | None,
        status: int,
        reason: Any,
        tdata: Any,
        rdata: Any,
        acc_id: int,
    ) -> None:
        self.event(
            "message_status",
            token=user_data or 0,
            to_uri=str_of(to),
            body=str_of(body),
            code=status,
            reason=str_of(reason),
        )

    def adopt_calls(self) -> None:
        """Give a pjsua2 ``Call`` to calls pjsua made on its own, and report them.

        pjsua starts a call without the application twice: the transferee's call to the REFER
        target (RFC 3515), and the call that takes over a dialog named by an INVITE's Replaces
        (RFC 3891). pjsua2 hands them to ``onCallTransferRequest``/``onCallReplaced``, which
        this binding does not expose, so their callbacks would reach nobody: wrap them here,
        right after the poll that created them, and report their state so far.
        """
        if self.account is None or self.ep is None:
            return
        for call_id in self.c.call_ids():
            if call_id in self.calls:
                continue
            call = AgentCall(self, self.account, call_id)
            self.calls[call_id] = call
            self.media.setdefault(call_id, CallMedia())
            info = call.info
            self.event(
                "call_adopted",
                call_id=call_id,
                role=info.role.name,
                state=info.state.name,
                remote_uri=info.remoteUri,
                call_id_header=info.callIdString,
            )
            self.on_call_state(call)
            if info.state.name != "DISCONNECTED":
                self.on_call_media_state(call)

    def on_call_media_state(self, call: AgentCall) -> None:
        info = call.info
        call_id = info.id
        media = self.media.setdefault(call_id, CallMedia())
        for mi in info.media:
            if mi.type != pj.MediaType.AUDIO:
                continue
            status = mi.status.name
            media.local_hold = status == "LOCAL_HOLD"
            if status == "ACTIVE" and mi.audioConfSlot >= 0:
                media.conf_slot = mi.audioConfSlot
                stats = parse_call_dump(self.c.call_dump(call_id))
                self.event(
                    "media_active", call_id=call_id, conf_slot=media.conf_slot, codec=stats["codec"], dir=mi.dir.name
                )
                if not media.defaults_applied:
                    media.defaults_applied = True
                    if media.tone_hz is None and self.default_tone_hz is not None:
                        media.tone_hz = self.default_tone_hz
                    if media.record_path is None and self.default_record_path is not None:
                        media.record_path = self.default_record_path
                self.attach_media(call_id)
            elif status in ("LOCAL_HOLD", "REMOTE_HOLD") and mi.audioConfSlot >= 0:
                # held (RFC 3264 8.4): the stream lives on, one way or none; keep our ports on it, but
                # a holding phone mutes its microphone (the held party hears silence, not the room)
                media.conf_slot = mi.audioConfSlot
                self.event("media_state", call_id=call_id, status=status, dir=mi.dir.name, conf_slot=media.conf_slot)
                self.attach_media(call_id)
            else:
                self.event("media_state", call_id=call_id, status=status)

    # -- media plumbing ---------------------------------------------------------------------------

    def attach_media(self, call_id: int) -> None:
        """Connect the wanted tone player and recorder to the call once its audio slot exists."""
        media = self.media[call_id]
        if media.conf_slot < 0:
            return
        # A re-INVITE (hold, resume) recreates the call's conference port, often in the same slot but
        # without its connections: connect again (connecting twice is harmless).
        if media.player_id >= 0:
            if media.local_hold:
                self.c.lib.pjsua_conf_disconnect(media.player_slot, media.conf_slot)
            else:
                self.c.check(self.c.lib.pjsua_conf_connect(media.player_slot, media.conf_slot), "conf_connect")
        if media.recorder_id >= 0:
            self.c.check(self.c.lib.pjsua_conf_connect(media.conf_slot, media.recorder_slot), "conf_connect")
        if media.tone_hz is not None and media.player_id < 0:
            path = media.tone_path or os.path.join(
                self.tmp_dir, f"sipfarm-peer-{self.name}-{os.getpid()}-{media.tone_hz:g}hz.wav"
            )
            if path not in self.tone_files:
                write_tone_wav(path, media.tone_hz)
                self.tone_files.add(path)
            media.tone_path = path
            media.player_id, media.player_slot = self.c.player_create(path)
            self.c.check(self.c.lib.pjsua_conf_connect(media.player_slot, media.conf_slot), "conf_connect")
            self.event("tone_playing", call_id=call_id, hz=media.tone_hz, path=path)
        if media.record_path is not None and media.recorder_id < 0:
            media.recorder_id, media.recorder_slot = self.c.recorder_create(media.record_path)
            self.c.check(self.c.lib.pjsua_conf_connect(media.conf_slot, media.recorder_slot), "conf_connect")
            self.event("recording", call_id=call_id, path=media.record_path)

    def release_media(self, call_id: int) -> None:
        media = self.media.get(call_id)
        if media is None:
            return
        if media.player_id >= 0:
            self.c.lib.pjsua_player_destroy(media.player_id)
            media.player_id = -1
        if media.recorder_id >= 0:
            # Destroying the recorder writes the WAV header sizes: the file is complete only now.
            self.c.lib.pjsua_recorder_destroy(media.recorder_id)
            media.recorder_id = -1
            path = media.record_path or ""
            self.event(
                "record_done", call_id=call_id, path=path, bytes=os.path.getsize(path) if os.path.exists(path) else 0
            )

    def snapshot_stats(self) -> None:
        """Keep each call's latest RTP totals: pjsua frees the stream before DISCONNECTED is reported."""
        for call_id, media in self.media.items():
            if media.conf_slot >= 0:
                stats = parse_call_dump(self.c.call_dump(call_id))
                if stats["has_media"]:
                    media.last_stats = stats

    def forget_call(self, call_id: int) -> None:
        self.release_media(call_id)
        self.media.pop(call_id, None)
        self.calls.pop(call_id, None)

    # -- commands ---------------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        try:
            cmd = json.loads(line)
        except ValueError as exc:
            self.send({"reply": None, "ok": False, "error": f"bad JSON: {exc}"})
            return
        if not isinstance(cmd, dict):
            self.send({"reply": None, "ok": False, "error": "command must be a JSON object"})
            return
        name = cmd.get("cmd")
        reply: JsonObject = {"reply": name, "id": cmd.get("id")}
        handler = getattr(self, f"cmd_{name}", None) if isinstance(name, str) else None
        if handler is None:
            reply.update(ok=False, error=f"unknown command {name!r}")
        else:
            try:
                reply.update(handler(cmd) or {})
                reply["ok"] = True
            except AgentError as exc:
                reply.update(ok=False, error=str(exc))
            except Exception as exc:  # pjsua2 errors (RuntimeError) and bugs alike go back to the test
                reply.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        self.send(reply)

    def require_started(self) -> pj.Endpoint:
        if self.ep is None:
            raise AgentError("not started: send start first")
        return self.ep

    def cmd_start(self, cmd: JsonObject) -> JsonObject:
        if self.ep is not None:
            raise AgentError("already started")
        transport = str(cmd.get("transport", "udp")).lower()
        if transport not in ("udp", "tcp"):
            raise AgentError(f"transport must be udp or tcp, not {transport!r}")
        bound = str(cmd.get("bind", "127.0.0.1"))
        port = int(cmd.get("port", 0))
        self.hostname = own_hostname(f"sipfarm-{self.name}-{os.getpid()}")
        self.c.pj.pj_log_set_level(0)  # before libCreate: no banner
        ep = pj.Endpoint()
        ep.libCreate()
        self.ep = ep
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.maxCalls = int(cmd.get("max_calls", 4))
        # sip_log: every SIP message sent and received goes to stderr (the Softphone's log file)
        sip_log = bool(cmd.get("sip_log", False))
        cfg.logConfig.level = SIP_LOG_LEVEL if sip_log else 0
        cfg.logConfig.consoleLevel = SIP_LOG_LEVEL if sip_log else 0
        cfg.logConfig.msgLogging = 1 if sip_log else 0
        cfg.medConfig.noVad = True  # continuous RTP: packet counts mean something
        cfg.medConfig.ecTailLen = 0
        ep.libInit(cfg)
        tcfg = pj.TransportConfig()
        tcfg.port = port
        tcfg.boundAddress = bound
        tcfg.publicAddress = bound
        ttype = pj.TransportType.TCP if transport == "tcp" else pj.TransportType.UDP
        self.transport_id = ep.transportCreate(ttype, tcfg)
        ep.libStart()
        ep.audDevManager.setNullDev()
        try:  # only MESSAGE needs the hooks: a PJSIP build where they fail still makes calls
            self.c.hook(ON_PAGER2, OnPager2(lambda *a: self.guard("on_pager2", lambda: self.on_pager(*a))))
            self.c.hook(
                ON_PAGER_STATUS2,
                OnPagerStatus2(lambda *a: self.guard("on_pager_status2", lambda: self.on_pager_status(*a))),
            )
        except (AgentError, AttributeError) as exc:
            self.c.unhook()
            self.event("error", where="hook", error=str(exc))
        self.transport = transport
        self.bound = bound
        local = ep.transportGetInfo(self.transport_id).localName
        self.local_port = int(local.rsplit(":", 1)[1])
        codecs = [str(c) for c in cmd.get("codecs", ["PCMU", "PCMA"])]
        for other in OTHER_CODECS:
            self.c.codec_priority(other, 0)
        for rank, codec in enumerate(codecs):
            self.c.check(self.c.codec_priority(codec, 255 - rank), f"codec priority {codec}")
        return {
            "port": self.local_port,
            "address": bound,
            "transport": transport,
            "local_name": local,
            "version": ep.version.full,
            "hostname": self.hostname,
            "codecs": codecs,
        }

    def cmd_register(self, cmd: JsonObject) -> JsonObject:
        self.require_started()
        if self.account is not None:
            raise AgentError("already registered: one account per agent")
        user = str(cmd["user"])
        domain = str(cmd["domain"])
        registrar = str(cmd["registrar"])
        transport = str(cmd.get("transport", self.transport)).lower()
        proxy = cmd.get("proxy", registrar)
        tparam = ";transport=tcp" if transport == "tcp" else ""
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:{user}@{domain}"
        reg = acfg.regConfig
        reg.registrarUri = f"sip:{registrar}{tparam}"
        reg.timeoutSec = int(cmd.get("expires", 300))
        reg.retryIntervalSec = 0  # report a failure once, never retry behind the test's back
        reg.firstRetryIntervalSec = 0
        reg.registerOnAdd = bool(cmd.get("register", True))
        sip = acfg.sipConfig
        sip.transportId = self.transport_id
        if proxy:
            proxies = pj.StringVector()
            proxies.append(f"sip:{proxy};lr{tparam}")
            sip.proxies = proxies
        password = cmd.get("password")
        if password is not None:
            creds = pj.AuthCredInfoVector()
            creds.append(
                pj.AuthCredInfo("digest", str(cmd.get("realm", "*")), str(cmd.get("auth_user", user)), 0, str(password))
            )
            sip.authCreds = creds
        acc = AgentAccount(self)
        acc.create(acfg, True)
        self.account = acc
        public = cmd.get("media_public_address")
        if public:
            self.c.set_media_public_address(acc.id, str(public))
        return {"uri": acfg.idUri, "registrar": reg.registrarUri, "media_public_address": public}

    def cmd_unregister(self, cmd: JsonObject) -> JsonObject:
        if self.account is None:
            raise AgentError("no account")
        self.account.setRegistration(False)
        return {}

    def cmd_reregister(self, cmd: JsonObject) -> JsonObject:
        """Refresh the registration now (as at its expiry); the outcome comes as reg_state."""
        if self.account is None:
            raise AgentError("no account")
        self.account.setRegistration(True)
        return {}

    def cmd_auto_answer(self, cmd: JsonObject) -> JsonObject:
        enabled = bool(cmd.get("enabled", True))
        self.auto_answer_code = int(cmd.get("code", 200)) if enabled else None
        return {"enabled": enabled, "code": self.auto_answer_code}

    def pick_call(self, cmd: JsonObject) -> int:
        if cmd.get("call_id") is not None:
            call_id = int(cmd["call_id"])
            if call_id not in self.calls:
                raise AgentError(f"no call {call_id}")
            return call_id
        if not self.calls:
            raise AgentError("no call")
        return max(self.calls)

    def cmd_call(self, cmd: JsonObject) -> JsonObject:
        self.require_started()
        if self.account is None:
            raise AgentError("no account: send register first")
        call = AgentCall(self, self.account)
        op = pj.CallOpParam(True)
        call.makeCall(str(cmd["uri"]), op)
        call_id = call.id
        self.calls[call_id] = call
        self.media.setdefault(call_id, CallMedia())
        return {"call_id": call_id}

    def cmd_answer(self, cmd: JsonObject) -> JsonObject:
        call_id = self.pick_call(cmd)
        op = pj.CallOpParam(True)
        op.statusCode = pj.StatusCode(int(cmd.get("code", 200)))
        self.calls[call_id].answer(op)
        return {"call_id": call_id}

    def cmd_hold(self, cmd: JsonObject) -> JsonObject:
        """Put the call on hold: re-INVITE offering sendonly (RFC 3264 8.4)."""
        call_id = self.pick_call(cmd)
        self.calls[call_id].setHold(pj.CallOpParam(True))
        return {"call_id": call_id}

    def cmd_unhold(self, cmd: JsonObject) -> JsonObject:
        """Resume a held call: re-INVITE offering sendrecv again."""
        call_id = self.pick_call(cmd)
        op = pj.CallOpParam(True)
        op.opt.flag = PJSUA_CALL_UNHOLD
        self.calls[call_id].reinvite(op)
        return {"call_id": call_id}

    def cmd_xfer(self, cmd: JsonObject) -> JsonObject:
        """Blind transfer: REFER the far end of the call to ``uri`` (RFC 3515)."""
        call_id = self.pick_call(cmd)
        self.calls[call_id].xfer(str(cmd["uri"]), pj.CallOpParam(True))
        return {"call_id": call_id}

    def cmd_xfer_replaces(self, cmd: JsonObject) -> JsonObject:
        """Attended transfer: REFER the far end of ``call_id`` to the far end of ``dest_call_id``
        with Replaces naming that dialog (RFC 3891, RFC 5589 7)."""
        call_id = self.pick_call(cmd)
        dest_id = int(cmd["dest_call_id"])
        if dest_id not in self.calls:
            raise AgentError(f"no call {dest_id}")
        self.calls[call_id].xferReplaces(self.calls[dest_id], pj.CallOpParam(True))
        return {"call_id": call_id, "dest_call_id": dest_id}

    def cmd_message(self, cmd: JsonObject) -> JsonObject:
        """Send a MESSAGE (RFC 3428) outside any dialog; its outcome comes as ``message_status``."""
        self.require_started()
        if self.account is None:
            raise AgentError("no account: send register first")
        if len(self.c.hooks) != 2:
            raise AgentError("MESSAGE unavailable: pjsua's pager callbacks could not be hooked")
        token = self.next_message_token
        self.next_message_token += 1
        self.c.im_send(self.account.id, str(cmd["uri"]), str(cmd["text"]), str(cmd.get("mime", "text/plain")), token)
        return {"token": token}

    def cmd_hangup(self, cmd: JsonObject) -> JsonObject:
        if cmd.get("call_id") is None and cmd.get("all"):
            self.require_started().hangupAllCalls()
            return {"call_ids": sorted(self.calls)}
        call_id = self.pick_call(cmd)
        op = pj.CallOpParam(True)
        if cmd.get("code") is not None:
            op.statusCode = pj.StatusCode(int(cmd["code"]))
        self.calls[call_id].hangup(op)
        return {"call_id": call_id}

    def cmd_play_tone(self, cmd: JsonObject) -> JsonObject:
        hz = float(cmd["hz"])
        if not 20 <= hz <= TONE_RATE / 2:
            raise AgentError(f"tone frequency {hz} Hz out of range 20..{TONE_RATE // 2}")
        if not self.calls or cmd.get("next_call"):
            self.default_tone_hz = hz  # played into every call whose media comes up later
            return {"call_id": None, "hz": hz}
        call_id = self.pick_call(cmd)
        media = self.media.setdefault(call_id, CallMedia())
        if media.player_id >= 0:
            raise AgentError(f"call {call_id} already plays {media.tone_hz} Hz")
        media.tone_hz = hz
        self.attach_media(call_id)
        return {"call_id": call_id, "hz": hz}

    def cmd_record(self, cmd: JsonObject) -> JsonObject:
        path = str(cmd["path"])
        if not path.endswith(".wav"):
            raise AgentError("record path must end in .wav")
        if not self.calls or cmd.get("next_call"):
            self.default_record_path = path
            return {"call_id": None, "path": path}
        call_id = self.pick_call(cmd)
        media = self.media.setdefault(call_id, CallMedia())
        if media.recorder_id >= 0:
            raise AgentError(f"call {call_id} already records to {media.record_path}")
        media.record_path = path
        self.attach_media(call_id)
        return {"call_id": call_id, "path": path}

    def cmd_stop_record(self, cmd: JsonObject) -> JsonObject:
        call_id = self.pick_call(cmd)
        media = self.media[call_id]
        if media.recorder_id < 0:
            raise AgentError(f"call {call_id} is not recording")
        self.c.lib.pjsua_recorder_destroy(media.recorder_id)
        media.recorder_id = -1
        path, media.record_path = media.record_path, None  # a later re-INVITE must not record again
        self.event("record_done", call_id=call_id, path=path, bytes=os.path.getsize(path or ""))
        return {"call_id": call_id}

    def cmd_stats(self, cmd: JsonObject) -> JsonObject:
        call_id = self.pick_call(cmd)
        dump = self.c.call_dump(call_id)
        stats = parse_call_dump(dump)
        if not stats["has_media"] and call_id in self.media:
            stats = self.media[call_id].last_stats or stats
        info = self.calls[call_id].info
        return {"call_id": call_id, "state": info.state.name, **stats, "peer": call_dump_peer(dump)}

    def cmd_calls(self, cmd: JsonObject) -> JsonObject:
        calls = [{"call_id": cid, "state": call.info.state.name} for cid, call in self.calls.items()]
        return {"calls": calls}

    def cmd_ping(self, cmd: JsonObject) -> JsonObject:
        return {"name": self.name, "pid": os.getpid()}

    def cmd_quit(self, cmd: JsonObject) -> JsonObject:
        self.quitting = True
        return {}

    # -- lifecycle --------------------------------------------------------------------------------

    def poll(self, ms: int) -> None:
        if self.ep is not None:
            self.c.lib.pjsua_handle_events(ms)
            self.adopt_calls()
        else:
            time.sleep(ms / 1000)
        while self.deferred:
            self.deferred.pop(0)()

    def shutdown(self, reason: str) -> None:
        self.event("shutting_down", reason=reason)
        ep = self.ep
        if ep is None:
            return
        if self.calls:
            ep.hangupAllCalls()
            deadline = time.monotonic() + SHUTDOWN_POLL_S
            while self.calls and time.monotonic() < deadline:
                self.poll(POLL_MS)
        for call_id in list(self.media):
            self.release_media(call_id)
        self.calls.clear()
        self.media.clear()
        if self.account is not None:
            self.account.shutdown()
            self.account = None
            deadline = time.monotonic() + 0.3  # let the un-REGISTER go out
            while time.monotonic() < deadline:
                self.poll(POLL_MS)
        self.deferred.clear()
        for path in self.tone_files:
            with contextlib.suppress(OSError):
                os.unlink(path)
        # A pj.Call still referenced after libDestroy aborts the process (PEERS.md).
        gc.collect()
        self.c.unhook()
        ep.libDestroy()
        self.ep = None


def run(args: argparse.Namespace) -> int:
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything pjsip prints lands on stderr, never in the JSON stream
    sys.stdout = sys.stderr
    agent = Agent(out_fd, args.name, args.tmp_dir)
    agent.event("ready", pid=os.getpid(), name=args.name)
    deadline = time.monotonic() + args.max_lifetime
    stdin_fd = sys.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    buffer = b""
    reason = "quit"
    next_snapshot = 0.0
    while not agent.quitting:
        agent.poll(POLL_MS)
        now = time.monotonic()
        if now > deadline:
            reason = "max lifetime"
            break
        if agent.ep is not None and now >= next_snapshot:
            agent.snapshot_stats()
            next_snapshot = now + STATS_SNAPSHOT_S
        ready, _, _ = select.select([stdin_fd], [], [], 0)
        if not ready:
            continue
        try:
            chunk = os.read(stdin_fd, STDIN_CHUNK)
        except BlockingIOError:
            continue
        if not chunk:
            reason = "stdin closed"
            break
        buffer += chunk
        if len(buffer) > MAX_LINE:
            reason = "command line too long"
            break
        while b"\n" in buffer and not agent.quitting:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                agent.handle_line(line)
    try:
        agent.shutdown(reason)
    finally:
        agent.event("exit", reason=reason)
        os.close(out_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", default="peer")
    parser.add_argument("--max-lifetime", type=float, default=300.0, help="seconds before exiting anyway")
    parser.add_argument("--tmp-dir", default="/tmp")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
