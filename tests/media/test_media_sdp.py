"""media/sdp.py: parsing what real phones send, anchoring it at a relay, and the fuzz properties."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.sdp import (
    ICE_ATTRIBUTES,
    MAX_MEDIA_SECTIONS,
    MAX_SDP_BYTES,
    MAX_SDP_LINES,
    Connection,
    Crypto,
    Direction,
    Fingerprint,
    IceMode,
    MediaEndpoint,
    Origin,
    RelayEndpoint,
    RtcpMuxMode,
    SdpError,
    SessionDescription,
    anchor,
    continue_session,
    endpoints_of,
    secure_media,
)


def crlf(text: str) -> bytes:
    return text.strip("\n").replace("\n", "\r\n").encode() + b"\r\n"


def lines(sdp: SessionDescription) -> list[str]:
    return sdp.to_bytes().decode("latin-1").split("\r\n")[:-1]


# --- golden SDPs ------------------------------------------------------------------------------

# pjsua2 2.x offer: media-level c=, a=rtcp with address, speex at three rates, session-level b=
PJSUA2 = """
v=0
o=- 3914838399 3914838399 IN IP4 192.168.1.10
s=pjmedia
b=AS:84
t=0 0
a=X-nat:0
m=audio 4000 RTP/AVP 0 8 96 97 98 99 101
c=IN IP4 192.168.1.10
b=AS:64000
b=TIAS:64000
a=rtcp:4001 IN IP4 192.168.1.10
a=sendrecv
a=rtpmap:96 speex/16000
a=rtpmap:97 speex/8000
a=rtpmap:98 speex/32000
a=rtpmap:99 iLBC/8000
a=fmtp:99 mode=30
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ssrc:1192568283 cname:5fc2b7a05b6d0b5c
"""

# baresip 1.0: session-level c= only, opus, ptime, LF-only here to check LF input
BARESIP = """
v=0
o=- 1463389573 1830487271 IN IP4 10.0.0.5
s=-
c=IN IP4 10.0.0.5
t=0 0
a=tool:baresip 1.0.0
m=audio 10280 RTP/AVP 96 0 8 101
b=AS:93
a=rtpmap:96 opus/48000/2
a=fmtp:96 stereo=1;sprop-stereo=1
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=sendrecv
a=label:1
a=rtcp-rsize
a=ssrc:2093618219 cname:c9f1b2b8-1a4e
a=mid:1
a=ptime:20
"""

# SIPp's uac scenario default body
SIPP = """
v=0
o=user1 53655765 2353687637 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""

# JsSIP on Chrome: ICE, DTLS, rtcp-mux, BUNDLE, mid, UDP/TLS/RTP/SAVPF, the a=rtcp:9 0.0.0.0 dummy
CHROME = """
v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS 2b7f3e4a
a=ice-options:trickle
m=audio 52000 UDP/TLS/RTP/SAVPF 111 9 0 8 110 126
c=IN IP4 192.168.1.20
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:1467250027 1 udp 2122260223 192.168.1.20 52000 typ host generation 0 network-id 1
a=candidate:435653019 1 udp 1686052607 203.0.113.7 52000 typ srflx raddr 192.168.1.20 rport 52000 generation 0
a=candidate:1853887674 1 tcp 1518280447 192.168.1.20 9 typ host tcptype active generation 0
a=end-of-candidates
a=ice-ufrag:4ZcD
a=ice-pwd:2/1muCWoOi3uLifh0NuRHlI2
a=fingerprint:sha-256 75:74:5A:A6:A4:E5:52:F4:A7:67:4C:01:C7:EE:91:3F:21:3D:A2:E3:53:7B:6F:30:86:F2:30:AA:65:FB:04:24
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=sendrecv
a=msid:2b7f3e4a 6f1c0d2e
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:3570614608 cname:4TOk42mSjXCkVIa6
m=video 52000 UDP/TLS/RTP/SAVPF 96 97
c=IN IP4 192.168.1.20
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:1467250027 1 udp 2122260223 192.168.1.20 52000 typ host generation 0 network-id 1
a=ice-ufrag:4ZcD
a=ice-pwd:2/1muCWoOi3uLifh0NuRHlI2
a=fingerprint:sha-256 75:74:5A:A6:A4:E5:52:F4:A7:67:4C:01:C7:EE:91:3F:21:3D:A2:E3:53:7B:6F:30:86:F2:30:AA:65:FB:04:24
a=setup:actpass
a=mid:1
a=sendrecv
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:96 VP8/90000
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
"""

