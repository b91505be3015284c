"""RFC 3261 17 transactions: every timer on an injected clock, matching, absorption, two layers
talking in memory, and Hypothesis walks over the transition tables."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipfarm.sip.address import Address
from sipfarm.sip.errors import ServiceUnavailable
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.parser import parse_message
from sipfarm.sip.transaction import (
    MACHINES,
    RELEASED,
    AckFor2xx,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ClientTransaction,
    Event,
    InvalidTransition,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    StrayResponse,
    TimerConfig,
    Transaction,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
    TxInput,
    TxState,
    new_branch,
)

UAC = Address("udp", "10.0.0.1", 5060)
UAS = Address("udp", "10.0.0.2", 5060)
UAC_TCP = Address("tcp", "10.0.0.1", 40000)
UAS_TCP = Address("tcp", "10.0.0.2", 5060)


def request(
    method: str = "INVITE",
    *,
    branch: str | None = "z9hG4bKaaa1",
    cseq: int = 1,
    via: str = "SIP/2.0/UDP 10.0.0.1:5060",
    call_id: str = "call-1",
    to_tag: str | None = None,
    uri: str = "sip:bob@example.com",
    routes: Iterable[str] = (),
) -> SipMessage:
    via_line = via + (f";branch={branch}" if branch is not None else "")
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: {via_line}",
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=from1",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *(f"Route: {r}" for r in routes),
        "Content-Length: 0",
        "",
        "",
    ]
    return parse_message("\r\n".join(lines).encode())


def response(req: SipMessage, status: int, to_tag: bytes = b"to1") -> SipMessage:
    """A response as it arrives from the network (serialized and parsed again)."""
    return parse_message(make_response(req, status, to_tag=to_tag).to_bytes())


def run_timers(layer: TransactionLayer, until: float) -> list[tuple[float, bytes]]:
    """Advance the injected clock to ``until`` deadline by deadline; what was sent, and when."""
    sent: list[tuple[float, bytes]] = []
    while (deadline := layer.next_deadline()) is not None and deadline <= until:
        layer.handle_timer(deadline)
        sent.extend((deadline, data) for data, _ in layer.datagrams_to_send())
    return sent


def times(sent: list[tuple[float, bytes]]) -> list[float]:
    return [t for t, _ in sent]


def kinds(events: list[Event]) -> list[type]:
    return [type(e) for e in events]


def drain(layer: TransactionLayer) -> None:
    layer.datagrams_to_send()
    layer.events()


# --- TimerConfig ------------------------------------------------------------------------------


def test_timer_config_defaults_follow_rfc_3261_table_4() -> None:
    cfg = TimerConfig()
    assert (cfg.t1, cfg.t2, cfg.t4) == (0.5, 4.0, 5.0)
    for timer in (TxInput.TIMER_B, TxInput.TIMER_F, TxInput.TIMER_H, TxInput.TIMER_L, TxInput.TIMER_M):
        assert cfg.duration(timer, reliable=False) == 32.0
        assert cfg.duration(timer, reliable=True) == 32.0
    assert cfg.duration(TxInput.TIMER_D, reliable=False) == 32.0
    assert cfg.duration(TxInput.TIMER_J, reliable=False) == 32.0
    assert cfg.duration(TxInput.TIMER_I, reliable=False) == 5.0
    assert cfg.duration(TxInput.TIMER_K, reliable=False) == 5.0
    for timer in (TxInput.TIMER_D, TxInput.TIMER_I, TxInput.TIMER_J, TxInput.TIMER_K):
        assert cfg.duration(timer, reliable=True) == 0.0
    for timer in (TxInput.TIMER_A, TxInput.TIMER_E, TxInput.TIMER_G):
        assert cfg.duration(timer, reliable=False) == 0.5
        assert cfg.duration(timer, reliable=True) is None
    assert TimerConfig(t1=0.1).duration(TxInput.TIMER_B, reliable=False) == pytest.approx(6.4)


def test_timer_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="t1"):
        TimerConfig(t1=0)
    with pytest.raises(ValueError, match="t2"):
        TimerConfig(t1=5, t2=4)
    for trying in (-0.1, 0.25):
        with pytest.raises(ValueError, match="trying"):
            TimerConfig(trying=trying)
    assert TimerConfig().duration(TxInput.TIMER_TRYING, reliable=False) is None  # 100 at once
    assert TimerConfig(trying=0.2).duration(TxInput.TIMER_TRYING, reliable=True) == 0.2


# --- client INVITE: Timers A, B, D, M ---------------------------------------------------------


def test_timer_a_doubles_without_cap_until_timer_b_times_out() -> None:
    layer = TransactionLayer()
    tx = layer.start_client(request(), UAS, 0.0)
    assert isinstance(tx, ClientInviteTransaction)
    assert tx.state is TxState.CALLING
    assert len(layer.datagrams_to_send()) == 1
    sent = run_timers(layer, 100.0)
    # RFC 3261 17.1.1.2: T1, 2*T1, 4*T1 ... until Timer B (64*T1) fires
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(data == tx.request.to_bytes() for _, data in sent)
    assert kinds(layer.events()) == [TransactionTimeout, TransactionTerminated]
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert layer.next_deadline() is None


def test_provisional_stops_timer_a_and_b() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.start_client(req, UAS, 0.0)
    drain(layer)
    assert layer.receive_response(response(req, 100), UAS, 0.2) is tx
    assert tx.state is TxState.PROCEEDING
    assert layer.receive_response(response(req, 180), UAS, 0.3) is tx  # every 1xx goes up
    assert tx.last_response is not None and tx.last_response.status == 180
    assert run_timers(layer, 1000.0) == []
    assert layer.events() == []
    assert tx.state is TxState.PROCEEDING  # only the TU (Timer C, CANCEL) ends it now


def test_non_2xx_final_is_acked_with_rfc_headers_and_timer_d() -> None:
    layer = TransactionLayer()
    req = request(routes=["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"])
    tx = layer.start_client(req, UAS, 0.0)
    drain(layer)
    final = response(req, 486, to_tag=b"callee")
    assert layer.receive_response(final, UAS, 1.0) is tx
    assert tx.state is TxState.COMPLETED
    ((ack_bytes, dest),) = layer.datagrams_to_send()
    assert dest == UAS
    ack = parse_message(ack_bytes)
    # RFC 3261 17.1.1.3
    assert ack.method == b"ACK"
    assert ack.uri == req.uri
    assert ack.get_all("via") == [req.top_via_value]
    assert ack.top_via.branch == "z9hG4bKaaa1"
    assert ack.to_tag == b"callee"
    assert ack.from_tag == req.from_tag
    assert ack.call_id == req.call_id
    assert ack.cseq == (1, b"ACK")
    assert ack.values("route") == [b"<sip:p1.example.com;lr>", b"<sip:p2.example.com;lr>"]
    # retransmitted final: absorbed, ACK re-sent
    assert layer.receive_response(final, UAS, 2.0) is None
    assert layer.datagrams_to_send() == [(ack_bytes, UAS)]
    assert layer.stats.responses_absorbed == 1
    # Timer D: 32 s after entering Completed; no Timer A retransmission in between
    assert run_timers(layer, 32.9) == []
    assert tx.state is TxState.COMPLETED
    run_timers(layer, 33.0)
    assert tx.state is TxState.TERMINATED
    assert kinds(layer.events()) == [TransactionTerminated]
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_timer_d_is_zero_over_reliable_transport() -> None:
    layer = TransactionLayer()
    req = request(via="SIP/2.0/TCP 10.0.0.1:40000")
    tx = layer.start_client(req, UAS_TCP, 0.0)
    assert layer.receive_response(response(req, 503), UAS_TCP, 1.0) is tx
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0
    sent = layer.datagrams_to_send()
    assert [parse_message(d).method for d, _ in sent] == [b"INVITE", b"ACK"]


def test_2xx_goes_to_tu_and_retransmissions_too_in_accepted_until_timer_m() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.start_client(req, UAS, 0.0)
    drain(layer)
    ok = response(req, 200)
    assert layer.receive_response(ok, UAS, 1.0) is tx
    assert tx.state is TxState.ACCEPTED
    assert layer.datagrams_to_send() == []  # the ACK for a 2xx is the TU's business
    # RFC 6026 8.4: 2xx retransmissions and 2xx from other forks go up too
    assert layer.receive_response(ok, UAS, 2.0) is tx
    assert layer.receive_response(response(req, 200, to_tag=b"fork2"), UAS, 2.5) is tx
    assert layer.receive_response(response(req, 180), UAS, 3.0) is None
    assert run_timers(layer, 32.9) == []  # no Timer A in Accepted
    assert tx.state is TxState.ACCEPTED
    run_timers(layer, 33.0)  # Timer M = 64*T1
    assert tx.state is TxState.TERMINATED
    assert kinds(layer.events()) == [TransactionTerminated]
    # after Timer M, a 2xx is stray
    assert layer.receive_response(ok, UAS, 40.0) is None
    assert kinds(layer.events()) == [StrayResponse]


# --- client non-INVITE: Timers E, F, K --------------------------------------------------------


def test_timer_e_doubles_capped_at_t2_until_timer_f() -> None:
    layer = TransactionLayer()
    tx = layer.start_client(request("OPTIONS"), UAS, 0.0)
    assert isinstance(tx, ClientNonInviteTransaction)
    assert tx.state is TxState.TRYING
    drain(layer)
    sent = run_timers(layer, 100.0)
    # RFC 3261 17.1.2.2: min(2^n * T1, T2), Timer F = 64*T1
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert kinds(layer.events()) == [TransactionTimeout, TransactionTerminated]
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_timer_e_fires_every_t2_in_proceeding() -> None:
    layer = TransactionLayer()
    req = request("REGISTER")
    tx = layer.start_client(req, UAS, 0.0)
    drain(layer)
    assert run_timers(layer, 0.6) == [(0.5, tx.request.to_bytes())]
    assert layer.receive_response(response(req, 100), UAS, 0.7) is tx
    assert tx.state is TxState.PROCEEDING
    # the pending E (due 1.5) fires, then every T2
    assert times(run_timers(layer, 20.0)) == [1.5, 5.5, 9.5, 13.5, 17.5]
    assert kinds(run_timers(layer, 40.0) and layer.events()) == [TransactionTimeout, TransactionTerminated]


def test_timer_k_absorbs_response_retransmissions() -> None:
    layer = TransactionLayer()
    req = request("BYE")
    tx = layer.start_client(req, UAS, 0.0)
    drain(layer)
    ok = response(req, 200)
    assert layer.receive_response(ok, UAS, 1.0) is tx
    assert tx.state is TxState.COMPLETED
    assert layer.receive_response(ok, UAS, 2.0) is None
    assert layer.datagrams_to_send() == []
    assert run_timers(layer, 5.9) == []  # no Timer E in Completed
    assert tx.state is TxState.COMPLETED
    run_timers(layer, 6.0)  # Timer K = T4
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_timer_k_is_zero_over_reliable_transport() -> None:
    layer = TransactionLayer()
    req = request("BYE", via="SIP/2.0/TCP 10.0.0.1:40000")
    tx = layer.start_client(req, UAS_TCP, 0.0)
    assert layer.receive_response(response(req, 404), UAS_TCP, 1.0) is tx
    assert tx.state is TxState.TERMINATED
    assert kinds(layer.events()) == [TransactionTerminated]


def test_reliable_transport_skips_retransmissions_but_keeps_timeouts() -> None:
    layer = TransactionLayer()
    layer.start_client(request(via="SIP/2.0/TCP 10.0.0.1:40000"), UAS_TCP, 0.0)
    layer.start_client(request("OPTIONS", via="SIP/2.0/TCP 10.0.0.1:40000"), UAS_TCP, 0.0)
    assert len(layer.datagrams_to_send()) == 2
    assert run_timers(layer, 100.0) == []
    assert kinds(layer.events()) == [TransactionTimeout, TransactionTerminated] * 2
    assert len(layer) == 0 and layer.retained_bytes == 0


# --- server INVITE: Timers G, H, I, L ---------------------------------------------------------


def test_server_invite_sends_100_and_absorbs_retransmissions() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert isinstance(tx, ServerInviteTransaction)
    assert tx.state is TxState.PROCEEDING
    ((trying, dest),) = layer.datagrams_to_send()
    assert parse_message(trying).status == 100
    assert dest == UAC
    assert layer.receive_request(request(), UAC, 0.3) is None
    assert layer.datagrams_to_send() == [(trying, UAC)]
    layer.send_response(tx, make_response(req, 180, to_tag=b"t"), 0.4)
    ((ringing, _),) = layer.datagrams_to_send()
    assert layer.receive_request(request(), UAC, 0.5) is None
    assert layer.datagrams_to_send() == [(ringing, UAC)]  # the last provisional is re-sent
    assert layer.stats.requests_absorbed == 2


def test_send_trying_can_be_turned_off() -> None:
    layer = TransactionLayer(send_trying=False)
    assert layer.receive_request(request(), UAC, 0.0) is not None
    assert layer.receive_request(request(), UAC, 0.5) is None
    assert layer.datagrams_to_send() == []


def test_a_deferred_100_is_not_sent_when_the_tu_answers_first() -> None:
    # RFC 3261 17.2.1: no 100 Trying is needed when the TU answers within 200 ms
    layer = TransactionLayer(timers=TimerConfig(trying=0.05))
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None and layer.datagrams_to_send() == []
    layer.send_response(tx, make_response(req, 180, to_tag=b"t"), 0.01)
    ((ringing, _),) = layer.datagrams_to_send()
    assert run_timers(layer, 0.4) == []  # the timer finds a response sent: nothing
    assert layer.receive_request(request(), UAC, 0.5) is None
    assert layer.datagrams_to_send() == [(ringing, UAC)]


def test_a_deferred_100_goes_when_the_tu_is_silent() -> None:
    for src, via in ((UAC, "SIP/2.0/UDP 10.0.0.1:5060"), (UAC_TCP, "SIP/2.0/TCP 10.0.0.1:40000")):
        layer = TransactionLayer(timers=TimerConfig(trying=0.05))
        req = request(via=via)
        tx = layer.receive_request(req, src, 0.0)
        assert tx is not None and layer.datagrams_to_send() == []
        ((when, trying),) = run_timers(layer, 1.0)
        assert when == pytest.approx(0.05) and parse_message(trying).status == 100
        assert layer.next_deadline() is None  # nothing else armed while the TU works
        layer.send_response(tx, make_response(req, 486, to_tag=b"t"), 1.0)
        assert parse_message(layer.datagrams_to_send()[0][0]).status == 486


def test_a_retransmission_gets_the_deferred_100_at_once_and_only_once() -> None:
    layer = TransactionLayer(timers=TimerConfig(trying=0.2))
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None and layer.datagrams_to_send() == []
    assert layer.receive_request(request(), UAC, 0.1) is None
    ((trying, dest),) = layer.datagrams_to_send()
    assert parse_message(trying).status == 100 and dest == UAC
    assert run_timers(layer, 0.3) == []  # the timer does not send it again
    assert layer.receive_request(request(), UAC, 0.35) is None
    assert layer.datagrams_to_send() == [(trying, UAC)]


def test_a_final_answer_disarms_the_deferred_100() -> None:
    layer = TransactionLayer(timers=TimerConfig(trying=0.05))
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    layer.send_response(tx, make_response(req, 200, to_tag=b"t"), 0.01)
    drain(layer)
    assert TxInput.TIMER_TRYING not in tx._timers
    assert all(parse_message(data).status != 100 for _, data in run_timers(layer, 40.0))


def test_the_100_timer_is_for_invite_only() -> None:
    layer = TransactionLayer(timers=TimerConfig(trying=0.05))
    tx = layer.receive_request(request("OPTIONS"), UAC, 0.0)
    assert tx is not None and tx._timers == {} and layer.next_deadline() is None


def test_timer_g_capped_at_t2_then_timer_h_reports_missing_ack() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    drain(layer)
    layer.send_response(tx, make_response(req, 404, to_tag=b"t"), 0.0)
    ((busy, _),) = layer.datagrams_to_send()
    assert tx.state is TxState.COMPLETED
    sent = run_timers(layer, 100.0)
    # RFC 3261 17.2.1: G = min(2^n * T1, T2); H = 64*T1
    assert times(sent) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert all(data == busy for _, data in sent)
    assert kinds(layer.events()) == [TransactionTimeout, TransactionTerminated]
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_a_final_with_no_provisional_before_it_is_resent_only_for_the_clients_retransmissions() -> None:
    """An INVITE the TU refuses before its 100 Trying went (``trying=False``, then
    ``start_trying``): the client got no provisional, so it still resends its INVITE (Timer A)
    and each copy gets the final again; Timer G sends no copies of its own (to a source anyone
    can forge), and Timer H still ends the transaction."""
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0, trying=False)
    assert tx is not None and layer.datagrams_to_send() == []
    layer.send_response(tx, make_response(req, 404, to_tag=b"t"), 0.0)
    layer.start_trying(tx, 0.0)  # answered already: no 100
    ((final, _),) = layer.datagrams_to_send()
    assert run_timers(layer, 0.9) == []  # no Timer G
    assert layer.receive_request(request(), UAC, 1.0) is None  # the client's Timer A copy
    assert layer.datagrams_to_send() == [(final, UAC)]
    assert run_timers(layer, 100.0) == []
    assert kinds(layer.events()) == [TransactionTimeout, TransactionTerminated]
    assert len(layer) == 0


def test_start_trying_sends_the_100_and_then_a_final_is_resent_by_timer_g() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0, trying=False)
    assert tx is not None
    layer.start_trying(tx, 0.0)
    ((trying, _),) = layer.datagrams_to_send()
    assert parse_message(trying).status == 100
    layer.send_response(tx, make_response(req, 486, to_tag=b"t"), 0.1)
    drain(layer)
    assert times(run_timers(layer, 4.0)) == [0.6, 1.6, 3.6]  # the client stopped resending: G


def test_ack_confirms_then_timer_i_terminates() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    layer.send_response(tx, make_response(req, 486, to_tag=b"t"), 0.0)
    run_timers(layer, 1.0)  # G at 0.5
    drain(layer)
    ack = request("ACK", to_tag="t")
    assert layer.receive_request(ack, UAC, 1.2) is None
    assert tx.state is TxState.CONFIRMED
    assert layer.events() == []  # the ACK of a non-2xx belongs to the transaction
    assert layer.receive_request(ack, UAC, 2.0) is None  # absorbed in Confirmed
    assert layer.receive_request(request(), UAC, 2.1) is None  # late INVITE too
    assert run_timers(layer, 6.1) == []  # no G in Confirmed
    assert tx.state is TxState.CONFIRMED
    run_timers(layer, 6.2)  # Timer I = T4 after the ACK
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_reliable_server_invite_has_no_timer_g_and_zero_timer_i() -> None:
    layer = TransactionLayer()
    req = request(via="SIP/2.0/TCP 10.0.0.1:40000")
    tx = layer.receive_request(req, UAC_TCP, 0.0)
    assert tx is not None
    layer.send_response(tx, make_response(req, 486, to_tag=b"t"), 0.0)
    drain(layer)
    assert layer.next_deadline() == 32.0  # only Timer H
    assert layer.receive_request(request("ACK", via="SIP/2.0/TCP 10.0.0.1:40000"), UAC_TCP, 1.0) is None
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert run_timers(layer, 100.0) == []


def test_server_invite_accepted_absorbs_invite_and_passes_ack_until_timer_l() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    drain(layer)
    ok = make_response(req, 200, to_tag=b"t")
    layer.send_response(tx, ok, 1.0)
    assert tx.state is TxState.ACCEPTED
    assert layer.datagrams_to_send() == [(ok.to_bytes(), UAC)]
    # RFC 6026 7.1: INVITE retransmissions absorbed without an answer (the TU retransmits 2xx)
    assert layer.receive_request(request(), UAC, 1.5) is None
    assert layer.datagrams_to_send() == []
    layer.send_response(tx, ok, 1.5)
    assert layer.datagrams_to_send() == [(ok.to_bytes(), UAC)]
    # an ACK with the INVITE's branch is passed up; one with its own branch has no transaction
    same = request("ACK", to_tag="t")
    own = request("ACK", to_tag="t", branch="z9hG4bKack2")
    assert layer.receive_request(same, UAC, 2.0) is None
    assert layer.receive_request(own, UAC, 2.0) is None
    assert layer.events() == [AckFor2xx(same, UAC), AckFor2xx(own, UAC)]
    assert run_timers(layer, 32.9) == []
    run_timers(layer, 33.0)  # Timer L = 64*T1 after the 2xx
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0


# --- server non-INVITE: Timer J ---------------------------------------------------------------


def test_server_non_invite_trying_discards_then_final_resent_until_timer_j() -> None:
    layer = TransactionLayer()
    req = request("REGISTER", branch="z9hG4bKreg")
    tx = layer.receive_request(req, UAC, 0.0)
    assert isinstance(tx, ServerNonInviteTransaction)
    assert layer.datagrams_to_send() == []  # no automatic 100 for non-INVITE
    assert layer.receive_request(request("REGISTER", branch="z9hG4bKreg"), UAC, 0.5) is None
    assert layer.datagrams_to_send() == []  # Trying: retransmission discarded
    ok = make_response(req, 200, to_tag=b"t")
    layer.send_response(tx, ok, 1.0)
    assert tx.state is TxState.COMPLETED
    drain(layer)
    assert layer.receive_request(request("REGISTER", branch="z9hG4bKreg"), UAC, 2.0) is None
    assert layer.datagrams_to_send() == [(ok.to_bytes(), UAC)]
    layer.send_response(tx, make_response(req, 500), 2.5)  # other finals discarded
    assert layer.datagrams_to_send() == []
    run_timers(layer, 32.9)
    assert tx.state is TxState.COMPLETED
    run_timers(layer, 33.0)  # Timer J = 64*T1
    assert tx.state is TxState.TERMINATED
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_timer_j_is_zero_over_reliable_transport() -> None:
    layer = TransactionLayer()
    req = request("OPTIONS", via="SIP/2.0/TCP 10.0.0.1:40000")
    tx = layer.receive_request(req, UAC_TCP, 0.0)
    assert tx is not None
    layer.send_response(tx, make_response(req, 200, to_tag=b"t"), 0.0)
    assert tx.state is TxState.TERMINATED
    assert len(layer.datagrams_to_send()) == 1
    assert kinds(layer.events()) == [TransactionTerminated]
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_non_invite_provisional_then_request_retransmission_resends_it() -> None:
    layer = TransactionLayer()
    req = request("SUBSCRIBE")
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    trying = make_response(req, 100)
    layer.send_response(tx, trying, 0.1)
    assert tx.state is TxState.PROCEEDING
    drain(layer)
    assert layer.receive_request(request("SUBSCRIBE"), UAC, 0.5) is None
    assert layer.datagrams_to_send() == [(trying.to_bytes(), UAC)]


# --- matching ---------------------------------------------------------------------------------


def test_matching_uses_branch_sent_by_and_method() -> None:
    layer = TransactionLayer()
    invite = layer.receive_request(request(), UAC, 0.0)
    assert invite is not None
    # same branch, other sent-by: another transaction (RFC 3261 17.2.3)
    other = layer.receive_request(request(via="SIP/2.0/UDP 10.9.9.9:5060"), UAC, 0.0)
    assert other is not None and other is not invite
    # same branch and sent-by, method CANCEL: its own transaction
    cancel = layer.receive_request(request("CANCEL"), UAC, 0.0)
    assert isinstance(cancel, ServerNonInviteTransaction)
    assert len(layer) == 3
    # sent-by is case-insensitive; LWS inside the Via is handled by the slow path
    assert layer.receive_request(request(via="SIP/2.0/UDP 10.9.9.9:5060".upper()), UAC, 0.1) is None
    odd = layer.receive_request(request(via="SIP / 2.0 / UDP 10.7.7.7 : 5070"), UAC, 0.0)
    assert odd is not None
    assert layer.receive_request(request(via="SIP/2.0/UDP 10.7.7.7:5070"), UAC, 0.1) is None


def test_cancel_finds_its_invite() -> None:
    layer = TransactionLayer()
    invite = layer.receive_request(request(), UAC, 0.0)
    assert invite is not None
    cancel = request("CANCEL")
    assert layer.find_invite_for_cancel(cancel) is invite
    assert layer.find_invite_for_cancel(request("CANCEL", branch="z9hG4bKother")) is None
    assert layer.find_invite_for_cancel(request("CANCEL", via="SIP/2.0/UDP 10.9.9.9")) is None
    # a CANCEL only ever cancels an INVITE
    layer.receive_request(request("OPTIONS", branch="z9hG4bKopt"), UAC, 0.0)
    assert layer.find_invite_for_cancel(request("CANCEL", branch="z9hG4bKopt")) is None


def test_rfc_2543_fallback_matching() -> None:
    layer = TransactionLayer()
    req = request(branch=None)  # no branch at all
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    drain(layer)
    assert layer.receive_request(request(branch=None), UAC, 0.2) is None  # retransmission
    assert len(layer.datagrams_to_send()) == 1
    # any of Request-URI, Call-ID, CSeq, top Via differing: a new transaction
    assert layer.receive_request(request(branch=None, cseq=2), UAC, 0.3) is not None
    assert layer.receive_request(request(branch=None, call_id="other"), UAC, 0.3) is not None
    assert layer.receive_request(request(branch=None, uri="sip:carol@example.com"), UAC, 0.3) is not None
    assert layer.receive_request(request(branch="1234"), UAC, 0.3) is not None  # branch w/o cookie
    # CANCEL matched the RFC 2543 way
    assert layer.find_invite_for_cancel(request("CANCEL", branch=None)) is tx
    # ACK: matches when its To tag is the tag of the response the transaction sent
    layer.send_response(tx, make_response(req, 486, to_tag=b"callee"), 1.0)
    drain(layer)
    assert layer.receive_request(request("ACK", branch=None, to_tag="wrong"), UAC, 1.1) is None
    assert kinds(layer.events()) == [AckFor2xx]
    assert tx.state is TxState.COMPLETED
    assert layer.receive_request(request("ACK", branch=None, to_tag="callee"), UAC, 1.2) is None
    assert tx.state is TxState.CONFIRMED
    assert layer.events() == []


def test_rfc_2543_reinvite_ack_matches_with_dialog_tag() -> None:
    layer = TransactionLayer()
    req = request(branch=None, to_tag="dlg", cseq=5)
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    layer.send_response(tx, make_response(req, 488), 0.1)
    assert layer.receive_request(request("ACK", branch=None, to_tag="dlg", cseq=5), UAC, 0.2) is None
    assert tx.state is TxState.CONFIRMED


def test_stray_response_is_reported_not_raised() -> None:
    layer = TransactionLayer()
    stray = response(request(branch="z9hG4bKnobody"), 200)
    assert layer.receive_response(stray, UAS, 0.0) is None
    assert layer.events() == [StrayResponse(stray, UAS)]
    assert layer.stats.stray_responses == 1
    # the CSeq method is part of the client key: a CANCEL's 200 does not hit the INVITE
    req = request()
    layer.start_client(req, UAS, 0.0)
    assert layer.receive_response(response(request("CANCEL"), 200), UAS, 0.1) is None
    assert kinds(layer.events()) == [StrayResponse]


def test_client_cancel_shares_the_invite_branch_but_not_its_transaction() -> None:
    layer = TransactionLayer()
    invite = request()
    inv_tx = layer.start_client(invite, UAS, 0.0)
    layer.receive_response(response(invite, 180), UAS, 0.1)
    cancel = request("CANCEL")
    cancel_tx = layer.start_client(cancel, UAS, 0.2)
    assert isinstance(cancel_tx, ClientNonInviteTransaction)
    assert layer.receive_response(response(cancel, 200), UAS, 0.3) is cancel_tx
    assert layer.receive_response(response(invite, 487), UAS, 0.4) is inv_tx
    assert (inv_tx.state, cancel_tx.state) == (TxState.COMPLETED, TxState.COMPLETED)


def test_start_client_reads_cseq_of_a_built_request() -> None:
    layer = TransactionLayer()
    built = SipMessage.request(
        "OPTIONS",
        "sip:bob@example.com",
        [
            ("via", "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKbuilt"),
            ("from", "<sip:alice@example.com>;tag=a"),
            ("to", "<sip:bob@example.com>"),
            ("call-id", "built-1"),
            ("cseq", "7 OPTIONS"),
        ],
    )
    tx = layer.start_client(built, UAS, 0.0)
    assert tx.request.cseq == (7, b"OPTIONS")
    assert layer.receive_response(response(parse_message(built.to_bytes()), 200), UAS, 0.1) is tx


def test_unmatched_ack_is_reported_for_stateless_forwarding() -> None:
    layer = TransactionLayer()
    ack = request("ACK", to_tag="x", branch="z9hG4bKack")
    assert layer.receive_request(ack, UAC, 0.0) is None
    assert layer.events() == [AckFor2xx(ack, UAC)]
    assert len(layer) == 0 and layer.retained_bytes == 0


# --- TU misuse, transport errors, limits ------------------------------------------------------


def test_invalid_tu_input_raises_and_terminates() -> None:
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    layer.send_response(tx, make_response(req, 486, to_tag=b"t"), 0.0)
    drain(layer)
    with pytest.raises(InvalidTransition) as info:
        layer.send_response(tx, make_response(req, 180, to_tag=b"t"), 0.1)
    assert info.value.state is TxState.COMPLETED
    assert info.value.input is TxInput.SEND_1XX
    assert tx.state is TxState.TERMINATED
    assert kinds(layer.events()) == [TransactionTerminated]
    assert len(layer) == 0 and layer.retained_bytes == 0
    with pytest.raises(InvalidTransition):
        layer.send_response(tx, make_response(req, 500), 0.2)
    assert run_timers(layer, 100.0) == []  # its timers died with it


def test_transport_error_is_reported() -> None:
    layer = TransactionLayer()
    tx = layer.start_client(request(), UAS, 0.0)
    layer.start_client(request("OPTIONS", branch="z9hG4bKo"), UAS, 0.0)
    layer.start_client(request("OPTIONS", branch="z9hG4bKp"), UAC, 0.0)
    drain(layer)
    layer.transport_error(tx, 0.1)
    assert layer.events() == [TransportFailure(tx), TransactionTerminated(tx)]
    layer.transport_error(UAS, 0.2)  # everything towards that address
    assert kinds(layer.events()) == [TransportFailure, TransactionTerminated]
    assert len(layer) == 1
    assert layer.stats.transport_errors == 2


class _NoScan(dict):  # type: ignore[type-arg]
    """A transaction table that fails the test when walked whole."""

    def values(self):  # type: ignore[no-untyped-def]
        raise AssertionError("transport_error scanned every transaction")


def test_transport_error_touches_only_the_failed_remote_and_the_index_is_released() -> None:
    layer = TransactionLayer()
    flows = [Address("tcp", "10.0.9.1", 40000 + i) for i in range(200)]
    servers = []
    for i, flow in enumerate(flows):
        layer.start_client(request("OPTIONS", branch=f"z9hG4bKc{i}"), flow, 0.0)
        via = f"SIP/2.0/TCP 10.0.9.1:{40000 + i}"
        servers.append(layer.receive_request(request("OPTIONS", branch=f"z9hG4bKs{i}", via=via), flow, 0.0))
    drain(layer)
    tables = layer._server, layer._client
    layer._server, layer._client = _NoScan(tables[0]), _NoScan(tables[1])
    layer.transport_error(flows[7], 0.1)  # one closed TCP flow: its two transactions end
    ended = [e.tx for e in layer.events() if isinstance(e, TransactionTerminated)]
    assert len(ended) == 2 and {tx.remote for tx in ended} == {flows[7]}
    assert len(layer) == 2 * 199
    layer.transport_error(Address("tcp", "10.0.9.9", 1), 0.2)  # no transaction there: nothing happens
    assert layer.events() == []
    layer._server, layer._client = dict(layer._server), dict(layer._client)
    for tx in servers:
        if tx is not None and not tx.terminated:
            layer.send_response(tx, make_response(tx.request, 200), 0.3)
    run_timers(layer, 100.0)  # everything ends (Timer F, J): no remote is remembered any more
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert layer._by_remote == {}


def test_start_client_rejects_ack_and_missing_branch() -> None:
    layer = TransactionLayer()
    with pytest.raises(ValueError, match="ACK"):
        layer.start_client(request("ACK"), UAS, 0.0)
    with pytest.raises(ValueError, match="branch"):
        layer.start_client(request(branch="1234"), UAS, 0.0)
    assert new_branch().startswith(b"z9hG4bK") and new_branch() != new_branch()


def test_max_transactions_answers_503_and_memory_returns_to_zero() -> None:
    layer = TransactionLayer(max_transactions=10)
    txs = [layer.receive_request(request("OPTIONS", branch=f"z9hG4bK{i}"), UAC, 0.0) for i in range(10)]
    with pytest.raises(ServiceUnavailable) as info:
        layer.receive_request(request("OPTIONS", branch="z9hG4bKone-too-many"), UAC, 0.0)
    assert info.value.status == 503
    assert ("retry-after", b"5") in info.value.headers
    assert info.value.partial is not None  # so error_response can answer it
    assert layer.stats.rejected_full == 1
    # retransmissions of known requests are still absorbed when full
    assert layer.receive_request(request("OPTIONS", branch="z9hG4bK3"), UAC, 0.1) is None
    with pytest.raises(ServiceUnavailable):
        layer.start_client(request("OPTIONS", branch="z9hG4bKout"), UAS, 0.0)
    for tx in txs:
        assert tx is not None
        layer.send_response(tx, make_response(tx.request, 200, to_tag=b"t"), 1.0)
    assert len(layer) == 10
    run_timers(layer, 1000.0)
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert layer.timer_entries == 0
    assert kinds(layer.events()).count(TransactionTerminated) == 10


def big_request(method: str, branch: str, size: int, via: str = "SIP/2.0/UDP 10.0.0.1:5060") -> SipMessage:
    """A parsed request of about ``size`` bytes (a long header, as an attacker would send)."""
    filler = "x" * size
    lines = [
        f"{method} sip:bob@example.com SIP/2.0",
        f"Via: {via};branch={branch}",
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=from1",
        "To: <sip:bob@example.com>",
        f"Call-ID: big-{branch}",
        f"CSeq: 1 {method}",
        f"X-Filler: {filler}",
        "Content-Length: 0",
        "",
        "",
    ]
    return parse_message("\r\n".join(lines).encode())


@pytest.mark.parametrize("method", ["OPTIONS", "INVITE", "REGISTER"])
def test_held_bytes_are_bounded_not_only_the_count(method: str) -> None:
    """64 KB requests fill max_bytes long before max_transactions: 503, and the bytes held
    (requests, the responses retransmitted for Timer J/H) stay within the budget."""
    budget = 1 << 20
    layer = TransactionLayer(max_transactions=200_000, max_bytes=budget)
    accepted = []
    refused = 0
    for i in range(200):
        req = big_request(method, f"z9hG4bKbig{i}", 60_000)
        assert req.size > 60_000
        try:
            tx = layer.receive_request(req, UAC, 0.0)
        except ServiceUnavailable as exc:
            assert exc.status == 503 and exc.partial is req
            refused += 1
            continue
        assert tx is not None
        accepted.append(tx)
        # the answer copies the request's headers: as large as it, and retained for resending
        reply = make_response(tx.request, 401, to_tag=b"t")
        reply.headers.append(("x-filler", b"X-Filler", tx.request.get("x-filler") or b""))
        layer.send_response(tx, reply, 0.0)
        assert layer.retained_bytes <= budget + 2 * 61_000
    drain(layer)
    assert refused > 150 and 4 <= len(accepted) <= 16
    assert layer.stats.rejected_memory == refused and layer.stats.rejected_full == 0
    # a small request still fits once the big ones are gone; nothing is left charged
    run_timers(layer, 1000.0)
    drain(layer)
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert layer.receive_request(request("OPTIONS", branch="z9hG4bKsmall"), UAC, 1000.0) is not None


def test_held_bytes_follow_client_transactions_and_their_responses() -> None:
    layer = TransactionLayer(max_bytes=1 << 20)
    req = request("INVITE", branch="z9hG4bKcli1")
    tx = layer.start_client(req, UAS, 0.0)
    sent = layer.retained_bytes
    assert sent == len(tx._request_bytes)
    ringing = response(req, 180)
    assert layer.receive_response(ringing, UAS, 0.1) is tx
    assert layer.retained_bytes == sent + ringing.size
    busy = response(req, 486)
    layer.receive_response(busy, UAS, 0.2)  # the ACK is built and held for Timer D
    # past the final response only the ACK's bytes stay (the request and responses released)
    assert layer.retained_bytes == len(tx._ack or b"") > 0
    run_timers(layer, 100.0)
    drain(layer)
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_server_past_its_final_holds_no_parsed_message_and_still_absorbs() -> None:
    """Completed (non-INVITE, INVITE), Confirmed, Accepted: the request and the response sent
    are released (Timers J, H, L: 32 s of them per transaction at a few hundred calls/s); a
    retransmission is still absorbed and answered with the very bytes first sent."""
    for method, status in (("OPTIONS", 200), ("INVITE", 486)):
        layer = TransactionLayer()
        req = request(method)
        tx = layer.receive_request(req, UAC, 0.0)
        assert tx is not None
        drain(layer)
        layer.send_response(tx, make_response(req, status, to_tag=b"t"), 0.1)
        ((sent, _),) = layer.datagrams_to_send()
        assert tx.state is TxState.COMPLETED and tx.released
        assert tx.request is RELEASED and tx.last_response is None
        assert layer.retained_bytes == len(sent)  # only the bytes it resends
        assert layer.receive_request(request(method), UAC, 0.2) is None
        assert layer.datagrams_to_send() == [(sent, UAC)]
        if method == "INVITE":
            assert layer.receive_request(request("ACK", to_tag="t"), UAC, 0.3) is None
            assert tx.state is TxState.CONFIRMED and layer.retained_bytes == 0  # nothing to resend
        run_timers(layer, 100.0)
        drain(layer)
        assert len(layer) == 0 and layer.retained_bytes == 0
    # Accepted: the TU retransmits its 2xx through it, an ACK is passed up; nothing is kept
    layer = TransactionLayer()
    req = request()
    tx = layer.receive_request(req, UAC, 0.0)
    assert tx is not None
    drain(layer)
    ok = make_response(req, 200, to_tag=b"t")
    layer.send_response(tx, ok, 0.1)
    layer.send_response(tx, ok, 0.6)
    assert layer.datagrams_to_send() == [(ok.to_bytes(), UAC)] * 2
    assert tx.state is TxState.ACCEPTED and tx.released and tx.last_response is None
    assert layer.retained_bytes == 0
    assert layer.receive_request(request(), UAC, 0.7) is None  # INVITE retransmission absorbed
    assert layer.datagrams_to_send() == []
    ack = request("ACK", to_tag="t")
    assert layer.receive_request(ack, UAC, 0.8) is None
    assert layer.events() == [AckFor2xx(ack, UAC)]
    assert "key=" in repr(tx)  # the log's view of a released transaction: its key
    run_timers(layer, 100.0)
    drain(layer)
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_client_past_its_final_holds_no_parsed_message_and_still_absorbs() -> None:
    """Client INVITE Completed keeps only its ACK's bytes (resent for each retransmitted
    final), Accepted and non-INVITE Completed nothing; 2xx in Accepted still reach the TU."""
    layer = TransactionLayer()
    req = request("INVITE", branch="z9hG4bKcli2")
    tx = layer.start_client(req, UAS, 0.0)
    drain(layer)
    assert layer.receive_response(response(req, 486), UAS, 0.1) is tx
    ((ack, _),) = layer.datagrams_to_send()
    assert tx.state is TxState.COMPLETED and tx.released and tx.last_response is None
    assert layer.retained_bytes == len(ack)
    assert layer.receive_response(response(req, 486), UAS, 0.2) is None
    assert layer.datagrams_to_send() == [(ack, UAS)]  # the same ACK
    for method, status in (("INVITE", 200), ("OPTIONS", 200)):
        req = request(method, branch=f"z9hG4bKcli3{method}")
        tx = layer.start_client(req, UAS, 0.0)
        drain(layer)
        assert layer.receive_response(response(req, 180), UAS, 0.1) is tx
        assert tx.last_response is not None  # awaiting the final: the 1xx is kept
        assert layer.receive_response(response(req, status), UAS, 0.2) is tx
        assert tx.released and tx.last_response is None and tx.size == 0
        again = layer.receive_response(response(req, status), UAS, 0.3)
        assert again is (tx if method == "INVITE" else None)  # RFC 6026 8.4: 2xx go up
        assert tx.size == 0
    run_timers(layer, 100.0)
    drain(layer)
    assert len(layer) == 0 and layer.retained_bytes == 0


def test_max_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        TransactionLayer(max_bytes=1000)


def test_stale_timer_entries_are_compacted() -> None:
    layer = TransactionLayer()
    for i in range(3000):
        req = request("OPTIONS", branch=f"z9hG4bK{i}", via="SIP/2.0/UDP 10.0.0.1:5060")
        tx = layer.start_client(req, UAS, 0.0)
        layer.transport_error(tx, 0.0)  # E and F entries become stale at once
    drain(layer)
    assert len(layer) == 0 and layer.retained_bytes == 0
    assert layer.timer_entries < 2000
    assert layer.next_deadline() is None


def test_context_slot_and_two_layers_are_independent() -> None:
    a, b = TransactionLayer(), TransactionLayer()
    tx = a.receive_request(request(), UAC, 0.0)
    assert tx is not None
    tx.context = {"branches": []}
    assert b.receive_request(request(), UAC, 0.0) is not None  # b has its own table
    assert (len(a), len(b)) == (1, 1)
    assert a.find_invite_for_cancel(request("CANCEL")) is tx
    assert b.find_invite_for_cancel(request("CANCEL")) is not tx


# --- two layers talking in memory (aioquic's transfer()) --------------------------------------


def transfer(
    sender: TransactionLayer,
    receiver: TransactionLayer,
    source: Address,
    now: float,
    *,
    drop: int = 0,
) -> list[Transaction | None]:
    """Deliver sender's datagrams to receiver (dropping the first ``drop``); what each returned."""
    results: list[Transaction | None] = []
    for i, (data, _) in enumerate(sender.datagrams_to_send()):
        if i < drop:
            continue
        msg = parse_message(data)
        if msg.is_request:
            got = receiver.receive_request(msg, source, now)
            assert got is None or isinstance(got, ServerInviteTransaction | ServerNonInviteTransaction)
            results.append(got)
        else:
            cgot = receiver.receive_response(msg, source, now)
            assert cgot is None or isinstance(cgot, ClientTransaction)
            results.append(cgot)
    return results


