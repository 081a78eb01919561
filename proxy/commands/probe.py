"""`mtls-sidecar probe`: dial each route the way its peer does, and say what happened.

Egress: the dial goes through the same pieces as the data path: the route's client material
(`tls.build_client_material`), `tls.ClientTLS`, the configured resolver and `pool.Pool`, so
the verification verdict is the one `run` would reach. One pool per DNS answer makes every
address's result visible. A short `GET /` on a verified connection tells whether the server
accepted our client certificate: with TLS 1.3 a server judges it only after the handshake.

Ingress: the probe stands where the partner stands and dials our own listener: it verifies the
served chain against the Mozilla bundle (the egress `trust` default, which is what D1 checks),
reads the CA names the listener asks clients for from its CertificateRequest, and presents no
client certificate, so a listener that enforces mutual TLS refuses it: that refusal is expected
and reported.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import defer, endpoints, error, protocol, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy import config as cfg
from proxy.oauth import client as oauth
from proxy.telemetry.metrics import Metrics
from proxy.tls import contexts as tls
from proxy.tls import pki
from proxy.wire.http import ProxyError
from proxy.wire.pool import Pool, UpstreamConnection
from proxy.wire.resolver import DNSResolver, resolve
from proxy.wire.tunnel import ProxyHop, hop_for

if TYPE_CHECKING:
    pass

ERROR = "mtls-sidecar: error:"
NO_TTL = "TTL not available from the system resolver"
ANSWER_PREVIEW = 4096  # bytes of the probe request's answer kept to recognise an error page
SWEEP_INTERVAL = 0.25  # as the running sidecar: connect/TLS/response deadlines are swept
# nginx answers a client certificate it cannot verify with HTTP 400 and one of these titles
# (internally 495/496), after a completed handshake.
_NGINX_CERT_PAGE = re.compile(rb"<title>\s*(\d{3} [^<]*SSL certificate[^<]*)</title>", re.I)
MOZILLA = "Mozilla bundle (certifi)"
# TLS 1.3: the listener judges our (absent) certificate after the handshake; its alert comes
# at once, so a quiet connection after this long means it let us in.
ALERT_GRACE = 1.0
ANSWER_WAIT = 3.0  # for an answer to the malformed request sent when no alert came
# no HTTP parser accepts this request line, so nothing can be forwarded to an upstream
NOT_A_REQUEST = b"PROBE\r\n\r\n"
NO_CLIENT_CERT = (
    "none presented (the probe holds no partner key); a listener that requires one refuses "
    "the connection, as it should"
)


# --------------------------------------------------------------------------- results
@attrs.define
class CertFacts:
    subject: str
    issuer: str
    not_after: str
    sans: list[str] | None = None  # the leaf only

    @classmethod
    def of(cls, cert: x509.Certificate, leaf: bool) -> CertFacts:
        return cls(
            cert.subject.rfc4514_string(),
            cert.issuer.rfc4514_string(),
            cert.not_valid_after_utc.isoformat(),
            _sans(cert) if leaf else None,
        )


@attrs.define
class AddressReport:
    address: str
    port: int
    tcp_ok: bool = False
    tcp: str = ""
    tcp_ms: float | None = None
    tls_version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    handshake_ms: float | None = None
    handshake: str = ""  # why the handshake failed, when it did
    peer_chain: list[CertFacts] = attrs.Factory(list)
    verified: bool | None = None  # None: not reached
    verification: str = ""
    anchor: str | None = None
    cert_requested: bool | None = None
    acceptable_cas: list[str] = attrs.Factory(list)
    client_cert_accepted: bool | None = None  # None: unknown
    client_cert: str = ""
    http_status: int | None = None
    proxy_answer: str = ""  # through a forward proxy: its answer to our CONNECT

    @property
    def ok(self) -> bool:
        return bool(self.verified and self.client_cert_accepted and self.http_status)


@attrs.define
class DNSReport:
    resolver: str
    answers: list[tuple[str, int | None]] = attrs.Factory(list)
    note: str = ""
    error: str = ""
    ms: float | None = None


@attrs.define
class OAuthReport:
    token_url: str
    ok: bool = False
    expires_in: int | None = None
    error: str = ""


@attrs.define
class RouteReport:
    name: str
    upstream: str
    tls_name: str
    profile: str
    trust: str
    client_certificate: dict[str, str] | None = None
    error: str = ""
    dns: DNSReport | None = None
    addresses: list[AddressReport] = attrs.Factory(list)
    oauth: OAuthReport | None = None
    proxy: str | None = None  # the forward proxy's URL; the addresses are then the proxy's

    @property
    def ok(self) -> bool:
        if self.error or not self.addresses:
            return False
        if self.oauth is not None and not self.oauth.ok:
            return False
        # An address that refuses TCP is skipped by `run` (nothing was sent); one that completes
        # TCP but fails TLS, verification or the client certificate breaks requests.
        reached = [a for a in self.addresses if a.tcp_ok]
        return bool(reached) and all(a.ok for a in reached)


@attrs.define
class IngressReport:
    """Our own ingress listener as the partner sees it."""

    name: str
    listen: str  # as configured
    address: str = ""  # what was dialed: host:port or a unix socket path
    tls_name: str | None = None  # the route's server_name: SNI and the name checked
    trust: str = MOZILLA
    client_certificate: str = NO_CLIENT_CERT
    skipped: str = ""  # why the route cannot be probed from here
    tcp_ok: bool = False
    tcp: str = ""
    tcp_ms: float | None = None
    tls_version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    handshake_ms: float | None = None
    handshake: str = ""
    served_chain: list[CertFacts] = attrs.Factory(list)
    mozilla_root: bool | None = None  # None: not reached
    verification: str = ""
    anchor: str | None = None
    name_ok: bool | None = None  # None: not checked
    name_check: str = ""
    configured: str = ""  # the served leaf against the route's server_cert
    cert_requested: bool | None = None
    client_cas: list[str] = attrs.Factory(list)
    client_cert_required: bool | None = None  # None: unknown
    client_auth: str = ""

    @property
    def ok(self) -> bool:
        return bool(
            self.tcp_ok
            and self.mozilla_root
            and self.name_ok is not False
            and self.client_cert_required
        )


# --------------------------------------------------------------------------- dialing
class _WatchedTLS(tls.ClientTLS):
    """The route's connection creator, keeping the connection so a failed handshake can be
    inspected (peer chain, verification error) after the pool has given up on it."""

    def __init__(self, material: tls.ClientMaterial, server_name: str, clock: Any) -> None:
        super().__init__(material, server_name)
        self.clock = clock
        self.connection: SSL.Connection | None = None
        self.tcp_at: float | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        # called once TCP is connected, before the first handshake byte
        self.tcp_at = self.clock.seconds()
        self.connection = super().clientConnectionForTLS(tlsProtocol)
        return self.connection


class _CertRequests:
    """Info callback: which connections received a CertificateRequest from the server."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __call__(self, conn: SSL.Connection, where: int, ret: int) -> None:
        if where & SSL.SSL_CB_LOOP and b"certificate request" in conn.get_state_string():
            self.seen.add(id(conn))


