"""When the sidecar closes a TLS connection itself (Connection: close here), a real client
(Python's ssl) sees the whole response, then our close_notify, then TCP's EOF: never a reset,
and the EOF comes at once after the client's own close_notify, not at close_grace. A client
that reads a large answer slowly still gets all of it."""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import PEERS, Peer, Sidecar, free_port, origin_pki, write_config

pytestmark = pytest.mark.integration

BIG = 1024 * 1024
GRACE = 1.0


@attrs.frozen
class Env:
    dir: Path
    small: int  # an ingress listener in front of an upstream answering "ok"
    big: int  # one in front of an upstream answering 1 MB

    def tls(self, port: int, rcvbuf: int | None = None) -> ssl.SSLSocket:
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        ctx = ssl.create_default_context(cafile=str(self.dir / "server-ca.pem"))
        ctx.load_cert_chain(str(self.dir / "client.pem"), str(self.dir / "client.key"))
        return ctx.wrap_socket(raw, server_hostname="localhost")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("close")
    origin_pki(d)
    small_up = Peer([str(PEERS / "byte_recorder.py"), "--record", str(d / "s.jsonl")]).start()
    big_up = Peer(
        [str(PEERS / "byte_recorder.py"), "--record", str(d / "b.jsonl"),
         "--body-bytes", str(BIG)]
    ).start()  # fmt: skip
    small, big = free_port(), free_port()
    routes = "".join(
        f"""
        [[ingress]]
        name = "{name}"
        listen = "127.0.0.1:{port}"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{up}"
        close_grace = {GRACE}
        """
        for name, port, up in (("small", small, small_up.port), ("big", big, big_up.port))
    )
    sidecar = Sidecar(write_config(d / "close.toml", routes))
    sidecar.start([("127.0.0.1", small), ("127.0.0.1", big)])
    try:
        yield Env(d, small, big)
    finally:
        sidecar.stop()
        small_up.stop()
        big_up.stop()


def read_response(s: ssl.SSLSocket, pace: float = 0.0) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        got = s.recv(16384)
        assert got, f"EOF after {len(body)} of {length} body bytes"
        body += got
        time.sleep(pace)
    return head, body


def close_then_eof(s: ssl.SSLSocket) -> float:
    """Our close_notify (unwrap: it also needs the server's), then the seconds until TCP's
    EOF; a reset fails the test."""
    raw = s.unwrap()  # raises unless the server's close_notify came after the response
    t0 = time.monotonic()
    raw.settimeout(5)
    assert raw.recv(1) == b""  # EOF (FIN), not a reset (ConnectionResetError)
    took = time.monotonic() - t0
    time.sleep(0.2)
    assert raw.recv(1) == b""  # and no reset after it either
    raw.close()
    return took


def test_our_close_is_close_notify_then_fin_and_the_client_never_sees_a_reset(env: Env) -> None:
    with env.tls(env.small) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        head, body = read_response(s)
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        assert b"\r\nConnection: close" in head
        took = close_then_eof(s)
    assert took < 0.1, f"EOF {took:.3f} s after our close_notify (close_grace is {GRACE} s)"


def test_http10_answer_closes_the_same_way(env: Env) -> None:
    with env.tls(env.small) as s:
        s.sendall(b"GET /x HTTP/1.0\r\nHost: localhost\r\n\r\n")
        _head, body = read_response(s)
        assert body == b"ok"
        assert close_then_eof(s) < 0.1


def test_a_slow_reader_gets_all_of_a_1_mb_answer_before_our_close(env: Env) -> None:
    with env.tls(env.big, rcvbuf=16384) as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        t0 = time.monotonic()
        _head, body = read_response(s, pace=0.04)  # ~2.5 s for 1 MB: past close_grace
        took = time.monotonic() - t0
        assert len(body) == BIG and body == b"x" * BIG
        assert took > 1.5 * GRACE  # the reading did outlast close_grace
        assert close_then_eof(s) < 0.1