def test_two_layers_invite_with_a_lost_datagram() -> None:
    uac, uas = TransactionLayer(), TransactionLayer()
    invite = request(branch=new_branch().decode())
    client = uac.start_client(invite, UAS, 0.0)
    assert transfer(uac, uas, UAC, 0.0, drop=1) == []  # the INVITE is lost
    uac.handle_timer(0.5)  # Timer A retransmits
    (server,) = transfer(uac, uas, UAC, 0.5)
    assert isinstance(server, ServerInviteTransaction)
    assert transfer(uas, uac, UAS, 0.5) == [client]  # 100 Trying
    assert client.state is TxState.PROCEEDING
    uas.send_response(server, make_response(server.request, 180, to_tag=b"uas"), 1.0)
    uas.send_response(server, make_response(server.request, 486, to_tag=b"uas"), 2.0)
    assert transfer(uas, uac, UAS, 2.0, drop=1) == [client]  # 180 lost, 486 arrives
    assert client.state is TxState.COMPLETED and client.released  # the TU had the 486
    assert transfer(uac, uas, UAC, 2.0) == [None]  # the ACK is absorbed by the server tx
    assert server.state is TxState.CONFIRMED
    for t in (10.0, 40.0, 100.0):
        uac.handle_timer(t)
        uas.handle_timer(t)
    assert (len(uac), len(uas)) == (0, 0)
    assert kinds(uac.events()) == [TransactionTerminated]
    assert kinds(uas.events()) == [TransactionTerminated]


