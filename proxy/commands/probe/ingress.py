"""`probe` for an ingress route: stand where the partner stands and dial our listener."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy import config as cfg
from proxy.commands.probe.egress import _CertRequests
from proxy.commands.probe.reports import (
    ALERT_GRACE,
    ANSWER_PREVIEW,
    ANSWER_WAIT,
    NOT_A_REQUEST,
    CertFacts,
    IngressReport,
    _lost_text,
    _name_text,
)
from proxy.tls import contexts as tls

# --------------------------------------------------------------------------- ingress
# OpenSSL's verdicts that only say the anchor is not in the bundle (X509_V_ERR_UNABLE_TO_GET_
# ISSUER_CERT, DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_
# LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE): what a private CA gives, unlike expiry or a bad
# signature
_ANCHOR_ERRORS = frozenset({2, 18, 19, 20, 21})


class _ChainVerdict:
    """Verify callback of the partner's view: keeps OpenSSL's first complaint and lets the
    handshake go on, so a chain that fails still shows what else the listener sends."""

    def __init__(self) -> None:
        self.called = False
        self.error: str | None = None
        self.errnos: set[int] = set()

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        self.called = True
        if not ok:
            self.errnos.add(errno)
        if not ok and self.error is None:
            subject = cert.to_cryptography().subject.rfc4514_string()
            reason = tls.VERIFY_REASONS.get(errno, f"verification error {errno}")
            self.error = f"{reason} (depth {depth}: {subject})"
        return True  # never sends anything that matters: nothing to protect


@implementer(IOpenSSLClientConnectionCreator)
class _PartnerTLS:
    """The partner's side of the handshake; keeps the connection for inspection."""

    def __init__(self, context: SSL.Context, sni: str | None, clock: Any) -> None:
        self.context = context
        self.sni = sni.encode("idna") if sni else None
        self.clock = clock
        self.connection: SSL.Connection | None = None
        self.tcp_at: float | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        self.tcp_at = self.clock.seconds()
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        if self.sni:
            conn.set_tlsext_host_name(self.sni)
        conn.set_connect_state()
        self.connection = conn
        return conn


