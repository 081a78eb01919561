"""What `probe` found, route by route, and the helpers that put it in words."""

from __future__ import annotations

import re
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import error
from twisted.python.failure import Failure

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
    private_ca: str = ""  # a warning: the chain is sound but ends at a CA outside Mozilla's

    @property
    def ok(self) -> bool:
        return bool(
            self.tcp_ok
            and (self.mozilla_root or self.private_ca)
            and self.name_ok is not False
            and self.client_cert_required
        )


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