def test_two_layers_non_invite_response_lost_then_resent() -> None:
    uac, uas = TransactionLayer(), TransactionLayer()
    client = uac.start_client(request("OPTIONS", branch=new_branch().decode()), UAS, 0.0)
    (server,) = transfer(uac, uas, UAC, 0.0)
    assert server is not None
    uas.send_response(server, make_response(server.request, 200, to_tag=b"x"), 0.1)
    assert transfer(uas, uac, UAS, 0.1, drop=1) == []  # 200 lost
    uac.handle_timer(0.5)  # Timer E
    assert transfer(uac, uas, UAC, 0.5) == [None]  # absorbed, 200 re-sent
    assert transfer(uas, uac, UAS, 0.5) == [client]
    assert client.state is TxState.COMPLETED


# --- Hypothesis: the tables -------------------------------------------------------------------

MACHINE_STATES = {m: {s for s, _ in m.TABLE} | {m.INITIAL[1], TxState.TERMINATED} for m in MACHINES}


def bare(machine: type[Transaction]) -> Transaction:
    if issubclass(machine, ClientInviteTransaction | ClientNonInviteTransaction):
        return machine(request(), UAS, b"z9hG4bKaaa1")  # type: ignore[call-arg]
    return machine(request(), UAC, ("key",))


