"""Structured logs: one event a line, ``key=value`` (default) or JSON.

Code logs events as ``log.info("event=register_ok aor=%s call_id=%s", ...)``; the formatter adds
time, level and component.  Nothing per message is logged above debug on the hot path.

Values come from outside (a From's user part, a Call-ID, a User-Agent), and log readers
(fail2ban, a SIEM) trust a line's keys: each ``%s``/``%r`` argument that is not a plain word
is written quoted, logfmt's way, as a JSON string with its ``=`` escaped too (a newline becomes
backslash-n, ``=`` becomes backslash-u003d), and any control character left in the line is
escaped (backslash-x0a), so a value can neither start a line of its own nor show a reader a
``key=`` of its own (red team, 2026-12-03: a From of ``sip:x%0A... event=auth_failed
source=203.0.113.9`` wrote a forged failure line).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time

_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([a-zA-Z%])")
_PLAIN = re.compile(r'[^\s="\\\x00-\x1f\x7f]+')  # a value written as it is
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PAIR = re.compile(r'(\S+?)=("(?:[^"\\]|\\.)*"|\S*)(?: |$)')


@functools.lru_cache(maxsize=1024)
def _conversions(fmt: str) -> tuple[str, tuple[str, ...]] | None:
    """``fmt`` with ``%r`` made ``%s``, and each argument's conversion (None: not a plain
    tuple-argument format, e.g. ``%(name)s``)."""
    kinds: list[str] = []
    for match in _CONVERSION.finditer(fmt):
        if match.group(0).startswith("%("):
            return None
        if match.group(1) != "%":
            kinds.append(match.group(1))
    return _CONVERSION.sub(lambda m: "%s" if m.group(1) == "r" else m.group(0), fmt), tuple(kinds)


def quoted(text: str) -> str:
    """``text`` as a log value: as it is when a plain word, else a quoted JSON string whose
    ``=`` is escaped too (``\\u003d``), so no reader's ``key=`` pattern matches inside it."""
    return text if _PLAIN.fullmatch(text) else json.dumps(text).replace("=", "\\u003d")


def render(record: logging.LogRecord) -> str:
    """The record's message with its outside values quoted and control characters escaped."""
    msg = record.msg if isinstance(record.msg, str) else str(record.msg)
    args = record.args
    if isinstance(args, tuple) and args:
        parsed = _conversions(msg)
        if parsed is not None and len(parsed[1]) == len(args):
            fmt, kinds = parsed
            values = tuple(
                quoted(str(a)) if k == "s" else quoted(repr(a)) if k == "r" else a
                for a, k in zip(args, kinds, strict=True)
            )
            try:
                msg = fmt % values
            except (TypeError, ValueError):
                msg = record.getMessage()
        else:
            msg = record.getMessage()
    elif args:
        msg = record.getMessage()
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", msg)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"component={record.name} {render(record)}"
        )
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "component": record.name,
        }
        message = render(record)
        fields = split_kv(message)
        if fields:
            out.update(fields)
        else:
            out["msg"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def split_kv(message: str) -> dict[str, str]:
    """``key=value key="quoted value"`` as a dict; {} when the message is not all pairs."""
    fields: dict[str, str] = {}
    end = 0
    for match in _PAIR.finditer(message):
        if match.start() != end:
            return {}
        key, value = match.group(1), match.group(2)
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                return {}
        fields[key] = value
        end = match.end()
    return fields if end == len(message) and fields else {}


def setup_logging(level: str = "info", fmt: str = "kv", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    from sipfarm import build  # noqa: PLC0415

    if build.explanation:  # a serving command: say which build runs (sipfarm.build)
        logging.getLogger("sipfarm").info("event=build build=%s detail=%s", build.running_build(), build.explanation)