@implementer(IHandshakeListener)
class _PartnerSide(protocol.Protocol):
    """Waits for the listener's verdict on a connection without a client certificate: an alert
    (refused), or, when none comes, an answer to a request line no parser accepts."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.done: defer.Deferred[None] = defer.Deferred()
        self.handshake_at: float | None = None
        self.asked = False
        self.answer = b""
        self.lost: Failure | None = None
        self.timed_out = False
        self._nudge: Any = None

    def handshakeCompleted(self) -> None:
        self.handshake_at = self.clock.seconds()
        self._nudge = self.clock.callLater(ALERT_GRACE, self._ask)

    def _ask(self) -> None:
        self._nudge = None
        self.asked = True
        assert self.transport is not None
        self.transport.write(NOT_A_REQUEST)

    def dataReceived(self, data: bytes) -> None:
        self.answer = (self.answer + data)[:ANSWER_PREVIEW]
        if b"\n" in self.answer or len(self.answer) >= ANSWER_PREVIEW:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._nudge is not None and self._nudge.active():
            self._nudge.cancel()
        self.lost = reason
        if not self.done.called:
            self.done.callback(None)


class _OneShotFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, side: _PartnerSide) -> None:
        self.side = side

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.side


def _dial_host(host: str) -> str:
    """A wildcard listener is dialed on loopback; a given address or name as it is."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class _IngressProber:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def _ms(self, since: float) -> float:
        now: float = self.reactor.seconds()
        return round((now - since) * 1000, 1)

    async def route(self, rc: cfg.IngressRoute) -> IngressReport:
        listen = rc.listen
        report = IngressReport(rc.name, str(listen), tls_name=rc.server_name)
        endpoint: Any
        if listen.kind == "systemd":
            report.skipped = (
                f"systemd:{listen.name} is a socket systemd hands over; its address is in the "
                ".socket unit, not in this config, so it cannot be probed from here"
            )
            return report
        if listen.kind == "unix":
            report.address = listen.path
            endpoint = endpoints.UNIXClientEndpoint(
                self.reactor, listen.path, timeout=rc.timeouts.connect
            )
        elif listen.port == 0:
            report.skipped = "port 0 is a port chosen at each start; it cannot be probed"
            return report
        else:
            host = _dial_host(listen.host)
            report.address = f"[{host}]:{listen.port}" if ":" in host else f"{host}:{listen.port}"
            endpoint = endpoints.HostnameEndpoint(
                self.reactor, host, listen.port, timeout=rc.timeouts.connect
            )
        # the Mozilla bundle through the loader egress uses when `trust` is not set
        context = tls.client_context(None, None, rc.profile)
        verdict = _ChainVerdict()
        context.set_verify(SSL.VERIFY_PEER, verdict)
        requests = _CertRequests()
        context.set_info_callback(requests)
        name = rc.server_name
        sni = name if name and not (isIPAddress(name) or isIPv6Address(name)) else None
        creator = _PartnerTLS(context, sni, self.reactor)
        side = _PartnerSide(self.reactor)
        started = self.reactor.seconds()
        try:
            wrapper = await endpoint.connect(tls.tls_factory(creator, True, _OneShotFactory(side)))
        except Exception as e:
            report.tcp = _connect_failure(e, rc.timeouts.connect)
            report.tcp_ms = self._ms(started)
            return report
        report.tcp_ok, report.tcp = True, "connected"
        if creator.tcp_at is not None:
            report.tcp_ms = round((creator.tcp_at - started) * 1000, 1)
        limit = rc.timeouts.handshake + ALERT_GRACE + ANSWER_WAIT

        def expire() -> None:
            side.timed_out = True
            wrapper.transport.abortConnection()

        timer = self.reactor.callLater(limit, expire)
        await side.done
        if timer.active():
            timer.cancel()
        self._facts(report, rc, creator, side, verdict, requests)
        return report

    def _facts(
        self,
        report: IngressReport,
        rc: cfg.IngressRoute,
        creator: _PartnerTLS,
        side: _PartnerSide,
        verdict: _ChainVerdict,
        requests: _CertRequests,
    ) -> None:
        conn = creator.connection
        if conn is None:
            return
        why = _lost_text(side.lost) if side.lost is not None else ""
        if side.handshake_at is not None and creator.tcp_at is not None:
            report.handshake_ms = round((side.handshake_at - creator.tcp_at) * 1000, 1)
            report.handshake = "completed"
        elif side.timed_out:
            report.handshake = f"did not finish within {rc.timeouts.handshake:g} s"
        else:
            report.handshake = f"ended by the listener: {why}"
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        report.served_chain = [CertFacts.of(c, i == 0) for i, c in enumerate(chain)]
        cipher = conn.get_cipher_name()
        if cipher or chain:  # before the ServerHello, OpenSSL names what we offer, not a choice
            report.tls_version = conn.get_protocol_version_name()
            report.cipher = cipher
            alpn = conn.get_alpn_proto_negotiated()
            report.alpn = alpn.decode("ascii", "replace") if alpn else None
        if not chain:
            report.verification = "not reached: no server certificate received"
        elif verdict.error is not None and verdict.errnos <= _ANCHOR_ERRORS:
            # sound but anchored outside Mozilla's bundle: D1 allows a private CA it was given
            report.mozilla_root = False
            report.verification = f"the served chain builds to no Mozilla root: {verdict.error}"
            top = chain[-1]
            ca = top.subject if top.issuer == top.subject else top.issuer
            report.private_ca = (
                f"a private CA ({ca.rfc4514_string()}) is fine for D1 only if Thales holds it:"
                " hand this CA's bundle (PEM) to Thales, and warn them before any CA change"
                + ("; from a public CA, serve its intermediates too" if len(chain) == 1 else "")
            )
        elif verdict.error is not None:
            report.mozilla_root = False
            report.verification = (
                f"the served chain does not build to a Mozilla root: {verdict.error}; "
                "the partner will refuse the connection"
            )
        elif verdict.called:
            report.mozilla_root = True
            verified = conn.get_verified_chain(as_cryptography=True)
            if verified:
                report.anchor = verified[-1].subject.rfc4514_string()
            report.verification = "the served chain builds to a Mozilla root"
        if chain and rc.server_name:
            problem = tls.verify_hostname_error(conn, rc.server_name)
            report.name_ok = problem is None
            report.name_check = problem or f"{rc.server_name} matches"
        elif chain:
            report.name_check = "not checked: the route sets no server_name"
        if chain:
            report.configured = _against_config(chain[0], rc.server_cert)
        requested = id(conn) in requests.seen
        report.cert_requested = requested if (requested or side.handshake_at) else None
        report.client_cas = [_name_text(n) for n in conn.get_client_ca_list()]
        self._client_auth(report, side, why)

    @staticmethod
    def _client_auth(report: IngressReport, side: _PartnerSide, why: str) -> None:
        refused = side.lost is not None and side.lost.check(SSL.Error) is not None
        if side.answer:
            line = side.answer.split(b"\n", 1)[0].decode("latin-1", "replace").strip()
            report.client_cert_required = False
            report.client_auth = (
                f"NOT required: the listener answered {line!r} to a connection without a "
                "client certificate"
            )
        elif refused and report.cert_requested:
            report.client_cert_required = True
            when = "after the handshake" if side.handshake_at is not None else "in the handshake"
            report.client_auth = (
                f"required: the listener refused the connection without a client certificate "
                f"{when} ({why})"
            )
        elif report.cert_requested is False:
            report.client_cert_required = False
            report.client_auth = "NOT required: the listener did not ask for a client certificate"
        elif side.timed_out and side.asked:
            report.client_auth = "unknown: no alert and no answer to a malformed request"
        elif side.handshake_at is not None:
            report.client_auth = f"unknown: the listener closed without an alert or answer ({why})"
        else:
            report.client_auth = "unknown: the handshake did not get that far"


def _connect_failure(e: Exception, timeout: float) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused (is the sidecar running with this config?)"
    if isinstance(e, error.TimeoutError | defer.CancelledError):
        return f"timed out after {timeout:g} s"
    if isinstance(e, error.DNSLookupError):
        return f"DNS lookup failed: {e}"
    if isinstance(e, error.ConnectError) and e.osError is not None:
        return str(e.osError)
    return str(e) or type(e).__name__


def _against_config(served: x509.Certificate, server_cert: Any) -> str:
    try:
        configured = tls.read_chain(server_cert, "server_cert")
    except tls.MaterialError as e:
        return f"cannot compare with the config: {e}"
    if configured and configured[0] == served:
        return f"the served certificate is the route's server_cert ({server_cert})"
    return (
        f"the served certificate is NOT the route's server_cert ({server_cert}): is the "
        "sidecar running this config, or is a reload pending?"
    )
