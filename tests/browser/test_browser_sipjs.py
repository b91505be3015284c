"""The SIP.js cells of the client matrix: two SIP.js (0.21) web phones in headless Chromium register
and call over the WebSocket listener of ``default_farm``'s balancer, as the JsSIP test does
(``test_browser_jssip.py``; the page is ``web/sipjs.js``, SIP.js's own API: Registerer, Messager,
Inviter, Invitation).

- register: both user agents' Registerers reach ``Registered`` (REGISTER, 401, REGISTER, 200).
- message: the caller's MESSAGE reaches the callee's user agent, the caller gets 200.
- call: the caller's INVITE is answered, both sessions ``Established``; the caller's BYE ends the
  callee's session through the farm.
- audio: each RTCPeerConnection received audio (inbound-rtp packets and energy from Chromium's
  fake microphone, DTLS-SRTP between 127.0.0.1 host candidates).
- hold: the caller holds as SIP.js's own SessionManager does (a re-INVITE whose offer is
  a=sendonly) and the callee's SIP.js answers a=recvonly: through the farm, the
  callee goes on hearing the caller while the caller receives no packet, then a re-INVITE
  offering sendrecv resumes the call and both hear each other again.
- busy: the callee rejects the next call with 486, the caller's INVITE gets it.
- no answer: the callee rings (180), the caller CANCELs: the callee's session ends.
"""

from __future__ import annotations

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

CLIENT = "sipjs"
TALK_MS = 2000
HOLD_MS = 1500
STEP_TIMEOUT_S = 15.0
MIN_PACKETS = 50  # ~50 a second each way

pytestmark = BROWSER_MARKS


def test_sipjs_over_websocket(default_farm: DefaultFarm, matrix, page_server: PageServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cell: Cell = matrix(CLIENT, "ws", "register", "call", "audio", "hold", "busy", "no answer", "message")
    server = page_server
    accounts = default_farm.accounts
    url = server.url(
        ws=f"ws://{default_farm.proxy('ws')}", domain=default_farm.domain, talk_ms=TALK_MS, hold_ms=HOLD_MS,
        caller=f"alice:{accounts['alice']}", callee=f"bob:{accounts['bob']}",
    )  # fmt: skip
    with HeadlessChromium(url, tmp_path) as chromium:

        def step(name: str, timeout: float = STEP_TIMEOUT_S) -> dict:  # type: ignore[type-arg]
            return server.wait_step(name, timeout, chromium.alive)

        with dumped_on_failure(server, chromium, default_farm.logs, "SIP.js"):
            for name in ("loaded", "media", "registered"):
                step(name, START_TIMEOUT_S if name == "loaded" else STEP_TIMEOUT_S)
            cell.ok("register")
            check_message(step("message"))
            cell.ok("message")
            step("confirmed")
            stats = step("stats")
            hold = step("hold", STEP_TIMEOUT_S + (HOLD_MS + TALK_MS) / 1000)
            ended, busy, no_answer = (step(name) for name in ("ended", "busy", "no answer"))
            step("done")
    print(f"stats: {stats}\nhold: {hold}\nended: {ended}\nbusy: {busy}\nno answer: {no_answer}")
    assert (ended["caller"], ended["callee"]) == ("Terminated", "Terminated"), ended
    cell.ok("call")
    check_audio(stats, MIN_PACKETS)
    cell.ok("audio")

    def grew(before: dict, after: dict, side: str) -> int:  # type: ignore[type-arg]
        return int(after[side]["packetsReceived"]) - int(before[side]["packetsReceived"])

    # the directions each re-INVITE's offer and answer carried, as the caller saw them
    assert (hold["holding"]["offer"], hold["holding"]["answer"]) == ("sendonly", "recvonly"), hold
    assert (hold["resuming"]["offer"], hold["resuming"]["answer"]) == ("sendrecv", "sendrecv"), hold
    # held: the callee, recvonly, sends nothing; the caller's audio still reaches it
    assert grew(hold["held"], hold["stillHeld"], "caller") <= 3, hold
    assert grew(hold["held"], hold["stillHeld"], "callee") >= MIN_PACKETS * HOLD_MS // 2000, hold
    # resumed: both hear each other again
    for side in ("caller", "callee"):
        assert grew(hold["resumed"], hold["talking"], side) >= MIN_PACKETS, hold
    cell.ok("hold")

    assert busy["status"] == 486, busy
    cell.ok("busy")

    assert (no_answer["caller"], no_answer["callee"]) == ("Terminated", "Terminated"), no_answer
    assert no_answer["status"] == 487, no_answer  # the INVITE the caller cancelled ended with 487
    cell.ok("no answer")
