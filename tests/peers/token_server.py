"""A stand-in for D1's OAuth token endpoint, over mutual TLS on 127.0.0.1.

    python tests/peers/token_server.py --port 0 --cert C --key K --client-ca CA \\
        --public-key PUB --expires-in 900 --stats FILE [--audience AUD] [--fail-status 400]
        [--fail-for SECONDS] [--error-style rfc6749|d1] [--error-message TEXT]

``POST /authz/v1/oauth2/token`` checks the RFC 7523 JWT-bearer grant as D1 does (ES256 only,
kid, iss, exp at most 900 s after iat, iat not in the future, jti not replayed, aud when asked
for, x-correlation-id present and well formed), in a form or JSON body. ``GET
/introspect?token=T`` answers 200 while T is a live token issued here, 401 otherwise. Every
token call appends one JSON line to --stats. With --fail-status, a well-formed call is refused
with that status (for --fail-for seconds from start, then answered again), and the error body
uses RFC 6749's ``error``/``error_description`` or, with --error-style d1, D1's
``errorCode``/``errorMessage``. Prints ``LISTENING <port>`` once ready; SIGTERM stops it with
exit status 0.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

TOKEN_PATH = b"/authz/v1/oauth2/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CORRELATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_LIFETIME = 900
SKEW = 30
ERRORS = {400: "invalid_grant", 401: "invalid_client", 429: "slow_down"}

reactor: Any = _reactor


class Refused(Exception):
    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class TokenServer:
    def __init__(self, args: argparse.Namespace) -> None:
        key = serialization.load_pem_public_key(Path(args.public_key).read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise SystemExit(f"{args.public_key}: not an EC public key")
        self.public_key = key
        self.audience: str | None = args.audience
        self.expires_in: int = args.expires_in
        self.fail_status: int | None = args.fail_status
        self.fail_for: float | None = getattr(args, "fail_for", None)
        self.fail_until: float | None = None
        self.listening()
        self.error_style: str = getattr(args, "error_style", None) or "rfc6749"
        self.error_message: str = getattr(args, "error_message", None) or "configured to fail"
        self.stats = Path(args.stats) if args.stats else None
        self.seen_jti: dict[str, float] = {}
        self.issued: dict[str, float] = {}

    def record(self, **fields: Any) -> None:
        if self.stats is not None:
            with self.stats.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**fields, "time": time.time()}) + "\n")

    def token_call(self, request: Request) -> tuple[int, dict[str, Any]]:
        seen: dict[str, Any] = {"kid": None, "iss": None, "correlation_id": None}
        try:
            self.check(request, seen)
        except Refused as e:
            self.record(ok=False, error=e.error, token_issued=False, **seen)
            return 400, {"error": e.error, "error_description": e.description}
        if self.failing():
            assert self.fail_status is not None
            error = ERRORS.get(self.fail_status, "server_error")
            self.record(ok=False, error=error, token_issued=False, **seen)
            if self.error_style == "d1":
                return self.fail_status, {"errorCode": error, "errorMessage": self.error_message}
            return self.fail_status, {"error": error, "error_description": self.error_message}
        token = secrets.token_urlsafe(32)
        self.issued[token] = time.time() + self.expires_in
        self.record(ok=True, error=None, token_issued=True, **seen)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}

    def listening(self) -> None:
        """Start the --fail-for window (again): it counts from the LISTENING line."""
        if self.fail_for is not None:
            self.fail_until = time.monotonic() + self.fail_for

    def failing(self) -> bool:
        if self.fail_status is None:
            return False
        return self.fail_until is None or time.monotonic() < self.fail_until

    def check(self, request: Request, seen: dict[str, Any]) -> None:
        cid = (request.getHeader(b"x-correlation-id") or b"").decode("latin-1")
        seen["correlation_id"] = cid or None
        if not CORRELATION_ID.fullmatch(cid):
            raise Refused("invalid_request", "x-correlation-id missing or malformed")
        body = request.content.read() if request.content is not None else b""
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        params: dict[str, Any]
        if ctype == b"application/json":
            try:
                params = json.loads(body)
            except ValueError:
                raise Refused("invalid_request", "body is not JSON") from None
            if not isinstance(params, dict):
                raise Refused("invalid_request", "body is not a JSON object")
        elif ctype == b"application/x-www-form-urlencoded":
            params = dict(urllib.parse.parse_qsl(body.decode("ascii", "replace")))
        else:
            raise Refused("invalid_request", "unsupported content type")
        if params.get("grant_type") != JWT_BEARER:
            raise Refused("unsupported_grant_type", "grant_type must be jwt-bearer")
        assertion = params.get("assertion")
        if not isinstance(assertion, str) or not assertion:
            raise Refused("invalid_request", "assertion missing")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise Refused("invalid_grant", "assertion is not a JWT") from None
        seen["kid"] = header.get("kid")
        if header.get("alg") != "ES256":
            raise Refused("invalid_grant", "alg must be ES256")
        if not isinstance(header.get("kid"), str) or not header["kid"]:
            raise Refused("invalid_grant", "kid missing")
        try:
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=["ES256"],
                audience=self.audience,
                leeway=SKEW,
                options={
                    "require": ["iss", "exp", "iat", "jti"],
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.PyJWTError as e:
            raise Refused("invalid_grant", f"assertion refused: {type(e).__name__}") from None
        seen["iss"] = claims.get("iss")
        now = time.time()
        if not isinstance(claims["iss"], str) or not claims["iss"]:
            raise Refused("invalid_grant", "iss empty")
        if claims["exp"] - claims["iat"] > MAX_LIFETIME:
            raise Refused("invalid_grant", "exp more than 900 s after iat")
        if claims["iat"] > now + SKEW:
            raise Refused("invalid_grant", "iat in the future")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Refused("invalid_grant", "jti empty")
        self.seen_jti = {j: exp for j, exp in self.seen_jti.items() if exp > now - SKEW}
        if jti in self.seen_jti:
            raise Refused("invalid_grant", "jti replayed")
        self.seen_jti[jti] = float(claims["exp"])

    def introspect(self, request: Request) -> int:
        token = (request.args.get(b"token") or [b""])[0].decode("ascii", "replace")
        return 200 if self.issued.get(token, 0) > time.time() else 401


class Root(Resource):
    isLeaf = True

    def __init__(self, server: TokenServer) -> None:
        super().__init__()
        self.server = server

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if request.path == TOKEN_PATH and request.method == b"POST":
            status, doc = self.server.token_call(request)
        elif request.path == b"/introspect" and request.method == b"GET":
            status = self.server.introspect(request)
            doc = {"active": status == 200}
        else:
            status, doc = 404, {"error": "not_found"}
        request.setResponseCode(status)
        return json.dumps(doc).encode()


def tls_options(cert: Path, key: Path, client_ca: Path) -> ssl.CertificateOptions:
    pems = x509.load_pem_x509_certificates(cert.read_bytes())
    leaf = ssl.PrivateCertificate.loadPEM(
        pems[0].public_bytes(serialization.Encoding.PEM) + key.read_bytes()
    )
    chain = [
        ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original
        for c in pems[1:]
    ]
    return ssl.CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=chain,
        trustRoot=ssl.Certificate.loadPEM(client_ca.read_bytes()),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableProtocols=[b"http/1.1"],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--public-key", required=True)
    p.add_argument("--expires-in", type=int, default=900)
    p.add_argument("--fail-status", type=int)
    p.add_argument("--fail-for", type=float, help="fail only this many seconds after start")
    p.add_argument("--error-style", choices=("rfc6749", "d1"), default="rfc6749")
    p.add_argument("--error-message", help="the error_description / errorMessage to answer")
    p.add_argument("--audience")
    p.add_argument("--stats")
    args = p.parse_args(argv)
    server = TokenServer(args)
    site = Site(Root(server))
    site.displayTracebacks = False
    options = tls_options(Path(args.cert), Path(args.key), Path(args.client_ca))
    port = reactor.listenSSL(args.port, site, options, interface="127.0.0.1")
    server.listening()
    print(f"LISTENING {port.getHost().port}", flush=True)
    reactor.run()  # SIGTERM stops the reactor, and main returns 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
