"""The RFC 3261 section 17 transaction layer, sans-IO (with the RFC 6026 "Accepted" states).

Theory of operation
-------------------
A transaction is a request plus every response to it (and the ACK of a non-2xx final answer to
an INVITE).  There are four kinds, each a small state machine whose states are named as in RFC
3261 17 (:class:`TxState`) and whose inputs (:class:`TxInput`) are "a message arrived", "the TU
passes a response", "timer X fired" and "the transport failed".  Every machine is one table,
``(state, input) -> (actions, next state)``: :data:`CLIENT_INVITE_TABLE`,
:data:`CLIENT_NON_INVITE_TABLE`, :data:`SERVER_INVITE_TABLE`, :data:`SERVER_NON_INVITE_TABLE`.
A pair missing from its table is a protocol error: :meth:`Transaction.process` moves the machine
to Terminated and raises :class:`InvalidTransition`; the machine never silently keeps its state.
Network oddities that RFC 3261 leaves open but that happen in practice (a late 1xx after the
final response, an ACK before any final response) have explicit "absorb" rows, so a peer cannot
tear a transaction down by sending them.

The machines know nothing of sockets or clocks.  :class:`TransactionLayer` owns all of them, and
is driven like aioquic's connection by three sources: messages received
(:meth:`~TransactionLayer.receive_request`, :meth:`~TransactionLayer.receive_response`), the TU
(:meth:`~TransactionLayer.start_client`, :meth:`~TransactionLayer.send_response`) and one timer
(:meth:`~TransactionLayer.next_deadline`, :meth:`~TransactionLayer.handle_timer`).  Its outputs
are drained by the caller: :meth:`~TransactionLayer.datagrams_to_send` (bytes and the
:class:`~sipfarm.sip.address.Address` to send them to) and :meth:`~TransactionLayer.events`.

Timers live in one FIFO queue per duration for the whole layer (RFC 3261's timers take a handful
of durations: T1, 64*T1, T4, and the doubled retransmission intervals), so arming one is an
append and firing one a pop from the front, with no comparisons: deadlines of one duration come
in the order they were armed (an entry armed out of order, from a late timer's own deadline, is
inserted in place). A transaction records, per armed timer, its queue entry; an entry no longer
recorded (cancelled, re-armed, transaction gone) is skipped when it reaches the front (lazy
deletion), and the queues are compacted when stale entries outnumber live ones. A timer stays
armed only while its machine's table has a row for it in the current state: entering a state
disarms the others (e.g. a 1xx cancels Timers A and B of an INVITE client transaction), so the
rule lives in the tables, not in code. A timer whose duration is zero (D, I, J, K on reliable
transports) fires at once, so a transaction over TCP reaches Terminated, and is forgotten, in
the same call that completed it.

A server INVITE transaction answers 100 Trying at once, or, with ``TimerConfig.trying`` > 0,
arms "Timer 100" instead (RFC 3261 17.2.1: no 100 is needed when the TU answers within 200
ms): the 100 goes when it fires with no response sent, or at the first retransmission of the
request if that comes first.  A node's callee usually rings within milliseconds, so a call
costs one datagram less at the node and at the balancer in front of it.  A TU may also hold the
100 until it has done what it does at once (``receive_request(..., trying=False)``, then
:meth:`TransactionLayer.start_trying`): an INVITE it refuses right away gets its final alone.

Timer G runs only after a provisional response: a client that got none still resends its
INVITE (Timer A), and each copy is answered with the final again, so the copies Timer G would
add are not needed for reliability; they would only multiply what a spoofed INVITE makes the
server send to the address it forged (a dozen datagrams in 32 s for one).

Retransmissions are absorbed before anything is parsed beyond what identifies the transaction:
the top Via's branch (``via_branch``, no full Via parse), its sent-by, the CSeq method.

Once a machine is past its final response (server: non-INVITE Completed, INVITE Accepted,
Completed, Confirmed; client: INVITE Accepted and Completed, non-INVITE Completed) it only
absorbs retransmissions and passes 2xx/ACK through for up to 32 s (Timers J, L, M, D): it
keeps its key, its remote end and the bytes it may resend (the response of a Completed
server, the ACK of a Completed INVITE client), and releases its parsed messages (``request``
becomes :data:`RELEASED`, ``last_response`` None): at a few hundred calls/s these are tens of
thousands of messages the cyclic GC would otherwise walk.

What the TU must act on right away is a return value: ``receive_request`` returns a new server
transaction (None when absorbed), ``receive_response`` returns the client transaction when the
TU must see the response it was given (None when absorbed or stray).  Everything else is an event,
drained with ``events()``: :class:`TransactionTimeout` (B, F, H), :class:`TransportFailure`,
:class:`TransactionTerminated` (release ``tx.context``), :class:`AckFor2xx` (an ACK outside any
transaction, to forward statelessly) and :class:`StrayResponse`.  Each thing is reported once,
by one of the two channels, so a proxy cannot handle a response twice.
"""

from __future__ import annotations

import collections
import enum
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeAlias

from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, MessageDropped, ServiceUnavailable
from sipfarm.sip.headers import HeaderError, parse_cseq, parse_via, via_branch
from sipfarm.sip.ids import random_hex
from sipfarm.sip.message import SipMessage, make_response

# RFC 3261 8.1.1.7: branches of RFC 3261 elements start with this.
MAGIC_COOKIE: Final = b"z9hG4bK"


def new_branch() -> bytes:
    """A fresh RFC 3261 branch (magic cookie + 64 random bits)."""
    return MAGIC_COOKIE + random_hex(8)


# --- timers -----------------------------------------------------------------------------------


class TxState(enum.Enum):
    """Transaction states, named as in RFC 3261 17 and RFC 6026 (Accepted)."""

    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"

    # Members are singletons compared by identity; Enum's own __hash__ is Python code that
    # hashes the name, and the per-message path does several table look-ups.
    __hash__ = object.__hash__


class TxInput(enum.Enum):
    """What can happen to a transaction."""

    # server side
    REQUEST = "request retransmission"
    ACK = "ACK"
    SEND_1XX = "1xx from TU"
    SEND_2XX = "2xx from TU"
    SEND_3XX_6XX = "300-699 from TU"
    # client side
    RECV_1XX = "1xx"
    RECV_2XX = "2xx"
    RECV_3XX_6XX = "300-699"
    # timers (RFC 3261 table 4, RFC 6026 L and M)
    TIMER_A = "Timer A"
    TIMER_B = "Timer B"
    TIMER_D = "Timer D"
    TIMER_E = "Timer E"
    TIMER_F = "Timer F"
    TIMER_G = "Timer G"
    TIMER_H = "Timer H"
    TIMER_I = "Timer I"
    TIMER_J = "Timer J"
    TIMER_K = "Timer K"
    TIMER_L = "Timer L"
    TIMER_M = "Timer M"
    # RFC 3261 17.2.1's 200 ms: a server INVITE transaction's 100 Trying, when it is not sent
    # at once (TimerConfig.trying), goes when this fires with no response sent yet
    TIMER_TRYING = "Timer 100"
    TRANSPORT_ERROR = "transport error"

    __hash__ = object.__hash__  # see TxState


