"""The JsSIP and SIP.js web phone pages (``web/``), the loopback HTTP server that serves them and collects their
reports, and headless Chromium to run it.

``make setup`` installs JsSIP and esbuild from npm into ``tests/browser/node_modules`` (see
``package.json``; git ignores the directory). JsSIP's npm package ships CommonJS only, so
``build_bundle`` makes the browser script with esbuild (an IIFE exposing ``window.JsSIP``).

The page reports each step by POSTing JSON to ``/report``; ``PageServer.wait_step`` waits for one.

Chromium flags (Debian chromium 156, as root, in a loopback-only network namespace):

* ``--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-sync
  --disable-background-networking --disable-component-update`` and a fresh ``--user-data-dir``:
  a headless browser that tries no connection of its own (this machine refuses them).
* ``--use-fake-device-for-media-stream --use-fake-ui-for-media-stream``: a fake microphone and
  an automatically granted permission prompt.
* ``--allow-loopback-in-peer-connection``: WebRTC leaves loopback out of ICE gathering; where
  ``lo`` is the only interface, no candidate at all would be gathered without it.
* ``--autoplay-policy=no-user-gesture-required``: JsSIP plays nothing itself, but the remote
  track is live without a click.
* ``--remote-debugging-port=0 --window-size=800,500``: the DevTools protocol on a port Chromium
  picks (written to ``DevToolsActivePort`` in the profile), for ``screenshot()``
  (``Page.captureScreenshot`` mid-call, of an 800x500 viewport set by
  ``Emulation.setDeviceMetricsOverride``: headless, ``--window-size`` leaves a smaller one;
  ``--screenshot`` only shoots a page once it has loaded).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
from fixtures.startup import START_TIMEOUT_S
from peers.netns import skip_reason
from websockets.sync.client import connect

HERE = Path(__file__).resolve().parent
WEB_DIR = HERE / "web"
NODE_MODULES = HERE / "node_modules"
ESBUILD = NODE_MODULES / ".bin" / "esbuild"
JSSIP_ENTRY = NODE_MODULES / "jssip" / "lib" / "JsSIP.js"
SIPJS_ENTRY = NODE_MODULES / "sip.js" / "lib" / "index.js"  # ES modules: bundled the same way
CHROMIUM = "/usr/bin/chromium"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-port=0",
    "--window-size=800,500",
)
SCREENSHOT_SIZE = (800, 500)
WAIT_TIMEOUT_S = 20.0  # how long GET /wait/NAME blocks at most

Report = dict[str, Any]

# the marks of every browser test module: run with the softphones, in the loopback-only namespace
BROWSER_MARKS = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 90),
]


def missing_tools() -> str | None:
    """What ``make setup`` has not installed yet, or None."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (Debian package chromium): run make setup"
    if not ESBUILD.exists() or not JSSIP_ENTRY.exists() or not SIPJS_ENTRY.exists():
        return f"JsSIP/SIP.js/esbuild missing in {NODE_MODULES}: run make setup"
    return None


