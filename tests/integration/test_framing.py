"""The framing corpus through the real sidecar, both directions over real TLS: egress (plain
client -> sidecar -> mutual-TLS upstream) and ingress (mutual-TLS client -> sidecar -> plain
upstream). Each vector is refused with 400 and a close, and the upstream, which records every
byte it receives, gets none of it: not with a pooled connection ready (the request head would
go out at once), and not when the error only comes in a later read (the upstream connection
that carried the first part is aborted and never used again)."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import PEERS, Peer, Sidecar, free_port, origin_pki, write_config

pytestmark = pytest.mark.integration

H = b"Host: localhost\r\n"
CH = b"POST /pay HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
CORPUS: dict[str, bytes] = {
    # a head llhttp accepts, then the error later in the same bytes
    "te-trailing-tab": b"POST /pay HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\t\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "chunk-0x": CH + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-overflow": CH + b"FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
    "chunk-bare-lf": CH + b"5\nhello\r\n0\r\n\r\n",
    "chunk-negative": CH + b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk-no-crlf-after-data": CH + b"5\r\nhelloXX0\r\n\r\n",
    "chunk-size-missing": CH + b"\r\nhello\r\n0\r\n\r\n",
    "chunk-ext-nul": CH + b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
    "chunk-size-plus": CH + b"+5\r\nhello\r\n0\r\n\r\n",
    "chunk-second-bad": CH + b"5\r\nhello\r\nzz\r\nhello\r\n0\r\n\r\n",
    "chunk-last-bare-lf": CH + b"5\r\nhello\r\n0\n\r\n",
    # Content-Length and Transfer-Encoding together, or ambiguous
    "cl-te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\n",
    "te-cl": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
    b"\r\n0\r\n\r\n",
    "cl-zero-te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nTransfer-Encoding: "
    b"chunked\r\n\r\n0\r\n\r\n",
    "double-cl-different": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length:"
    b" 4\r\n\r\nabcd",
    "double-cl-same": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3"
    b"\r\n\r\nabc",
    "cl-list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc",
    "cl-plus": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
    "cl-negative": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -3\r\n\r\nabc",
    "cl-hex": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc",
    "cl-inner-space": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nabc",
    "cl-letters": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3a\r\n\r\nabc",
    "cl-empty": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\nabc",
    # Transfer-Encoding variants
    "te-identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc",
    "te-gzip-chunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
    b"0\r\n\r\n",
    "te-chunked-gzip": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n"
    b"0\r\n\r\n",
    "te-xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-chunkedx": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n",
    "te-space-before-colon": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\n",
    "te-vertical-tab": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \x0bchunked\r\n\r\n"
    b"0\r\n\r\n",
    "te-http10": b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-obs-fold": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "te-empty": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n\r\n0\r\n\r\n",
    "te-quoted": b"POST / HTTP/1.1\r\n" + H + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
    # header syntax
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n folded\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tfolded\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "cr-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\n" + H + b"X-\x00A: a\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\n" + H + b"Bad Header: x\r\n\r\n",
    "colon-less-line": b"GET / HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n",
    "empty-name": b"GET / HTTP/1.1\r\n" + H + b": x\r\n\r\n",
    "leading-space-first-header": b"GET / HTTP/1.1\r\n Host: localhost\r\n\r\n",
    "double-host": b"GET / HTTP/1.1\r\n" + H + b"Host: elsewhere\r\n\r\n",
    # request line
    "space-in-target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "nul-in-target": b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n",
    "bad-version": b"GET / HTTP/1.x\r\n" + H + b"\r\n",
    "lowercase-version": b"GET / http/1.1\r\n" + H + b"\r\n",
    "garbage": b"GARBAGE\r\n\r\n",
    "bad-method-char": b"G(T / HTTP/1.1\r\n" + H + b"\r\n",
}


@attrs.frozen
class Side:
    """One direction: a sidecar in front of a byte-recording upstream."""

    name: str
    port: int
    record: Path
    tls: ssl.SSLContext | None  # the client's TLS (ingress), or None (egress: plain)

    def connect(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if self.tls is None:
            return raw
        return self.tls.wrap_socket(raw, server_hostname="localhost")

    def events(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def received(self) -> bytes:
        return b"".join(base64.b64decode(str(e["data"])) for e in self.events() if "data" in e)

    def prime(self) -> None:
        """A good request, so the pool holds an idle connection to hand out at once."""
        with self.connect() as s:
            s.sendall(b"GET /prime HTTP/1.1\r\n" + H + b"\r\n")
            status, _ = read_until_close(s, stop_after_response=True)
        assert status == 200


def read_until_close(s: socket.socket, stop_after_response: bool = False) -> tuple[int, bytes]:
    s.settimeout(10)
    data = b""
    try:
        while True:
            if stop_after_response and b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                if b"content-length: 2" in head.lower() and len(body) >= 2:
                    break
            got = s.recv(65536)
            if not got:
                break
            data += got
    except (ConnectionResetError, ssl.SSLError):
        pass
    return int(data.split(b" ", 2)[1]), data


def _wait_settled(side: Side) -> None:
    time.sleep(0.3)  # what reached the upstream is recorded by then (loopback)


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Side]]:
    d = tmp_path_factory.mktemp("framing")
    origin_pki(d)
    tls_up = Peer(
        [str(PEERS / "byte_recorder.py"), "--record", str(d / "egress.jsonl"),
         "--cert", str(d / "origin.pem"), "--key", str(d / "origin.key"),
         "--client-ca", str(d / "client-ca.pem")]
    ).start()  # fmt: skip
    plain_up = Peer([str(PEERS / "byte_recorder.py"), "--record", str(d / "ingress.jsonl")]).start()
    for attempt in range(3):  # a free port can be taken (by another test's connection) first
        egress, ingress = free_port(), free_port()
        conf = write_config(
            d / "framing.toml",
            f"""
            [[egress]]
            name = "out"
            listen = "127.0.0.1:{egress}"
            upstream = "https://localhost:{tls_up.port}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"

            [[ingress]]
            name = "in"
            listen = "127.0.0.1:{ingress}"
            server_cert = "origin.pem"
            server_key = "origin.key"
            client_ca = "client-ca.pem"
            upstream = "http://127.0.0.1:{plain_up.port}"
            """,
        )
        try:
            sidecar = Sidecar(conf).start([("127.0.0.1", egress), ("127.0.0.1", ingress)])
            break
        except RuntimeError as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise
    client = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
    client.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    try:
        yield {
            "egress": Side("egress", egress, d / "egress.jsonl", None),
            "ingress": Side("ingress", ingress, d / "ingress.jsonl", client),
        }
    finally:
        sidecar.stop()
        tls_up.stop()
        plain_up.stop()


DIRECTIONS = pytest.mark.parametrize("direction", ["egress", "ingress"])


@DIRECTIONS
@pytest.mark.parametrize("vector", list(CORPUS))
def test_vector_is_400_and_the_upstream_gets_no_byte(
    sides: dict[str, Side], direction: str, vector: str
) -> None:
    side = sides[direction]
    side.prime()
    before = side.received()
    with side.connect() as s:
        s.sendall(CORPUS[vector])
        status, answer = read_until_close(s)
    _wait_settled(side)
    assert status == 400, answer
    assert b"\r\nConnection: close\r\n" in answer
    assert side.received() == before, f"{vector}: the upstream received part of it"


@DIRECTIONS
@pytest.mark.parametrize("bad", [b"0x5\r\nhello\r\n", b"5\nhello\r\n", b"FFFFFFFFFFFFFFFFF1\r\n"])
def test_error_in_a_later_read_aborts_the_upstream_connection_that_carried_the_start(
    sides: dict[str, Side], direction: str, bad: bytes
) -> None:
    side = sides[direction]
    side.prime()
    before = len(side.events())
    with side.connect() as s:
        s.sendall(CH + b"5\r\nfirst\r\n")
        time.sleep(0.3)  # the head and the first chunk went upstream
        streamed = side.events()[before:]
        assert b"first" in b"".join(base64.b64decode(str(e["data"])) for e in streamed)
        (conn,) = {e["conn"] for e in streamed}
        s.sendall(bad)
        status, answer = read_until_close(s)
    _wait_settled(side)
    assert status == 400 and b"\r\nConnection: close\r\n" in answer
    after = [e for e in side.events()[before:] if e["conn"] == conn]
    sent = b"".join(base64.b64decode(str(e["data"])) for e in after if "data" in e)
    assert sent.endswith(b"5\r\nfirst\r\n")  # nothing after the first chunk, no last chunk
    assert after[-1].get("end") in ("eof", "reset")  # the connection was ended by us ...
    mark = len(side.events())
    side.prime()  # ... and never used again: the next request goes on another connection
    assert all(e["conn"] != conn for e in side.events()[mark:] if "data" in e)
