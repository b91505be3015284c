"""The JsSIP cells of the client matrix: two JsSIP web phones in headless Chromium register and
call over the WebSocket listener of ``default_farm``'s balancer (one node on the default
configuration).

The page (``web/phone.js``) runs two JsSIP user agents, alice and bob, both registered over
WebSocket (RFC 7118) through the balancer. Each step is asserted as the users would notice it and
marked in the ``jssip``/``ws`` matrix cell right after:

- register: both user agents report ``registered``.
- message: alice's MESSAGE text reaches bob's user agent (``newMessage``), alice gets 200.
- call: alice calls bob, bob answers, the call is confirmed on both sides; alice's hangup ends
  bob's session by the BYE that crossed the farm.
- audio: each RTCPeerConnection received audio (inbound-rtp packets and audio energy from
  Chromium's fake microphone, over DTLS-SRTP between 127.0.0.1 host candidates).
- hold: alice holds (re-INVITE, a=sendonly; JsSIP mutes both ends while held): neither side
  hears anything while held (no audio energy received once what each had buffered before the
  hold has played out, and bob, recvonly, sends alice no packet), both hear each other again
  after alice resumes.
- busy: bob rejects alice's next call with 486 Busy Here; alice's call fails as Busy.
- no answer: bob's phone rings, alice gives up: her CANCEL ends bob's ringing session.

While the two are talking, the page (each phone's state, the call's duration, RTP packets, the
audio level heard) is captured over the DevTools protocol into the test's ``tmp_path`` as
``browser-call.png``; with ``SIPFARM_UPDATE_SCREENSHOT=1`` it is copied to
``docs/browser-call.png``, the README's picture. Runs in the loopback-only namespace like the
softphone tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fixtures.default_farm import DefaultFarm
from fixtures.matrix import Cell
from fixtures.startup import START_TIMEOUT_S
from webphone import (
    BROWSER_MARKS,
    HeadlessChromium,
    PageServer,
    check_audio,
    check_message,
    dumped_on_failure,
)

CLIENT = "jssip"
TALK_MS = 2000
HOLD_MS = 1500
HOLD_SETTLE_MS = 5000  # at most, for what was buffered before the hold to play out
STEP_TIMEOUT_S = 15.0
SCREENSHOT = "browser-call.png"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / SCREENSHOT
UPDATE_SCREENSHOT = os.environ.get("SIPFARM_UPDATE_SCREENSHOT") == "1"
MIN_PACKETS = 50  # ~50 a second each way
HELD_ENERGY = 0.05  # audio energy received while held, at most, as a share of the resumed talk's

pytestmark = BROWSER_MARKS


def test_jssip_over_websocket(default_farm: DefaultFarm, matrix, page_server: PageServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cell: Cell = matrix(CLIENT, "ws", "register", "call", "audio", "hold", "busy", "no answer", "message")
    server = page_server
    accounts = default_farm.accounts
    url = server.url(
        ws=f"ws://{default_farm.proxy('ws')}", domain=default_farm.domain,
        talk_ms=TALK_MS, hold_ms=HOLD_MS, hold_settle_ms=HOLD_SETTLE_MS,
        caller=f"alice:{accounts['alice']}", callee=f"bob:{accounts['bob']}",
    )  # fmt: skip
    with HeadlessChromium(url, tmp_path) as chromium:

        def step(name: str, timeout: float = STEP_TIMEOUT_S) -> dict:  # type: ignore[type-arg]
            return server.wait_step(name, timeout, chromium.alive)

        with dumped_on_failure(server, chromium, default_farm.logs, "JsSIP"):
            # Chromium's start with a fresh profile, to the page's first report: ~1-3 s idle, over
            # 15 s seen while CI loaded both cores (stop 20)
            step("loaded", START_TIMEOUT_S)
            step("media")
            step("registered")
            cell.ok("register")
            check_message(step("message"))
            cell.ok("message")

            step("confirmed")
            stats = step("stats")
            step("talking")
            shot = chromium.screenshot(tmp_path / SCREENSHOT)
            server.release("screenshot")
            hold = step("hold", STEP_TIMEOUT_S + HOLD_SETTLE_MS / 1000)
            ended = step("ended")
            busy = step("busy")
            no_answer = step("no answer")
            step("done")
    print(f"stats: {stats}\nhold: {hold}\nended: {ended}\nbusy: {busy}\nno answer: {no_answer}")
    assert ended["caller"] == "local: Terminated", ended
    assert ended["callee"] == "remote: Terminated", ended  # alice's BYE reached bob through the farm
    cell.ok("call")

    check_audio(stats, MIN_PACKETS)
    cell.ok("audio")

    def grew(before: dict, after: dict, side: str, figure: str) -> float:  # type: ignore[type-arg]
        return float(after[side][figure]) - float(before[side][figure])

    for side in ("caller", "callee"):
        # held: silence (bob still receives alice's muted packets; what little energy loss
        # concealment adds is ~0.5 % of the talk's), then each hears the other again
        talk_energy = grew(hold["resumed"], hold["talking"], side, "totalAudioEnergy")
        assert grew(hold["held"], hold["stillHeld"], side, "totalAudioEnergy") < HELD_ENERGY * talk_energy, hold
        assert talk_energy > 0 and grew(hold["resumed"], hold["talking"], side, "packetsReceived") >= MIN_PACKETS, hold
    # bob answered the hold recvonly: he sends alice nothing until she resumes
    assert grew(hold["held"], hold["stillHeld"], "caller", "packetsReceived") <= 3, hold
    cell.ok("hold")

    assert busy["status"] == 486 and busy["cause"] == "Busy", busy
    cell.ok("busy")

    assert (no_answer["caller"], no_answer["callee"]) == ("local: Canceled", "remote: Canceled"), no_answer
    cell.ok("no answer")

    assert shot.read_bytes().startswith(b"\x89PNG"), shot
    if UPDATE_SCREENSHOT:
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
