"""TLS session resumption in the pool (egress) and its absence on ingress, in memory.

Handshakes run between two pyOpenSSL connections on memory BIOs: the client side is made by
ClientTLS for a real UpstreamConnection of a real Pool, as Twisted would make it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import attrs
import pytest
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from proxy.tls.contexts import (
    ClientMaterial,
    ClientTLS,
    KeyPair,
    PeerRejected,
    client_context,
    server_context,
    session_reused,
)
from proxy.wire.pool import Pool, UpstreamConnection
from tests.pkifactory import Issued, make_ca, write_ca

VERSIONS = {"tls12": SSL.TLS1_2_VERSION, "tls13": SSL.TLS1_3_VERSION}
RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"


@attrs.frozen
class Pki:
    dir: Path
    server: Issued
    client: Issued

    def client_material(self) -> ClientMaterial:
        pair = KeyPair((self.client.cert,), self.client.key)
        return ClientMaterial(pair, client_context(pair, self.dir / "server-ca.pem", "generic"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("resumption")
    server_ca, client_ca = make_ca("CN=Server Root"), make_ca("CN=Client Root")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    server = server_ca.issue("CN=localhost", dns=("localhost",), server=True)
    client = client_ca.issue("CN=merchant", client=True)
    return Pki(d, server, client)


def origin_context(pki: Pki, version: int) -> SSL.Context:
    """A partner that allows resumption: OpenSSL's server cache and tickets, both on."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.use_certificate(pki.server.cert)
    ctx.use_privatekey(pki.server.key)
    ctx.set_session_id(b"origin")
    return ctx


def ingress_context(pki: Pki, version: int) -> SSL.Context:
    pair = KeyPair((pki.server.cert,), pki.server.key)
    ctx, _cas = server_context(pair, pki.dir / "client-ca.pem", "generic", b"mtls-sidecar/in")
    ctx.set_max_proto_version(version)
    return ctx


