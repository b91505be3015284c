"""Structured logs: one event a line, ``key=value`` (default) or JSON.

Code logs events as ``log.info("event=register_ok aor=%s call_id=%s", ...)``; the formatter adds
time, level and component.  Nothing per message is logged above debug on the hot path.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"component={record.name} {record.getMessage()}"
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
        message = record.getMessage()
        fields = _split_kv(message)
        if fields:
            out.update(fields)
        else:
            out["msg"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _split_kv(message: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for word in message.split(" "):
        key, eq, value = word.partition("=")
        if not eq or not key:
            return {}
        fields[key] = value
    return fields


def setup_logging(level: str = "info", fmt: str = "kv", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    from sipfarm import build  # noqa: PLC0415

    if build.explanation:  # a serving command: say which build runs (sipfarm.build)
        logging.getLogger("sipfarm").info("event=build build=%s detail=%r", build.running_build(), build.explanation)