class _Answer:
    """Stands where a relay Exchange would: collects the answer to the probe request."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.done: defer.Deferred[None] = defer.Deferred()
        self.status: int | None = None
        self.reason = b""
        self.body = b""
        self.lost: Failure | None = None
        self.problem = ""

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(None)

    def response_head(self, up: UpstreamConnection) -> None:
        self.status, self.reason = up.status, up.reason

    def response_body(self, data: bytes) -> None:
        self.body += data[: ANSWER_PREVIEW - len(self.body)]
        if len(self.body) >= ANSWER_PREVIEW:
            self._finish()

    def response_complete(self) -> None:
        self._finish()

    def upstream_lost(self, reason: Failure) -> None:
        self.lost = reason
        self._finish()

    def upstream_failed(self, err: ProxyError) -> None:
        self.problem = err.detail
        self._finish()

    def upstream_timeout(self) -> None:
        self.problem = f"no answer within {self.timeout:g} s"
        self._finish()

    def upstream_full(self, full: bool) -> None:
        pass  # the probe's request is one small write


class _Prober:
    def __init__(self, reactor: Any, config: cfg.Config) -> None:
        self.reactor = reactor
        self.config = config
        ns = config.service.nameservers
        self.dns: DNSResolver | None = DNSResolver(ns) if ns else None
        self.resolver: Any = self.dns if self.dns is not None else reactor.nameResolver

    def _ms(self, since: float) -> float:
        now: float = self.reactor.seconds()
        return round((now - since) * 1000, 1)

    async def route(self, rc: cfg.EgressRoute) -> RouteReport:
        tls_name = rc.server_name or rc.upstream.host
        report = RouteReport(
            rc.name,
            str(rc.upstream),
            tls_name,
            rc.profile,
            str(rc.trust) if rc.trust else "Mozilla bundle (certifi)",
            proxy=str(rc.proxy) if rc.proxy else None,
        )
        try:
            material = tls.build_client_material(rc)
            hop = hop_for(rc.proxy)
        except tls.MaterialError as e:
            report.error = str(e)
            return report
        if material.pair is not None:
            leaf = material.pair.leaf
            report.client_certificate = {
                "subject": leaf.subject.rfc4514_string(),
                "issuer": leaf.issuer.rfc4514_string(),
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "key": pki.describe_key(leaf.public_key()),
            }
        requests = _CertRequests()
        material.context.set_info_callback(requests)
        report.dns, addresses = await self._resolve(rc)
        report.addresses = list(
            await defer.gatherResults(
                [
                    defer.ensureDeferred(self._dial(rc, material, tls_name, a, requests, hop))
                    for a in addresses
                ]
            )
        )
        if rc.oauth is not None:
            report.oauth = await self._token(rc, tls.ClientTLS(material, tls_name))
        return report

    async def _resolve(self, rc: cfg.EgressRoute) -> tuple[DNSReport, list[str]]:
        """The upstream's addresses; through a forward proxy, the proxy's (it resolves the
        upstream's name itself)."""
        host, port = rc.upstream.host, rc.upstream.port
        if rc.proxy is not None:
            host, port = rc.proxy.host, rc.proxy.port
        if isIPAddress(host) or isIPv6Address(host):
            what = "the proxy" if rc.proxy is not None else "the upstream"
            return DNSReport("", [(host, None)], note=f"{what} is an IP address"), [host]
        started = self.reactor.seconds()
        if self.dns is not None:
            servers = ", ".join(f"{h}:{p}" for h, p in self.config.service.nameservers)
            report = DNSReport(servers)
            answers = await self.dns.answers(host)
            report.ms = self._ms(started)
            report.answers = [(a.address, a.ttl) for a in answers]
            if not answers:
                report.error = f"no A or AAAA record for {host}"
            return report, list(dict.fromkeys(a.address for a in answers))
        report = DNSReport("system (getaddrinfo)", note=NO_TTL)
        try:
            found = await resolve(self.resolver, host, port)
        except Exception as e:
            report.ms = self._ms(started)
            report.error = str(e) or type(e).__name__
            return report, []
        report.ms = self._ms(started)
        report.answers = [(a, None) for a in found]
        return report, found

    async def _dial(
        self,
        rc: cfg.EgressRoute,
        material: tls.ClientMaterial,
        tls_name: str,
        address: str,
        requests: _CertRequests,
        hop: ProxyHop | None = None,
    ) -> AddressReport:
        report = AddressReport(address, rc.upstream.port if hop is None else hop.port)
        creator = _WatchedTLS(material, tls_name, self.reactor)
        if hop is not None:  # this one address of the proxy; the upstream's name in CONNECT
            hop = ProxyHop(address, hop.port, hop.authorization)
            hop.url = str(rc.proxy)
        pool = Pool(
            reactor=self.reactor,
            clock=self.reactor,
            resolver=self.resolver,  # not asked: the host is this one address
            host=address if hop is None else rc.upstream.host,
            port=rc.upstream.port,
            proxy=hop,
            tls=creator,
            connect_timeout=rc.timeouts.connect,
            idle_timeout=rc.timeouts.pool_idle,
            max_age=rc.max_connection_age,
            max_idle=1,
        )
        sweeper = task.LoopingCall(lambda: pool.sweep(self.reactor.seconds()))
        sweeper.clock = self.reactor
        sweeper.start(SWEEP_INTERVAL, now=False)
        started = self.reactor.seconds()
        try:
            try:
                conn = await defer.maybeDeferred(pool.acquire)
            except ProxyError as e:
                if e.code in ("proxy_refused", "bad_gateway", "proxy_unreachable"):
                    _proxy_failed(report, e, self._ms(started))
                    return report
                self._failed(report, creator, e, started, tls_name, requests, rc.timeouts.connect)
                if hop is not None and creator.connection is not None:
                    report.proxy_answer = _tunnel_answer(_upstream_of(creator.connection))
                return report
            report.proxy_answer = _tunnel_answer(conn)
            self._handshake_facts(report, creator, started, requests, completed=True)
            report.verified = True
            report.verification = f"verified against trust; name {tls_name} matches"
            await self._ask(report, rc, conn)
            return report
        finally:
            sweeper.stop()
            pool.close_all()

    def _handshake_facts(
        self,
        report: AddressReport,
        creator: _WatchedTLS,
        started: float,
        requests: _CertRequests,
        completed: bool,
    ) -> None:
        conn = creator.connection
        if conn is None:
            return
        report.tcp_ok = True
        report.tcp = "connected"
        if creator.tcp_at is not None:
            report.tcp_ms = round((creator.tcp_at - started) * 1000, 1)
            report.handshake_ms = self._ms(creator.tcp_at)
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        report.peer_chain = [CertFacts.of(c, i == 0) for i, c in enumerate(chain)]
        cipher = conn.get_cipher_name()
        # before the ServerHello, OpenSSL names the highest version we offer, not a choice
        if cipher or chain:
            report.tls_version = conn.get_protocol_version_name()
            report.cipher = cipher
            alpn = conn.get_alpn_proto_negotiated()
            report.alpn = alpn.decode("ascii", "replace") if alpn else None
        verified = conn.get_verified_chain(as_cryptography=True)
        if verified:
            report.anchor = verified[-1].subject.rfc4514_string()
        # before a completed handshake, "not seen" may only mean "not reached"
        report.cert_requested = (
            True if id(conn) in requests.seen else (False if completed else None)
        )
        report.acceptable_cas = [_name_text(n) for n in conn.get_client_ca_list()]

    def _failed(
        self,
        report: AddressReport,
        creator: _WatchedTLS,
        e: ProxyError,
        started: float,
        tls_name: str,
        requests: _CertRequests,
        connect_timeout: float,
    ) -> None:
        conn = creator.connection
        if conn is None:  # TCP never connected
            if e.code == "upstream_timeout":
                report.tcp = f"timed out after {connect_timeout:g} s"
            else:  # the pool's detail ends with the reason, e.g. "connection refused"
                report.tcp = e.detail.rsplit(": ", 1)[-1]
            report.tcp_ms = self._ms(started)
            return
        up = _upstream_of(conn)
        verify_error = up.verify_error if up is not None else None
        detail = up.failure_detail if up is not None else None
        # a name mismatch is found after a completed handshake (see UpstreamConnection)
        mismatch = bool(detail and detail.startswith("hostname mismatch"))
        self._handshake_facts(report, creator, started, requests, completed=mismatch)
        if not mismatch:
            report.handshake_ms = None
        if verify_error:
            report.verified = False
            report.verification = f"not trusted: {verify_error}"
            report.handshake = "aborted by us: the server's certificate failed verification"
        elif mismatch:
            report.verified = False
            report.verification = detail or e.detail
            report.handshake = "completed, then closed by us before any request"
        elif e.code == "upstream_timeout":
            report.handshake = detail or e.detail
            report.verification = "not reached: the handshake did not finish"
        else:
            report.handshake = _strip_address(e.detail)
            if report.peer_chain:
                # the chain passed the verify callback; the name is checked as run does
                problem = tls.verify_hostname_error(conn, tls_name)
                report.verified = problem is None
                report.verification = (
                    f"verified against trust; name {tls_name} matches"
                    if problem is None
                    else problem
                )
                if report.cert_requested:
                    report.client_cert_accepted = False
                    report.client_cert = (
                        "client certificate refused: the server ended the handshake after "
                        f"asking for it ({_strip_address(e.detail)})"
                    )
            else:
                report.verification = "not reached: no server certificate received"
        if report.client_cert_accepted is None:
            report.client_cert = (
                "client certificate not tested: no request goes to an unverified server"
                if report.verified is False
                else "client certificate not tested: the handshake failed"
            )

    async def _ask(self, report: AddressReport, rc: cfg.EgressRoute, conn: Any) -> None:
        """A tiny GET /: any HTTP status means the server let our certificate through."""
        answer = _Answer(rc.timeouts.response)
        conn.exchange = answer
        conn.deadline = self.reactor.seconds() + rc.timeouts.response
        conn.write(
            b"GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: mtls-sidecar-probe\r\nAccept: */*\r\n"
            b"x-correlation-id: %s\r\nConnection: close\r\n\r\n"
            % (rc.upstream.authority.encode("idna"), oauth.new_correlation_id().encode())
        )
        await answer.done
        conn.exchange = None
        conn.abort()
        if answer.status is not None:
            report.http_status = answer.status
            reason = answer.reason.decode("latin-1", "replace").strip()
            page = _NGINX_CERT_PAGE.search(answer.body)
            if answer.status in (495, 496) or (answer.status == 400 and page):
                report.client_cert_accepted = False
                title = page.group(1).decode("latin-1") if page else f"{answer.status} {reason}"
                report.client_cert = (
                    f"client certificate refused: GET / answered HTTP {answer.status} "
                    f"({title!r}, an nginx-style certificate error page)"
                )
            elif report.cert_requested is False:
                report.client_cert_accepted = True
                report.client_cert = (
                    "client certificate not requested by the server (nothing to refuse); "
                    f"GET / answered HTTP {answer.status} {reason}".rstrip()
                )
            else:
                report.client_cert_accepted = True
                report.client_cert = (
                    f"client certificate accepted: GET / answered HTTP {answer.status} {reason}"
                ).rstrip()
        elif answer.lost is not None:
            why = _lost_text(answer.lost)
            if answer.lost.check(SSL.Error):
                report.client_cert_accepted = False
                report.client_cert = (
                    f"client certificate refused: TLS alert right after the handshake ({why})"
                )
            else:
                report.client_cert_accepted = False
                report.client_cert = (
                    "client certificate refused: the server closed the connection right after "
                    f"the handshake without answering ({why})"
                )
        else:
            report.client_cert = f"client certificate not confirmed: {answer.problem}"

    async def _token(self, rc: cfg.EgressRoute, client: tls.ClientTLS) -> OAuthReport:
        from proxy.oauth.glue import egress_token_source

        assert rc.oauth is not None
        report = OAuthReport(rc.oauth.token_url)
        metrics = Metrics.create()
        try:
            glue = egress_token_source(self.reactor, metrics, rc, client)
        except tls.MaterialError as e:
            report.error = str(e)
            return report
        glue.source.start()
        try:
            await glue.source.token()  # the token itself is dropped here, never shown
        except oauth.TokenError as e:
            report.error = e.detail
            return report
        finally:
            glue.source.stop()
        left = metrics.registry.get_sample_value(
            "mtls_sidecar_oauth_token_expiry_seconds", {"route": rc.name}
        )
        report.ok = True
        report.expires_in = round(left) if left is not None else None
        return report


def _tunnel_answer(conn: Any) -> str:
    """The forward proxy's answer to the CONNECT of a connection made through one."""
    tunnel = getattr(getattr(conn, "connector", None), "tunnel", None)
    return str(tunnel.answer) if tunnel is not None else ""


def _proxy_failed(report: AddressReport, e: ProxyError, ms: float) -> None:
    """The forward proxy refused the tunnel, or could not be reached."""
    report.tcp_ms = ms
    if e.code == "proxy_unreachable":
        report.tcp = e.detail.rsplit(": ", 1)[-1]
        return
    report.tcp_ok = True
    report.tcp = "connected to the proxy"
    report.proxy_answer = e.detail
    report.verification = "not reached: no tunnel"
    report.client_cert = "client certificate not tested: no tunnel"


def _upstream_of(conn: SSL.Connection) -> UpstreamConnection | None:
    wrapped = getattr(conn.get_app_data(), "wrappedProtocol", None)
    return wrapped if isinstance(wrapped, UpstreamConnection) else None


def _strip_address(detail: str) -> str:
    return re.sub(r" \[[^\]]*\]$", "", detail)


def _lost_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        texts = [str(item[-1]) for item in value.args[0] if isinstance(item, tuple)]
        if texts:
            return "; ".join(texts)
    if isinstance(value, error.ConnectionDone):
        return "clean close"
    return str(value) or type(value).__name__


def _sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for n in san:
        if isinstance(n, x509.DNSName):
            out.append(f"DNS:{n.value}")
        elif isinstance(n, x509.IPAddress):
            out.append(f"IP:{n.value}")
        elif isinstance(n, x509.UniformResourceIdentifier):
            out.append(f"URI:{n.value}")
        elif isinstance(n, x509.RFC822Name):
            out.append(f"email:{n.value}")
        else:
            out.append(f"{type(n).__name__}:{n.value}")
    return out


def _name_text(name: Any) -> str:
    """An X509Name as cryptography's rfc4514_string() writes it: most specific first."""
    components = name.get_components()
    parts = [f"{k.decode()}={_dn_value(v.decode('utf-8', 'replace'))}" for k, v in components]
    return ",".join(reversed(parts))


def _dn_value(value: str) -> str:
    value = re.sub(r'([\\"+,;<>])', r"\\\1", value)
    if value.startswith(("#", " ")):
        value = "\\" + value
    if value.endswith(" "):
        value = value[:-1] + "\\ "
    return value


# --------------------------------------------------------------------------- ingress
class _ChainVerdict:
    """Verify callback of the partner's view: keeps OpenSSL's first complaint and lets the
    handshake go on, so a chain that fails still shows what else the listener sends."""

    def __init__(self) -> None:
        self.called = False
        self.error: str | None = None

    def __call__(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        self.called = True
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


# --------------------------------------------------------------------------- output
def _as_json(config: cfg.Config, reports: Sequence[RouteReport | IngressReport]) -> dict[str, Any]:
    def plain(value: Any) -> dict[str, Any]:
        return attrs.asdict(value, value_serializer=lambda _i, _f, v: None if v == "" else v)

    def address(a: AddressReport) -> dict[str, Any]:
        doc = plain(a)
        doc["ok"] = a.ok
        return doc

    routes: list[dict[str, Any]] = []
    for r in reports:
        if isinstance(r, IngressReport):
            routes.append({"name": r.name, "direction": "ingress", **plain(r), "ok": r.ok})
            continue
        dns = None
        if r.dns is not None:
            dns = {
                "resolver": r.dns.resolver or None,
                "answers": [{"address": a, "ttl": t} for a, t in r.dns.answers],
                "note": r.dns.note or None,
                "error": r.dns.error or None,
                "ms": r.dns.ms,
            }
        routes.append(
            {
                "name": r.name,
                "direction": "egress",
                "upstream": r.upstream,
                "tls_name": r.tls_name,
                "profile": r.profile,
                "trust": r.trust,
                "client_certificate": r.client_certificate,
                "error": r.error or None,
                "proxy": r.proxy,
                "dns": dns,
                "addresses": [address(a) for a in r.addresses],
                "oauth": plain(r.oauth) if r.oauth is not None else None,
                "ok": r.ok,
            }
        )
    return {"config": str(config.path), "ok": _all_ok(reports), "routes": routes}


def _all_ok(reports: Sequence[RouteReport | IngressReport]) -> bool:
    """Every probed route is fine; a route that cannot be probed from here (a socket systemd
    hands over) does not count, but a run that probed nothing is no confirmation."""
    probed = [r for r in reports if not (isinstance(r, IngressReport) and r.skipped)]
    return bool(probed) and all(r.ok for r in probed)


def _kv(lines: list[str], indent: int, key: str, value: str) -> None:
    label = f"{key}:" if key else ""
    lines.append(f"{' ' * indent}{label:<20} {value}")


def _chain_lines(lines: list[str], indent: int, title: str, chain: Sequence[CertFacts]) -> None:
    for i, c in enumerate(chain):
        _kv(lines, indent, f"{title} [{i}]", f"subject {c.subject}")
        _kv(lines, indent, "", f"issuer {c.issuer}")
        _kv(lines, indent, "", f"not after {c.not_after}")
        if c.sans is not None:
            _kv(lines, indent, "", f"SANs {', '.join(c.sans) or 'none'}")


def _ingress_text(r: IngressReport) -> list[str]:
    lines: list[str] = []

    def kv(key: str, value: str) -> None:
        _kv(lines, 2, key, value)

    dialed = f", dialed {r.address} as the partner would" if r.address else ""
    lines.append(f"ingress {r.name} <- listen {r.listen}{dialed}")
    if r.skipped:
        kv("not probed", r.skipped)
        kv("result", "not probed")
        return lines
    kv("TLS name", r.tls_name or "not set (no SNI, no name check): set server_name")
    kv("trust", f"{r.trust}, as the partner checks")
    kv("client certificate", r.client_certificate)
    if r.address:
        kv("TCP", r.tcp + (f" in {r.tcp_ms:g} ms" if r.tcp_ms is not None else ""))
    if r.tcp_ok:
        if r.tls_version and r.cipher:
            took = f" (handshake {r.handshake_ms:g} ms)" if r.handshake_ms is not None else ""
            kv("TLS", f"{r.tls_version}, {r.cipher}, ALPN {r.alpn or 'none'}{took}")
        kv("handshake", r.handshake)
        _chain_lines(lines, 2, "served chain", r.served_chain)
        verdict = r.verification + (f" (anchor {r.anchor})" if r.anchor else "")
        answer = {True: "yes: ", False: "NO: ", None: ""}[r.mozilla_root]
        kv("Mozilla root", answer + verdict)
        if r.name_check:
            kv("name", r.name_check)
        if r.configured:
            kv("config", r.configured)
        if r.cert_requested is not None:
            kv("cert requested", "yes" if r.cert_requested else "no")
        kv("client CAs asked", "; ".join(r.client_cas) or "none")
        kv("client auth", r.client_auth)
    kv("result", "OK" if r.ok else "FAILED")
    return lines


def _text(reports: Sequence[RouteReport | IngressReport]) -> str:
    lines: list[str] = []

    def kv(indent: int, key: str, value: str) -> None:
        _kv(lines, indent, key, value)

    for r in reports:
        if isinstance(r, IngressReport):
            lines += [*_ingress_text(r), ""]
            continue
        lines.append(
            f"egress {r.name} -> {r.upstream} (TLS name {r.tls_name}, profile {r.profile})"
        )
        kv(2, "trust", r.trust)
        if r.client_certificate:
            own = r.client_certificate
            kv(
                2,
                "client certificate",
                f"{own['subject']} ({own['key']}), not after {own['not_after']}",
            )
        if r.proxy:
            kv(2, "proxy", f"{r.proxy}: CONNECT by name, the proxy resolves the upstream")
        if r.error:
            kv(2, "error", r.error)
        if r.dns is not None:
            d = r.dns
            took = f" in {d.ms:g} ms" if d.ms is not None else ""
            dns = "proxy DNS" if r.proxy else "DNS"
            kv(2, dns, f"resolver {d.resolver}{took}" if d.resolver else "not asked")
            for addr, ttl in d.answers:
                kv(4, "answer", f"{addr} ({f'TTL {ttl} s' if ttl is not None else d.note})")
            if d.error:
                kv(4, "error", d.error)
            elif d.note and not d.answers:
                kv(4, "note", d.note)
        for a in r.addresses:
            lines.append(f"  {a.address}:{a.port}" + (" (proxy)" if r.proxy else ""))
            tcp = a.tcp + (f" in {a.tcp_ms:g} ms" if a.tcp_ms is not None else "")
            kv(4, "TCP", tcp)
            if a.proxy_answer:
                kv(4, "CONNECT", a.proxy_answer)
            if not a.tcp_ok or (r.proxy and a.verified is None and not a.tls_version):
                if a.tcp_ok:
                    kv(4, "client auth", a.client_cert)
                continue
            if a.tls_version and a.cipher:
                hs = (
                    f" (handshake {a.handshake_ms:g} ms)"
                    if a.handshake_ms is not None
                    else " (handshake not completed)"
                )
                kv(4, "TLS", f"{a.tls_version}, {a.cipher}, ALPN {a.alpn or 'none'}{hs}")
            elif a.tls_version:
                kv(4, "TLS", f"{a.tls_version} negotiated; the handshake did not complete")
            if a.handshake:
                kv(4, "handshake", a.handshake)
            _chain_lines(lines, 4, "peer chain", a.peer_chain)
            verdict = a.verification
            if a.verified and a.anchor:
                verdict += f" (anchor {a.anchor})"
            kv(4, "verification", verdict)
            if a.cert_requested is not None:
                asked = "yes" if a.cert_requested else "no"
                if a.acceptable_cas:
                    asked += f" (acceptable CAs: {'; '.join(a.acceptable_cas)})"
                kv(4, "cert requested", asked)
            kv(4, "client auth", a.client_cert)
        if r.oauth is not None:
            o = r.oauth
            if o.ok:
                expires = f"expires_in {o.expires_in} s" if o.expires_in is not None else "OK"
                kv(2, "OAuth token", f"OK from {o.token_url}, {expires}")
            else:
                kv(2, "OAuth token", f"FAILED: {o.error}")
        kv(2, "result", "OK" if r.ok else "FAILED")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def run_probe(config_path: str, route: str | None, *, as_json: bool, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        config = cfg.load(config_path)
    except cfg.ConfigError as e:
        for f in e.findings:
            print(f"mtls-sidecar: {f}", file=sys.stderr)  # a finding starts with "error:"
        return 2
    routes = list(config.routes())
    names = ", ".join(r.name for r in routes) or "none"
    if route is not None:
        routes = [r for r in routes if r.name == route]
        if not routes:
            _error(f"no route named {route!r} in {config.path}; routes: {names}")
            return 2
    if not routes:
        _error(f"{config.path} has no [[egress]] or [[ingress]] route to probe")
        return 2
    result: dict[str, list[RouteReport | IngressReport]] = {}

    async def main(reactor: Any) -> None:
        egress, ingress = _Prober(reactor, config), _IngressProber(reactor)
        result["reports"] = [
            await (egress.route(r) if isinstance(r, cfg.EgressRoute) else ingress.route(r))
            for r in routes
        ]

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if "reports" not in result:
            return int(e.code) if isinstance(e.code, int) else 1
    reports = result["reports"]
    if as_json:
        json.dump(_as_json(config, reports), out, indent=2)
        out.write("\n")
    else:
        out.write(_text(reports))
    out.flush()
    return 0 if _all_ok(reports) else 1


def _error(message: str) -> None:
    print(f"{ERROR} {message}", file=sys.stderr)