TIMER_INPUTS: Final = frozenset(i for i in TxInput if i.name.startswith("TIMER_"))
# Retransmission timers: armed only over unreliable transports (RFC 3261 17.1.1.2, 17.1.2.2, 17.2.1).
_RETRANSMIT_TIMERS: Final = frozenset({TxInput.TIMER_A, TxInput.TIMER_E, TxInput.TIMER_G})
# Wait timers that are zero over reliable transports (RFC 3261 17.1.1.2, 17.1.2.2, 17.2.1, 17.2.2).
_ZERO_IF_RELIABLE: Final = frozenset({TxInput.TIMER_D, TxInput.TIMER_I, TxInput.TIMER_J, TxInput.TIMER_K})


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 timer values (seconds; table 4 of section A) and the RFC 6026 additions."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
    t4: float = 5.0  # maximum duration a message remains in the network
    d: float = 32.0  # Timer D over unreliable transports: "at least 32 seconds" (17.1.1.2)
    # A server INVITE transaction's 100 Trying: 0 sends it at once; > 0 sends it only if the TU
    # has sent no response that long after the request (RFC 3261 17.2.1: no 100 is needed when
    # the TU answers within 200 ms), or at the first retransmission of the request, if earlier
    trying: float = 0.0

    def __post_init__(self) -> None:
        for name in ("t1", "t2", "t4", "d"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TimerConfig.{name} must be positive")
        if self.t2 < self.t1:
            raise ValueError("TimerConfig.t2 must not be smaller than t1")
        if not 0 <= self.trying <= 0.2:
            raise ValueError("TimerConfig.trying must lie between 0 and 0.2 s (RFC 3261 17.2.1)")

    def duration(self, timer: TxInput, reliable: bool) -> float | None:
        """Initial duration of ``timer``; None when it is not used at all (A/E/G when reliable)."""
        if reliable:
            if timer in _RETRANSMIT_TIMERS:
                return None
            if timer in _ZERO_IF_RELIABLE:
                return 0.0
        if timer in _RETRANSMIT_TIMERS:
            return self.t1  # A, E, G start at T1
        if timer is TxInput.TIMER_D:
            return self.d
        if timer in (TxInput.TIMER_I, TxInput.TIMER_K):
            return self.t4
        if timer is TxInput.TIMER_TRYING:
            return self.trying if self.trying > 0 else None
        if timer in TIMER_INPUTS:
            return 64 * self.t1  # B, F, H, J, L, M
        raise ValueError(f"{timer.value} is not a timer")


# --- actions and tables -----------------------------------------------------------------------


class Action(enum.Enum):
    """Side effects of a transition, run by :class:`TransactionLayer` in table order."""

    SEND_REQUEST = "send the request"  # client: first transmission and retransmissions
    SEND_ACK = "send ACK"  # client INVITE: ACK a 300-699 (17.1.1.3)
    DELIVER_TO_TU = "deliver response to TU"  # client: receive_response returns the transaction
    SEND_TRYING = "send 100 Trying"  # server INVITE (17.2.1), when the layer is asked to
    SEND_RESPONSE = "send the TU's response"  # server: transmit and remember for retransmission
    RESEND_RESPONSE = "resend last response"  # server: request retransmission or Timer G
    ACK_TO_TU = "pass ACK to TU"  # server INVITE in Accepted (RFC 6026 7.1): AckFor2xx event
    REPORT_TIMEOUT = "inform TU of timeout"  # B, F, H: TransactionTimeout event
    REPORT_TRANSPORT_ERROR = "inform TU of transport error"  # TransportFailure event
    START_A = "start Timer A"
    START_B = "start Timer B"
    START_D = "start Timer D"
    START_E = "start Timer E"
    START_F = "start Timer F"
    START_G = "start Timer G"
    START_H = "start Timer H"
    START_I = "start Timer I"
    START_J = "start Timer J"
    START_K = "start Timer K"
    START_L = "start Timer L"
    START_M = "start Timer M"
    START_TRYING = "start the 100 Trying timer"  # server INVITE, when TimerConfig.trying > 0
    DOUBLE_A = "restart Timer A at twice its interval"  # 17.1.1.2: no cap for INVITE
    BACKOFF_E = "restart Timer E at min(2x, T2)"  # 17.1.2.2 (Trying)
    RESET_E_T2 = "restart Timer E at T2"  # 17.1.2.2 (Proceeding)
    BACKOFF_G = "restart Timer G at min(2x, T2)"  # 17.2.1

    __hash__ = object.__hash__  # see TxState


_START_TIMER: Final[Mapping[Action, TxInput]] = {
    Action.START_A: TxInput.TIMER_A,
    Action.START_B: TxInput.TIMER_B,
    Action.START_D: TxInput.TIMER_D,
    Action.START_E: TxInput.TIMER_E,
    Action.START_F: TxInput.TIMER_F,
    Action.START_G: TxInput.TIMER_G,
    Action.START_H: TxInput.TIMER_H,
    Action.START_I: TxInput.TIMER_I,
    Action.START_J: TxInput.TIMER_J,
    Action.START_K: TxInput.TIMER_K,
    Action.START_L: TxInput.TIMER_L,
    Action.START_M: TxInput.TIMER_M,
    Action.START_TRYING: TxInput.TIMER_TRYING,
}

Transition: TypeAlias = tuple[tuple[Action, ...], TxState]
Table: TypeAlias = Mapping[tuple[TxState, TxInput], Transition]

_S = TxState
_I = TxInput
_A = Action

# RFC 3261 17.1.1 (figure 5) as amended by RFC 6026 8.4 (Accepted, Timer M).
CLIENT_INVITE_TABLE: Final[Table] = {
    (_S.CALLING, _I.TIMER_A): ((_A.SEND_REQUEST, _A.DOUBLE_A), _S.CALLING),
    (_S.CALLING, _I.TIMER_B): ((_A.REPORT_TIMEOUT,), _S.TERMINATED),
    (_S.CALLING, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.CALLING, _I.RECV_1XX): ((_A.DELIVER_TO_TU,), _S.PROCEEDING),
    (_S.CALLING, _I.RECV_2XX): ((_A.DELIVER_TO_TU, _A.START_M), _S.ACCEPTED),
    (_S.CALLING, _I.RECV_3XX_6XX): ((_A.DELIVER_TO_TU, _A.SEND_ACK, _A.START_D), _S.COMPLETED),
    # 17.1.1.2: "any further provisional responses MUST be passed up to the TU"
    (_S.PROCEEDING, _I.RECV_1XX): ((_A.DELIVER_TO_TU,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.RECV_2XX): ((_A.DELIVER_TO_TU, _A.START_M), _S.ACCEPTED),
    (_S.PROCEEDING, _I.RECV_3XX_6XX): ((_A.DELIVER_TO_TU, _A.SEND_ACK, _A.START_D), _S.COMPLETED),
    # a stream flow that breaks while waiting for the final response
    (_S.PROCEEDING, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    # 17.1.1.2: a retransmitted final response is ACKed again, not passed up
    (_S.COMPLETED, _I.RECV_3XX_6XX): ((_A.SEND_ACK,), _S.COMPLETED),
    (_S.COMPLETED, _I.RECV_1XX): ((), _S.COMPLETED),  # late (reordered) provisional: absorbed
    # a 2xx after a non-2xx final (downstream forking): proxies forward every 2xx (16.7 step 5)
    (_S.COMPLETED, _I.RECV_2XX): ((_A.DELIVER_TO_TU,), _S.COMPLETED),
    (_S.COMPLETED, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.COMPLETED, _I.TIMER_D): ((), _S.TERMINATED),
    # RFC 6026 8.4: 2xx retransmissions (and 2xx from other forks) go to the TU
    (_S.ACCEPTED, _I.RECV_2XX): ((_A.DELIVER_TO_TU,), _S.ACCEPTED),
    (_S.ACCEPTED, _I.RECV_1XX): ((), _S.ACCEPTED),  # reordered provisional: absorbed
    (_S.ACCEPTED, _I.RECV_3XX_6XX): ((), _S.ACCEPTED),  # a final after a 2xx: absorbed
    (_S.ACCEPTED, _I.TIMER_M): ((), _S.TERMINATED),
}
CLIENT_INVITE_INITIAL: Final = ((_A.SEND_REQUEST, _A.START_A, _A.START_B), _S.CALLING)

# RFC 3261 17.1.2 (figure 6).
CLIENT_NON_INVITE_TABLE: Final[Table] = {
    (_S.TRYING, _I.TIMER_E): ((_A.SEND_REQUEST, _A.BACKOFF_E), _S.TRYING),
    (_S.TRYING, _I.TIMER_F): ((_A.REPORT_TIMEOUT,), _S.TERMINATED),
    (_S.TRYING, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.TRYING, _I.RECV_1XX): ((_A.DELIVER_TO_TU,), _S.PROCEEDING),
    (_S.TRYING, _I.RECV_2XX): ((_A.DELIVER_TO_TU, _A.START_K), _S.COMPLETED),
    (_S.TRYING, _I.RECV_3XX_6XX): ((_A.DELIVER_TO_TU, _A.START_K), _S.COMPLETED),
    (_S.PROCEEDING, _I.TIMER_E): ((_A.SEND_REQUEST, _A.RESET_E_T2), _S.PROCEEDING),
    (_S.PROCEEDING, _I.TIMER_F): ((_A.REPORT_TIMEOUT,), _S.TERMINATED),
    (_S.PROCEEDING, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.PROCEEDING, _I.RECV_1XX): ((_A.DELIVER_TO_TU,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.RECV_2XX): ((_A.DELIVER_TO_TU, _A.START_K), _S.COMPLETED),
    (_S.PROCEEDING, _I.RECV_3XX_6XX): ((_A.DELIVER_TO_TU, _A.START_K), _S.COMPLETED),
    # 17.1.2.2: Completed buffers response retransmissions
    (_S.COMPLETED, _I.RECV_1XX): ((), _S.COMPLETED),
    (_S.COMPLETED, _I.RECV_2XX): ((), _S.COMPLETED),
    (_S.COMPLETED, _I.RECV_3XX_6XX): ((), _S.COMPLETED),
    (_S.COMPLETED, _I.TIMER_K): ((), _S.TERMINATED),
}
CLIENT_NON_INVITE_INITIAL: Final = ((_A.SEND_REQUEST, _A.START_E, _A.START_F), _S.TRYING)

# RFC 3261 17.2.1 (figure 7) as amended by RFC 6026 7.1 (Accepted, Timer L).
SERVER_INVITE_TABLE: Final[Table] = {
    # a retransmission before any response (TimerConfig.trying > 0): the 100 Trying, now
    (_S.PROCEEDING, _I.REQUEST): ((_A.RESEND_RESPONSE,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.TIMER_TRYING): ((_A.SEND_TRYING,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.SEND_1XX): ((_A.SEND_RESPONSE,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.SEND_2XX): ((_A.SEND_RESPONSE, _A.START_L), _S.ACCEPTED),
    (_S.PROCEEDING, _I.SEND_3XX_6XX): ((_A.SEND_RESPONSE, _A.START_G, _A.START_H), _S.COMPLETED),
    (_S.PROCEEDING, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.PROCEEDING, _I.ACK): ((), _S.PROCEEDING),  # ACK before any final response: bogus, absorbed
    (_S.COMPLETED, _I.REQUEST): ((_A.RESEND_RESPONSE,), _S.COMPLETED),
    (_S.COMPLETED, _I.TIMER_G): ((_A.RESEND_RESPONSE, _A.BACKOFF_G), _S.COMPLETED),
    (_S.COMPLETED, _I.ACK): ((_A.START_I,), _S.CONFIRMED),
    (_S.COMPLETED, _I.TIMER_H): ((_A.REPORT_TIMEOUT,), _S.TERMINATED),
    (_S.COMPLETED, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    # 17.2.1: Confirmed absorbs ACKs (and, like them, late INVITE retransmissions)
    (_S.CONFIRMED, _I.ACK): ((), _S.CONFIRMED),
    (_S.CONFIRMED, _I.REQUEST): ((), _S.CONFIRMED),
    (_S.CONFIRMED, _I.TIMER_I): ((), _S.TERMINATED),
    # RFC 6026 7.1: INVITE retransmissions absorbed without an answer, 2xx from the TU sent,
    # an ACK (the 2xx's, when its sender reused the branch) passed up
    (_S.ACCEPTED, _I.REQUEST): ((), _S.ACCEPTED),
    (_S.ACCEPTED, _I.SEND_2XX): ((_A.SEND_RESPONSE,), _S.ACCEPTED),
    (_S.ACCEPTED, _I.ACK): ((_A.ACK_TO_TU,), _S.ACCEPTED),
    (_S.ACCEPTED, _I.TIMER_L): ((), _S.TERMINATED),
}
SERVER_INVITE_INITIAL: Final = ((_A.SEND_TRYING,), _S.PROCEEDING)
# TimerConfig.trying > 0: the 100 Trying waits for the TU (RFC 3261 17.2.1)
SERVER_INVITE_INITIAL_DEFERRED: Final = ((_A.START_TRYING,), _S.PROCEEDING)

# RFC 3261 17.2.2 (figure 8).
SERVER_NON_INVITE_TABLE: Final[Table] = {
    (_S.TRYING, _I.REQUEST): ((), _S.TRYING),  # "MUST be discarded"
    (_S.TRYING, _I.SEND_1XX): ((_A.SEND_RESPONSE,), _S.PROCEEDING),
    (_S.TRYING, _I.SEND_2XX): ((_A.SEND_RESPONSE, _A.START_J), _S.COMPLETED),
    (_S.TRYING, _I.SEND_3XX_6XX): ((_A.SEND_RESPONSE, _A.START_J), _S.COMPLETED),
    (_S.PROCEEDING, _I.REQUEST): ((_A.RESEND_RESPONSE,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.SEND_1XX): ((_A.SEND_RESPONSE,), _S.PROCEEDING),
    (_S.PROCEEDING, _I.SEND_2XX): ((_A.SEND_RESPONSE, _A.START_J), _S.COMPLETED),
    (_S.PROCEEDING, _I.SEND_3XX_6XX): ((_A.SEND_RESPONSE, _A.START_J), _S.COMPLETED),
    (_S.PROCEEDING, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.COMPLETED, _I.REQUEST): ((_A.RESEND_RESPONSE,), _S.COMPLETED),
    # "Any other final responses passed by the TU ... MUST be discarded while in Completed"
    (_S.COMPLETED, _I.SEND_2XX): ((), _S.COMPLETED),
    (_S.COMPLETED, _I.SEND_3XX_6XX): ((), _S.COMPLETED),
    (_S.COMPLETED, _I.TRANSPORT_ERROR): ((_A.REPORT_TRANSPORT_ERROR,), _S.TERMINATED),
    (_S.COMPLETED, _I.TIMER_J): ((), _S.TERMINATED),
}
SERVER_NON_INVITE_INITIAL: Final = ((), _S.TRYING)


def _timers_by_state(table: Table) -> dict[TxState, frozenset[TxInput]]:
    out: dict[TxState, set[TxInput]] = {state: set() for state in TxState}
    for state, inp in table:
        if inp in TIMER_INPUTS:
            out[state].add(inp)
    return {state: frozenset(timers) for state, timers in out.items()}


class InvalidTransition(Exception):
    """``input`` has no row in the machine's table for ``state``; the machine is now Terminated."""

    def __init__(self, machine: str, state: TxState, inp: TxInput) -> None:
        super().__init__(f"{machine}: {inp.value!r} is not valid in state {state.value}")
        self.machine = machine
        self.state = state
        self.input = inp


# --- transactions -----------------------------------------------------------------------------

# What a transaction's ``request`` becomes past its final response (see the module docstring):
# retransmissions are matched by key and answered with bytes; nothing reads the message then.
RELEASED: Final = SipMessage(method=b"RELEASED", uri=b"sip:released.invalid")


class _TimerEntry:
    """One armed timer in its duration's queue (a compiled class: read by attribute, never
    compared as a tuple).  Stale once its transaction no longer records it for ``timer``."""

    __slots__ = ("deadline", "seq", "timer", "tx")

    def __init__(self, deadline: float, seq: int, tx: Transaction, timer: TxInput) -> None:
        self.deadline = deadline
        self.seq = seq  # arming order: equal deadlines fire in the order they were armed
        self.tx = tx
        self.timer = timer


class Transaction:
    """State shared by the four machines: the request, the remote end, the state, the timers.

    ``context`` is the TU's slot (the proxy hangs its response context / branch state there).
    """

    __slots__ = (
        "_interval",
        "_timers",
        "context",
        "key",
        "remote",
        "request",
        "size",
        "state",
    )

    TABLE: ClassVar[Table]
    INITIAL: ClassVar[Transition]
    TIMERS_IN_STATE: ClassVar[Mapping[TxState, frozenset[TxInput]]]
    # states past the final response, where the parsed messages are released
    RELEASE_IN: ClassVar[frozenset[TxState]]

    def __init__(self, request: SipMessage, remote: Address, key: tuple[object, ...]) -> None:
        self.request = request
        self.remote = remote  # server: where the request came from; client: where it goes
        self.key = key
        self.context: object | None = None
        self.state = self.INITIAL[1]
        self._timers: dict[TxInput, _TimerEntry] = {}  # armed timer -> its queue entry
        self._interval = 0.0  # current retransmission interval (A, E or G)
        self.size = 0  # the message bytes it holds, charged to the layer's budget

    @property
    def reliable(self) -> bool:
        return self.remote.reliable

    @property
    def terminated(self) -> bool:
        return self.state is TxState.TERMINATED

    @property
    def released(self) -> bool:
        """Past its final response: ``request`` is :data:`RELEASED` (see the module docstring)."""
        return self.request is RELEASED

    def process(self, inp: TxInput) -> tuple[Action, ...]:
        """Apply ``inp``: the actions to run; raises InvalidTransition (and terminates) if illegal."""
        transition = self.TABLE.get((self.state, inp))
        if transition is None:
            state = self.state
            self.state = TxState.TERMINATED
            raise InvalidTransition(type(self).__name__, state, inp)
        self.state = transition[1]
        return transition[0]

    def __repr__(self) -> str:
        request = self.request
        what = f"key={self.key!r}" if request is RELEASED else repr(request)
        return f"<{type(self).__name__} {self.state.value} {what}>"


class ClientTransaction(Transaction):
    """A request this element sends (RFC 3261 17.1); matched by (branch, CSeq method)."""

    __slots__ = ("_ack", "_request_bytes", "branch", "last_response")

    def __init__(self, request: SipMessage, remote: Address, branch: bytes) -> None:
        super().__init__(request, remote, (branch, request.method))
        self.branch = branch
        self.last_response: SipMessage | None = None
        self._request_bytes = request.to_bytes()
        self._ack: bytes | None = None


class ClientInviteTransaction(ClientTransaction):
    __slots__ = ()
    TABLE = CLIENT_INVITE_TABLE
    INITIAL = CLIENT_INVITE_INITIAL
    TIMERS_IN_STATE = _timers_by_state(CLIENT_INVITE_TABLE)
    RELEASE_IN = frozenset({TxState.ACCEPTED, TxState.COMPLETED})


class ClientNonInviteTransaction(ClientTransaction):
    __slots__ = ()
    TABLE = CLIENT_NON_INVITE_TABLE
    INITIAL = CLIENT_NON_INVITE_INITIAL
    TIMERS_IN_STATE = _timers_by_state(CLIENT_NON_INVITE_TABLE)
    RELEASE_IN = frozenset({TxState.COMPLETED})


class ServerTransaction(Transaction):
    """A request this element answers (RFC 3261 17.2); ``remote`` is where it came from."""

    __slots__ = ("_response_bytes", "last_response", "provisional")

    def __init__(self, request: SipMessage, remote: Address, key: tuple[object, ...]) -> None:
        super().__init__(request, remote, key)
        self.last_response: SipMessage | None = None
        self._response_bytes: bytes | None = None
        self.provisional = False  # a provisional response was sent: the client stopped resending

    @property
    def source(self) -> Address:
        return self.remote


class ServerInviteTransaction(ServerTransaction):
    __slots__ = ()
    TABLE = SERVER_INVITE_TABLE
    INITIAL = SERVER_INVITE_INITIAL
    TIMERS_IN_STATE = _timers_by_state(SERVER_INVITE_TABLE)
    RELEASE_IN = frozenset({TxState.ACCEPTED, TxState.COMPLETED, TxState.CONFIRMED})


class ServerNonInviteTransaction(ServerTransaction):
    __slots__ = ()
    TABLE = SERVER_NON_INVITE_TABLE
    INITIAL = SERVER_NON_INVITE_INITIAL
    TIMERS_IN_STATE = _timers_by_state(SERVER_NON_INVITE_TABLE)
    RELEASE_IN = frozenset({TxState.COMPLETED})


MACHINES: Final[tuple[type[Transaction], ...]] = (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
)


# --- events -----------------------------------------------------------------------------------


class _TxEvent:
    """An event about one transaction.  Immutable (a Final attribute, which a compiled build
    enforces) with value equality: a plain class, not a frozen dataclass, whose generated
    __init__ costs ~15x a compiled one (the layer makes one per transaction it forgets)."""

    def __init__(self, tx: Transaction) -> None:
        self.tx: Final = tx

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, _TxEvent) and other.tx is self.tx

    def __hash__(self) -> int:
        return hash((type(self).__name__, id(self.tx)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tx={self.tx!r})"


class TransactionTimeout(_TxEvent):
    """Timer B or F (client: the proxy answers 408 for that branch, RFC 3261 16.7 step 2 / 16.8)
    or Timer H (server INVITE: the ACK never came, 17.2.1)."""


class TransportFailure(_TxEvent):
    """The transport could not deliver for ``tx`` (RFC 3261 17.1.4, 17.2.4; proxy: 503, 16.9)."""


class TransactionTerminated(_TxEvent):
    """``tx`` reached Terminated and the layer forgot it: release whatever hangs off its context."""


_ACKFOR2XX_FIELDS: Final = ("request", "source")


class AckFor2xx:
    """An ACK that no server transaction consumed: the ACK of a 2xx, which is its own end-to-end
    transaction (RFC 3261 17, 13.2.2.4), or one passed up in Accepted (RFC 6026 7.1).  A proxy
    forwards it statelessly (RFC 3261 16.11 / 16.10 "ACK ... forwarded").

    Immutable (Final attributes, which a compiled build enforces) with value equality: a plain
    class, not a frozen dataclass, whose generated __init__ costs ~15x a compiled one."""

    def __init__(
        self,
        request: SipMessage,
        source: Address,
    ) -> None:
        self.request: Final = request
        self.source: Final = source

    def _fields(self) -> tuple[object, ...]:
        return (self.request, self.source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AckFor2xx) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            "AckFor2xx(" + ", ".join(f"{n}={v!r}" for n, v in zip(_ACKFOR2XX_FIELDS, self._fields(), strict=True)) + ")"
        )


class StrayResponse:
    """A response matching no client transaction (RFC 3261 17.1.3, 18.1.2).  RFC 3261 16.7 had
    proxies forward those statelessly; RFC 6026 keeps 2xx retransmissions inside the Accepted
    state instead, so a proxy built on this layer may simply count and drop them.

    Immutable with value equality, a plain class (see :class:`AckFor2xx`)."""

    def __init__(self, response: SipMessage, source: Address) -> None:
        self.response: Final = response
        self.source: Final = source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StrayResponse) and (self.response, self.source) == (other.response, other.source)

    def __hash__(self) -> int:
        return hash((self.response, self.source))

    def __repr__(self) -> str:
        return f"StrayResponse(response={self.response!r}, source={self.source!r})"


Event: TypeAlias = TransactionTimeout | TransportFailure | TransactionTerminated | AckFor2xx | StrayResponse


@dataclass(slots=True)
class TransactionStats:
    """Counters for the metrics exporter (``sipfarm_node_transaction_events_total{event=<name>}``)."""

    server_created: int = 0
    client_created: int = 0
    requests_absorbed: int = 0
    responses_absorbed: int = 0
    stray_responses: int = 0
    acks_for_2xx: int = 0
    timeouts: int = 0
    transport_errors: int = 0
    invalid_inputs: int = 0
    rejected_full: int = 0
    rejected_memory: int = 0  # requests refused because the held messages reached max_bytes

    def as_dict(self) -> dict[str, int]:
        """Every counter by name (what ``sync_counters`` exports)."""
        return {
            "server_created": self.server_created,
            "client_created": self.client_created,
            "requests_absorbed": self.requests_absorbed,
            "responses_absorbed": self.responses_absorbed,
            "stray_responses": self.stray_responses,
            "acks_for_2xx": self.acks_for_2xx,
            "timeouts": self.timeouts,
            "transport_errors": self.transport_errors,
            "invalid_inputs": self.invalid_inputs,
            "rejected_full": self.rejected_full,
            "rejected_memory": self.rejected_memory,
        }


# --- matching keys ----------------------------------------------------------------------------

_INVITE: Final = b"INVITE"
_ACK: Final = b"ACK"
_LEGACY: Final = "rfc2543"  # first element of an RFC 2543 key; cookie keys start with bytes


def _sent_by(via: bytes) -> bytes:
    """sent-by (host[:port], lower case) of one via-parm; fast path for ``SIP/2.0/UDP h:p;...``."""
    sp = via.find(b" ")
    if sp > 8 and via[:8].upper() == b"SIP/2.0/":
        semi = via.find(b";", sp)
        chunk = via[sp + 1 : semi] if semi >= 0 else via[sp + 1 :]
        chunk = chunk.rstrip(b" \t")
        if chunk and chunk.find(b" ") < 0 and chunk.find(b"\t") < 0:
            return chunk.lower()
    # LWS inside the protocol or around ':' (RFC 4475 "wsinv"): the full parser knows
    parsed = parse_via(via)
    host = parsed.host.encode("ascii")
    return host if parsed.port is None else b"%s:%d" % (host, parsed.port)


def _legacy_key(msg: SipMessage, top_via: bytes, to_tag: bytes | None, method: bytes) -> tuple[object, ...]:
    # RFC 3261 17.2.3: Request-URI, To tag, From tag, Call-ID, CSeq, top Via (RFC 2543 peers)
    return (_LEGACY, msg.uri, to_tag, msg.from_tag, msg.call_id, msg.cseq[0], method, top_via)


def _status_input(status: int, *, received: bool) -> TxInput:
    if status < 200:
        return TxInput.RECV_1XX if received else TxInput.SEND_1XX
    if status < 300:
        return TxInput.RECV_2XX if received else TxInput.SEND_2XX
    return TxInput.RECV_3XX_6XX if received else TxInput.SEND_3XX_6XX


def build_ack(request: SipMessage, response: SipMessage) -> SipMessage:
    """The ACK of a 300-699 answer to ``request`` (RFC 3261 17.1.1.3).

    Request-URI, Call-ID, From, the CSeq number and the top Via (hence the branch) are the
    INVITE's, To is the response's (with its tag), Route headers are the INVITE's.
    """
    headers: list[tuple[str, bytes, bytes]] = []
    via = request.top_via_value
    for key, raw, value in request.headers:
        if key == "via":
            if via:
                headers.append((key, raw, via))
                via = b""
        elif key == "to":
            headers.append((key, raw, response.get("to") or value))
        elif key in ("from", "call-id", "route", "max-forwards"):
            headers.append((key, raw, value))
        elif key == "cseq":
            headers.append((key, raw, b"%d ACK" % request.cseq[0]))
    ack = SipMessage(method=_ACK, uri=request.uri, headers=headers, cseq=(request.cseq[0], _ACK))
    ack.set_body(b"", None)
    return ack


# --- the layer --------------------------------------------------------------------------------


_Handler: TypeAlias = Callable[["Transaction", SipMessage | None, float], None]


@dataclass(slots=True)
class _Output:
    datagrams: list[tuple[bytes, Address]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class TransactionLayer:
    """Every transaction of one SIP element, their timers and their output.

    ``max_transactions`` and ``max_bytes`` bound memory: a request that would create a
    transaction beyond ``max_transactions``, or when the messages the transactions hold plus
    twice the new request (it and a response of about its size: a response copies the
    request's Via, From, To, Call-ID and CSeq) would pass ``max_bytes``, raises
    :class:`~sipfarm.sip.errors.ServiceUnavailable` (answer 503, statelessly).  The count alone
    does not bound memory: a request may be 64 KB, so 200,000 of them held for Timer J or H
    would be 12.8 GB.  What a transaction holds is counted in wire bytes (``retained_bytes``):
    its request until its final response (then released, see the module docstring), the
    response bytes it may retransmit, a client's last provisional response and its ACK.
    ``send_trying``: server INVITE transactions answer 100 Trying (RFC 3261 17.2.1, a proxy's
    16.2 duty): at once, or, with ``TimerConfig.trying`` > 0, only when the TU has sent no
    response by then (or the request is retransmitted first); false: never (a TU that always
    answers within 200 ms).
    """

    def __init__(
        self,
        *,
        timers: TimerConfig | None = None,
        max_transactions: int = 100_000,
        max_bytes: int = 256 * 2**20,
        send_trying: bool = True,
    ) -> None:
        if max_transactions < 1:
            raise ValueError("max_transactions must be at least 1")
        if max_bytes < 2**16:
            raise ValueError("max_bytes must be at least 64 KiB")
        self.timers = timers or TimerConfig()
        self.max_transactions = max_transactions
        self.max_bytes = max_bytes
        self._bytes = 0  # sum of the live transactions' size
        self.send_trying = send_trying
        # TimerConfig.trying > 0: a server INVITE transaction starts its 100 Trying timer
        # instead of answering 100 at once
        self._defer_trying = self.timers.trying > 0
        self.stats = TransactionStats()
        self._server: dict[tuple[object, ...], ServerTransaction] = {}
        self._client: dict[tuple[object, ...], ClientTransaction] = {}
        # remote end (a stream flow) -> its live transactions, so a failed flow touches only its
        # own (O(affected))
        self._by_remote: dict[Address, set[Transaction]] = {}
        # timer duration -> its entries, deadlines in order (see the module docstring)
        self._queues: dict[float, collections.deque[_TimerEntry]] = {}
        self._seq = 0
        self._entries = 0  # queued entries, stale ones included
        self._armed = 0  # live entries
        self._out = _Output()
        self._immediate: list[TxInput] = []  # zero-length timers started by the running transition
        self._handlers = self._action_handlers()
        self._durations: dict[tuple[TxInput, bool], float | None] = {
            (timer, reliable): self.timers.duration(timer, reliable)
            for timer in TIMER_INPUTS
            for reliable in (False, True)
        }

    def __len__(self) -> int:
        """Live transactions (server and client)."""
        return len(self._server) + len(self._client)  # one key per transaction

    @property
    def retained_bytes(self) -> int:
        """The message bytes the live transactions hold (see the class docstring)."""
        return self._bytes

    def _charge(self, tx: Transaction, delta: int) -> None:
        tx.size += delta
        self._bytes += delta

    def _room(self, size: int, msg: SipMessage) -> None:
        """Raise ServiceUnavailable unless a transaction holding ``size`` bytes fits."""
        if len(self._server) + len(self._client) >= self.max_transactions:
            self.stats.rejected_full += 1
            raise ServiceUnavailable("transaction table full", partial=msg)
        if self._bytes + 2 * size > self.max_bytes:
            self.stats.rejected_memory += 1
            raise ServiceUnavailable("transaction memory full", partial=msg)

    @property
    def timer_entries(self) -> int:
        """Queued timer entries, stale ones included (for tests and a gauge)."""
        return self._entries

    # -- output --------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = self._out.datagrams
        self._out.datagrams = []
        return out

    def events(self) -> list[Event]:
        out = self._out.events
        self._out.events = []
        return out

    def send_stateless(self, msg: SipMessage | bytes, destination: Address) -> None:
        """Queue a message outside any transaction (an ACK for 2xx, a stateless reply)."""
        self._out.datagrams.append((msg if isinstance(msg, bytes) else msg.to_bytes(), destination))

    # -- server side ---------------------------------------------------------------------------

    def receive_request(
        self, msg: SipMessage, source: Address, now: float, trying: bool = True
    ) -> ServerTransaction | None:
        """Match ``msg`` to a server transaction (RFC 3261 17.2.3) or create one.

        Returns the new transaction for a new request; None when the request was absorbed (a
        retransmission: the last response is re-sent), when an ACK completed an INVITE
        transaction, or for an ACK no transaction takes (reported as :class:`AckFor2xx`).
        Raises BadMessage for an unreadable top Via and ServiceUnavailable when full.
        ``trying=False``: a new INVITE's 100 Trying waits for :meth:`start_trying`, which the
        TU calls once it has done what it does at once (an INVITE it refuses right away then
        gets its final alone, sent once: see ``_start_timer``).
        """
        method = msg.method
        is_ack = method == _ACK
        try:
            top = msg.top_via_value
            branch = via_branch(top) if top else None
            if branch is not None and branch.startswith(MAGIC_COOKIE):
                key: tuple[object, ...] = (branch, _sent_by(top), _INVITE if is_ack else method)
                tx = self._server.get(key)
            else:
                key, tx = self._legacy_lookup(msg, top, is_ack)
        except HeaderError as exc:
            raise BadMessage(f"Via: {exc}", partial=msg) from None
        if tx is not None:
            # ACK keys name the INVITE, so an ACK only ever finds an INVITE transaction
            if not is_ack:
                self.stats.requests_absorbed += 1
            self._network_input(tx, TxInput.ACK if is_ack else TxInput.REQUEST, msg, now)
            return None
        if is_ack:
            self.stats.acks_for_2xx += 1
            self._out.events.append(AckFor2xx(msg, source))
            return None
        if msg.size <= 0:
            msg.size = len(msg.to_bytes())  # built, not parsed (tests, local requests)
        self._room(msg.size, msg)
        new: ServerTransaction
        if method == _INVITE:
            new = ServerInviteTransaction(msg, source, key)
        else:
            new = ServerNonInviteTransaction(msg, source, key)
        self._server[key] = new
        self._charge(new, msg.size)
        self._index(new)
        self.stats.server_created += 1
        initial: tuple[Action, ...] = new.INITIAL[0]
        if method == _INVITE:
            if not trying:
                initial = ()
            elif self._defer_trying:
                initial = SERVER_INVITE_INITIAL_DEFERRED[0]
        self._run(new, initial, None, now)
        return new

    def start_trying(self, tx: ServerTransaction, now: float) -> None:
        """The 100 Trying of an INVITE received with ``trying=False``: sent now (or its Timer
        100 armed, with ``TimerConfig.trying``), unless the TU has answered it already."""
        if not isinstance(tx, ServerInviteTransaction) or tx.state is not TxState.PROCEEDING:
            return
        if tx._response_bytes is not None or TxInput.TIMER_TRYING in tx._timers:
            return
        self._run(tx, SERVER_INVITE_INITIAL_DEFERRED[0] if self._defer_trying else SERVER_INVITE_INITIAL[0], None, now)

    def _legacy_lookup(
        self, msg: SipMessage, top: bytes, is_ack: bool
    ) -> tuple[tuple[object, ...], ServerTransaction | None]:
        to_tag = msg.to_tag
        if not is_ack:
            key = _legacy_key(msg, top, to_tag, msg.method)
            return key, self._server.get(key)
        # RFC 3261 17.2.3: the ACK's To tag matches the tag of the response the transaction sent,
        # so look for the INVITE under its own To tag (re-INVITE) and without one (initial INVITE).
        for tag in (to_tag, None) if to_tag is not None else (None,):
            key = _legacy_key(msg, top, tag, _INVITE)
            tx = self._server.get(key)
            if tx is not None:
                sent = tx.last_response
                if sent is None or sent.to_tag == to_tag:
                    return key, tx
        return _legacy_key(msg, top, to_tag, _INVITE), None

    def find_invite_for_cancel(self, cancel: SipMessage) -> ServerInviteTransaction | None:
        """The INVITE server transaction ``cancel`` cancels (RFC 3261 9.2: 17.2.3 matching with
        the method taken as INVITE)."""
        try:
            top = cancel.top_via_value
            branch = via_branch(top) if top else None
            if branch is not None and branch.startswith(MAGIC_COOKIE):
                tx = self._server.get((branch, _sent_by(top), _INVITE))
            else:
                # RFC 3261 9.1: the CANCEL's Request-URI, To, From, Call-ID, CSeq number and top
                # Via are the INVITE's
                tx = self._server.get(_legacy_key(cancel, top, cancel.to_tag, _INVITE))
        except HeaderError:
            return None
        return tx if isinstance(tx, ServerInviteTransaction) else None

    def send_response(self, tx: ServerTransaction, response: SipMessage, now: float) -> None:
        """Pass the TU's ``response`` to ``tx``: it is queued to the request's source address.

        Raises InvalidTransition (and ``tx`` is terminated and forgotten) when the machine does
        not accept it, e.g. a provisional response after a final one, or any response after
        Terminated.
        """
        inp = _status_input(response.status, received=False)
        if tx.state is TxState.TERMINATED:
            raise InvalidTransition(type(tx).__name__, tx.state, inp)
        state = tx.state
        try:
            actions = tx.process(inp)
        except InvalidTransition:
            self._forget(tx)
            raise
        self._after(tx, state, actions, response, now)

    # -- client side ---------------------------------------------------------------------------

    def start_client(self, request: SipMessage, destination: Address, now: float) -> ClientTransaction:
        """Send ``request`` to ``destination`` in a new client transaction (RFC 3261 17.1).

        The request's top Via must carry the branch (the TU chose it, e.g. with
        :func:`new_branch`); ACK is never sent in a transaction (use :meth:`send_stateless`).
        """
        if request.method == _ACK:
            raise ValueError("ACK is not sent in a client transaction (use send_stateless)")
        branch = via_branch(request.top_via_value)
        if not branch or not branch.startswith(MAGIC_COOKIE):
            raise ValueError("the request's top Via needs an RFC 3261 branch (z9hG4bK...)")
        if request.cseq[1] != request.method:
            # a request built by the TU (not parsed) keeps its CSeq only as a header until asked
            value = request.get("cseq")
            try:
                request.cseq = parse_cseq(value or b"")
            except HeaderError as exc:
                raise ValueError(f"bad CSeq in request to send: {exc}") from None
            if request.cseq[1] != request.method:
                raise ValueError("CSeq method differs from the request method")
        tx: ClientTransaction
        if request.method == _INVITE:
            tx = ClientInviteTransaction(request, destination, branch)
        else:
            tx = ClientNonInviteTransaction(request, destination, branch)
        self._room(len(tx._request_bytes), request)  # room for it and an answer of its size
        if tx.key in self._client:
            raise ValueError("a client transaction with this branch and method exists")
        self._client[tx.key] = tx
        self._charge(tx, len(tx._request_bytes))
        self._index(tx)
        self.stats.client_created += 1
        self._run(tx, tx.INITIAL[0], None, now)
        return tx

    def receive_response(self, msg: SipMessage, source: Address, now: float) -> ClientTransaction | None:
        """Match ``msg`` to its client transaction (RFC 3261 17.1.3: top Via branch + CSeq method).

        Returns the transaction when the TU must see ``msg``: every provisional, the first final,
        and in Accepted every 2xx (RFC 6026). ``tx.last_response`` is ``msg`` only while a final
        response is awaited (past it the transaction keeps no parsed message). Returns None
        when it was absorbed (retransmitted final; an ACK is re-sent for a 300-699) or matches
        nothing (:class:`StrayResponse` event).
        """
        try:
            top = msg.top_via_value
            branch = via_branch(top) if top else None
        except (HeaderError, BadMessage):
            raise MessageDropped("response with a malformed top Via") from None
        tx = self._client.get((branch, msg.cseq[1])) if branch is not None else None
        if tx is None:
            self.stats.stray_responses += 1
            self._out.events.append(StrayResponse(msg, source))
            return None
        if self._network_input(tx, _status_input(msg.status, received=True), msg, now):
            return tx
        self.stats.responses_absorbed += 1
        return None

    def abandon(self, tx: ServerTransaction) -> None:
        """The TU ends a server transaction without answering it (RFC 4320 4.1: a proxy sends
        no 408 for a non-INVITE request). Its retransmissions then match nothing here."""
        self._forget(tx)

    # -- transport errors and timers -----------------------------------------------------------

    def transport_error(self, target: Transaction | Address, now: float) -> None:
        """The transport failed sending for ``target`` (one transaction, or every transaction
        whose remote end is that address, e.g. a TCP flow that closed)."""
        if isinstance(target, Transaction):
            txs: list[Transaction] = [target]
        elif target.reliable:
            txs = list(self._by_remote.get(target, ()))
        else:
            # a UDP peer has no flow to lose: nothing in the node reports one (only stream
            # connects and client flows fail), so it is not indexed, and this scan is the rare path
            txs = [tx for table in (self._server, self._client) for tx in table.values() if tx.remote == target]
        for tx in txs:
            if tx.state is not TxState.TERMINATED:
                self._network_input(tx, TxInput.TRANSPORT_ERROR, None, now)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next be called (None: no timer armed)."""
        best: _TimerEntry | None = None
        for queue in self._queues.values():
            head = self._live_head(queue)
            if head is not None and (best is None or head.deadline < best.deadline):
                best = head
        return None if best is None else best.deadline

    def _live_head(self, queue: collections.deque[_TimerEntry]) -> _TimerEntry | None:
        """The first live entry of ``queue``, the stale ones before it dropped."""
        while queue:
            head = queue[0]
            if head.tx._timers.get(head.timer) is head:
                return head
            queue.popleft()
            self._entries -= 1
        return None

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``, in deadline order.

        A timer's effects are computed at its own deadline (a re-armed Timer A counts from when
        it was due), so a late call, or a test jumping far ahead, replays the exact RFC schedule.
        """
        queues = self._queues
        while True:
            # the earliest due entry of all queues (a few: one per duration in use)
            due: _TimerEntry | None = None
            due_queue: collections.deque[_TimerEntry] | None = None
            for queue in queues.values():
                head = self._live_head(queue)
                if (
                    head is not None
                    and head.deadline <= now
                    and (
                        due is None
                        or head.deadline < due.deadline
                        or (head.deadline == due.deadline and head.seq < due.seq)
                    )
                ):
                    due, due_queue = head, queue
            if due is None or due_queue is None:
                return
            due_queue.popleft()
            self._entries -= 1
            tx, inp = due.tx, due.timer
            del tx._timers[inp]
            self._armed -= 1
            state = tx.state
            actions = tx.process(inp)  # armed timers always have a row (see _after)
            self._after(tx, state, actions, None, due.deadline)

    # -- machinery -----------------------------------------------------------------------------

    def _network_input(self, tx: Transaction, inp: TxInput, msg: SipMessage | None, now: float) -> bool:
        """Feed a network-originated input; a peer's invalid input terminates the transaction
        (counted), it never raises into the receive path.  True when the TU must see ``msg``."""
        state = tx.state
        try:
            actions = tx.process(inp)
        except InvalidTransition:
            self.stats.invalid_inputs += 1
            self._forget(tx)
            return False
        return self._after(tx, state, actions, msg, now)

    def _after(
        self,
        tx: Transaction,
        before: TxState,
        actions: tuple[Action, ...],
        msg: SipMessage | None,
        now: float,
    ) -> bool:
        """Run ``actions`` of a transition out of state ``before``, then settle timers/removal."""
        to_tu = self._run(tx, actions, msg, now)
        if tx.state is before:
            return to_tu
        if tx.state is TxState.TERMINATED:
            self._forget(tx)
            return to_tu
        if tx.state in tx.RELEASE_IN:
            self._release(tx)
        # a timer stays armed only while the table reacts to it in the current state
        timers = tx._timers
        if timers:
            valid = tx.TIMERS_IN_STATE[tx.state]
            for inp in [t for t in timers if t not in valid]:
                del timers[inp]
                self._armed -= 1
        return to_tu

    def _release(self, tx: Transaction) -> None:
        """``tx`` is past its final response (``RELEASE_IN``): it keeps its key, its remote end
        and the bytes it may resend, and drops its parsed messages. A completed REGISTER holds
        ~0.5 KB instead of ~4 KB (a registrar at 4,000 REG/s holds 128,000 of them for Timer J);
        a call's transactions hold no message for their 32 s of Timers L, M, D."""
        request = tx.request
        if isinstance(tx, ServerTransaction):
            if request is not RELEASED:
                tx.request = RELEASED
                self._charge(tx, -request.size)
            if tx.state is not TxState.COMPLETED:
                # Accepted and Confirmed resend nothing (the TU retransmits its 2xx, RFC 6026 7.1)
                old = tx._response_bytes
                if old is not None:
                    tx._response_bytes = None
                    self._charge(tx, -len(old))
                tx.last_response = None
            elif tx.key[0] != _LEGACY or isinstance(tx, ServerNonInviteTransaction):
                tx.last_response = None
            # else an RFC 2543 peer's ACK of a non-2xx is told from a 2xx's by the To tag of the
            # response sent (RFC 3261 17.2.3, _legacy_lookup): it stays (not charged, as before)
        else:
            assert isinstance(tx, ClientTransaction)
            if request is not RELEASED:
                tx.request = RELEASED
                self._charge(tx, -len(tx._request_bytes))
                tx._request_bytes = b""
            response = tx.last_response
            if response is not None:
                tx.last_response = None
                self._charge(tx, -response.size)

    def _run(self, tx: Transaction, actions: tuple[Action, ...], msg: SipMessage | None, now: float) -> bool:
        handlers = self._handlers
        for action in actions:
            handlers[action](tx, msg, now)
        if self._immediate:
            # zero-length timers (reliable transports) fire now, after the transition settled;
            # START_X only leads to states with a Timer X row, so process() cannot raise here
            timers, self._immediate = self._immediate, []
            for timer in timers:
                state = tx.state
                self._after(tx, state, tx.process(timer), None, now)
        return Action.DELIVER_TO_TU in actions

    # -- action handlers (one per Action; see _handlers) ---------------------------------------

    def _start_timer(self, timer: TxInput, tx: Transaction, _msg: SipMessage | None, now: float) -> None:
        duration = self._durations[(timer, tx.remote.reliable)]
        if duration is None:
            return  # retransmission timer over a reliable transport
        if timer is TxInput.TIMER_G and isinstance(tx, ServerTransaction) and not tx.provisional:
            # no provisional was sent, so the client still resends its INVITE (Timer A), and each
            # copy gets the final again: Timer G would only send copies nobody asked for, to an
            # address anyone can forge (one spoofed INVITE, a dozen datagrams at its victim)
            return
        if timer in _RETRANSMIT_TIMERS:
            tx._interval = duration
        if duration <= 0:
            self._immediate.append(timer)
        else:
            self._arm(tx, timer, now, duration)

    def _send_request(self, tx: Transaction, _msg: SipMessage | None, _now: float) -> None:
        assert isinstance(tx, ClientTransaction)
        self._out.datagrams.append((tx._request_bytes, tx.remote))

    def _deliver_to_tu(self, tx: Transaction, msg: SipMessage | None, _now: float) -> None:
        assert isinstance(tx, ClientTransaction)
        if tx.state in tx.RELEASE_IN:
            return  # a final: the TU has ``msg``, the transaction keeps none (see _release)
        old = tx.last_response
        self._charge(tx, (msg.size if msg is not None else 0) - (old.size if old is not None else 0))
        tx.last_response = msg

    def _send_response(self, tx: Transaction, msg: SipMessage | None, _now: float) -> None:
        assert isinstance(tx, ServerTransaction) and msg is not None
        data = msg.to_bytes()
        self._out.datagrams.append((data, tx.remote))
        if msg.status < 200:
            tx.provisional = True
        if tx.state is TxState.ACCEPTED:
            return  # never resent by the layer (RFC 6026 7.1): nothing to keep (see _release)
        old = tx._response_bytes
        self._charge(tx, len(data) - (len(old) if old is not None else 0))
        tx.last_response = msg
        tx._response_bytes = data

    def _resend_response(self, tx: Transaction, msg: SipMessage | None, now: float) -> None:
        assert isinstance(tx, ServerTransaction)
        if tx._response_bytes is not None:
            self._out.datagrams.append((tx._response_bytes, tx.remote))
        elif isinstance(tx, ServerInviteTransaction):
            self._send_trying(tx, msg, now)  # deferred (TimerConfig.trying) and not sent yet

    def _send_ack(self, tx: Transaction, msg: SipMessage | None, _now: float) -> None:
        assert isinstance(tx, ClientTransaction) and msg is not None
        if tx._ack is None:
            # built on entering Completed, before the request is released
            tx._ack = build_ack(tx.request, msg).to_bytes()
            self._charge(tx, len(tx._ack))
        self._out.datagrams.append((tx._ack, tx.remote))

    def _send_trying(self, tx: Transaction, _msg: SipMessage | None, _now: float) -> None:
        assert isinstance(tx, ServerTransaction)
        if self.send_trying and tx._response_bytes is None:  # else (deferred) the TU answered first
            trying = make_response(tx.request, 100)
            tx.last_response = trying
            tx.provisional = True
            data = trying.to_bytes()
            tx._response_bytes = data
            self._charge(tx, len(data))
            self._out.datagrams.append((data, tx.remote))

    def _ack_to_tu(self, tx: Transaction, msg: SipMessage | None, _now: float) -> None:
        assert msg is not None
        self.stats.acks_for_2xx += 1
        self._out.events.append(AckFor2xx(msg, tx.remote))

    def _report_timeout(self, tx: Transaction, _msg: SipMessage | None, _now: float) -> None:
        self.stats.timeouts += 1
        self._out.events.append(TransactionTimeout(tx))

    def _report_transport_error(self, tx: Transaction, _msg: SipMessage | None, _now: float) -> None:
        self.stats.transport_errors += 1
        self._out.events.append(TransportFailure(tx))

    def _double_a(self, tx: Transaction, _msg: SipMessage | None, now: float) -> None:
        tx._interval *= 2  # RFC 3261 17.1.1.2: no cap for INVITE
        self._arm(tx, TxInput.TIMER_A, now, tx._interval)

    def _backoff_e(self, tx: Transaction, _msg: SipMessage | None, now: float) -> None:
        tx._interval = min(2 * tx._interval, self.timers.t2)
        self._arm(tx, TxInput.TIMER_E, now, tx._interval)

    def _backoff_g(self, tx: Transaction, _msg: SipMessage | None, now: float) -> None:
        tx._interval = min(2 * tx._interval, self.timers.t2)
        self._arm(tx, TxInput.TIMER_G, now, tx._interval)

    def _reset_e_t2(self, tx: Transaction, _msg: SipMessage | None, now: float) -> None:
        tx._interval = self.timers.t2
        self._arm(tx, TxInput.TIMER_E, now, tx._interval)

    def _action_handlers(self) -> dict[Action, _Handler]:
        handlers: dict[Action, _Handler] = {
            Action.SEND_REQUEST: self._send_request,
            Action.SEND_ACK: self._send_ack,
            Action.DELIVER_TO_TU: self._deliver_to_tu,
            Action.SEND_TRYING: self._send_trying,
            Action.SEND_RESPONSE: self._send_response,
            Action.RESEND_RESPONSE: self._resend_response,
            Action.ACK_TO_TU: self._ack_to_tu,
            Action.REPORT_TIMEOUT: self._report_timeout,
            Action.REPORT_TRANSPORT_ERROR: self._report_transport_error,
            Action.DOUBLE_A: self._double_a,
            Action.BACKOFF_E: self._backoff_e,
            Action.RESET_E_T2: self._reset_e_t2,
            Action.BACKOFF_G: self._backoff_g,
        }
        for action, timer in _START_TIMER.items():
            handlers[action] = functools.partial(self._start_timer, timer)
        missing = set(Action) - set(handlers)
        if missing:  # pragma: no cover - guards future Actions
            raise AssertionError(f"no handler for {missing}")
        return handlers

    def _arm(self, tx: Transaction, timer: TxInput, now: float, duration: float) -> None:
        """Arm ``timer`` of ``tx`` to fire ``duration`` after ``now`` (re-arming replaces it)."""
        self._seq += 1
        entry = _TimerEntry(now + duration, self._seq, tx, timer)
        if timer not in tx._timers:
            self._armed += 1
        tx._timers[timer] = entry
        queue = self._queues.get(duration)
        if queue is None:
            queue = self._queues[duration] = collections.deque()
        if queue and queue[-1].deadline > entry.deadline:
            # armed from an earlier "now" than the last one (a late timer re-arming from its
            # own deadline): in place, from the back
            index = len(queue) - 1
            while index > 0 and queue[index - 1].deadline > entry.deadline:
                index -= 1
            queue.insert(index, entry)
        else:
            queue.append(entry)
        self._entries += 1
        if self._entries > 1024 and self._entries > 3 * self._armed:
            # stale entries (timers cancelled by a state change) outnumber the live ones: drop
            # them, so memory follows the live transactions, not their history
            self._queues = {
                key: collections.deque(e for e in old if e.tx._timers.get(e.timer) is e)
                for key, old in self._queues.items()
            }
            self._entries = sum(len(q) for q in self._queues.values())

    def _index(self, tx: Transaction) -> None:
        """Remember ``tx`` under its remote end if that is a flow (stream transports), so a
        failed flow touches only its own transactions (see :meth:`transport_error`)."""
        if not tx.remote.reliable:
            return
        same_remote = self._by_remote.get(tx.remote)
        if same_remote is None:
            self._by_remote[tx.remote] = {tx}
        else:
            same_remote.add(tx)

    def _forget(self, tx: Transaction) -> None:
        table: dict[tuple[object, ...], ServerTransaction] | dict[tuple[object, ...], ClientTransaction]
        table = self._server if isinstance(tx, ServerTransaction) else self._client
        if table.get(tx.key) is not tx:
            return  # already forgotten
        del table[tx.key]
        same_remote = self._by_remote.get(tx.remote) if tx.remote.reliable else None
        if same_remote is not None:
            same_remote.discard(tx)
            if not same_remote:
                del self._by_remote[tx.remote]
        self._armed -= len(tx._timers)
        tx._timers.clear()
        self._bytes -= tx.size
        tx.size = 0
        self._out.events.append(TransactionTerminated(tx))


__all__ = [
    "CLIENT_INVITE_TABLE",
    "CLIENT_NON_INVITE_TABLE",
    "MACHINES",
    "MAGIC_COOKIE",
    "RELEASED",
    "SERVER_INVITE_TABLE",
    "SERVER_NON_INVITE_TABLE",
    "AckFor2xx",
    "Action",
    "ClientInviteTransaction",
    "ClientNonInviteTransaction",
    "ClientTransaction",
    "Event",
    "InvalidTransition",
    "ServerInviteTransaction",
    "ServerNonInviteTransaction",
    "ServerTransaction",
    "StrayResponse",
    "TimerConfig",
    "Transaction",
    "TransactionLayer",
    "TransactionStats",
    "TransactionTerminated",
    "TransactionTimeout",
    "TransportFailure",
    "TxInput",
    "TxState",
    "build_ack",
    "new_branch",
]
