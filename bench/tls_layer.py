"""What the TLS layer alone costs per keep-alive request, in memory, with no socket.

One server-side TLS 1.3 connection (OpenSSL on both ends, ECDSA), driven three ways with the same
~50-byte request record in and a 240-byte response out:

- `twisted`: the data path as it is: our TLS protocol (Twisted's TLSMemoryBIOProtocol) around a
  protocol that answers each request at once;
- `pyopenssl`: pyOpenSSL's calls as Twisted makes them (recv and bio_read until WantReadError);
- `direct`: the binding's calls with one reused buffer, asking the BIO and SSL_pending instead of
  raising: the floor a TLS transport of our own could reach.

The difference between `twisted` and `direct` is what such a transport can save per request on
one TLS connection (egress has one TLS side per request, ingress one). Prints the median of RUNS
runs of N requests, in microseconds of process CPU per request.

    .venv/bin/python bench/tls_layer.py [N] [RUNS]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from proxy.tls.contexts import tls_factory
from proxy.tls.throwaway import make_ca

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + b"x" * 200


def _server_context() -> SSL.Context:
    ca = make_ca()
    leaf = ca.issue("CN=localhost", dns=("localhost",), server=True)
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(crypto.X509.from_cryptography(leaf.cert))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(leaf.key))
    return ctx


SERVER = _server_context()


def _client() -> SSL.Connection:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    conn.set_connect_state()
    return conn


def _out(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(1 << 16)
    except SSL.WantReadError:
        return b""


def _handshake(client: SSL.Connection, feed: Callable[[bytes], bytes]) -> None:
    """Client flights into `feed`, which returns the server's answer."""
    for _ in range(10):
        with contextlib.suppress(SSL.WantReadError):
            client.do_handshake()
        answer = feed(_out(client))
        if answer:
            client.bio_write(answer)
    client.do_handshake()


def _records(client: SSL.Connection, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        client.send(REQUEST)
        out.append(_out(client))
    return out


def _pair() -> tuple[SSL.Connection, Iterator[bytes]]:
    server = SSL.Connection(SERVER, None)
    server.set_accept_state()
    client = _client()

    def feed(data: bytes) -> bytes:
        if data:
            server.bio_write(data)
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        return _out(server)

    _handshake(client, feed)
    return server, iter(_records(client, N))


def pyopenssl_way(n: int) -> float:
    server, records = _pair()
    start = time.process_time()
    for _ in range(n):
        server.bio_write(next(records))
        while True:
            try:
                server.recv(1 << 15)
            except SSL.WantReadError:
                break
        server.send(RESPONSE)
        while True:
            try:
                server.bio_read(1 << 15)
            except SSL.WantReadError:
                break
    return time.process_time() - start


def direct_way(n: int) -> float:
    server, records = _pair()
    ssl, into, out = server._ssl, server._into_ssl, server._from_ssl
    buf = ffi.new("char[]", 1 << 15)
    start = time.process_time()
    for _ in range(n):
        server.bio_write(next(records))
        while True:
            got = lib.SSL_read(ssl, buf, 1 << 15)
            if got <= 0:
                break
            ffi.buffer(buf, got)[:]
            if not lib.SSL_pending(ssl) and not lib.BIO_get_mem_data(into, ffi.NULL):
                break
        with ffi.from_buffer(RESPONSE) as data:
            lib.SSL_write(ssl, data, len(RESPONSE))
        waiting = lib.BIO_get_mem_data(out, ffi.NULL)
        if waiting:
            got = lib.BIO_read(out, buf, min(waiting, 1 << 15))
            ffi.buffer(buf, got)[:]
    return time.process_time() - start


@implementer(IOpenSSLServerConnectionCreator)
class _Creator:
    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        conn = SSL.Connection(SERVER, None)
        conn.set_app_data(tls_protocol)
        return conn


class _Answer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(RESPONSE)  # type: ignore[union-attr]


class _Discard(StringTransport):
    def write(self, data: bytes) -> None:
        pass


def twisted_way(n: int) -> float:
    proto = tls_factory(_Creator(), False, Factory.forProtocol(_Answer)).buildProtocol(None)
    wire = StringTransport()
    proto.makeConnection(wire)
    client = _client()

    def feed(data: bytes) -> bytes:
        if data:
            proto.dataReceived(data)
        answer = wire.value()
        wire.clear()
        return answer

    _handshake(client, feed)
    records = _records(client, n)
    proto.transport = _Discard()
    start = time.process_time()
    for record in records:
        proto.dataReceived(record)
    return time.process_time() - start


N = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 5

if __name__ == "__main__":
    for label, way in (
        ("twisted", twisted_way),
        ("pyopenssl", pyopenssl_way),
        ("direct", direct_way),
    ):
        runs = [way(N) / N * 1e6 for _ in range(RUNS)]
        print(
            f"{label:10} {statistics.median(runs):6.1f} us/request  (runs: "
            + ", ".join(f"{r:.1f}" for r in runs)
            + ")"
        )