# re-INVITE putting the call on hold the RFC 3264 way
HOLD_SENDONLY = """
v=0
o=- 3914838399 3914838400 IN IP4 192.168.1.10
s=pjmedia
t=0 0
m=audio 4000 RTP/AVP 0 101
c=IN IP4 192.168.1.10
a=rtcp:4001 IN IP4 192.168.1.10
a=sendonly
a=rtpmap:101 telephone-event/8000
"""

# ... and the RFC 2543 way
HOLD_ZERO = """
v=0
o=user1 53655765 2353687638 IN IP4 127.0.0.1
s=-
c=IN IP4 0.0.0.0
t=0 0
m=audio 6000 RTP/AVP 0
a=rtpmap:0 PCMU/8000
"""

IPV6 = """
v=0
o=alice 2890844526 2890844527 IN IP6 2001:db8::10
s=-
c=IN IP6 2001:db8::10
t=0 0
m=audio 49170 RTP/AVP 0
a=rtcp:53020 IN IP6 2001:db8::11
a=recvonly
"""

# audio + video, video rejected; session c= overridden at media level for audio; SDES crypto
TWO_STREAMS = """
v=0
o=bob 2808844564 2808844564 IN IP4 198.51.100.2
s=call
c=IN IP4 10.9.9.9
t=0 0
a=sendrecv
m=audio 20000 RTP/SAVP 0 8
c=IN IP4 10.1.1.1
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32
a=ptime:20
m=video 0 RTP/AVP 31
c=IN IP4 10.1.1.1
"""

GOLDEN = [PJSUA2, BARESIP, SIPP, CHROME, HOLD_SENDONLY, HOLD_ZERO, IPV6, TWO_STREAMS]
RELAY = "203.0.113.50"


# --- parsing and views ------------------------------------------------------------------------


@pytest.mark.parametrize("text", GOLDEN)
def test_round_trip_is_byte_exact_and_lf_becomes_crlf(text: str) -> None:
    body = crlf(text)
    assert SessionDescription.parse(body).to_bytes() == body
    lf_only = text.strip("\n").encode() + b"\n"
    assert SessionDescription.parse(lf_only).to_bytes() == body


def test_pjsua2_views() -> None:
    sdp = SessionDescription.parse(crlf(PJSUA2))
    assert sdp.origin == Origin("-", "3914838399", 3914838399, "IN", "IP4", "192.168.1.10")
    assert sdp.connection is None
    (audio,) = sdp.media
    assert audio.line.media == "audio"
    assert audio.port == 4000
    assert audio.line.proto == "RTP/AVP"
    assert audio.line.formats == ("0", "8", "96", "97", "98", "99", "101")
    assert audio.connection == Connection("IP4", "192.168.1.10")
    assert audio.rtcp is not None
    assert audio.rtcp.port == 4001
    assert audio.direction is Direction.SENDRECV
    assert audio.attribute_values("rtpmap")[:3] == ("96 speex/16000", "97 speex/8000", "98 speex/32000")
    assert audio.attribute("fmtp") == "99 mode=30"
    assert not audio.rtcp_mux
    assert endpoints_of(sdp) == [
        MediaEndpoint(
            0, "audio", "RTP/AVP", "192.168.1.10", 4000, "192.168.1.10", 4001, False, Direction.SENDRECV, False
        )
    ]


def test_chrome_views() -> None:
    sdp = SessionDescription.parse(crlf(CHROME))
    assert sdp.connection is None
    assert sdp.ice_options == ("trickle",)
    assert sdp.attribute("group") == "BUNDLE 0 1"
    audio, video = sdp.media
    assert audio.line.proto == "UDP/TLS/RTP/SAVPF"
    assert audio.rtcp_mux
    assert audio.mid == "0"
    assert video.mid == "1"
    assert audio.ice_ufrag == "4ZcD"
    assert audio.ice_pwd == "2/1muCWoOi3uLifh0NuRHlI2"
    assert len(audio.candidates) == 3
    assert audio.has_attribute("end-of-candidates")
    assert audio.setup == "actpass"
    assert audio.fingerprints[0].hash_function == "sha-256"
    assert isinstance(audio.fingerprints[0], Fingerprint)
    endpoint = endpoints_of(sdp)[0]
    assert endpoint.rtp_destination == ("192.168.1.20", 52000)
    assert endpoint.rtcp_mux
    assert endpoint.rtcp_destination is None  # a=rtcp:9 IN IP4 0.0.0.0 is no place to send to


