"""`probe` for an egress route: dial the upstream as `run` would (see the package's doc)."""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.python.failure import Failure

from proxy import config as cfg
from proxy.commands.probe.reports import (
    _NGINX_CERT_PAGE,
    ANSWER_PREVIEW,
    NO_TTL,
    SWEEP_INTERVAL,
    AddressReport,
    CertFacts,
    DNSReport,
    OAuthReport,
    RouteReport,
    _lost_text,
    _name_text,
)
from proxy.oauth import client as oauth
from proxy.telemetry.metrics import Metrics
from proxy.tls import contexts as tls
from proxy.tls import pki
from proxy.wire.http import ProxyError
from proxy.wire.pool import Pool, UpstreamConnection
from proxy.wire.resolver import DNSResolver, resolve
from proxy.wire.tunnel import ProxyHop, hop_for


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
        requests = _CertRequests()  # shown the handshakes by each creator (the context's own
        # info callback is the name check, and stays)
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
        host, port = rc.upstream.host, rc.upstream.port
        if rc.proxy is not None:  # the proxy resolves the upstream's name itself
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
        creator.observe = requests
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
