"""The name check lives in the client connection creator (ClientTLS): every outbound TLS
connection of the sidecar gets it, and a failed check ends the connection before any
application byte is written.

In memory: a real OpenSSL server over iosim, the client on the data path's TLS (TLSFactory) and
on Twisted's (tls_factory). The last tests
read the source of proxy/ for every place that makes a client TLS connection.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import ResponseNeverReceived
from zope.interface import implementer

from proxy.oauth import glue
from proxy.oauth.client import TokenError, TokenSource
from proxy.tls.contexts import (
    ClientMaterial,
    ClientTLS,
    KeyPair,
    PeerRejected,
    client_context,
    tls_factory,
)
from proxy.tls.transport import TLSFactory
from tests.pkifactory import make_ca, write_ca
from tests.unit.test_oauth import URL, failure_of, oauth_settings

REQUEST = b"POST /authz/v1/oauth2/token HTTP/1.1\r\nHost: localhost\r\n\r\nassertion=secret"
PROXY = Path(__file__).resolve().parents[2] / "proxy"


class Server(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Client(Protocol):
    """Writes its request as soon as TCP is up, as twisted.web's Agent does (Twisted's TLS
    buffers it until the handshake completes)."""

    def __init__(self) -> None:
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(REQUEST)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IOpenSSLServerConnectionCreator)
class _Server:
    def __init__(self, ctx: SSL.Context) -> None:
        self.ctx = ctx

    def serverConnectionForTLS(self, proto: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(proto)
        return conn


class Pki:
    def __init__(self, d: Path) -> None:
        self.dir = d
        ca, other = make_ca("CN=Token Root"), make_ca("CN=Other Root")
        write_ca(ca, d / "ca.pem")
        self.certs = {
            "right": ca.issue("CN=localhost", dns=("localhost",), server=True),
            "elsewhere": ca.issue("CN=elsewhere", dns=("elsewhere.test",), server=True),
            "untrusted": other.issue("CN=localhost", dns=("localhost",), server=True),
        }
        client = ca.issue("CN=merchant", client=True)
        pair = KeyPair((client.cert,), client.key)
        self.material = ClientMaterial(
            pair, client_context(pair, d / "ca.pem", "generic"), f"trust {d / 'ca.pem'}"
        )

    def server_context(self, which: str, version: int) -> SSL.Context:
        issued = self.certs[which]
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.use_certificate(issued.cert)
        ctx.use_privatekey(issued.key)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("client-tls"))


def dial(
    pki: Pki, which: str, name: str, version: int, layer: Any = TLSFactory
) -> tuple[Server, Client]:
    """The server on Twisted's TLS; the client on `layer`: the data path's TLSFactory or
    Twisted's (tls_factory: the token request, probe)."""
    server_factory = tls_factory(
        _Server(pki.server_context(which, version)), False, Factory.forProtocol(Server)
    )
    client_factory = layer(ClientTLS(pki.material, name), True, Factory.forProtocol(Client))
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    apps = server.wrappedProtocol, client.wrappedProtocol  # (Twisted's drops them at the close)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    pump.flush()
    return apps


VERSIONS = pytest.mark.parametrize(
    "version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["tls12", "tls13"]
)
LAYERS = pytest.mark.parametrize("layer", [TLSFactory, tls_factory], ids=["ours", "twisted"])


@VERSIONS
@LAYERS
def test_the_right_name_gets_the_request(pki: Pki, version: int, layer: Any) -> None:
    server, client = dial(pki, "right", "localhost", version, layer)
    assert server.data == REQUEST and client.lost is None


@VERSIONS
@LAYERS
def test_a_certificate_for_another_name_gets_no_application_byte(
    pki: Pki, version: int, layer: Any
) -> None:
    server, client = dial(pki, "elsewhere", "localhost", version, layer)
    assert server.data == b""
    assert client.lost is not None and isinstance(client.lost.value, PeerRejected)
    assert client.lost.value.check == "name"
    assert str(client.lost.value) == (
        "hostname mismatch: certificate is for elsewhere.test, not localhost"
    )


@VERSIONS
@LAYERS
def test_an_untrusted_chain_says_which_check_and_which_file(
    pki: Pki, version: int, layer: Any
) -> None:
    server, client = dial(pki, "untrusted", "localhost", version, layer)
    assert server.data == b""
    assert client.lost is not None and isinstance(client.lost.value, PeerRejected)
    rejected = client.lost.value
    assert rejected.check == "trust"
    assert rejected.detail.startswith("certificate not trusted: unable to get local issuer")
    assert rejected.detail.endswith(f"checked against trust {pki.dir / 'ca.pem'}")


def test_an_ip_address_is_checked_as_an_ip_address(pki: Pki) -> None:
    server, client = dial(pki, "right", "127.0.0.1", SSL.TLS1_3_VERSION)
    assert server.data == b""
    assert client.lost is not None and isinstance(client.lost.value, PeerRejected)
    assert "not 127.0.0.1" in str(client.lost.value)


def test_the_token_request_policy_hands_out_the_checking_creator(pki: Pki) -> None:
    policy = glue._RoutePolicy(ClientTLS(pki.material, "api.d1.example"))
    creator = policy.creatorForNetloc(b"auth.d1.example", 443)
    assert isinstance(creator, ClientTLS) and creator.server_name == "auth.d1.example"


def test_a_token_server_refused_by_the_check_is_a_plain_token_error() -> None:
    rejected = PeerRejected("name", "hostname mismatch: certificate is for elsewhere.test, not x")

    def fetch(body: bytes, headers: dict[str, str]) -> Any:
        from twisted.internet.defer import fail

        return fail(ResponseNeverReceived([Failure(rejected)]))

    from twisted.internet.task import Clock

    source = TokenSource(Clock(), oauth_settings(), fetch, route="d1-ppr")
    error = failure_of(source.token()).value
    assert isinstance(error, TokenError)
    assert str(error) == (
        f"token endpoint {URL}: TLS check failed, no request sent: "
        "hostname mismatch: certificate is for elsewhere.test, not x"
    )