def test_tables_only_reach_states_they_leave_or_terminated() -> None:
    for machine in MACHINES:
        targets = {nxt for _, nxt in machine.TABLE.values()} | {machine.INITIAL[1]}
        sources = {s for s, _ in machine.TABLE}
        assert targets - sources <= {TxState.TERMINATED}, machine
        assert TxState.TERMINATED not in sources


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("state", list(TxState), ids=lambda s: s.value)
@pytest.mark.parametrize("inp", list(TxInput), ids=lambda i: i.name)
def test_every_state_input_pair(machine: type[Transaction], state: TxState, inp: TxInput) -> None:
    tx = bare(machine)
    tx.state = state
    row = machine.TABLE.get((state, inp))
    if row is None:
        with pytest.raises(InvalidTransition):
            tx.process(inp)
        assert tx.state is TxState.TERMINATED
    else:
        assert tx.process(inp) == row[0]
        assert tx.state is row[1]
        assert tx.state in MACHINE_STATES[machine]


@settings(max_examples=500, deadline=None)
@given(
    machine=st.sampled_from(MACHINES),
    start=st.integers(min_value=0, max_value=6),
    inputs=st.lists(st.sampled_from(list(TxInput)), max_size=30),
)
def test_random_input_walks_end_in_a_legal_state(machine: type[Transaction], start: int, inputs: list[TxInput]) -> None:
    tx = bare(machine)
    states = sorted(MACHINE_STATES[machine], key=lambda s: s.value)
    tx.state = states[start % len(states)]  # walks start anywhere, so every row is reachable
    for inp in inputs:
        before = tx.state
        legal = (before, inp) in machine.TABLE
        try:
            tx.process(inp)
        except InvalidTransition:
            assert not legal
            assert tx.state is TxState.TERMINATED
        else:
            assert legal
        assert tx.state in MACHINE_STATES[machine]


