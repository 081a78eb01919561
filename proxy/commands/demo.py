"""`mtls-sidecar demo`: both directions on loopback with a throwaway PKI, and a trace.

Everything runs in this process on one reactor: a stand-in for Thales D1 (a mutual-TLS API that
checks the client certificate and the bearer token, plus the OAuth token endpoint that checks the
ES256 assertion like D1 does), a stand-in internal app, and the real sidecar built from a real
config file, exactly as `run` builds it. Nothing leaves 127.0.0.1; files live in a temp dir.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
import time
import urllib.parse
from pathlib import Path
from typing import Any

import jwt
from twisted.internet import defer, ssl, task
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from proxy import config as cfg
from proxy.ops.service import Sidecar
from proxy.telemetry.logs import AccessLog
from proxy.tls import pki
from proxy.tls.throwaway import Issued, make_ca, write_ca

GATEWAY_ID = "MGW_000001"
KEY_ID = "demo-es256-1"
OUT = print


def say(hop: str, text: str) -> None:
    OUT(f"  {hop:<22} {text}")


class D1StandIn(Resource):
    """The partner: token endpoint + an API that wants our client certificate and a token."""

    isLeaf = True

    def __init__(self, public_key: Any, clock: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.public_key = public_key
        self.clock = clock
        self.tokens: dict[str, float] = {}
        self.fetches = 0

    def render_POST(self, request: Request) -> bytes:
        if request.path == b"/authz/v1/oauth2/token":
            return self._token(request)
        return self._api(request)

    def render_GET(self, request: Request) -> bytes:
        return self._api(request)

    def _peer(self, request: Request) -> str:
        cert = request.transport.getPeerCertificate()  # type: ignore[union-attr]
        return str(cert.to_cryptography().subject.rfc4514_string()) if cert else "none"

    def _token(self, request: Request) -> bytes:
        body = request.content.read() if request.content else b""
        ctype = request.getHeader(b"content-type") or b""
        fields: dict[str, Any] = (
            json.loads(body) if b"json" in ctype else dict(urllib.parse.parse_qsl(body.decode()))
        )
        assertion = str(fields.get("assertion", ""))
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion, self.public_key, algorithms=["ES256"], options={"verify_aud": False}
            )
        except jwt.PyJWTError as e:
            request.setResponseCode(400)
            say("D1 token endpoint", f"refused the assertion: {e}")
            return b'{"error":"invalid_grant"}'
        lifetime = int(claims["exp"]) - int(claims["iat"])
        ok = (
            header.get("kid") == KEY_ID
            and claims.get("iss") == GATEWAY_ID
            and lifetime <= 900
            and fields.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        )
        if not ok:
            request.setResponseCode(400)
            return b'{"error":"invalid_grant"}'
        self.fetches += 1
        token = f"demo-token-{self.fetches}"
        self.tokens[token] = self.clock.seconds() + 900
        say(
            "D1 token endpoint",
            f"client cert {self._peer(request)}; ES256 signature valid; kid={header['kid']} "
            f"iss={claims['iss']} exp-iat={lifetime}s jti={str(claims['jti'])[:8]}... "
            f"x-correlation-id={request.getHeader(b'x-correlation-id').decode()}"  # type: ignore[union-attr]
            f" -> token #{self.fetches}",
        )
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"access_token": token, "token_type": "Bearer", "expires_in": 900}
        ).encode()

    def _api(self, request: Request) -> bytes:
        auth = (request.getHeader(b"authorization") or b"").decode()
        token = auth.removeprefix("Bearer ")
        valid = self.tokens.get(token, 0) > self.clock.seconds()
        say(
            "D1 API",
            f"{request.method.decode()} {request.uri.decode()} from {self._peer(request)}; "
            f"bearer {'valid (token #' + token.rsplit('-', 1)[-1] + ')' if valid else 'INVALID'}; "
            f"Host={request.getHeader(b'host').decode()}; "  # type: ignore[union-attr]
            f"x-correlation-id={(request.getHeader(b'x-correlation-id') or b'-').decode()}",
        )
        request.setHeader(b"content-type", b"application/json")
        if not valid:
            request.setResponseCode(401)
            return b'{"error":"invalid_token"}'
        return b'{"tokenUpdated":true}'


class InternalApp(Resource):
    """The merchant's legacy app behind the ingress: prints what it was told about the caller."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        say("internal app", f"{request.method.decode()} {request.uri.decode()} (plain HTTP)")
        for name, values in sorted(request.requestHeaders.getAllRawHeaders()):
            low = name.lower()
            if low.startswith((b"x-client", b"x-forwarded", b"client-cert")):
                for value in values:
                    shown = value.decode()
                    shown = shown if len(shown) <= 90 else shown[:87] + "..."
                    say("", f"{name.decode()}: {shown}")
        return b'{"status":"received"}'


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, options: Any) -> None:
        self.options = options

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.options


