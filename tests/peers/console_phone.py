"""``ConsolePhone``: a softphone with a command line (``twinkle -c``, ``linphonec``) driven on its
stdin, its console read line by line on a thread.

Each line the phone prints is kept (``lines``) and written to ``console.log`` in the phone's
directory with the seconds since start, the commands sent among them (``>>> cmd``). A test waits
for a line with ``wait_for(regex, timeout, since=mark)``: ``mark()`` before an action, so that an
earlier line of the same kind does not count. Every wait is bounded; a failed one raises
``PhoneError`` with the console's tail.

The process runs under coreutils ``timeout`` (``max_lifetime_s``) in a session of its own: a test
that dies without closing it leaves nothing running for long. ``close()`` sends the phone's quit
command, then SIGTERM, then SIGKILL to the session.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO

DEFAULT_TIMEOUT_S = 10.0
QUIT_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 3.0
TAIL_LINES = 40


class PhoneError(Exception):
    """The phone died, or an awaited console line did not come in time."""


class ConsolePhone:
    """One console softphone process. Subclasses write its configuration and call ``_spawn``."""

    quit_command = "quit"

    def __init__(self, name: str, workdir: Path, *, max_lifetime_s: int = 80) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.dir / "console.log"
        self.max_lifetime_s = max_lifetime_s
        self.lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._console: TextIO | None = None
        self._t0 = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------

    def _spawn(self, argv: list[str], env: dict[str, str], *, stderr: Path | None = None) -> None:
        """Start ``argv`` (bounded by ``timeout``) in the phone's directory, stdin and stdout piped."""
        self._console = self.console_path.open("w", encoding="utf-8")
        err = stderr.open("wb") if stderr is not None else None
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(
            ["timeout", "-k", str(int(KILL_TIMEOUT_S)), str(self.max_lifetime_s), *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=err if err is not None else subprocess.STDOUT,
            env={**os.environ, "LANG": "C", **env}, cwd=self.dir, start_new_session=True,
        )  # fmt: skip
        if err is not None:
            err.close()
        self._reader = threading.Thread(target=self._read_loop, name=f"console-{self.name}", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buffer = b""
        while chunk := os.read(fd, 65536):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self._add([line.decode("utf-8", "replace").rstrip("\r") for line in complete])
        self._add([buffer.decode("utf-8", "replace")] if buffer else [])
        with self._cond:
            self._cond.notify_all()

    def _add(self, lines: list[str]) -> None:
        with self._cond:
            self.lines.extend(lines)
            self._write(lines)
            self._cond.notify_all()

    def _write(self, lines: list[str], prefix: str = "") -> None:
        if self._console is not None and not self._console.closed:
            now = time.monotonic() - self._t0
            self._console.writelines(f"{now:8.3f} {prefix}{line}\n" for line in lines if line.strip())
            self._console.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> int | None:
        """Quit the phone (SIGTERM, then SIGKILL to its session if it lingers); its exit status.
        Safe to call twice."""
        if self.proc is None:
            return None
        if self.alive():
            self.send(self.quit_command)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(QUIT_TIMEOUT_S)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(KILL_TIMEOUT_S)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self._reader is not None:
            self._reader.join(KILL_TIMEOUT_S)
        with self._cond:
            if self._console is not None:
                self._console.close()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- console --------------------------------------------------------------------------------

    def send(self, command: str) -> None:
        """Type ``command`` (one line) at the phone's prompt."""
        assert self.proc is not None and self.proc.stdin is not None, "start() first"
        with self._cond:
            self._write([command], ">>> ")
        try:
            self.proc.stdin.write(command.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise PhoneError(f"{self.name}: cannot send {command!r} ({exc}): {self.tail()}") from None

    def mark(self) -> int:
        """The index of the next console line: ``wait_for(..., since=mark)`` sees only later ones."""
        with self._cond:
            return len(self.lines)

    def find(self, pattern: str, since: int = 0) -> re.Match[str] | None:
        """The first console line from index ``since`` on that matches ``pattern``, if any."""
        regex = re.compile(pattern)
        with self._cond:
            for line in self.lines[since:]:
                if match := regex.search(line):
                    return match
        return None

    def wait_for(self, pattern: str, timeout: float = DEFAULT_TIMEOUT_S, since: int = 0) -> re.Match[str]:
        """The first console line from index ``since`` on that matches ``pattern``, within
        ``timeout`` seconds; ``PhoneError`` if none comes or the phone exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                for line in self.lines[index:]:
                    if match := regex.search(line):
                        return match
                index = max(index, len(self.lines))
                left = deadline - time.monotonic()
                reader_done = self._reader is not None and not self._reader.is_alive()
                if left <= 0 or reader_done:
                    state = "exited" if reader_done else "no such line"
                    raise PhoneError(f"{self.name}: {pattern!r} not seen in {timeout} s ({state}): {self.tail()}")
                self._cond.wait(min(left, 0.2))

    def tail(self, lines: int = TAIL_LINES) -> str:
        with self._cond:
            kept = [line for line in self.lines if line.strip()]
        return "\n".join(kept[-lines:])