# --- Hypothesis: whole layers driven by random traffic ----------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["client_resp", "server_resp", "retransmit", "ack", "ack_2xx", "advance", "transport"]),
        st.sampled_from([100, 180, 200, 202, 302, 404, 486, 503, 603]),
        st.floats(min_value=0.0, max_value=40.0),
        st.booleans(),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["INVITE", "OPTIONS", "BYE"]),
    reliable=st.booleans(),
    trying=st.sampled_from([0.0, 0.05]),
    ops=OPS,
)
def test_random_traffic_never_breaks_a_layer(
    method: str, reliable: bool, trying: float, ops: list[tuple[str, int, float, bool]]
) -> None:
    uac, uas = TransactionLayer(), TransactionLayer(timers=TimerConfig(trying=trying))
    via = "SIP/2.0/TCP 10.0.0.1:40000" if reliable else "SIP/2.0/UDP 10.0.0.1:5060"
    src, dst = (UAC_TCP, UAS_TCP) if reliable else (UAC, UAS)
    req = request(method, via=via)
    client = uac.start_client(req, dst, 0.0)
    server_req = request(method, via=via)  # the TU's own reference (the layer releases its own)
    server = uas.receive_request(server_req, src, 0.0)
    assert server is not None
    now = 0.0
    for op, status, dt, flag in ops:
        if op == "client_resp":
            uac.receive_response(response(req, status), dst, now)
        elif op == "server_resp":
            try:
                uas.send_response(server, make_response(server_req, status, to_tag=b"t"), now)
            except InvalidTransition:
                assert server.state is TxState.TERMINATED
            for data, _ in uas.datagrams_to_send():
                uac.receive_response(parse_message(data), dst, now)
        elif op == "retransmit":
            again_req = request(method, via=via)
            again = uas.receive_request(again_req, src, now)
            if again is not None:  # a new transaction only once the old one is gone
                assert server.state is TxState.TERMINATED
                server, server_req = again, again_req
        elif op == "ack":
            uas.receive_request(request("ACK", via=via, to_tag="t"), src, now)
        elif op == "ack_2xx":  # the 2xx's ACK, with its own branch: never a transaction's
            uas.receive_request(request("ACK", via=via, to_tag="t", branch="z9hG4bKack2"), src, now)
        elif op == "transport":
            (uac if flag else uas).transport_error(client if flag else server, now)
        else:
            now += dt
            uac.handle_timer(now)
            uas.handle_timer(now)
        for layer, tx in ((uac, client), (uas, server)):
            assert tx.state in MACHINE_STATES[type(tx)]
            if tx.state in tx.RELEASE_IN:  # past the final: no parsed message held
                assert tx.released and tx.last_response is None
            assert (len(layer) == 1) == (tx.state is not TxState.TERMINATED)
            deadline = layer.next_deadline()
            assert deadline is None or deadline > now
    # whatever happened, everything but an INVITE waiting in Proceeding ends and is forgotten
    uac.handle_timer(now + 1000)
    uas.handle_timer(now + 1000)
    if client.state is not TxState.PROCEEDING or method != "INVITE":
        assert len(uac) == 0
        assert uac.next_deadline() is None
    if server.state not in (TxState.TRYING, TxState.PROCEEDING):  # waiting for the TU
        assert len(uas) == 0
        assert uas.next_deadline() is None
