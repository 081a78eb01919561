"""TLS contexts from config: client (egress) and server (ingress), each swappable on reload.

Contexts are built with pyOpenSSL directly and handed to Twisted through the public connection
creator interfaces; a reload builds a whole new context, validates it, then swaps it in. Open
connections keep the context they were made with.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _ssl_lib
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy import config as cfg
from proxy.tls import pki
from proxy.tls.revocation import CRL_EXPIRED, REVOKED, CRLError, Revocation, read_crls
from proxy.tls.transport import MEM_BIO_CALLS, buffered, swap_idle_bios

# TLS 1.2: ECDHE with AEAD only; TLS 1.3 suites are all AEAD and left to OpenSSL's defaults.
CIPHERS_TLS12 = b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:" + (
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
ALPN = [b"http/1.1"]
_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION

# OpenSSL X509_V_ERR_* -> a reason an operator can act on
VERIFY_REASONS = {
    2: "issuer certificate not found (not signed by a CA in the trust store)",
    3: "no CRL from the certificate's issuer in client_crl (unable to get certificate CRL)",
    8: "CRL signature failure (a CRL in client_crl is not signed by the certificate's issuer)",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    11: "CRL not yet valid (its thisUpdate is in the future)",
    12: "stale CRL: past its nextUpdate (crl_stale = refuse)",
    18: "self-signed certificate (not in the trust store)",
    19: "self-signed certificate in the chain (root not in the trust store)",
    20: "unable to get local issuer certificate (not signed by a CA in the trust store)",
    21: "unable to verify the first certificate (chain incomplete or CA not trusted)",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose (wrong extended key usage)",
    62: "hostname mismatch",
    64: "IP address mismatch",
}

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class MaterialError(Exception):
    """Key material that cannot be used; the message names the file and the reason."""


@attrs.frozen
class KeyPair:
    chain: tuple[x509.Certificate, ...]  # leaf first
    key: Any  # a cryptography private key

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def read_chain(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MaterialError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN" not in data and _is_der(data, x509.load_der_x509_certificate):
        raise MaterialError(
            f"{what} {path}: is a DER (binary) certificate; PEM is expected: convert it with "
            f"`openssl x509 -inform der -in {path} -out {path}.pem`"
        )
    hint = _other_format_hint(data, path)
    if hint:
        raise MaterialError(f"{what} {path}: {hint}")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise MaterialError(
            f"{what} {path}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)"
        ) from None
    return certs


def _other_format_hint(data: bytes, path: Path) -> str | None:
    """What a file that holds no PEM certificate holds instead, and how to get one from it."""
    if b"-----BEGIN CERTIFICATE-----" in data:
        return None
    if b"-----BEGIN PKCS7-----" in data or (
        b"-----BEGIN" not in data and _is_der(data, pkcs7.load_der_pkcs7_certificates)
    ):
        inform = "" if b"-----BEGIN" in data else "-inform der "
        return (
            "is a PKCS#7 bundle (.p7b/.p7c); PEM is expected: convert it with "
            f"`openssl pkcs7 {inform}-print_certs -in {path} -out {path}.pem`"
        )
    if b"CERTIFICATE REQUEST-----" in data or (
        b"-----BEGIN" not in data and _is_der(data, x509.load_der_x509_csr)
    ):
        return (
            "is a certificate signing request (CSR), not a certificate: send it to the CA and"
            " use the certificate it returns (leaf first, then intermediates)"
        )
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _is_der(data: bytes, loader: Any) -> bool:
    try:
        loader(data)
    except (ValueError, TypeError):
        return False
    return True


def read_key(path: Path, what: str) -> Any:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MaterialError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    if b"-----BEGIN" not in data and _is_der(
        data, lambda d: serialization.load_der_private_key(d, password=None)
    ):
        raise MaterialError(
            f"{what} {path}: is a DER (binary) private key; PEM is expected: convert it with "
            f"`openssl pkey -inform der -in {path} -out {path}.pem`"
        )
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise MaterialError(f"{what} {path}: is encrypted; an unencrypted key is needed") from None
    except ValueError:
        raise MaterialError(
            f"{what} {path}: no unencrypted PEM private key in it "
            "(expected -----BEGIN PRIVATE KEY----- or -----BEGIN EC/RSA PRIVATE KEY-----)"
        ) from None


def load_key_pair(
    cert_path: Path, key_path: Path, profile: str, *, cert_what: str, key_what: str
) -> KeyPair:
    chain = read_chain(cert_path, cert_what)
    key = read_key(key_path, key_what)
    if not pki.key_matches_cert(key, chain[0]):
        matching = [i for i, c in enumerate(chain[1:], 2) if pki.key_matches_cert(key, c)]
        if matching:
            raise MaterialError(
                f"{cert_what} {cert_path}: chain order: the certificate matching {key_path} is "
                f"number {matching[0]} of {len(chain)}; the leaf must come first, then each "
                "issuer in turn"
            )
        raise MaterialError(f"{key_what} {key_path}: does not match the certificate in {cert_path}")
    problem = pki.key_policy_problem(key.public_key(), profile)
    if problem:
        raise MaterialError(f"{key_what} {key_path}: {problem}")
    return KeyPair(tuple(chain), key)


def _trust_store(ctx: SSL.Context, cafile: Path | None, what: str) -> None:
    path = str(cafile) if cafile else certifi.where()
    try:
        ctx.load_verify_locations(path)
    except SSL.Error as e:
        raise MaterialError(f"{what} {path}: no usable CA certificate: {e}") from None


def _use_pair(ctx: SSL.Context, pair: KeyPair) -> None:
    ctx.use_certificate(crypto.X509.from_cryptography(pair.leaf))
    for extra in pair.chain[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(pair.key))
    ctx.check_privatekey()


def _base_context(method: int, profile: str) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    # idle keep-alive connections give their 2 x 16+ KiB record buffers back to the allocator
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(CIPHERS_TLS12 + (b":@SECLEVEL=2" if profile == "generic" else b""))
    return ctx


def _record_verify_error(
    conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    """Keep OpenSSL's first verification error on the protocol so errors can say which."""
    if not ok:
        subject = cert.to_cryptography().subject.rfc4514_string()
        reason = VERIFY_REASONS.get(errno, f"verification error {errno}")
        serial = f", serial {cert.get_serial_number():x}" if errno == REVOKED else ""
        text = f"{reason} (depth {depth}: {subject}{serial})"
        if isinstance(conn, CheckedConnection) and conn.verify_problem is None:
            conn.verify_problem = text
        tls_protocol = conn.get_app_data()
        proto = getattr(tls_protocol, "wrappedProtocol", None)
        if proto is not None and getattr(proto, "verify_error", None) is None:
            proto.verify_error = text
    return bool(ok)


