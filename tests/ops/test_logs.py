"""The log formatters: one event a line whatever the values logged (sipfarm.logs)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipfarm.logs import JsonFormatter, KeyValueFormatter, split_kv
from sipfarm.sip.errors import BadMessage
from sipfarm.sip.parser import parse_message, validate_request

FORGED = "x\n ts=2026-12-03T00:00:00.000Z level=info event=auth_failed source=203.0.113.9 user=y"


def _line(formatter: logging.Formatter, fmt: str, *args: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.Logger("sipfarm.test")
    log.addHandler(handler)
    log.info(fmt, *args)
    return stream.getvalue()


def test_a_value_cannot_start_a_line_or_show_a_key_of_its_own() -> None:
    """A From's user part with %0A decoded (red team, 2026-12-03) stays inside its quoted value."""
    line = _line(KeyValueFormatter(), "event=auth_failed source=%s user=%s count=%d", "10.0.0.1", FORGED, 3)
    assert line.count("\n") == 1 and line.endswith("count=3\n"), line
    assert line.count("source=") == 1 and line.count("event=") == 1, line
    fields = split_kv(line.strip())
    assert (fields["source"], fields["user"], fields["count"]) == ("10.0.0.1", FORGED, "3")


def test_plain_words_stay_as_they_are_and_control_characters_are_escaped() -> None:
    line = _line(KeyValueFormatter(), "event=e a=%s b=%r c=%.1f d=%s", "word", ValueError("no"), 1.25, "two words")
    assert line.endswith("event=e a=word b=ValueError('no') c=1.2 d=\"two words\"\n"), line
    assert _line(KeyValueFormatter(), "event=e raw\x00\x1b[2J").endswith("event=e raw\\x00\\x1b[2J\n")


def test_json_lines_carry_the_values_as_they_were() -> None:
    out = json.loads(_line(JsonFormatter(), "event=auth_failed source=%s user=%s", "10.0.0.1", FORGED))
    assert (out["event"], out["source"], out["user"]) == ("auth_failed", "10.0.0.1", FORGED)


@given(st.text())
def test_any_value_round_trips_on_one_line(value: str) -> None:
    line = _line(KeyValueFormatter(), "event=e v=%s", value)
    assert line.count("\n") == 1
    assert split_kv(line.strip())["v"] == value


@pytest.mark.parametrize("call_id", [b"abc\x00def", b"abc\x1b[2Jdef", b"abc def"])
def test_a_call_id_with_a_space_or_control_character_is_a_bad_request(call_id: bytes) -> None:
    raw = (
        b"OPTIONS sip:farm.test SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-1\r\n"
        b"From: <sip:a@farm.test>;tag=1\r\nTo: <sip:farm.test>\r\nCall-ID: " + call_id + b"\r\n"
        b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    try:
        msg = parse_message(raw)
    except BadMessage:
        return  # refused by the parser already
    with pytest.raises(BadMessage, match="Call-ID"):
        validate_request(msg)