# --------------------------------------------------------------------------- every client site
# Each place in proxy/ that can make a client TLS connection, and what it goes through. A new
# place fails this test until it is added here, going through ClientTLS.
CLIENT_TLS_SITES = {
    # ClientTLS itself: its connection is the checking one
    ("tls/contexts.py", "ClientTLS.clientConnectionForTLS", "CheckedConnection"): "checking",
    # the data path (egress to the partner, ingress to an https upstream)
    ("wire/pool.py", "Pool._dial", "TLSFactory"): "ClientTLS (Pool.tls)",
    ("wire/tunnel.py", "TunnelEndpoint.connect", "tls_factory"): "ClientTLS (the token policy)",
    # the token request: twisted.web's Agent asks the policy for a creator per netloc
    ("oauth/glue.py", "_RoutePolicy.creatorForNetloc", "creatorForNetloc"): "ClientTLS",
    ("oauth/glue.py", "_RoutePolicy.creatorForNetloc", "ClientTLS"): "ClientTLS",
    ("ops/service.py", "Sidecar._build_egress", "ClientTLS"): "ClientTLS",
    ("ops/service.py", "Sidecar._build_ingress", "ClientTLS"): "ClientTLS",
    # Twisted's TLS around a factory, with whichever creator the caller gives (listed above)
    ("tls/contexts.py", "tls_factory", "TLSMemoryBIOFactory"): "the caller's creator",
    ("ops/supervisor.py", "Supervisor._token_sources", "ClientTLS"): "ClientTLS",
    # probe: egress dials and its token fetch through ClientTLS (and _WatchedTLS, a subclass)
    ("commands/probe/egress.py", "_Prober.route", "ClientTLS"): "ClientTLS",
    # probe's ingress check stands where the partner stands, to report on our own listener:
    # it sends one malformed line and no request, and reports the name check it makes itself
    (
        "commands/probe/ingress.py",
        "_PartnerTLS.clientConnectionForTLS",
        "SSL.Connection",
    ): "partner view",
    ("commands/probe/ingress.py", "_IngressProber.route", "tls_factory"): "partner view",
    # the demo's stand-in for D1 calling us: Twisted's own checking creator
    ("commands/demo.py", "_Policy.creatorForNetloc", "creatorForNetloc"): "Twisted's",
    ("commands/demo.py", "_demo", "optionsForClientTLS"): "Twisted's (checks the name)",
}

# server side: the ingress listeners (the data path's TLS around the relay, with ServerTLS)
SERVER_SITES = {("ops/service.py", "Sidecar._factory", "TLSFactory")}

_MARKERS = {
    "SSL.Connection": "SSL.Connection",
    "CheckedConnection": "CheckedConnection",
    "ClientTLS": "ClientTLS",
    "tls.ClientTLS": "ClientTLS",
    "tls_factory": "tls_factory",
    "tls.tls_factory": "tls_factory",
    "TLSFactory": "TLSFactory",
    "optionsForClientTLS": "optionsForClientTLS",
    "ssl.optionsForClientTLS": "optionsForClientTLS",
    "TLSMemoryBIOFactory": "TLSMemoryBIOFactory",
    "wrap_socket": "wrap_socket",
    "connectSSL": "connectSSL",
    "startTLS": "startTLS",
    "CertificateOptions": "CertificateOptions",
    "ssl.CertificateOptions": "CertificateOptions",
}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _sites() -> set[tuple[str, str, str]]:
    """(file, Class.function, marker) for every TLS-making call and creatorForNetloc."""
    found: set[tuple[str, str, str]] = set()
    for path in sorted(PROXY.rglob("*.py")):
        rel = path.relative_to(PROXY).as_posix()
        tree = ast.parse(path.read_text(), str(path))

        def walk(node: ast.AST, scope: list[str], rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    inner = [*scope, child.name]
                    if child.name == "creatorForNetloc":
                        found.add((rel, ".".join(inner), "creatorForNetloc"))
                    walk(child, inner)
                    continue
                if isinstance(child, ast.Call):
                    called = _dotted(child.func)
                    marker = _MARKERS.get(called) or _MARKERS.get(called.rsplit(".", 1)[-1])
                    if marker and not called.startswith(("self.", "super")):
                        found.add((rel, ".".join(scope) or "<module>", marker))
                walk(child, scope)

        walk(tree, [])
    return found


def test_every_client_tls_site_in_proxy_goes_through_the_checking_creator() -> None:
    sites = _sites()
    servers = {s for s in sites if "server" in s[1].lower()}  # serverConnectionForTLS & co
    clients = sites - servers - SERVER_SITES
    assert clients == set(CLIENT_TLS_SITES), (
        "client TLS sites changed; each must go through ClientTLS:\n"
        f"new: {sorted(clients - set(CLIENT_TLS_SITES))}\n"
        f"gone: {sorted(set(CLIENT_TLS_SITES) - clients)}"
    )


def test_no_code_replaces_the_client_contexts_info_callback() -> None:
    """The name check is the client context's info callback: only contexts.py sets it, and
    probe's partner view on a context of its own."""
    setters = [
        (p.relative_to(PROXY).as_posix(), n)
        for p in PROXY.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if ".set_info_callback(" in line
    ]
    assert {f for f, _n in setters} <= {"tls/contexts.py", "commands/probe/ingress.py"}
    probe = (PROXY / "commands/probe/egress.py").read_text()
    assert "material.context.set_info_callback" not in probe