def test_session_level_connection_and_ptime() -> None:
    sdp = SessionDescription.parse(crlf(BARESIP))
    assert sdp.connection == Connection("IP4", "10.0.0.5")
    assert sdp.media[0].connection is None
    assert sdp.connection_of(0) == sdp.connection
    assert sdp.media[0].ptime == 20.0
    (endpoint,) = endpoints_of(sdp)
    assert endpoint.rtp_destination == ("10.0.0.5", 10280)
    assert endpoint.rtcp_destination == ("10.0.0.5", 10281)  # RFC 3550 11: RTP + 1


def test_media_connection_overrides_session_and_disabled_stream_is_kept() -> None:
    sdp = SessionDescription.parse(crlf(TWO_STREAMS))
    audio, video = endpoints_of(sdp)
    assert audio.address == "10.1.1.1"
    assert sdp.direction is Direction.SENDRECV
    assert sdp.media[0].crypto == (
        Crypto(1, "AES_CM_128_HMAC_SHA1_80", "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32"),
    )
    assert video.disabled
    assert not video.receives
    assert video.rtp_destination is None


def test_hold_sendonly_is_recognised() -> None:
    (endpoint,) = endpoints_of(SessionDescription.parse(crlf(HOLD_SENDONLY)))
    assert endpoint.direction is Direction.SENDONLY
    assert endpoint.on_hold
    assert endpoint.sends
    assert not endpoint.receives
    assert endpoint.rtp_destination is None


def test_hold_zero_address_is_never_a_destination() -> None:
    (endpoint,) = endpoints_of(SessionDescription.parse(crlf(HOLD_ZERO)))
    assert endpoint.zero_address
    assert endpoint.on_hold
    assert endpoint.rtp_destination is None
    assert endpoint.rtcp_destination is None


def test_ipv6_views() -> None:
    sdp = SessionDescription.parse(crlf(IPV6))
    assert sdp.origin.addrtype == "IP6"
    assert sdp.origin.address == "2001:db8::10"
    (endpoint,) = endpoints_of(sdp)
    assert endpoint.direction is Direction.RECVONLY
    assert endpoint.rtp_destination == ("2001:db8::10", 49170)
    assert endpoint.rtcp_destination == ("2001:db8::11", 53020)


def test_media_direction_overrides_session_direction() -> None:
    body = crlf(SIPP.replace("t=0 0", "t=0 0\na=sendonly") + "a=inactive\n")
    sdp = SessionDescription.parse(body)
    assert sdp.direction is Direction.SENDONLY
    assert sdp.direction_of(0) is Direction.INACTIVE
    body = crlf(SIPP.replace("t=0 0", "t=0 0\na=sendonly"))
    assert SessionDescription.parse(body).direction_of(0) is Direction.SENDONLY


def test_multicast_connection_kept_verbatim() -> None:
    body = crlf(SIPP.replace("c=IN IP4 127.0.0.1", "c=IN IP4 224.2.1.1/127/3"))
    sdp = SessionDescription.parse(body)
    assert sdp.connection == Connection("IP4", "224.2.1.1", ttl=127, count=3)
    assert sdp.to_bytes() == body


def test_trailing_blank_lines_and_missing_final_newline_are_accepted() -> None:
    body = crlf(SIPP)
    assert SessionDescription.parse(body + b"\r\n\r\n").to_bytes() == body
    assert SessionDescription.parse(body[:-2]).to_bytes() == body


def test_non_ascii_bytes_survive() -> None:
    body = crlf(SIPP).replace(b"s=-", "s=Caf\u00e9 \u2615".encode())
    assert SessionDescription.parse(body).to_bytes() == body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "SDP body is empty"),
        (b"o=- 1 1 IN IP4 1.2.3.4\r\n", "SDP does not start with v=0: 'o=- 1 1 IN IP4 1.2.3.4'"),
        (b"v=0\r\ns=-\r\n", "SDP has no o= line"),
        (b"v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n", "o= line has a bad sess-version 'x'"),
        (b"v=0\r\no=- 1 1 IN IP4\r\n", "o= line has 5 fields, not 6"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3\r\n", "c= line has a bad IP4 address '1.2.3'"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 ::1\r\n", "c= line has a bad IP4 address '::1'"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP6 fe80::1%eth0\r\n", "c= line has a bad IP6 address 'fe80::1%eth0'"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP5 1.2.3.4\r\n", "c= line has address type 'IP5', not IP4 or IP6"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 host.example\r\n", "c= line has a bad IP4 address 'host.example'"),
        (
            b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4/127\r\n",
            "c= line has a TTL or address count on a unicast address",
        ),
        (
            b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n",
            "m= line has a bad port '70000'",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio -1 RTP/AVP 0\r\n", "m= line has a bad port '-1'"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000\r\n", "m= line has 2 fields, fewer than 3"),
        (
            b"v=0\r\no=- 1 1 IN IP4 a\r\nm=audio 4000 RTP/AVP 0\r\n",
            "media section 0 has no c= line and the session has none",
        ),
        (
            b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:x\r\n",
            "a=rtcp has a bad port 'x'",
        ),
        (
            b"v=0\r\no=- 1 1 IN IP4 a\r\nc=IN IP4 1.2.3.4\r\na=sendonly\r\na=inactive\r\n",
            "session part has more than one direction attribute",
        ),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\n\r\ns=-\r\n", "SDP line 3 is not <type>=<value>: ''"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\nsession\r\n", "SDP line 3 is not <type>=<value>: 'session'"),
        (b"v=0\r\no=- 1 1 IN IP4 a\r\ns=a\rb\r\n", "SDP line 3 has a stray CR or NUL"),
    ],
)
def test_defects_raise_sdp_error_naming_them(body: bytes, message: str) -> None:
    with pytest.raises(SdpError, match="^" + re.escape(message) + "$"):
        SessionDescription.parse(body)