def _verify_stale_crl_ok(
    conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    """crl_stale = "warn": a CRL past its nextUpdate is still used (its revocations hold) and
    the handshake goes on; the service logs the stale CRL as an error line."""
    if not ok and errno == CRL_EXPIRED:
        return True
    return _record_verify_error(conn, cert, errno, depth, ok)


# --------------------------------------------------------------------------- client (egress)
MOZILLA = "the Mozilla bundle (certifi)"


@attrs.frozen
class ClientMaterial:
    pair: KeyPair | None  # None: no client certificate (an https internal upstream)
    context: SSL.Context
    trust: str = MOZILLA  # the file the server's chain is verified against, for messages


def trust_label(key: str, trust: Path | None) -> str:
    return f"{key} {trust}" if trust else f"{MOZILLA} {certifi.where()}"


class PeerRejected(SSL.Error):
    """A server certificate that failed one of our checks, in words: which check ("trust":
    the chain against the trust file, "name": the name we dialled) and against what. A
    subclass of SSL.Error so Twisted's TLS reports it to the protocol as the connection's end."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__([("mtls-sidecar", check, detail)])  # the shape of OpenSSL's queue
        self.check = check
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


InfoObserver = Callable[[SSL.Connection, int, int], None]


class CheckedConnection(SSL.Connection):
    """A client connection that checks the server's name as its handshake completes.

    The check runs from the context's info callback at SSL_CB_HANDSHAKE_DONE (whichever
    OpenSSL call completes the handshake), as Twisted's ClientTLSOptions does, and again after
    do_handshake returns: a mismatch fails the connection through Twisted's failVerification,
    which aborts it before any buffered application byte is encrypted. A resumed session runs
    no chain verification, but this check runs on every handshake."""

    def __init__(
        self, context: SSL.Context, server_name: str, trust: str, observe: InfoObserver | None
    ) -> None:
        super().__init__(context, None)
        self.server_name = server_name
        self.trust = trust
        self.observe = observe
        self.verify_problem: str | None = None  # OpenSSL's first chain complaint, in words
        self.rejection: PeerRejected | None = None
        self.name_checked = False

    def check_name(self) -> None:
        if self.name_checked:
            return
        self.name_checked = True
        problem = verify_hostname_error(self, self.server_name)
        if problem is None:
            return
        self.rejection = PeerRejected("name", problem)
        fail = getattr(self.get_app_data(), "failVerification", None)
        if fail is not None:
            fail(Failure(self.rejection))
        else:  # no Twisted TLS protocol above: end the session so nothing can be sent on it
            with contextlib.suppress(SSL.Error):
                self.shutdown()

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except SSL.WantReadError:
            raise
        except SSL.Error as e:
            if self.verify_problem is not None and not isinstance(e, PeerRejected):
                self.rejection = PeerRejected(
                    "trust",
                    f"certificate not trusted: {self.verify_problem}; checked against {self.trust}",
                )
                raise self.rejection from e
            raise
        self.check_name()  # also here: a context whose info callback was replaced still checks


def _client_info(conn: SSL.Connection, where: int, ret: int) -> None:
    """The context's info callback: the name check at handshake completion (must not raise:
    an exception in an OpenSSL callback is printed and dropped)."""
    if not isinstance(conn, CheckedConnection):
        return
    if conn.observe is not None:
        conn.observe(conn, where, ret)
    if where & SSL.SSL_CB_HANDSHAKE_DONE:
        conn.check_name()


def client_context(pair: KeyPair | None, trust: Path | None, profile: str) -> SSL.Context:
    ctx = _base_context(SSL.TLS_CLIENT_METHOD, profile)
    if pair is not None:
        _use_pair(ctx, pair)
    _trust_store(ctx, trust, "trust")
    ctx.set_verify(SSL.VERIFY_PEER, _record_verify_error)
    ctx.set_info_callback(_client_info)
    ctx.set_alpn_protos(ALPN)
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """Creates client connections for one upstream name from the current context: the only
    creator of the sidecar's outbound TLS (data path, token request, probe).

    Every connection it makes checks the server's certificate against the trust file (OpenSSL,
    VERIFY_PEER) and its name against server_name (service_identity, at handshake completion,
    see CheckedConnection) before any application byte is written; a failed check ends the
    connection with PeerRejected.

    Resumption: a protocol that has `tls_session_for(context)` (pool.UpstreamConnection) is
    asked, as its connection is made, for a session to offer; it must answer with one made under
    that very context (pyOpenSSL refuses any other), i.e. under the same trust store and client
    certificate, or None.
    """

    observe: InfoObserver | None = None  # sees every info callback (probe: CertificateRequest)

    def __init__(self, material: ClientMaterial, server_name: str) -> None:
        self.material = material
        self.server_name = server_name
        self._sni = server_name.encode("idna") if not _is_ip(server_name) else None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        material = self.material
        context = material.context
        conn = CheckedConnection(context, self.server_name, material.trust, self.observe)
        conn.set_app_data(tlsProtocol)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        offer = getattr(getattr(tlsProtocol, "wrappedProtocol", None), "tls_session_for", None)
        if offer is not None:
            session = offer(context)
            if session is not None:
                conn.set_session(session)
        conn.set_connect_state()
        return conn


def session_reused(conn: SSL.Connection) -> bool:
    """Whether a finished client handshake resumed a session. pyOpenSSL has no call for
    SSL_session_reused, the binding under it has; should that binding go, a client connection
    that verified the server (VERIFY_PEER) has a verified chain after a full handshake only."""
    reused = getattr(_ssl_lib, "SSL_session_reused", None)
    if reused is not None:
        return bool(reused(conn._ssl))
    return conn.get_verified_chain() is None


def _is_ip(host: str) -> bool:
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    return isIPAddress(host) or isIPv6Address(host)


# --------------------------------------------------------------------------- server (ingress)
@attrs.frozen
class ServerMaterial:
    pair: KeyPair
    client_cas: tuple[x509.Certificate, ...]
    context: SSL.Context
    revocation: Revocation | None = None


def server_context(
    pair: KeyPair,
    client_ca: Path,
    profile: str,
    session_id: bytes,
    revocation: Revocation | None = None,
) -> tuple[SSL.Context, list[x509.Certificate]]:
    cas = read_chain(client_ca, "client_ca")
    for ca in cas:
        if not _is_ca(ca):
            raise MaterialError(
                f"client_ca {client_ca}: {ca.subject.rfc4514_string()} is not a CA certificate "
                "(no basicConstraints CA:TRUE): give the CA that issues the partner's "
                "certificates, never a leaf"
            )
    ctx = _base_context(SSL.TLS_SERVER_METHOD, profile)
    _use_pair(ctx, pair)
    store = ctx.get_cert_store()
    assert store is not None
    for ca in cas:  # only these: the system roots are never trusted for clients
        store.add_cert(crypto.X509.from_cryptography(ca))
    flags = crypto.X509StoreFlags.PARTIAL_CHAIN  # an intermediate CA as the only anchor
    callback = _record_verify_error
    if revocation is not None:
        for crl in revocation.crls:
            store.add_crl(crl)
        flags |= crypto.X509StoreFlags.CRL_CHECK
        if revocation.check == "chain":
            # every CA below the root is checked against its issuer's CRL, which needs the
            # chain built up to the self-signed root: a partial chain would stop short of it
            flags = crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL
        if revocation.stale == "warn":
            callback = _verify_stale_crl_ok
    store.set_flags(flags)
    ctx.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE, callback
    )
    ctx.set_verify_depth(5)
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject() for ca in cas])
    ctx.set_session_id(session_id[:32])
    # no resumption on ingress: a resumed session carries no client chain, and the identity
    # headers are built from the verified chain of every connection
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_alpn_select_callback(_select_alpn)
    return ctx, cas


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if b"http/1.1" in offered:
        return b"http/1.1"
    return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server connections from the current material; reload swaps `material`."""

    def __init__(self, material: ServerMaterial) -> None:
        self.material = material

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self.material.context, None)
        conn.set_app_data(tlsProtocol)
        return conn


