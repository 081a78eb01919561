"""The hosted client-credentials token endpoint for D1's calls to us (ingress OAuth): the
issuer of bearer tokens, the client secrets it checks, and the endpoint on the mTLS listener."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import secrets
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from proxy.oauth.client import Clock, printable

# --------------------------------------------------------------------------- ingress: issuer


@attrs.frozen
class _Grant:
    client_id: str
    scope: str | None
    expires_at: float


class TokenIssuer:
    """Opaque bearer tokens for D1's calls to us (client credentials grant).

    Tokens live in this process's memory, stored as SHA-256 hashes, at most ``max_tokens`` of
    them (the oldest go first).
    """

    def __init__(
        self,
        clock: IReactorTime,
        clients: Mapping[str, bytes],
        lifetime: float = 900.0,
        max_tokens: int = 10_000,
    ) -> None:
        if not clients:
            raise ValueError("a token endpoint needs at least one client")
        if any(not secret for secret in clients.values()):
            raise ValueError("every client needs a non-empty secret")
        if not (math.isfinite(lifetime) and lifetime >= 1):
            raise ValueError(f"token lifetime must be at least 1 s, got {lifetime}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self._clock = cast(Clock, clock)
        self._clients = dict(clients)
        self.lifetime = lifetime
        self._max_tokens = max_tokens
        self._tokens: OrderedDict[bytes, _Grant] = OrderedDict()
        # Unknown client ids are compared against this, so both paths cost the same.
        self._dummy = secrets.token_bytes(32)

    def authenticate(self, client_id: str, secret: bytes) -> bool:
        expected = self._clients.get(client_id)
        candidate = expected if expected is not None else self._dummy
        same = hmac.compare_digest(
            hashlib.sha256(secret).digest(), hashlib.sha256(candidate).digest()
        )
        return same and expected is not None

    def issue(
        self, client_id: str, secret: bytes, scope: str | None = None
    ) -> tuple[str, int] | None:
        """(token, expires_in) for good credentials, None otherwise."""
        if not self.authenticate(client_id, secret):
            return None
        now = self._clock.seconds()
        while self._tokens:  # issue order is expiry order: drop the expired from the front
            first = next(iter(self._tokens.values()))
            if first.expires_at > now:
                break
            self._tokens.popitem(last=False)
        token = secrets.token_urlsafe(32)
        self._tokens[hashlib.sha256(token.encode("ascii")).digest()] = _Grant(
            client_id, scope, now + self.lifetime
        )
        while len(self._tokens) > self._max_tokens:
            self._tokens.popitem(last=False)
        return token, int(self.lifetime)

    def check_bearer(self, authorization: bytes | None) -> str | None:
        """The client id behind an ``Authorization: Bearer`` value, or None."""
        if not authorization:
            return None
        m = _BEARER.fullmatch(authorization)
        if m is None:
            return None
        grant = self._tokens.get(hashlib.sha256(m.group(1)).digest())
        if grant is None or grant.expires_at <= self._clock.seconds():
            return None
        return grant.client_id


_BEARER = re.compile(rb"(?i:bearer) +([A-Za-z0-9._~+/-]+=*) *")


def load_client_secrets(path: Path) -> dict[str, bytes]:
    """``client_id:secret`` per line; blank lines and ``#`` comments are skipped.

    Whitespace around either part is ignored. Secrets drawn from ``[A-Za-z0-9_-]`` read the
    same whether or not a client form-encodes them in its Basic header.

    A systemd credential file has the same format. Errors name the file and the line, never
    the secret.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read client secrets: {e.strerror}") from None
    clients: dict[str, bytes] = {}
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{number}: not UTF-8") from None
        if not text or text.startswith("#"):
            continue
        client_id, sep, secret = text.partition(":")
        client_id, secret = client_id.strip(), secret.strip()
        if not sep or not client_id or not secret:
            raise ValueError(f"{path}:{number}: expected client_id:secret")
        if any(not c.isprintable() for c in client_id):
            raise ValueError(f"{path}:{number}: client id contains unprintable characters")
        if client_id in clients:
            raise ValueError(f"{path}:{number}: client id {client_id!r} appears twice")
        clients[client_id] = secret.encode("utf-8")
    if not clients:
        raise ValueError(f"{path}: no client_id:secret line")
    return clients


# --------------------------------------------------------------------------- ingress: endpoint

_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+( [\x21\x23-\x5b\x5d-\x7e]+)*")


