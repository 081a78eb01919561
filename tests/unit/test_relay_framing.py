"""Framing is decided before any byte of a request goes upstream (both directions share the
relay): every byte of a read is parsed before what it holds for the upstream is written, so a
framing error later in the same read leaves the upstream without a single byte of the request;
an error in a later read, after part of the body went out, aborts the upstream connection."""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from proxy.wire.pool import UpstreamConnection
from tests.unit.test_relay import GET, OK_HELLO, Rig, make_rig, messages, proxy_error

CHUNKED_HEAD = b"POST /pay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
# a head llhttp accepts, then the error further on in the same bytes
VECTORS = {
    "te-trailing-tab": b"POST /pay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\t\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "chunk-0x": CHUNKED_HEAD + b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk-overflow": CHUNKED_HEAD + b"FFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n",
    "chunk-bare-lf": CHUNKED_HEAD + b"5\nhello\r\n0\r\n\r\n",
}


def pooled(rig: Rig) -> tuple[UpstreamConnection, StringTransport]:
    """An idle keep-alive upstream connection the pool hands out at once."""
    conn = UpstreamConnection(rig.pool, "192.0.2.10", None, rig.clock.seconds())
    transport = StringTransport(lenient=True)
    conn.makeConnection(transport)
    rig.pool.idle_ready.append(conn)
    return conn, transport


@pytest.mark.parametrize("vector", list(VECTORS))
def test_an_error_later_in_the_same_read_sends_nothing_upstream(vector: str) -> None:
    rig = make_rig()
    conn, upstream = pooled(rig)
    rig.send(VECTORS[vector])
    assert upstream.value() == b""  # not the head, not the first chunk
    assert upstream.disconnecting or upstream.disconnected  # and it is not used again
    assert all(c is not conn for c, _ in rig.pool.released)
    resp = proxy_error(rig, 400, "bad_request")
    assert resp.one(b"connection") == b"close" and rig.client.disconnecting


@pytest.mark.parametrize("vector", list(VECTORS))
def test_an_error_in_the_same_read_before_a_connection_is_ready_dials_nothing(vector: str) -> None:
    rig = make_rig()
    rig.send(VECTORS[vector])
    proxy_error(rig, 400, "bad_request")
    assert all(d.called for d in rig.pool.pending)  # the acquire was cancelled


@pytest.mark.parametrize("bad", [b"0x5\r\nhello\r\n", b"5\nhello\r\n", b"FFFFFFFFFFFFFFFFF1\r\n"])
def test_an_error_in_a_later_read_aborts_the_upstream_and_closes_the_client(bad: bytes) -> None:
    rig = make_rig()
    conn, upstream = pooled(rig)
    rig.send(CHUNKED_HEAD + b"5\r\nfirst\r\n")
    sent = upstream.value()
    assert sent.startswith(b"POST /pay HTTP/1.1\r\n") and sent.endswith(b"5\r\nfirst\r\n")
    rig.send(bad)
    assert upstream.value() == sent  # nothing more, and never the last chunk
    assert not sent.endswith(b"0\r\n\r\n")
    assert upstream.disconnecting or upstream.disconnected  # aborted ...
    assert all(c is not conn for c, _ in rig.pool.released)  # ... and never pooled again
    resp = proxy_error(rig, 400, "bad_request")
    assert resp.one(b"connection") == b"close" and rig.client.disconnecting


def test_a_whole_request_in_one_read_goes_out_once_the_read_is_parsed() -> None:
    rig = make_rig()
    _conn, upstream = pooled(rig)
    rig.send(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n")
    (msg,) = messages(upstream.value(), requests=True)
    assert msg.body == b"hello"


def test_a_good_request_before_a_bad_one_in_the_same_read_is_still_forwarded() -> None:
    rig = make_rig()
    conn, upstream = pooled(rig)
    rig.send(GET + VECTORS["chunk-0x"])
    (msg,) = messages(upstream.value(), requests=True)
    assert msg.start == b"GET /v1/cards HTTP/1.1"
    conn.dataReceived(OK_HELLO)
    first, second = messages(rig.received())
    assert first.body == b"hello" and second.status == 400
    assert rig.client.disconnecting


def test_a_queued_request_whose_body_is_bad_is_answered_400_and_never_dialled() -> None:
    rig = make_rig()
    rig.send(GET + VECTORS["chunk-0x"])  # the second waits behind the first
    rig.upstream().reply(OK_HELLO)
    assert rig.pool.pending == []  # no connection was asked for the refused one
    first, second = messages(rig.received())
    assert first.body == b"hello" and second.status == 400
    assert rig.client.disconnecting


def test_connection_tokens_are_the_same_from_the_cache_and_the_cache_stays_small() -> None:
    """tokens_of remembers a few short values; what peers send cannot grow it."""
    from proxy.wire import http

    assert http.tokens_of(b"keep-alive, X-Hint") == frozenset({b"keep-alive", b"x-hint"})
    assert http.tokens_of(b"keep-alive, X-Hint") == frozenset({b"keep-alive", b"x-hint"})
    for i in range(1000):
        assert http.tokens_of(b"x-%d , Close" % i) == frozenset({b"x-%d" % i, b"close"})
    long = b",".join(b"x-%d" % i for i in range(30))
    assert len(http.tokens_of(long)) == 30
    assert len(http._TOKENS) <= 64 and long not in http._TOKENS