def test_bounds() -> None:
    head = crlf(SIPP)
    with pytest.raises(SdpError, match=f"more than {MAX_SDP_BYTES}"):
        SessionDescription.parse(head + b"a=x:" + b"y" * MAX_SDP_BYTES + b"\r\n")
    with pytest.raises(SdpError, match=f"more than {MAX_SDP_LINES} lines"):
        SessionDescription.parse(head + b"a=x\n" * MAX_SDP_LINES)
    section = b"m=audio 0 RTP/AVP 0\r\n"
    assert len(SessionDescription.parse(head + section * (MAX_MEDIA_SECTIONS - 1)).media) == MAX_MEDIA_SECTIONS
    with pytest.raises(SdpError, match=f"more than {MAX_MEDIA_SECTIONS} media sections"):
        SessionDescription.parse(head + section * MAX_MEDIA_SECTIONS)


@pytest.mark.parametrize("text", GOLDEN)
def test_every_truncation_parses_or_raises_sdp_error(text: str) -> None:
    body = crlf(text)
    for end in range(len(body)):
        try:
            SessionDescription.parse(body[:end])
        except SdpError:
            pass


# --- anchoring --------------------------------------------------------------------------------


def test_anchor_pjsua2_line_by_line() -> None:
    sdp = SessionDescription.parse(crlf(PJSUA2))
    out = anchor(sdp, [RelayEndpoint(RELAY, 30000)])
    assert lines(out) == [
        "v=0",
        "o=- 3914838399 3914838399 IN IP4 203.0.113.50",
        "s=pjmedia",
        "b=AS:84",
        "t=0 0",
        "a=X-nat:0",
        "m=audio 30000 RTP/AVP 0 8 96 97 98 99 101",
        "c=IN IP4 203.0.113.50",
        "b=AS:64000",
        "b=TIAS:64000",
        "a=rtcp:30001 IN IP4 203.0.113.50",
        "a=sendrecv",
        "a=rtpmap:96 speex/16000",
        "a=rtpmap:97 speex/8000",
        "a=rtpmap:98 speex/32000",
        "a=rtpmap:99 iLBC/8000",
        "a=fmtp:99 mode=30",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ssrc:1192568283 cname:5fc2b7a05b6d0b5c",
    ]
    assert sdp == SessionDescription.parse(crlf(PJSUA2))  # the input is untouched
    assert endpoints_of(out)[0].rtp_destination == (RELAY, 30000)
    assert endpoints_of(out)[0].rtcp_destination == (RELAY, 30001)


def test_anchor_session_level_connection_only() -> None:
    out = anchor(SessionDescription.parse(crlf(SIPP)), [RelayEndpoint(RELAY, 30000)])
    assert lines(out) == [
        "v=0",
        "o=user1 53655765 2353687637 IN IP4 203.0.113.50",
        "s=-",
        "c=IN IP4 203.0.113.50",
        "t=0 0",
        "m=audio 30000 RTP/AVP 0",
        "a=rtpmap:0 PCMU/8000",
    ]


def test_anchor_without_replacing_session_connection_adds_a_media_connection() -> None:
    sdp = SessionDescription.parse(crlf(BARESIP))
    out = anchor(sdp, [RelayEndpoint(RELAY, 30000)], replace_origin=False, replace_session_connection=False)
    assert lines(out)[:8] == [
        "v=0",
        "o=- 1463389573 1830487271 IN IP4 10.0.0.5",
        "s=-",
        "c=IN IP4 10.0.0.5",
        "t=0 0",
        "a=tool:baresip 1.0.0",
        "m=audio 30000 RTP/AVP 96 0 8 101",
        "c=IN IP4 203.0.113.50",
    ]
    assert lines(out)[8] == "b=AS:93"
    assert endpoints_of(out)[0].rtp_destination == (RELAY, 30000)