@attrs.frozen
class TokenReply:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class TokenEndpoint:
    """RFC 6749 client-credentials token endpoint with HTTP Basic client authentication,
    independent of any HTTP server: the ingress data path and twisted.web both call it."""

    log = Logger()

    def __init__(
        self, issuer: TokenIssuer, realm: str = "mtls-sidecar", max_body: int = 16 * 1024
    ) -> None:
        if '"' in realm or "\\" in realm:
            raise ValueError("realm must not contain quotes or backslashes")
        self.issuer = issuer
        self.realm = realm
        self.max_body = max_body

    def handle(
        self, method: bytes, content_type: bytes | None, authorization: bytes | None, body: bytes
    ) -> TokenReply:
        if method != b"POST":
            return self._error(405, "invalid_request", "use POST", ((b"Allow", b"POST"),))
        if len(body) > self.max_body:
            return self._error(413, "invalid_request", "request body too large")
        ctype = (content_type or b"").split(b";")[0].strip().lower()
        if ctype != b"application/x-www-form-urlencoded":
            return self._error(
                400, "invalid_request", "Content-Type must be application/x-www-form-urlencoded"
            )
        params = _parse_form(body)
        if params is None:
            return self._error(400, "invalid_request", "malformed or repeated parameter")
        candidates = _basic_credentials(authorization)
        if not candidates:
            return self._invalid_client(None)
        for client_id, secret in candidates:
            if self.issuer.authenticate(client_id, secret):
                break
        else:
            return self._invalid_client(candidates[0][0])
        grant_type = params.get("grant_type")
        if grant_type is None:
            return self._error(400, "invalid_request", "grant_type is missing")
        if grant_type != "client_credentials":
            return self._error(
                400, "unsupported_grant_type", "only client_credentials is supported"
            )
        scope = params.get("scope")
        if scope is not None and not _SCOPE.fullmatch(scope):
            return self._error(400, "invalid_scope", "malformed scope")
        issued = self.issuer.issue(client_id, secret, scope)
        if issued is None:  # the secrets changed between the two calls
            return self._invalid_client(client_id)
        token, expires_in = issued
        self.log.info(
            "token issued to client {client_id}, valid {expires_in} s",
            client_id=client_id,
            expires_in=expires_in,
        )
        return self._json(
            200, {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
        )

    def _invalid_client(self, client_id: str | None) -> TokenReply:
        self.log.warn(
            "token request refused: invalid_client (client id {client_id})",
            client_id=printable(client_id, 64) if client_id is not None else "absent",
        )
        challenge = (b"WWW-Authenticate", f'Basic realm="{self.realm}"'.encode("ascii"))
        return self._error(401, "invalid_client", "client authentication failed", (challenge,))

    def _error(
        self,
        status: int,
        error: str,
        description: str,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> TokenReply:
        return self._json(status, {"error": error, "error_description": description}, extra)

    @staticmethod
    def _json(
        status: int, doc: Mapping[str, object], extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> TokenReply:
        headers = (
            (b"Content-Type", b"application/json"),
            (b"Cache-Control", b"no-store"),
            (b"Pragma", b"no-cache"),
            *extra,
        )
        return TokenReply(status, headers, json.dumps(doc, separators=(",", ":")).encode("ascii"))


class TokenEndpointResource(Resource):
    """The token endpoint as a twisted.web resource (e.g. on a separate listener)."""

    isLeaf = True

    def __init__(
        self, issuer: TokenIssuer, realm: str = "mtls-sidecar", max_body: int = 16 * 1024
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.endpoint = TokenEndpoint(issuer, realm, max_body)

    def render(self, request: Request) -> bytes:
        # twisted.web has read the body already; the cap keeps parsing bounded.
        cap = self.endpoint.max_body + 1
        body = request.content.read(cap) if request.content is not None else b""
        reply = self.endpoint.handle(
            request.method,
            request.getHeader(b"content-type"),
            request.getHeader(b"authorization"),
            body,
        )
        request.setResponseCode(reply.status)
        for name, value in reply.headers:
            request.responseHeaders.setRawHeaders(name, [value])
        return reply.body


def _parse_form(body: bytes) -> dict[str, str] | None:
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body)
        )
    except (UnicodeDecodeError, ValueError):
        return None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:  # RFC 6749 3.2: parameters must not repeat
            return None
        params[name] = value
    return params


def _basic_credentials(header: bytes | None) -> list[tuple[str, bytes]]:
    """The (client id, secret) pairs an ``Authorization: Basic`` value may mean.

    RFC 6749 2.3.1 form-urlencodes id and secret before base64; many clients skip that step,
    so the pair as sent comes second when it differs (it does only for '+' or '%').
    """
    if not header:
        return []
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return []
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return []
    raw_id, sep, raw_secret = decoded.partition(":")
    if not sep or not raw_id:
        return []
    candidates: list[tuple[str, bytes]] = []
    try:
        client_id = urllib.parse.unquote_plus(raw_id, errors="strict")
        secret = urllib.parse.unquote_plus(raw_secret, errors="strict")
        if client_id:
            candidates.append((client_id, secret.encode("utf-8")))
    except UnicodeDecodeError:
        pass
    if (raw_id, raw_secret.encode("utf-8")) not in candidates:
        candidates.append((raw_id, raw_secret.encode("utf-8")))
    return candidates