def build_bundle(out_dir: Path, entry: Path = JSSIP_ENTRY, name: str = "JsSIP") -> Path:
    """A library as one browser script defining ``window.<name>`` (JsSIP's CommonJS, SIP.js's
    ES modules)."""
    out = out_dir / f"{name.lower()}-bundle.js"
    subprocess.run(
        [str(ESBUILD), str(entry), "--bundle", "--format=iife", f"--global-name={name}",
         "--platform=browser", "--log-level=warning", f"--outfile={out}"],
        check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    return out


class PageServer:
    """A loopback HTTP server for ``/`` (phone.html), ``/phone.js``, ``/jssip.js`` (or the SIP.js
    page: ``page="sipjs"``, sipjs.html, ``/sipjs.js``, ``/sipjs-bundle.js``), ``POST /report``
    and ``GET /wait/NAME`` (answered once the test calls ``release(NAME)``: the page waits there
    for the test, for its screenshot say)."""

    def __init__(self, bundle: Path, log_path: Path, page: str = "phone") -> None:
        self.reports: list[Report] = []
        self.started = time.monotonic()
        self.fetched: list[str] = []  # "PATH at +S s" for every GET, to tell a slow start from a stuck page
        self._released: dict[str, threading.Event] = {}
        self._cond = threading.Condition()
        self._log = log_path.open("w")
        files = {  # page "phone": JsSIP's; "sipjs": SIP.js's
            "/": (WEB_DIR / f"{page}.html", "text/html"),
            f"/{page}.js": (WEB_DIR / f"{page}.js", "text/javascript"),
            "/pair.js": (WEB_DIR / "pair.js", "text/javascript"),
            "/jssip.js" if page == "phone" else f"/{page}-bundle.js": (bundle, "text/javascript"),
        }
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                since = time.monotonic() - server.started
                with server._cond:
                    server.fetched.append(f"{self.path.partition('?')[0]} at +{since:.1f} s")
                if self.path.startswith("/wait/"):
                    released = server.gate(self.path.removeprefix("/wait/")).wait(WAIT_TIMEOUT_S)
                    self.send_response(HTTPStatus.NO_CONTENT if released else HTTPStatus.GATEWAY_TIMEOUT)
                    self.end_headers()
                    return
                entry = files.get(self.path.partition("?")[0])
                if entry is None:
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                body = entry[0].read_bytes()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", entry[1])
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                report = json.loads(self.rfile.read(length) or b"{}")
                server.add(report)
                self.send_response(HTTPStatus.NO_CONTENT)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="page-server", daemon=True)
        self._thread.start()

    def add(self, report: Report) -> None:
        report["t"] = time.monotonic()
        with self._cond:
            self._log.write(json.dumps(report) + "\n")
            self._log.flush()
            self.reports.append(report)
            self._cond.notify_all()

    def gate(self, name: str) -> threading.Event:
        with self._cond:
            return self._released.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        """Answer the page's ``GET /wait/NAME`` (now, or as soon as it asks)."""
        self.gate(name).set()

    def url(self, **query: str | int) -> str:
        return f"http://127.0.0.1:{self.port}/?{urlencode(query)}"

    def wait_step(self, step: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> Report:
        """The page's report of ``step``; AssertionError if it reports a failure first or is silent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for report in self.reports:
                    if report.get("step") == "failed":
                        raise AssertionError(f"web phone failed before {step!r}: {report}")
                    if report.get("step") == step:
                        return report
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    steps = [r.get("step") for r in self.reports if r.get("step") != "debug"]
                    state = "running" if alive() else "exited"
                    raise AssertionError(
                        f"web phone did not report {step!r} in {timeout} s (steps: {steps}; "
                        f"Chromium {state}; fetched: {self.fetched})"
                    )
                self._cond.wait(min(left, 0.2))

    def debug_text(self) -> str:
        with self._cond:
            return "\n".join(str(r.get("text", "")) for r in self.reports if r.get("step") == "debug")

    def close(self) -> None:
        for gate in list(self._released.values()):
            gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._log.close()

    def __enter__(self) -> PageServer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class HeadlessChromium:
    """Chromium showing one URL until closed (killed: the page has reported all it had to)."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.profile = workdir / "chromium-profile"
        self.profile.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "chromium.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", url],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def screenshot(self, path: Path, timeout: float = 10.0) -> Path:
        """A PNG of the page as it is now, over the DevTools protocol (``Page.captureScreenshot``)."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or not self.alive():
                raise AssertionError(f"no DevTools port from Chromium: {self.log()[-2000:]}")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as answer:
            targets = json.load(answer)
        (page,) = [t for t in targets if t.get("type") == "page"]
        with connect(page["webSocketDebuggerUrl"], open_timeout=timeout, max_size=None) as devtools:

            def call(ident: int, method: str, **params: object) -> dict[str, Any]:
                devtools.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    reply: dict[str, Any] = json.loads(devtools.recv(timeout))
                    if reply.get("id") == ident:
                        if "result" not in reply:
                            raise AssertionError(f"DevTools {method} failed: {reply}")
                        return reply

            # headless Chromium's viewport is smaller than --window-size: set it
            width, height = SCREENSHOT_SIZE
            call(1, "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            reply = call(2, "Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(reply["result"]["data"]))
        return path

    def close(self) -> None:
        # Chromium's renderer, GPU and zygote processes share the session started for it
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# -- what both pages' tests check -------------------------------------------------------------------


@contextlib.contextmanager
def dumped_on_failure(
    server: PageServer, chromium: HeadlessChromium, farm_logs: Callable[[], str], library: str
) -> Iterator[None]:
    """Print the page's SIP trace, Chromium's log and the farm's logs when a step fails."""
    try:
        yield
    except AssertionError:
        print(f"--- {library} debug\n{server.debug_text()[-6000:]}\n--- chromium\n{chromium.log()[-3000:]}")
        print(farm_logs())
        raise


def check_message(message: Report) -> None:
    """The caller's MESSAGE reached the callee's user agent as sent, and the caller got 200."""
    assert message["status"] == 200, message
    assert message["received"] == {"from": "sip:alice@farm.test", "body": message["sent"]}, message


def check_audio(stats: Report, min_packets: int) -> None:
    """Each RTCPeerConnection sent and received audio (~50 packets a second each way; the fake
    microphone is a beep, not silence) between 127.0.0.1 host candidates."""
    for side in ("caller", "callee"):
        audio = stats[side]
        assert audio["packetsReceived"] >= min_packets and audio["bytesReceived"] > 0, stats
        assert audio["packetsSent"] >= min_packets, stats
        assert audio["totalAudioEnergy"] > 0, stats
        assert audio["pair"].startswith("127.0.0.1:"), stats
