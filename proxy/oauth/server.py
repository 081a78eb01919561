"""The hosted client-credentials token endpoint for D1's calls to us (ingress OAuth): the
issuer of bearer tokens, the client secrets it checks, and the endpoint on the mTLS listener.

Tokens are RFC 9068 JWT access tokens signed with ES256, so any worker or replica holding the
same key files accepts any other's: nothing about an issued token is kept anywhere.
"""

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import attrs
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from proxy.oauth.client import Clock, printable
from proxy.oauth.hsm import TokenKey, encode_jwt
from proxy.tls import pki

# --------------------------------------------------------------------------- ingress: keys

ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")  # RFC 9068 section 4
REQUIRED_CLAIMS = ("iss", "aud", "sub", "client_id", "iat", "exp", "jti")
# An iat up to this far ahead of our clock is another replica's clock running ahead, not a
# forgery; exp gets no leeway at all.
IAT_SKEW = 5


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The kid of a hosted-token key: its RFC 7638 JWK thumbprint, the same on every replica."""
    return pki.jwk_thumbprint(pki.public_jwk(public_key, None))


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An unencrypted PEM P-256 private key; errors name the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path}: {pki.describe_key(key.public_key())}; {_P256}")
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """The P-256 public key in a PEM file holding a public key (SPKI) or a private key."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    public: Any
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            public = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise ValueError(
                f"{path}: neither a PEM public key nor an unencrypted PEM private key"
            ) from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise ValueError(f"{path}: {pki.describe_key(public)}; {_P256}")
    return public


_P256 = "hosted tokens are ES256: an ECDSA P-256 key is needed (mtls-sidecar oauth-key)"


@attrs.frozen
class TokenKeys:
    """The keys of hosted tokens: one signs; it and the verify-only ones verify, by kid."""

    signing_key: ec.EllipticCurvePrivateKey | TokenKey
    kid: str
    verify: Mapping[str, ec.EllipticCurvePublicKey]

    @classmethod
    def of(
        cls,
        signing_key: ec.EllipticCurvePrivateKey | TokenKey,
        verify_keys: Iterable[ec.EllipticCurvePublicKey] = (),
    ) -> TokenKeys:
        public = signing_key.public_key()
        if not isinstance(signing_key.curve, ec.SECP256R1):
            raise ValueError(f"{pki.describe_key(public)}; {_P256}")
        keys = {key_id(public): public}
        for other in verify_keys:
            if not isinstance(other.curve, ec.SECP256R1):
                raise ValueError(f"{pki.describe_key(other)}; {_P256}")
            keys.setdefault(key_id(other), other)
        return cls(signing_key, key_id(public), keys)


# --------------------------------------------------------------------------- ingress: issuer


class TokenIssuer:
    """RFC 9068 JWT access tokens for D1's calls to us (client credentials grant).

    A token is accepted when its ES256 signature verifies under one of ``keys``, its header
    says ``typ: at+jwt`` and its ``iss``, ``aud`` and ``exp`` are ours and current. Nothing is
    kept about issued tokens; tokens verified once are remembered (at most ``cache_size``, by
    SHA-256, until they expire) only to spare the signature check on the next request.
    """

    def __init__(
        self,
        clock: IReactorTime,
        clients: Mapping[str, bytes],
        keys: TokenKeys,
        *,
        audience: str,
        issuer: str = "mtls-sidecar",
        lifetime: float = 900.0,
        cache_size: int = 10_000,
    ) -> None:
        if not clients:
            raise ValueError("a token endpoint needs at least one client")
        if any(not secret for secret in clients.values()):
            raise ValueError("every client needs a non-empty secret")
        if not (math.isfinite(lifetime) and lifetime >= 1):
            raise ValueError(f"token lifetime must be at least 1 s, got {lifetime}")
        if not issuer or not audience:
            raise ValueError("issuer and audience must not be empty")
        if cache_size < 0:
            raise ValueError(f"cache_size must not be negative, got {cache_size}")
        self._clock = cast(Clock, clock)
        self._clients = dict(clients)
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self._cache_size = cache_size
        self._verified: OrderedDict[bytes, tuple[str, int]] = OrderedDict()
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
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client_id,  # RFC 9068 2.2: a client acting for itself is its own subject
            "client_id": client_id,
            "iat": int(now),
            # rounded up: the token lives at least the expires_in the client is told
            "exp": math.ceil(now + self.lifetime),
            "jti": secrets.token_urlsafe(16),
        }
        if scope is not None:
            claims["scope"] = scope
        token = encode_jwt(claims, self.keys.signing_key, {"typ": "at+jwt", "kid": self.keys.kid})
        return token, int(self.lifetime)

    def check_bearer(self, authorization: bytes | None) -> str | None:
        """The client id behind an ``Authorization: Bearer`` value, or None."""
        if not authorization:
            return None
        m = _BEARER.fullmatch(authorization)
        if m is None:
            return None
        now = self._clock.seconds()
        digest = hashlib.sha256(m.group(1)).digest()
        known = self._verified.get(digest)
        if known is not None:
            return known[0] if known[1] > now else None
        try:
            client_id, exp = self._verify(m.group(1).decode("ascii"), now)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            return None
        if self._cache_size:
            while self._verified:  # oldest first: drop the expired and the overflow
                oldest = next(iter(self._verified.values()))
                if oldest[1] > now and len(self._verified) < self._cache_size:
                    break
                self._verified.popitem(last=False)
            self._verified[digest] = (client_id, exp)
        return client_id

    def _verify(self, token: str, now: float) -> tuple[str, int]:
        """(client id, exp) of a token that passes every check; raises otherwise."""
        header = jwt.get_unverified_header(token)
        if header.get("alg") != "ES256":  # never none, never HS* with a public key as secret
            raise ValueError("alg is not ES256")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCESS_TOKEN_TYPES:
            raise ValueError("typ is not at+jwt")
        kid = header.get("kid")
        key = self.keys.verify.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise ValueError("unknown kid")
        claims = jwt.decode(
            token,
            key,
            algorithms=["ES256"],
            audience=self.audience,
            issuer=self.issuer,
            # exp and iat are checked below against our clock, not PyJWT's wall time
            options={"require": list(REQUIRED_CLAIMS), "verify_exp": False, "verify_iat": False},
        )
        exp, iat, client_id = claims["exp"], claims["iat"], claims["client_id"]
        if not all(type(v) is int for v in (exp, iat)):
            raise ValueError("exp and iat must be integers")
        if exp <= now or iat > now + IAT_SKEW or iat > exp:
            raise ValueError("expired or not yet valid")
        if not isinstance(client_id, str) or claims["sub"] != client_id:
            raise ValueError("sub and client_id differ")
        return client_id, exp


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