def test_anchor_chrome_removes_ice_and_keeps_dtls_bundle_and_mux() -> None:
    sdp = SessionDescription.parse(crlf(CHROME))
    out = anchor(sdp, [RelayEndpoint(RELAY, 30000, 30000), RelayEndpoint(RELAY, 30000, 30000)])
    text = lines(out)
    assert not [t for t in text if t.startswith("a=") and t[2:].partition(":")[0] in ICE_ATTRIBUTES]
    assert not [t for t in text if t.startswith("a=rtcp:")]  # one port: RTCP rides on RTP
    assert text.count("a=rtcp-mux") == 2
    assert text.count("a=setup:actpass") == 2
    assert "a=group:BUNDLE 0 1" in text
    assert text[:8] == [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 203.0.113.50",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=extmap-allow-mixed",
        "a=msid-semantic: WMS 2b7f3e4a",
        "m=audio 30000 UDP/TLS/RTP/SAVPF 111 9 0 8 110 126",
    ]
    assert text[8:11] == [
        "c=IN IP4 203.0.113.50",
        "a=fingerprint:sha-256 " + sdp.media[0].fingerprints[0].fingerprint,
        "a=setup:actpass",
    ]


def test_anchor_keep_ice_and_demux() -> None:
    sdp = SessionDescription.parse(crlf(CHROME))
    out = anchor(
        sdp, [RelayEndpoint(RELAY, 30000), RelayEndpoint(RELAY, 30002)], ice=IceMode.KEEP, rtcp_mux=RtcpMuxMode.DEMUX
    )
    assert out.media[0].candidates == sdp.media[0].candidates
    assert out.ice_options == ("trickle",)
    assert not out.media[0].rtcp_mux
    assert not out.media[1].rtcp_mux
    assert out.media[0].rtcp is not None
    assert out.media[0].rtcp.port == 30001
    assert out.media[1].attribute("rtcp") == "30003 IN IP4 203.0.113.50"


def test_anchor_offer_rtcp_mux_keeps_a_fallback_rtcp_port() -> None:
    out = anchor(SessionDescription.parse(crlf(PJSUA2)), [RelayEndpoint(RELAY, 30000)], rtcp_mux=RtcpMuxMode.OFFER)
    assert out.media[0].rtcp_mux
    assert out.media[0].attribute("rtcp") == "30001 IN IP4 203.0.113.50"
    assert lines(out)[-1] == "a=rtcp-mux"


def test_anchor_adds_a_rtcp_when_the_relay_port_is_not_rtp_plus_one() -> None:
    out = anchor(SessionDescription.parse(crlf(SIPP)), [RelayEndpoint(RELAY, 30000, 31000)])
    assert lines(out)[-1] == "a=rtcp:31000"
    assert endpoints_of(out)[0].rtcp_destination == (RELAY, 31000)


def test_anchor_refuses_endpoints_that_do_not_fit() -> None:
    sdp = SessionDescription.parse(crlf(SIPP))
    with pytest.raises(ValueError, match="2 relay endpoints for 1 media sections"):
        anchor(sdp, [RelayEndpoint(RELAY, 30000), None])
    with pytest.raises(ValueError, match="media section 0 is enabled but has no relay endpoint"):
        anchor(sdp, [None])
    with pytest.raises(ValueError, match="RTCP on the RTP port needs rtcp-mux"):
        anchor(sdp, [RelayEndpoint(RELAY, 30000, 30000)])
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        RelayEndpoint("relay.example", 30000)
    with pytest.raises(ValueError, match="relay RTCP port 65536 is out of range"):
        RelayEndpoint(RELAY, 65535)


def test_anchor_two_streams_one_disabled() -> None:
    sdp = SessionDescription.parse(crlf(TWO_STREAMS))
    out = anchor(sdp, [RelayEndpoint(RELAY, 30000), None])
    assert lines(out) == [
        "v=0",
        "o=bob 2808844564 2808844564 IN IP4 203.0.113.50",
        "s=call",
        "c=IN IP4 203.0.113.50",
        "t=0 0",
        "a=sendrecv",
        "m=audio 30000 RTP/SAVP 0 8",
        "c=IN IP4 203.0.113.50",
        "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
        "a=ptime:20",
        "m=video 0 RTP/AVP 31",
        "c=IN IP4 0.0.0.0",  # a disabled stream's own c= names nobody
    ]