def not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def verify_hostname_error(conn: SSL.Connection, name: str) -> str | None:
    """service_identity's verdict on the peer certificate for name, or None when it matches."""
    from service_identity import CertificateError, VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address

    try:
        if _is_ip(name):
            verify_ip_address(conn, name)
        else:
            verify_hostname(conn, name)
    except (VerificationError, CertificateError) as e:
        cert = conn.get_peer_certificate(as_cryptography=True)
        names: list[str] = []
        if cert is not None:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                names = [str(n.value) for n in san]
            except x509.ExtensionNotFound:
                names = []
        return (
            f"hostname mismatch: certificate is for {', '.join(names) or 'no name'}, not {name}"
            + ("" if names else f" ({e})")
        )
    return None


class TLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS over memory BIOs, with release_buffers() for connections gone idle; the
    data path uses transport.TLSConnection, this the token request's and probe's connections."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Twisted's last read after TCP is gone, when nothing is left to read, can only raise
        OpenSSL's unexpected-EOF error, which Twisted reports as ConnectionLost; the error's
        Failure stays in a cycle with the frame that caught it, left to the cyclic collector's
        rare full collections. The same outcome here, without the read."""
        conn = self._tlsConnection
        into = getattr(conn, "_into_ssl", None)
        if (
            not self._lostTLSConnection
            and conn is not None
            and MEM_BIO_CALLS
            and into is not None
            and not buffered(into)
        ):
            self._lostTLSConnection = True
            if self._reason is None:
                self._reason = Failure(CONNECTION_LOST)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    def release_buffers(self) -> None:
        conn = self._tlsConnection
        if conn is None or not self._handshakeDone or self._lostTLSConnection:
            return
        swap_idle_bios(conn)


def tls_factory(creator: Any, is_client: bool, wrapped: Any) -> TLSMemoryBIOFactory:
    """TLS around a factory, without Twisted's small-write aggregation: the relay already
    writes whole messages (one cork per upstream read), so the aggregator's per-write
    callLater(0) would only add a timer and a loop iteration to every request."""
    factory = TLSMemoryBIOFactory(creator, is_client, wrapped)
    factory.protocol = TLSProtocol
    factory.noisy = False
    return factory


# --------------------------------------------------------------------------- from config
def build_client_material(route: cfg.EgressRoute) -> ClientMaterial:
    pair = load_key_pair(
        route.client_cert, route.client_key, route.profile,
        cert_what="client_cert", key_what="client_key",
    )  # fmt: skip
    context = client_context(pair, route.trust, route.profile)
    return ClientMaterial(pair, context, trust_label("trust", route.trust))


def build_server_material(route: cfg.IngressRoute) -> ServerMaterial:
    # D1's RSA-4096/P-256 rule is for our client certificate; the server certificate D1 sees
    # comes from a public CA, so the generic policy applies to it.
    pair = load_key_pair(
        route.server_cert, route.server_key, "generic",
        cert_what="server_cert", key_what="server_key",
    )  # fmt: skip
    revocation = None
    if route.client_crl is not None:
        try:
            crls = tuple(read_crls(route.client_crl))
        except CRLError as e:
            raise MaterialError(str(e)) from None
        revocation = Revocation(route.client_crl, crls, route.crl_check, route.crl_stale)
    ctx, cas = server_context(
        pair, route.client_ca, route.profile, f"mtls-sidecar/{route.name}".encode(), revocation
    )
    return ServerMaterial(pair, tuple(cas), ctx, revocation)


def build_upstream_material(route: cfg.IngressRoute) -> ClientMaterial:
    """TLS toward an https internal upstream: its own trust, no client certificate."""
    context = client_context(None, route.upstream_trust, route.profile)
    return ClientMaterial(None, context, trust_label("upstream_trust", route.upstream_trust))
