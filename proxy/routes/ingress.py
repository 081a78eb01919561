"""Ingress: mutual TLS from the partner -> plain HTTP to the internal app, with the verified
client identity in headers the app can trust (every client-sent copy is removed first)."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.python.failure import Failure

from proxy.config import IngressRoute as IngressConfig
from proxy.routes.route import Route
from proxy.telemetry.logs import fields
from proxy.tls import identity
from proxy.wire.http import HOP_BY_HOP, ProxyError, RequestHead
from proxy.wire.pool import ssl_text
from proxy.wire.relay import Downstream, Exchange, LocalHandler

PEER_CACHE_SIZE = 256
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"expect"})
DROP = HOP_BY_HOP | FORWARDED
_REFUSED_PREFIXES = (b"proxy-", identity.STRIPPED_PREFIX)


@attrs.frozen
class Peer:
    """A verified client certificate, computed once and shared by its connections."""

    subject: str
    allowed: bool
    headers: tuple[tuple[bytes, bytes], ...]
    serial: str = ""  # hex, for spans
    # its member of every access line, encoded once
    access: str = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "access", fields({"peer_subject": self.subject}))


def handshake_reason(down: Downstream, reason: Failure) -> str:
    """A short label for a failed ingress handshake (metrics and logs)."""
    verify = getattr(down, "verify_error", None) or ""
    text = reason.getErrorMessage().lower()
    if "revoked" in verify:
        return "certificate_revoked"
    if "stale CRL" in verify:
        return "crl_stale"
    if "no CRL" in verify:
        return "crl_missing"
    if "CRL" in verify:
        return "crl_unusable"
    if "expired" in verify:
        return "certificate_expired"
    if "not yet valid" in verify:
        return "certificate_not_yet_valid"
    if verify:
        return "certificate_untrusted"
    if "peer did not return a certificate" in text or "certificate required" in text:
        return "no_client_certificate"
    if "version" in text or "protocol" in text:
        return "protocol_version"
    if "cipher" in text:
        return "no_shared_cipher"
    return "handshake_failed"


_WORDS = {
    "no_client_certificate": "the client sent no certificate",
    "protocol_version": "the client offered no TLS version we accept (1.2 or 1.3)",
    "no_shared_cipher": "no cipher suite in common with the client",
}


def _in_words(label: str, verify: str | None, reason: Failure) -> str:
    """A refused handshake as an operator reads it, not a Python repr."""
    if verify:
        return f"client certificate refused: {verify}"
    return _WORDS.get(label) or ssl_text(reason)


class Ingress(Route):
    direction = "ingress"

    def __init__(self, config: IngressConfig, *, token_endpoint: Any = None, **kw: Any) -> None:
        super().__init__(name=config.name, limits=config.limits, timeouts=config.timeouts, **kw)
        self.config = config
        self.base_path = config.upstream.base_path.encode()
        self.token_endpoint = token_endpoint
        self.peers: dict[bytes, Peer] = {}  # leaf SHA-256 -> Peer; cleared on reload
        # a bearer token we validated is ours, not the app's, unless the operator says so
        oauth = config.oauth
        forward = oauth is None or oauth.forward_authorization
        self.drop = DROP if forward else DROP | {b"authorization"}
        # never from the client: the above and the identity headers (see identity.py)
        self.refused = self.drop | identity.STRIPPED_NAMES

    def handshake_completed(self, down: Downstream) -> None:
        conn = down.transport.getHandle()
        cert = conn.get_peer_certificate()
        if cert is None:
            return
        # A partner uses few certificates for many connections: one Peer per leaf, shared.
        key = cert.digest("sha256")
        peer = self.peers.get(key)
        if peer is None:
            peer = self._peer(conn)
            if peer is None:
                return
            if len(self.peers) >= PEER_CACHE_SIZE:
                self.peers.pop(next(iter(self.peers)))
            self.peers[key] = peer
        down.peer = peer

    def _peer(self, conn: Any) -> Peer | None:
        chain = conn.get_verified_chain(as_cryptography=True) or []
        if not chain:
            return None
        leaf = chain[0]
        patterns = self.config.allow_subjects
        return Peer(
            subject=identity.rfc4514_subject(leaf),
            allowed=identity.subject_matches(leaf, patterns) if patterns else True,
            headers=tuple(identity.identity_headers(chain, self.config.identity_headers)),
            serial=f"{leaf.serial_number:x}",
        )

    def connection_closed(self, down: Downstream, reason: Failure) -> None:
        if not down.handshake_done:
            if down.handshake_timed_out:
                label, detail = (
                    "handshake_timeout",
                    (f"no TLS handshake within {self.timeouts.handshake:g}s"),
                )
            else:
                label = handshake_reason(down, reason)
                detail = _in_words(label, getattr(down, "verify_error", None), reason)
            if label != "handshake_failed" or "SSL" in repr(reason.value):
                self.metrics.handshake_errors.labels(self.name, label).inc()
                self.peer_log.info(
                    f"handshake:{label}",
                    "{route}: TLS handshake from {client} refused: {reason} ({detail})",
                    route=self.name,
                    client=down.peer_host,
                    reason=label,
                    detail=detail,
                )
        super().connection_closed(down, reason)

    def local_handler(self, head: RequestHead, down: Downstream) -> LocalHandler | None:
        if self.token_endpoint is None:
            return None
        self._authorize_peer(down)
        path = head.target.split(b"?", 1)[0]
        if path != self.token_endpoint.path:
            return None
        handler: LocalHandler = self.token_endpoint.answer
        return handler

    def _authorize_peer(self, down: Downstream) -> Peer:
        peer: Peer | None = down.peer
        if peer is None:
            raise ProxyError(403, "forbidden", "no verified client certificate")
        if not peer.allowed:
            self.peer_log.warn(
                "subject_not_allowed",
                "{route}: client subject {subject} refused: not in allow_subjects",
                route=self.name,
                subject=peer.subject,
            )
            raise ProxyError(403, "forbidden", "client certificate subject is not allowed")
        return peer

    def prepare(
        self, head: RequestHead, down: Downstream
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        peer = self._authorize_peer(down)
        if not head.target.startswith(b"/"):
            raise ProxyError(400, "bad_request", "request target must be origin-form (/path)")
        if self.token_endpoint is not None:
            self.token_endpoint.check(head)
        listed = head.listed
        drop = self.refused if listed <= self.refused else self.refused | listed
        out: list[tuple[bytes, bytes]] = []
        hosts = 0
        for lname, name, value in head.headers:
            if lname == b"host":
                hosts += 1
            if lname in drop or lname.startswith(_REFUSED_PREFIXES):
                continue
            out.append((name, value))
        # RFC 9112 3.2: exactly one Host in HTTP/1.1; two could route one way and log another
        if hosts > 1:
            raise ProxyError(400, "bad_request", "more than one Host header")
        if hosts == 0:
            if head.version == b"1.1":
                raise ProxyError(400, "bad_request", "HTTP/1.1 request without a Host header")
            out.append((b"Host", self.config.upstream.authority.encode("idna")))
        out.extend(peer.headers)
        out.append((b"X-Forwarded-For", down.peer_host.encode()))
        out.append((b"X-Forwarded-Proto", b"https"))
        if self.tracer is not None:
            self.traced(head, down, out)
        return self.base_path + head.target, out

    def error_headers(self, err: ProxyError) -> list[tuple[bytes, bytes]]:
        if err.status == 401:
            return [(b"WWW-Authenticate", b'Bearer realm="mtls-sidecar"')]
        return []

    def access_extra(self, ex: Exchange, down: Downstream) -> str:
        peer: Peer | None = down.peer
        return peer.access if peer is not None else ""

    def span_attributes(self, ex: Exchange, down: Downstream) -> dict[str, Any]:
        attributes = super().span_attributes(ex, down)
        attributes["client.address"] = down.peer_host
        peer: Peer | None = down.peer
        if peer is not None:  # who called: the name and serial, never the certificate
            attributes["tls.client.subject"] = peer.subject
            attributes["tls.client.serial_number"] = peer.serial
        return attributes