def test_anchor_hold_sendonly_stays_hold() -> None:
    out = anchor(SessionDescription.parse(crlf(HOLD_SENDONLY)), [RelayEndpoint(RELAY, 30000)])
    (endpoint,) = endpoints_of(out)
    assert endpoint.direction is Direction.SENDONLY
    assert endpoint.on_hold
    assert endpoint.address == RELAY


def test_anchor_zero_address_hold_stays_zero_and_follows_relay_family() -> None:
    sdp = SessionDescription.parse(crlf(HOLD_ZERO))
    out = anchor(sdp, [RelayEndpoint(RELAY, 30000)])
    assert "c=IN IP4 0.0.0.0" in lines(out)
    assert "m=audio 30000 RTP/AVP 0" in lines(out)
    assert endpoints_of(out)[0].on_hold
    assert endpoints_of(out)[0].rtp_destination is None
    out6 = anchor(sdp, [RelayEndpoint("2001:db8::50", 30000)])
    assert "c=IN IP6 ::" in lines(out6)
    assert out6.origin.address == "2001:db8::50"
    assert out6.origin.addrtype == "IP6"


def test_anchor_ipv6_phone_behind_ipv4_relay() -> None:
    out = anchor(SessionDescription.parse(crlf(IPV6)), [RelayEndpoint(RELAY, 30000)])
    assert lines(out) == [
        "v=0",
        "o=alice 2890844526 2890844527 IN IP4 203.0.113.50",
        "s=-",
        "c=IN IP4 203.0.113.50",
        "t=0 0",
        "m=audio 30000 RTP/AVP 0",
        "a=rtcp:30001 IN IP4 203.0.113.50",
        "a=recvonly",
    ]


def test_anchor_forced_direction() -> None:
    sdp = SessionDescription.parse(crlf(PJSUA2))
    out = anchor(sdp, [RelayEndpoint(RELAY, 30000)], direction=Direction.INACTIVE)
    assert lines(out).count("a=inactive") == 1
    assert "a=sendrecv" not in lines(out)
    out = anchor(SessionDescription.parse(crlf(SIPP)), [RelayEndpoint(RELAY, 30000)], direction=Direction.SENDONLY)
    assert lines(out)[-1] == "a=sendonly"


def test_continue_session_bumps_the_version_only_on_change() -> None:
    sdp = SessionDescription.parse(crlf(SIPP))
    first = continue_session(anchor(sdp, [RelayEndpoint(RELAY, 30000)]), None)
    assert first.origin.session_version == 2353687637
    # a session refresh with the same body: same o= line (RFC 3264 8)
    again = continue_session(anchor(sdp, [RelayEndpoint(RELAY, 30000)]), first)
    assert again == first
    # the phone bumped its version but nothing changed on the leg: still the same
    bumped = SessionDescription.parse(crlf(SIPP.replace("2353687637", "2353687638")))
    assert continue_session(anchor(bumped, [RelayEndpoint(RELAY, 30000)]), first) == first
    # the relay moved (failover): version + 1, o= otherwise pinned to the first one sent
    moved = continue_session(anchor(sdp, [RelayEndpoint("198.51.100.7", 40000)]), first)
    assert moved.origin == Origin("user1", "53655765", 2353687638, "IN", "IP4", RELAY)
    assert moved.connection == Connection("IP4", "198.51.100.7")
    # hold: changed again
    held = anchor(SessionDescription.parse(crlf(HOLD_ZERO)), [RelayEndpoint("198.51.100.7", 40000)])
    assert continue_session(held, moved).origin.session_version == 2353687639


# --- properties -------------------------------------------------------------------------------

_safe_text = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"), min_size=1, max_size=12
)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)


def _connection_line(address: str) -> str:
    return f"c=IN {'IP4' if ipaddress.ip_address(address).version == 4 else 'IP6'} {address}"


@st.composite
def _attribute_lines(draw: st.DrawFn) -> list[str]:
    out = []
    if draw(st.booleans()):
        out.append("a=" + draw(st.sampled_from([d.value for d in Direction])))
    if draw(st.booleans()):
        out.append(f"a=rtcp:{draw(st.integers(1, 65535))}")
    if draw(st.booleans()):
        out.append("a=rtcp-mux")
    if draw(st.booleans()):
        out += ["a=ice-ufrag:" + draw(_safe_text), "a=ice-pwd:" + draw(_safe_text)]
        for _ in range(draw(st.integers(0, 3))):
            out.append(f"a=candidate:1 1 udp 2122260223 {draw(_ipv4)} {draw(st.integers(1, 65535))} typ host")
        if draw(st.booleans()):
            out.append("a=end-of-candidates")
    for _ in range(draw(st.integers(0, 3))):
        out.append(f"a={draw(st.sampled_from(['rtpmap', 'fmtp', 'x-foo', 'ssrc']))}:{draw(_safe_text)}")
    return out