def _pem(issued: Issued) -> tuple[bytes, bytes]:
    return issued.chain_pem(), issued.key_pem()


def _tls_server(issued: Issued, client_ca: Issued) -> Any:
    return ssl.CertificateOptions(
        privateKey=ssl.PrivateCertificate.loadPEM(
            issued.cert_pem() + issued.key_pem()
        ).privateKey.original,
        certificate=ssl.Certificate.loadPEM(issued.cert_pem()).original,
        trustRoot=ssl.Certificate.loadPEM(client_ca.cert_pem()),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableProtocols=[b"http/1.1"],
    )


def _listen_port(sidecar: Sidecar, name: str) -> int:
    for state in sidecar.routes:
        if state.config.name == name and state.port is not None:
            port: int = getattr(state.port.getHost(), "port", 0)
            return port
    raise LookupError(name)


async def _demo(reactor: Any, workdir: Path) -> None:
    OUT("mtls-sidecar demo: both directions on 127.0.0.1, throwaway PKI in " + str(workdir))
    # ---- PKI: D1's server CA, Thales' client CA, the merchant's server CA, our ES256 key
    d1_server_ca = make_ca("C=US,O=Amazon-like demo root,CN=Demo Root CA 1")
    thales_client_ca = make_ca("C=FR,O=Thales-like demo,CN=Demo D1 Client CA")
    merchant_ca = make_ca("C=FR,O=Merchant demo,CN=Merchant Demo CA")
    d1_server = d1_server_ca.issue("CN=localhost", dns=("localhost",), server=True)
    ours = thales_client_ca.issue(
        f"C=FR,ST=IDF,L=Paris,O=Merchant,OU=Payments,CN=TLSMA-ECDSA/{GATEWAY_ID}/D1.PPR",
        client=True,
    )
    merchant_server = merchant_ca.issue("CN=localhost", dns=("localhost",), server=True)
    d1_caller = thales_client_ca.issue("C=FR,O=Thales D1,CN=d1-notifications.demo", client=True)
    ours.write(workdir, "client")
    merchant_server.write(workdir, "server")
    write_ca(d1_server_ca, workdir / "d1-roots.pem")
    write_ca(thales_client_ca, workdir / "thales-client-ca.pem")
    signing_key = pki.make_oauth_key()
    (workdir / "oauth-es256.key").write_bytes(pki.private_key_pem(signing_key))
    OUT(f"  PKI: our client certificate CN=TLSMA-ECDSA/{GATEWAY_ID}/D1.PPR (ECDSA P-256)")

    # ---- the stand-ins
    d1 = D1StandIn(signing_key.public_key(), reactor)
    d1_port = reactor.listenSSL(
        0, Site(d1), _tls_server(d1_server, thales_client_ca), interface="127.0.0.1"
    )
    app = InternalApp()  # type: ignore[no-untyped-call]
    app_port = reactor.listenTCP(0, Site(app), interface="127.0.0.1")
    d1_at = d1_port.getHost().port
    app_at = app_port.getHost().port

    # ---- the sidecar, from a config file as an operator writes it
    conf = workdir / "sidecar.toml"
    conf.write_text(
        textwrap.dedent(
            f"""
            [log]
            format = "text"
            [[egress]]
            name = "d1-ppr"
            listen = "127.0.0.1:0"
            upstream = "https://localhost:{d1_at}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "d1-roots.pem"
              [egress.oauth]
              token_url = "https://localhost:{d1_at}/authz/v1/oauth2/token"
              issuer = "{GATEWAY_ID}"
              signing_key = "oauth-es256.key"
              key_id = "{KEY_ID}"
              body = "json"
            [[ingress]]
            name = "d1-callbacks"
            listen = "127.0.0.1:0"
            server_cert = "server.pem"
            server_key = "server.key"
            client_ca = "thales-client-ca.pem"
            allow_subjects = ["CN=*.demo"]
            upstream = "http://127.0.0.1:{app_at}"
            """
        )
    )
    config = cfg.load(conf)
    sidecar = Sidecar(config, reactor, access_log=AccessLog(None, False))
    sidecar.build()
    sidecar.start()
    egress_at = _listen_port(sidecar, "d1-ppr")
    ingress_at = _listen_port(sidecar, "d1-callbacks")
    OUT(f"  sidecar: egress 127.0.0.1:{egress_at} -> D1 stand-in https://localhost:{d1_at}")
    OUT(f"           ingress https://127.0.0.1:{ingress_at} -> internal app :{app_at}\n")
    OUT("0) at start the sidecar fetches D1's OAuth token with an ES256 assertion (JWT bearer)")
    await task.deferLater(reactor, 0.3, lambda: None)  # the first token fetch is eager
    OUT("")

    plain = Agent(reactor)
    try:
        OUT("1) egress: the legacy app calls D1 through the sidecar (plain HTTP, no token)")
        for i in range(3):
            url = f"http://127.0.0.1:{egress_at}/d1/v1/tokens/T{i}/notify"
            say("app -> sidecar", f"POST {url}")
            response = await plain.request(
                b"POST", url.encode(), Headers({b"content-type": [b"application/json"]})
            )
            body = await readBody(response)
            say("app <- sidecar", f"{response.code} {body.decode()}")
        OUT(f"   token endpoint calls: {d1.fetches} (fetched once, reused)\n")

        OUT("2) egress: an absolute-form request for another host is refused (not an open proxy)")
        say("app -> sidecar", "GET http://evil.example/ (absolute-form, as with HTTP_PROXY set)")
        refused = await _raw(
            reactor, egress_at, b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        )
        status_line, _, rest = refused.partition(b"\r\n")
        answer = rest.rsplit(b"\r\n", 1)[-1].decode()
        say("app <- sidecar", f"{status_line.decode()} {answer}")

        OUT("\n3) ingress: D1 calls the merchant over mutual TLS; the app gets the verified caller")
        policy = _Policy(
            ssl.optionsForClientTLS(
                "localhost",
                trustRoot=ssl.Certificate.loadPEM(merchant_ca.cert_pem()),
                clientCertificate=ssl.PrivateCertificate.loadPEM(
                    d1_caller.cert_pem() + d1_caller.key_pem()
                ),
            )
        )
        d1_client = Agent(reactor, contextFactory=policy)
        url = f"https://localhost:{ingress_at}/merchant-gateways/{GATEWAY_ID}/notify-update"
        say("D1 -> sidecar", f"POST {url} (client cert CN=d1-notifications.demo)")
        response = await d1_client.request(
            b"POST",
            url.encode(),
            Headers({b"x-client-subject": [b"CN=spoofed"], b"x-correlation-id": [b"demo-1"]}),
        )
        body = await readBody(response)
        say(
            "D1 <- sidecar",
            f"{response.code} {body.decode()}  (the spoofed X-Client-Subject was dropped)",
        )

        OUT("\n4) ingress: a caller without a certificate never reaches the app")
        anonymous = Agent(
            reactor,
            contextFactory=_Policy(
                ssl.optionsForClientTLS(
                    "localhost", trustRoot=ssl.Certificate.loadPEM(merchant_ca.cert_pem())
                )
            ),
        )
        try:
            await anonymous.request(b"POST", url.encode())
            say("anonymous", "unexpectedly answered")
        except Exception as e:
            say("anonymous", f"refused during the TLS handshake ({type(e).__name__})")
        OUT("\ndone: the demo stops by itself.")
    finally:
        await sidecar.stop()
        await defer.maybeDeferred(d1_port.stopListening)
        await defer.maybeDeferred(app_port.stopListening)


async def _raw(reactor: Any, port: int, data: bytes) -> bytes:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    class Collect(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.done: defer.Deferred[bytes] = defer.Deferred()

        def dataReceived(self, chunk: bytes) -> None:
            self.data += chunk
            if b"}" in self.data:
                self.transport.loseConnection()  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            self.done.callback(self.data)

    proto = Collect()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    proto.transport.write(data)  # type: ignore[union-attr]
    return await proto.done


def run_demo() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mtls-sidecar-demo-"))
    started = time.monotonic()
    try:
        task.react(lambda reactor: defer.ensureDeferred(_demo(reactor, workdir)))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        OUT(f"(took {time.monotonic() - started:.1f}s)")
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
