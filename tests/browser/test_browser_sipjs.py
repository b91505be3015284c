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
- busy: the callee rejects the next call with 486, the caller's INVITE gets it.
- no answer: the callee rings (180), the caller CANCELs: the callee's session ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.default_farm import DefaultFarm
from fixtures.matrix import Cell
from fixtures.startup import START_TIMEOUT_S
from peers.netns import skip_reason
from webphone import SIPJS_ENTRY, HeadlessChromium, PageServer, build_bundle, missing_tools

CLIENT = "sipjs"
TALK_MS = 2000
STEP_TIMEOUT_S = 15.0
MIN_PACKETS = 50  # ~50 a second each way

pytestmark = [
    pytest.mark.softphone,
    pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or ""),
    pytest.mark.timeout(START_TIMEOUT_S + 90),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = missing_tools()
    if missing is not None:
        pytest.fail(missing)
    return build_bundle(tmp_path_factory.mktemp("sipjs"), SIPJS_ENTRY, "SIP")


@pytest.fixture
def page_server(bundle: Path, tmp_path: Path) -> Iterator[PageServer]:
    with PageServer(bundle, tmp_path / "page-reports.jsonl", page="sipjs") as server:
        yield server


def test_sipjs_over_websocket(default_farm: DefaultFarm, matrix, page_server: PageServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cell: Cell = matrix(CLIENT, "ws", "register", "call", "audio", "busy", "no answer", "message")
    server = page_server
    accounts = default_farm.accounts
    url = server.url(
        ws=f"ws://{default_farm.proxy('ws')}", domain=default_farm.domain, talk_ms=TALK_MS,
        caller=f"alice:{accounts['alice']}", callee=f"bob:{accounts['bob']}",
    )  # fmt: skip
    with HeadlessChromium(url, tmp_path) as chromium:

        def step(name: str, timeout: float = STEP_TIMEOUT_S) -> dict:  # type: ignore[type-arg]
            return server.wait_step(name, timeout, chromium.alive)

        try:
            step("loaded", START_TIMEOUT_S)
            step("media")
            step("registered")
            cell.ok("register")

            message = step("message")
            assert message["status"] == 200, message
            assert message["received"] == {"from": "sip:alice@farm.test", "body": message["sent"]}, message
            cell.ok("message")

            step("confirmed")
            stats = step("stats")
            ended = step("ended")
            busy = step("busy")
            no_answer = step("no answer")
            step("done")
        except AssertionError:
            print(f"--- SIP.js debug\n{server.debug_text()[-6000:]}\n--- chromium\n{chromium.log()[-3000:]}")
            print(default_farm.logs())
            raise
    print(f"stats: {stats}\nended: {ended}\nbusy: {busy}\nno answer: {no_answer}")
    assert (ended["caller"], ended["callee"]) == ("Terminated", "Terminated"), ended
    cell.ok("call")

    for side in ("caller", "callee"):
        audio = stats[side]
        assert audio["packetsReceived"] >= MIN_PACKETS and audio["bytesReceived"] > 0, stats
        assert audio["packetsSent"] >= MIN_PACKETS, stats
        assert audio["totalAudioEnergy"] > 0, stats
        assert audio["pair"].startswith("127.0.0.1:"), stats
    cell.ok("audio")

    assert busy["status"] == 486, busy
    cell.ok("busy")

    assert (no_answer["caller"], no_answer["callee"]) == ("Terminated", "Terminated"), no_answer
    assert no_answer["status"] == 487, no_answer  # the INVITE the caller cancelled ended with 487
    cell.ok("no answer")
