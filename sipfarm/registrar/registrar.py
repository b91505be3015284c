"""The registrar (RFC 3261 10.3, RFC 3327, RFC 5626) as a sans-IO transaction user.

Theory of operation
-------------------
A REGISTER without credentials gets its 401 statelessly (RFC 3261 8.2.7: no transaction to
keep for 32 s; a lost 401 is re-sent for the retransmission).  With credentials it gets a
server transaction; then, in order: the REGISTER is read (:func:`read_register`: AOR,
Contacts, expiries; policy errors are SipErrors), the credentials must be the AOR's own, the
authenticator verifies them (account and guard in one Redis pipeline), and one atomic
``register.lua`` applies every Contact (:meth:`FarmState.register`).  The 200 lists every
binding.

The common case costs one round trip, not two: when the account is in the node's cache and
the credentials verify without I/O (:meth:`Authenticator.verified_without_io`), and the store
can check the guard's keys in the script that writes the bindings (``admits``: one Redis, not
a Cluster), the ban and nonce-use checks and the write are one script
(:meth:`FarmState.register_admitted`), which writes nothing unless the source is not banned
and the nonce use is new.  The order stays: credentials verified, then admitted, then written;
every other case (and any doubt) takes the two round trips above.

A client connected straight to this node over a connection (or an outbound client)
gets our own Path entry naming its flow, so every node reaches it through us.

A UA that sends ``Supported: gruu`` gets, on each Contact with an instance ID, its public and a
fresh temporary GRUU (RFC 5627 5.2, 5.4, :mod:`sipfarm.registrar.gruu`: nothing stored).  An
outbound registration gets ``Flow-Timer`` (RFC 5626 5.4): the keepalive interval its flow's
transport needs (below a NAT's UDP binding life, below a connection's idle timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from sipfarm.edge import FlowTokens, flow_uri
from sipfarm.element import Element
from sipfarm.protect.authenticator import AuthAnswer, Authenticator, Verdict, nonce_use
from sipfarm.registrar.bindings import ExpiresPolicy, RegisterRequest, read_register, register_ok
from sipfarm.registrar.flows import DirectFlows
from sipfarm.registrar.gruu import TempGruus, public_gruu
from sipfarm.sip import auth
from sipfarm.sip.address import Address
from sipfarm.sip.errors import BadMessage, Forbidden
from sipfarm.sip.headers import HeaderError, parse_name_addr
from sipfarm.sip.message import SipMessage, make_response
from sipfarm.sip.transaction import ServerTransaction
from sipfarm.sip.uri import SipURI, URIError
from sipfarm.store.accounts import Account
from sipfarm.store.errors import StoreError
from sipfarm.store.location import AdmittedRegister, Binding, ContactUpdate, RegisterOutcome, RegisterResult

# RFC 5626 4.4.1 / 5.4: a UA sends a keepalive every 80-100 % of Flow-Timer. UDP: under the
# ~30 s many NATs keep an idle UDP binding (and under the 30 s of silence after which the
# balancer probes a UDP phone with OPTIONS); streams: within RFC 5626's 95-120 s and far under
# the 300 s after which an idle connection is closed.
FLOW_TIMER_UDP = 25
FLOW_TIMER_STREAM = 110


class BindingStore(Protocol):
    def register(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        callback: Callable[[RegisterResult | StoreError], None],
        **kwargs: object,
    ) -> None: ...

    @property
    def admits(self) -> bool:
        """``register_admitted`` may be used (the guard's keys and the bindings in one store)."""
        ...

    def register_admitted(
        self,
        aor: str,
        contacts: Sequence[ContactUpdate],
        source_ip: str,
        nonce_use: str,
        nonce_ttl: float,
        callback: Callable[[AdmittedRegister | StoreError], None],
        **kwargs: object,
    ) -> None:
        """``register`` behind the guard's admission of ``source_ip`` and ``nonce_use``, atomically."""
        ...


class Registrar:
    def __init__(
        self,
        element: Element,
        authenticator: Authenticator,
        store: BindingStore,
        *,
        policy: ExpiresPolicy | None = None,
        flow_tokens: FlowTokens,
        temp_gruus: TempGruus,
        flow_timer_udp: int = FLOW_TIMER_UDP,
        flow_timer_stream: int = FLOW_TIMER_STREAM,
    ) -> None:
        self.element = element
        self.auth = authenticator
        self.store = store
        self.policy = policy or ExpiresPolicy()
        self.flow_tokens = flow_tokens
        self.temp_gruus = temp_gruus
        self.flow_timer_udp = flow_timer_udp
        self.flow_timer_stream = flow_timer_stream
        # the UDP flows registered straight to this node: the only sources whose STUN
        # keep-alives it answers (:mod:`sipfarm.registrar.flows`)
        self.direct_flows = DirectFlows()

    def challenge_stateless(self, msg: SipMessage, source: Address) -> None:
        """A REGISTER with no credentials: 401 without a transaction (403 to a banned source)."""
        element = self.element
        client = element.client(msg, source)  # behind a balancer: the hop its branch names
        if self.auth.banned(client):
            element.send_stateless(msg, self.auth.refusal(msg), source)
            return
        response = self.auth.challenge(msg, 401, self.auth.register_realm(msg), client)
        element.send_stateless(msg, response, source)

    def on_register(self, stx: ServerTransaction, msg: SipMessage, source: Address) -> None:
        # RFC 3261 10.3 step 2 comes before the Contacts are read: challenge first, cheaply
        realm = self.auth.register_realm(msg)
        creds = self.auth.credentials(msg, "authorization", realm)
        if creds is None:
            self.element.reply(stx, self.auth.challenge(msg, 401, realm, self.element.client(msg, source)))
            return
        reg = read_register(msg, self.element.identity.domains, self.policy)
        if reg.domain != realm:
            raise Forbidden("To and Request-URI name different domains", partial=msg)
        if creds.username != reg.user:
            self.element.metrics.auth_failures("user_mismatch").inc()
            raise Forbidden("credentials do not match the address-of-record", partial=msg)
        client = self.element.client(msg, source)
        started = self.element.now()
        if self.store.admits:
            account = self.auth.verified_without_io(creds, msg, client, realm)
            if account is not None:
                try:
                    self._write(stx, msg, source, reg, started, account, creds, client)
                    return
                except ValueError:
                    pass  # authenticate first, then the same ValueError (400) as ever
        # partials of methods, not closures: no reference cycle per request (see farmstate.py)
        done = partial(self._authenticated, stx, msg, source, creds, reg, started)
        self.auth.authenticate(creds, msg, client, realm, done)

    def _authenticated(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        source: Address,
        creds: auth.Credentials,
        reg: RegisterRequest,
        started: float,
        answer: AuthAnswer,
    ) -> None:
        element = self.element
        if answer.error is not None:
            element.store_failed(stx, msg, answer.error)
            return
        if answer.verdict is not Verdict.OK:
            self._refuse(stx, msg, element.client(msg, source), reg, answer.verdict)
            return
        account = answer.account
        assert account is not None
        try:
            self._write(stx, msg, source, reg, started, account, None, None)
        except ValueError as exc:
            element.fail(stx, BadMessage(str(exc), partial=msg))

    def _refuse(
        self, stx: ServerTransaction, msg: SipMessage, client: Address, reg: RegisterRequest, verdict: Verdict
    ) -> None:
        """A banned source's 403, or a new challenge (stale=true for a stale or replayed nonce)."""
        element = self.element
        if verdict is Verdict.BANNED:
            element.reply(stx, self.auth.refusal(msg))
        else:
            element.reply(stx, self.auth.challenge(msg, 401, reg.domain, client, stale=verdict is Verdict.STALE))

    def _write(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        source: Address,
        reg: RegisterRequest,
        started: float,
        account: Account,
        creds: auth.Credentials | None,
        client: Address | None,
    ) -> None:
        """Apply the REGISTER's Contacts; with ``creds`` (verified without I/O) and ``client``,
        behind the guard's admission in the same script. ValueError: nothing was sent."""
        element = self.element
        path = self._path(reg.path, reg.outbound, source)
        flow_timer = self._flow_timer(path, source) if reg.outbound else None
        # the binding's facts, the same for either store call
        fields: dict[str, object] = {
            "call_id": msg.call_id.decode("latin-1"),
            "cseq": msg.cseq[0],
            "now": element.wall(),
            "max_contacts": account.max_contacts,
            "remove_all": reg.remove_all,
            "path": path,
            "received": str(source),
            "user_agent": (msg.get("user-agent") or b"").decode("utf-8", "replace")[:100],
            "node": element.identity.node_id,
        }
        if creds is None or client is None:
            applied = partial(self._applied, stx, msg, reg, started, flow_timer)
            self.store.register(reg.aor, reg.updates, applied, **fields)
            return
        self.store.register_admitted(
            reg.aor,
            reg.updates,
            client.host,
            nonce_use(creds),
            self.auth.nonce_use_ttl,
            partial(self._admitted, stx, msg, reg, started, flow_timer, creds, client),
            **fields,
        )

    def _admitted(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        reg: RegisterRequest,
        started: float,
        flow_timer: int | None,
        creds: auth.Credentials,
        client: Address,
        res: AdmittedRegister | StoreError,
    ) -> None:
        if isinstance(res, StoreError):
            self.element.store_failed(stx, msg, res)
            return
        verdict = self.auth.admitted(creds, msg, client, res.ban_left, res.first_use)
        if verdict is not Verdict.OK or res.result is None:
            self._refuse(stx, msg, client, reg, verdict)
            return
        self._applied(stx, msg, reg, started, flow_timer, res.result)

    def _applied(
        self,
        stx: ServerTransaction,
        msg: SipMessage,
        reg: RegisterRequest,
        started: float,
        flow_timer: int | None,
        res: RegisterResult | StoreError,
    ) -> None:
        element = self.element
        if isinstance(res, StoreError):
            element.store_failed(stx, msg, res)
            return
        if res.outcome is RegisterOutcome.OK:
            source = stx.source
            if not reg.path and source.transport == "udp":
                # this node is the phone's edge proxy: answer its flow's STUN keep-alives for
                # as long as a binding it registered from there lasts
                received = str(source)
                until = max((b.expires_at for b in res.bindings if b.received == received), default=0.0)
                self.direct_flows.registered(source, until)
            gruu = partial(self._gruu_params, msg, reg) if _supports_gruu(msg) else None
            response = register_ok(
                msg,
                res.bindings,
                element.wall(),
                element.tag(msg),
                outbound=reg.outbound,
                gruu=gruu,
                flow_timer=flow_timer,
            )
        else:
            response = make_response(msg, res.outcome.sip_status, res.outcome.sip_reason, to_tag=element.tag(msg))
        element.metrics.register_seconds.observe(element.now() - started)
        element.reply(stx, response)

    def _gruu_params(self, msg: SipMessage, reg: RegisterRequest, binding: Binding) -> str:
        """RFC 5627 5.2, 5.4: the public GRUU and a new temporary one (this binding's Call-ID and
        CSeq: a new one on every refresh) of a binding with an instance ID."""
        instance = binding.instance or ""
        to_uri = msg.name_addr_uri("to")
        user_part = to_uri.user if isinstance(to_uri, SipURI) and to_uri.user else reg.user
        pub = public_gruu(user_part, reg.domain, instance)
        try:
            temp = self.temp_gruus.uri(reg.user, reg.domain, instance, binding.call_id, binding.cseq)
        except ValueError:  # an instance no temporary GRUU can carry (stored before the bound)
            return f';pub-gruu="{pub}"'
        return f';pub-gruu="{pub}";temp-gruu="{temp}"'

    def _flow_timer(self, path: tuple[str, ...], source: Address) -> int:
        """RFC 5626 5.4: the keepalive interval of the flow to the UA, by its transport: the
        bottom Path entry is the edge proxy facing the UA (``;transport=`` when not UDP), else
        the UA is connected straight to this node."""
        transport = source.transport
        if path:
            try:
                uri = parse_name_addr(path[-1].encode("latin-1")).uri
            except (HeaderError, URIError, UnicodeEncodeError):
                uri = None
            if isinstance(uri, SipURI):
                transport = uri.transport
        return self.flow_timer_udp if transport == "udp" else self.flow_timer_stream

    def _path(self, path: tuple[str, ...], outbound: bool, source: Address) -> tuple[str, ...]:
        """The Path to store: the request's, or (a client connected straight to this node over a
        connection, or an outbound client) our own entry naming its flow, so any node reaches it
        through us (RFC 3327 / RFC 5626 5.1, the node acting as its own edge proxy)."""
        if path or (source.transport == "udp" and not outbound):
            return path
        host, port = self.element.identity.address(source.transport)
        return (flow_uri(self.flow_tokens, source, host, port, outbound=True).decode("latin-1"),)


def _supports_gruu(msg: SipMessage) -> bool:
    """The UA lists ``gruu`` in Supported (RFC 5627 4.1, 5.2: no GRUU for one that does not)."""
    for value in msg.get_all("supported"):
        for token in value.split(b","):
            if token.strip().lower() == b"gruu":
                return True
    return False