@st.composite
def sdps(draw: st.DrawFn) -> bytes:
    session_address = draw(st.one_of(st.none(), _ipv4, _ipv6, st.just("0.0.0.0")))
    out = [
        "v=0",
        f"o={draw(_safe_text)} {draw(st.integers(0, 10**12))} {draw(st.integers(0, 10**12))} IN IP4 {draw(_ipv4)}",
    ]
    out += ["s=" + draw(_safe_text)]
    if session_address is not None:
        out.append(_connection_line(session_address))
    out.append("t=0 0")
    if draw(st.booleans()):
        out.append("a=ice-lite")
    if draw(st.booleans()):
        out.append("a=" + draw(st.sampled_from([d.value for d in Direction])))
    for _ in range(draw(st.integers(0, 4))):
        port = draw(st.one_of(st.just(0), st.integers(1, 65535)))
        proto = draw(st.sampled_from(["RTP/AVP", "RTP/SAVP", "RTP/SAVPF", "UDP/TLS/RTP/SAVPF"]))
        out.append(f"m={draw(st.sampled_from(['audio', 'video']))} {port} {proto} 0 8 101")
        own = draw(st.one_of(st.none(), _ipv4, _ipv6, st.just("0.0.0.0")))
        if own is None and session_address is None:
            own = draw(_ipv4)
        if own is not None:
            out.append(_connection_line(own))
        out += draw(_attribute_lines())
    return ("\r\n".join(out) + "\r\n").encode()


@given(sdps())
def test_property_round_trip(body: bytes) -> None:
    sdp = SessionDescription.parse(body)
    assert sdp.to_bytes() == body
    assert SessionDescription.parse(sdp.to_bytes()) == sdp
    assert len(endpoints_of(sdp)) == len(sdp.media)


_relay_endpoints = st.builds(
    RelayEndpoint, st.one_of(_ipv4, _ipv6), st.integers(1, 32767).map(lambda n: n * 2), st.none()
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    sdps(),
    st.data(),
    st.booleans(),
    st.booleans(),
    st.sampled_from(IceMode),
    st.sampled_from(RtcpMuxMode),
    st.one_of(st.none(), st.sampled_from(Direction)),
)
def test_property_anchor_leaves_only_relay_addresses(
    body: bytes,
    data: st.DataObject,
    replace_origin: bool,
    replace_session_connection: bool,
    ice: IceMode,
    rtcp_mux: RtcpMuxMode,
    direction: Direction | None,
) -> None:
    sdp = SessionDescription.parse(body)
    relays = [data.draw(_relay_endpoints) for _ in sdp.media]
    out = anchor(
        sdp,
        relays,
        replace_origin=replace_origin,
        replace_session_connection=replace_session_connection,
        ice=ice,
        rtcp_mux=rtcp_mux,
        direction=direction,
    )
    assert SessionDescription.parse(out.to_bytes()) == out
    assert len(out.media) == len(sdp.media)
    for index, (before, after, relay, endpoint) in enumerate(
        zip(sdp.media, out.media, relays, endpoints_of(out), strict=True)
    ):
        if before.disabled:  # copied, its own c= naming nobody
            assert after.line == before.line
            assert [t for t in after.lines if t[0] != "c"] == [t for t in before.lines if t[0] != "c"]
            assert after.connection is None or after.connection.unspecified
            continue
        connection = out.connection_of(index)
        assert connection is not None
        held = sdp.connection_of(index).unspecified  # type: ignore[union-attr]
        assert connection.address == (("0.0.0.0" if ":" not in relay.address else "::") if held else relay.address)
        assert endpoint.rtp_port == relay.rtp_port
        if endpoint.receives:
            assert endpoint.rtp_destination == (relay.address, relay.rtp_port)
            assert endpoint.rtcp_destination in (None, (relay.address, relay.rtp_port + 1))
        assert (
            after.rtcp_mux
            == {RtcpMuxMode.KEEP: before.rtcp_mux, RtcpMuxMode.OFFER: True, RtcpMuxMode.DEMUX: False}[rtcp_mux]
        )
        if ice is IceMode.REMOVE:
            assert not any(a.name in ICE_ATTRIBUTES for a in after.attributes)
        if direction is not None:
            assert out.direction_of(index) is direction
        else:
            assert out.direction_of(index) is sdp.direction_of(index)
    if ice is IceMode.REMOVE:
        assert not any(a.name in ICE_ATTRIBUTES for a in out.attributes)
    relayed = [r for m, r in zip(sdp.media, relays, strict=True) if not m.disabled]
    if replace_session_connection and relayed and sdp.connection is not None:
        assert out.connection is not None
        assert out.connection.address in (relayed[0].address, "0.0.0.0", "::")
    if replace_origin and any(not m.disabled for m in sdp.media):
        assert out.origin.address == next(r.address for m, r in zip(sdp.media, relays, strict=True) if not m.disabled)
    assert out.origin.session_version == sdp.origin.session_version


