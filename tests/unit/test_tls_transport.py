"""transport.TLSConnection in memory: real OpenSSL on both ends, joined by iosim or fed by hand.

What the data path relies on: exact bytes both ways whatever the record splits, writes larger
than a record, the handshake callback, the peer certificate and ALPN, the steady state without
pyOpenSSL's exception path, close_notify then FIN, errors named as pyOpenSSL names them, and a
creator able to refuse the peer before any application byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from proxy.tls import transport
from proxy.tls.transport import TLSConnection
from tests.pkifactory import make_ca, write_ca

REQUEST = (
    b"POST /merchant-gateways/x/notify-update HTTP/1.1\r\nHost: d1\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


@implementer(IHandshakeListener)
class App(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.handshakes = 0
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLClientConnectionCreator)
class Creator:
    def __init__(self, ctx: SSL.Context, refuse: bool = False) -> None:
        self.ctx = ctx
        self.refuse = refuse

    def serverConnectionForTLS(self, proto: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(proto)
        return conn

    def clientConnectionForTLS(self, proto: Any) -> SSL.Connection:
        conn = SSL.Connection(self.ctx, None)
        conn.set_app_data(proto)
        conn.set_tlsext_host_name(b"localhost")
        if self.refuse:  # as a name check in a creator does: at handshake done, refuse

            def info(c: SSL.Connection, where: int, ret: int) -> None:
                if where & SSL.SSL_CB_HANDSHAKE_DONE:
                    c.get_app_data().failVerification(Failure(ValueError("name mismatch")))

            conn.set_info_callback(info)
        conn.set_connect_state()
        return conn


@pytest.fixture(scope="module")
def ctxs(tmp_path_factory: pytest.TempPathFactory) -> tuple[SSL.Context, SSL.Context]:
    tmp: Path = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    write_ca(ca, tmp / "ca.pem")
    cert, key = ca.issue("CN=localhost", dns=("localhost",), server=True).write(tmp, "server")
    server = SSL.Context(SSL.TLS_SERVER_METHOD)
    server.use_certificate_chain_file(str(cert))
    server.use_privatekey_file(str(key))
    server.set_alpn_select_callback(lambda conn, offered: b"http/1.1")
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.load_verify_locations(str(tmp / "ca.pem"))
    client.set_verify(SSL.VERIFY_PEER)
    client.set_alpn_protos([b"http/1.1"])
    return server, client


class Pair:
    def __init__(self, ctxs: tuple[SSL.Context, SSL.Context], refuse: bool = False) -> None:
        self.server_app, self.client_app = App(), App()
        self.server = TLSConnection(Creator(ctxs[0]), False, self.server_app)
        self.client = TLSConnection(Creator(ctxs[1], refuse), True, self.client_app)
        self.server_io = iosim.makeFakeServer(self.server)
        self.client_io = iosim.makeFakeClient(self.client)
        self.pump = iosim.connect(self.server, self.server_io, self.client, self.client_io)


def test_the_data_path_builds_its_tls_connections_on_this_transport() -> None:
    from proxy.ops import service
    from proxy.wire import pool

    assert pool.TLSFactory is transport.TLSFactory
    assert service.TLSFactory is transport.TLSFactory
    factory = transport.TLSFactory(None, False, _OneFactory())
    assert isinstance(factory.buildProtocol(None), TLSConnection)


class _OneFactory:
    def buildProtocol(self, addr: Any) -> Protocol:
        return App()


def test_exact_bytes_both_ways_with_writes_larger_than_a_record(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    assert (pair.server_app.handshakes, pair.client_app.handshakes) == (1, 1)
    big = bytes(range(256)) * 4096  # 1 MiB: SSL_write takes it a record at a time
    pair.client.write(REQUEST)
    pair.server.write(big)
    pair.pump.flush()
    assert pair.server_app.data == REQUEST
    assert pair.client_app.data == big
    assert ISSLTransport.providedBy(pair.server)


def test_peer_certificate_alpn_and_handle(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    cert = pair.client.getPeerCertificate()
    assert cert is not None and cert.get_subject().CN == "localhost"
    assert pair.client.negotiatedProtocol == b"http/1.1"
    assert pair.server.getHandle() is not None


def test_writes_before_the_handshake_go_out_after_it(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.client.write(b"early ")
    pair.client.write(b"bytes")
    pair.pump.flush()
    assert pair.server_app.data == b"early bytes"


def test_the_steady_state_takes_no_exception_path(
    ctxs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    calls: list[str] = []
    for side in (pair.server, pair.client):
        conn = side.getHandle()
        for name in ("recv", "bio_read", "sendall", "send"):
            original = getattr(conn, name)

            def counted(*a: Any, _o: Any = original, _n: str = name) -> Any:
                calls.append(_n)
                return _o(*a)

            setattr(conn, name, counted)
    for _ in range(50):
        pair.client.write(REQUEST)
        pair.pump.flush()
        pair.server.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        pair.pump.flush()
    assert pair.server_app.data == REQUEST * 50
    assert calls == []


def _wire(ctxs: Any) -> tuple[Pair, bytes]:
    """A connected pair and the records the client sends for REQUEST, not yet delivered."""
    pair = Pair(ctxs)
    pair.pump.flush()
    pair.client.write(REQUEST)
    return pair, pair.client_io.getOutBuffer()


def test_a_request_split_at_every_byte_boundary_arrives_whole(ctxs: Any) -> None:
    pair, wire = _wire(ctxs)
    for cut in range(len(wire) + 1):
        pair.server.dataReceived(wire[:cut])
        pair.server.dataReceived(wire[cut:])
        assert pair.server_app.data == REQUEST, cut
        pair.server_app.data = b""
        pair.client.write(REQUEST)
        wire = pair.client_io.getOutBuffer()


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_records_split_anywhere_into_many_pieces(ctxs: Any, cuts: list[int]) -> None:
    pair, wire = _wire(ctxs)
    pair.client.write(REQUEST)  # two requests: two records back to back
    wire += pair.client_io.getOutBuffer()
    points = sorted({min(c, len(wire)) for c in cuts})
    start = 0
    for point in [*points, len(wire)]:
        pair.server.dataReceived(wire[start:point])
        start = point
    assert pair.server_app.data == REQUEST * 2


def test_our_close_sends_close_notify_then_fin_and_the_peer_sees_a_clean_end(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    shut: list[str] = []
    pair.server_io.loseWriteConnection = lambda: shut.append("fin")  # type: ignore[method-assign]
    pair.server.write(b"last answer")
    pair.server.loseConnection()
    assert shut == ["fin"]  # TCP shut for writing right after our close_notify
    pair.pump.flush()
    assert pair.client_app.data == b"last answer"
    # the client read our close_notify, answered it and closed: a clean end on both sides
    assert pair.client.lost
    assert pair.client_app.lost is not None and pair.client_app.lost.check(ConnectionDone)
    assert pair.server_app.lost is not None and pair.server_app.lost.check(ConnectionDone)


def test_writes_after_close_are_dropped(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    pair.server.loseConnection()
    pair.server.write(b"too late")
    pair.pump.flush()
    assert pair.client_app.data == b""


def test_a_creator_refusing_the_peer_stops_the_connection_before_any_byte(ctxs: Any) -> None:
    pair = Pair(ctxs, refuse=True)
    pair.client.write(b"must never leave")
    pair.pump.flush()
    assert pair.client_app.handshakes == 0
    assert pair.server_app.data == b""
    assert pair.client.aborted
    assert pair.client_io.disconnecting or pair.client_io.disconnected


def test_garbage_after_the_handshake_ends_the_session_with_pyopenssls_error(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    pair.server.dataReceived(b"\x17\x03\x03\x00\x05hello")  # a record that fails to decrypt
    pair.server.connectionLost(Failure(ConnectionError()))
    assert pair.server_app.lost is not None
    assert pair.server_app.lost.check(SSL.Error)


def test_producers_register_on_the_tcp_transport(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()

    class Producer:
        paused = 0

        def pauseProducing(self) -> None:
            self.paused += 1

        def resumeProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    producer = Producer()
    pair.server.registerProducer(producer, True)
    assert pair.server_io.producer is producer
    pair.server.unregisterProducer()
    assert pair.server_io.producer is None


def test_idle_release_swaps_the_bios_and_the_connection_keeps_working(ctxs: Any) -> None:
    pair = Pair(ctxs)
    pair.pump.flush()
    pair.client.write(b"x" * 200_000)
    pair.pump.flush()
    conn: Any = pair.server.getHandle()
    before = (conn._into_ssl, conn._from_ssl)
    pair.server.release_buffers()
    assert (conn._into_ssl, conn._from_ssl) != before
    pair.client.write(b"after")
    pair.server.write(b"reply")
    pair.pump.flush()
    assert pair.server_app.data.endswith(b"after")
    assert pair.client_app.data == b"reply"


def test_a_renegotiation_is_refused_and_ends_the_session(tmp_path: Path) -> None:
    """The server context's OP_NO_RENEGOTIATION answers a TLS 1.2 client's renegotiation with a
    no_renegotiation alert: the transport sends it at once (no timer), no second handshake
    runs, and the session ends with OpenSSL's words for it on the client."""
    from proxy.tls import contexts

    ca = make_ca()
    write_ca(ca, tmp_path / "ca.pem")
    cert, key = ca.issue("CN=localhost", dns=("localhost",), server=True).write(tmp_path, "s")
    server = contexts._base_context(SSL.TLS_SERVER_METHOD, "generic")  # as every listener's
    server.use_certificate_chain_file(str(cert))
    server.use_privatekey_file(str(key))
    client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client.set_max_proto_version(SSL.TLS1_2_VERSION)
    client.load_verify_locations(str(tmp_path / "ca.pem"))
    client.set_verify(SSL.VERIFY_PEER)
    pair = Pair((server, client))
    pair.pump.flush()
    conn: Any = pair.client.getHandle()
    assert conn.renegotiate()
    with pytest.raises(SSL.WantReadError):
        conn.do_handshake()
    pair.client._flush()  # the ClientHello of the renegotiation
    pair.pump.flush()
    assert pair.server_app.handshakes == 1
    assert pair.server.lost and pair.client.lost
    assert pair.client_app.lost is not None and pair.client_app.lost.check(SSL.Error)
    assert "no renegotiation" in str(pair.client_app.lost.value)
    pair.server.write(b"never")
    pair.pump.flush()
    assert pair.client_app.data == b""


def test_tcp_lost_without_close_notify_is_a_lost_connection_and_frees_by_refcount(
    ctxs: Any,
) -> None:
    """A peer gone without close_notify: the protocol hears ConnectionLost, as under Twisted's
    TLS, and nothing of the connection is left in a reference cycle."""
    import gc
    import weakref

    from twisted.internet.error import ConnectionLost

    pair = Pair(ctxs)
    pair.pump.flush()
    gc.collect()
    gc.disable()
    try:
        pair.server.connectionLost(Failure(ConnectionDone()))
        app = pair.server_app
        assert app.lost is not None and app.lost.check(ConnectionLost)
        app.lost = None  # what the relay does with it: handled, then dropped
        gone = weakref.ref(pair.server)
        pair.server_io.protocol = None  # as the reactor's TCP connection drops it when lost
        del pair, app
        assert gone() is None
    finally:
        gc.enable()