class FakeTLS:
    """What ClientTLS sees of Twisted's TLS protocol, and what the upstream sees of its
    transport."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.wrappedProtocol = conn
        self.handle: SSL.Connection | None = None
        self.aborted = False
        self.disconnecting = False
        self.reason: Failure | None = None

    def getHandle(self) -> SSL.Connection:
        assert self.handle is not None
        return self.handle

    def abortConnection(self) -> None:
        self.aborted = self.disconnecting = True

    def failVerification(self, reason: Failure) -> None:
        """What ClientTLS's connection calls on a failed name check (Twisted's TLS aborts)."""
        self.reason = reason
        self.abortConnection()


def make_pool(material: ClientMaterial, clock: Clock | None = None) -> tuple[Pool, list[str]]:
    kinds: list[str] = []
    pool = Pool(
        reactor=object(),  # type: ignore[arg-type]  # nothing is dialled here
        clock=clock or Clock(),
        resolver=object(),  # type: ignore[arg-type]
        host="localhost",
        port=443,
        tls=ClientTLS(material, "localhost"),
        connect_timeout=5,
        idle_timeout=15,
        max_age=60,
        max_idle=4,
        on_handshake=kinds.append,
    )
    return pool, kinds


def pump(a: SSL.Connection, b: SSL.Connection) -> None:
    """Move bytes both ways until neither side has anything more to say."""
    for _ in range(50):
        moved = False
        for src, dst in ((a, b), (b, a)):
            if src.get_state_string() != b"SSL negotiation finished successfully":
                with contextlib.suppress(SSL.WantReadError):
                    src.do_handshake()
            try:
                data = src.bio_read(1 << 16)
            except SSL.WantReadError:
                data = b""
            if data:
                dst.bio_write(data)
                moved = True
        if not moved:
            return


def connect(
    pool: Pool, server_ctx: SSL.Context, tls_name: str = "localhost", respond: bool = True
) -> tuple[UpstreamConnection, FakeTLS, SSL.Connection]:
    """One new upstream connection: handshake, name check, then (respond) a response."""
    up = UpstreamConnection(pool, "127.0.0.1", tls_name, pool.clock.seconds())
    transport = FakeTLS(up)
    up.transport = transport
    assert pool.tls is not None
    # the pool's creator, for the name this connection dials (same material: same session)
    client = ClientTLS(pool.tls.material, tls_name).clientConnectionForTLS(transport)
    transport.handle = client
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    pump(client, server)
    up.handshakeCompleted()
    if respond and not transport.aborted:
        server.send(RESPONSE)
        pump(client, server)
        up.dataReceived(client.recv(1 << 16))  # TLS 1.3 tickets are read on the way
    return up, transport, client


@pytest.mark.parametrize("version", list(VERSIONS))
def test_the_next_connection_resumes_the_last_session(pki: Pki, version: str) -> None:
    pool, kinds = make_pool(pki.client_material())
    origin = origin_context(pki, VERSIONS[version])
    _, _, first = connect(pool, origin)
    second_up, second_t, second = connect(pool, origin)
    third_up, _, third = connect(pool, origin)
    assert not session_reused(first) and session_reused(second) and session_reused(third)
    assert kinds == ["full", "resumed", "resumed"]
    assert second.get_protocol_version() == VERSIONS[version]
    # handed out only after the (repeated) name check, with the certificate it vouches for
    assert not second_t.aborted and second_up.ready is None and third_up.ready is None
    peer = second.get_peer_certificate(as_cryptography=True)
    assert peer is not None and peer == pki.server.cert


def test_tls13_session_is_taken_after_the_first_response_bytes(pki: Pki) -> None:
    pool, _ = make_pool(pki.client_material())
    origin = origin_context(pki, SSL.TLS1_3_VERSION)
    up, _, _ = connect(pool, origin, respond=False)
    assert pool.session is None and up.session_wanted  # the tickets have not been read yet
    _, _, client = connect(pool, origin)
    assert not session_reused(client) and pool.session is not None


def test_tls12_session_is_taken_right_after_the_handshake(pki: Pki) -> None:
    pool, _ = make_pool(pki.client_material())
    connect(pool, origin_context(pki, SSL.TLS1_2_VERSION), respond=False)
    assert pool.session is not None


@pytest.mark.parametrize("version", list(VERSIONS))
def test_the_name_is_still_checked_on_a_resumed_connection(pki: Pki, version: str) -> None:
    pool, kinds = make_pool(pki.client_material())
    origin = origin_context(pki, VERSIONS[version])
    connect(pool, origin)
    up, transport, client = connect(pool, origin, tls_name="elsewhere.example", respond=False)
    assert session_reused(client)  # OpenSSL resumed: it ran no chain verification ...
    assert transport.aborted and up.ready is not None  # ... the name check refused it anyway
    assert transport.reason is not None and isinstance(transport.reason.value, PeerRejected)
    assert transport.reason.value.check == "name"
    assert "hostname mismatch" in transport.reason.value.detail
    assert kinds == ["full"]


@pytest.mark.parametrize("version", list(VERSIONS))
def test_new_material_on_reload_means_a_full_handshake(pki: Pki, version: str) -> None:
    pool, kinds = make_pool(pki.client_material())
    origin = origin_context(pki, VERSIONS[version])
    connect(pool, origin)
    assert pool.tls is not None
    pool.tls.material = pki.client_material()  # what a reload does: a new context
    _, _, client = connect(pool, origin)
    assert not session_reused(client)
    _, _, client = connect(pool, origin)
    assert session_reused(client)
    assert kinds == ["full", "full", "resumed"]


def test_renew_drops_the_session_and_old_connections_do_not_bring_it_back(pki: Pki) -> None:
    pool, kinds = make_pool(pki.client_material())
    origin = origin_context(pki, SSL.TLS1_3_VERSION)
    old, _, _ = connect(pool, origin, respond=False)
    assert old.session_wanted
    pool.renew()  # a new client certificate
    assert pool.session is None
    old.dataReceived(RESPONSE)  # the old generation's first response: its session is not kept
    assert pool.session is None
    _, _, client = connect(pool, origin)
    assert not session_reused(client) and kinds == ["full", "full"]


def test_a_session_is_not_offered_past_the_server_certificates_not_after(pki: Pki) -> None:
    clock = Clock()
    pool, _ = make_pool(pki.client_material(), clock)
    origin = origin_context(pki, SSL.TLS1_2_VERSION)
    connect(pool, origin)
    clock.advance(pki.server.cert.not_valid_after_utc.timestamp())
    assert pool.tls is not None
    assert pool.session_for(pool.tls.material.context) is None and pool.session is None


def test_a_session_from_another_context_is_never_offered(pki: Pki) -> None:
    pool, _ = make_pool(pki.client_material())
    connect(pool, origin_context(pki, SSL.TLS1_2_VERSION))
    other = pki.client_material().context
    assert pool.session_for(other) is None and pool.session is None


def test_a_failed_handshake_after_an_offer_drops_the_session(pki: Pki) -> None:
    from twisted.python.failure import Failure

    pool, _ = make_pool(pki.client_material())
    origin = origin_context(pki, SSL.TLS1_2_VERSION)
    connect(pool, origin)
    up = UpstreamConnection(pool, "127.0.0.1", "localhost", 0.0)
    transport = FakeTLS(up)
    assert pool.tls is not None
    pool.tls.clientConnectionForTLS(transport)
    assert up.session_offered
    assert up.ready is not None
    up.ready.addErrback(lambda f: None)
    up.connectionLost(Failure(ConnectionError("reset during the handshake")))
    assert pool.session is None


def test_ingress_contexts_have_no_session_cache_and_no_tickets(pki: Pki) -> None:
    ctx = ingress_context(pki, SSL.TLS1_3_VERSION)
    assert ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert ctx.set_options(0) & SSL.OP_NO_TICKET


@pytest.mark.parametrize("version", list(VERSIONS))
def test_ingress_never_resumes(pki: Pki, version: str) -> None:
    """A client that offers the session of its last connection gets a full handshake, so every
    connection carries the client chain the identity headers are made from."""
    ingress = ingress_context(pki, VERSIONS[version])
    pool, kinds = make_pool(pki.client_material())
    for _ in range(3):
        _, transport, client = connect(pool, ingress)
        assert not transport.aborted and not session_reused(client)
    assert kinds == ["full", "full", "full"]