@given(st.binary(max_size=2048))
def test_property_random_bytes_parse_or_raise_sdp_error(body: bytes) -> None:
    try:
        SessionDescription.parse(body)
    except SdpError:
        pass


_sdp_alphabet = st.sampled_from(list("vocmats=IPN4 6:/.0123456789\r\n-aAbeiuxy\x00\xff"))


@given(st.lists(st.one_of(_sdp_alphabet, st.sampled_from(["v=0\r\n", "o=- 1 1 IN IP4 1.2.3.4\r\n", "c=IN IP4 "]))))
def test_property_sdp_like_text_parses_or_raises_sdp_error(parts: list[str]) -> None:
    try:
        sdp = SessionDescription.parse("".join(parts).encode("latin-1"))
    except SdpError:
        return
    assert SessionDescription.parse(sdp.to_bytes()) == sdp
    endpoints_of(sdp)


@given(sdps(), st.data())
def test_property_mutated_sdp_parses_or_raises_sdp_error(body: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(body)))
    insert = data.draw(st.binary(max_size=8))
    cut = data.draw(st.integers(0, 8))
    mutated = body[:position] + insert + body[position + cut :]
    try:
        sdp = SessionDescription.parse(mutated)
    except SdpError:
        return
    assert SessionDescription.parse(sdp.to_bytes()) == sdp
    relays = [RelayEndpoint(RELAY, 30000, 30000 if m.rtcp_mux else None) for m in sdp.media]
    anchor(sdp, relays)


# --- encrypted media: what the relay must refuse ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (CHROME, "UDP/TLS/RTP/SAVPF"),
        (TWO_STREAMS, "RTP/SAVP"),
        (PJSUA2, None),
        (BARESIP, None),
        (SIPP, None),
        (HOLD_ZERO, None),
        # keys on a plain profile: the profile decides (anchor drops them)
        (PJSUA2.replace("a=sendrecv", "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40), None),
    ],
)  # fmt: skip
def test_secure_media_names_what_asks_for_srtp_or_dtls(text: str, why: str | None) -> None:
    assert secure_media(SessionDescription.parse(crlf(text))) == why


def test_an_offer_with_every_stream_disabled_shows_no_address_of_its_party() -> None:
    """Red team (2026-12-03): an all-port-0 offer went on with the caller's c= and o= addresses."""
    sdp = SessionDescription.parse(
        crlf("v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\nm=audio 0 RTP/AVP 0\nc=IN IP4 10.0.0.9\n")
    )
    out = anchor(sdp, [None]).to_bytes()
    assert b"10.0.0." not in out
    assert b"o=- 1 1 IN IP4 0.0.0.0" in out and b"m=audio 0 RTP/AVP 0" in out


def test_keys_on_a_plain_stream_are_dropped_when_anchored_and_a_disabled_secure_stream_does_not_count() -> None:
    """Red team (2026-12-03): one made-up ``a=fingerprint`` on a plain RTP/AVP offer kept a call's
    media off the relay (both parties' addresses end to end).  The profile decides; a plain
    stream is anchored and its keys and fingerprints (session- or media-level) are dropped."""
    fingerprint = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
    crypto = "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40
    plain = "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=-\nc=IN IP4 10.0.0.1\nt=0 0\n"
    audio = "m=audio 4000 RTP/AVP 0\n"
    offer = SessionDescription.parse(crlf(plain + fingerprint + "\n" + audio + crypto + "\na=tls-id:abc\n"))
    assert secure_media(offer) is None
    out = anchor(offer, [RelayEndpoint("203.0.113.1", 30000)]).to_bytes()
    assert b"fingerprint" not in out and b"crypto" not in out and b"tls-id" not in out
    assert b"m=audio 30000 RTP/AVP 0" in out
    disabled = plain + audio + "m=video 0 UDP/TLS/RTP/SAVPF 96\n"
    assert secure_media(SessionDescription.parse(crlf(disabled))) is None
