"""proxy.relay in memory: a Downstream fed bytes, an UpstreamConnection on a StringTransport,
a pool whose acquire() the test answers, and a clock the test advances."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from proxy.config import EgressOAuth, EgressRoute, Limits, Listen, Timeouts, Upstream
from proxy.routes.egress import Egress
from proxy.telemetry.logs import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.wire.pool import Pool, UpstreamConnection
from proxy.wire.relay import Downstream

UPSTREAM_HOST = b"api.d1-stg.example"
LIMITS = Limits(max_header_bytes=1024, max_headers=10, max_body_bytes=100)
TIMEOUTS = Timeouts(connect=5.0, response=30.0, header=10.0, idle=60.0, pool_idle=15.0)


class RecordingPool(Pool):
    """A Pool whose acquire() hands out Deferreds the test fires; release() is recorded.

    Everything else (sweep, which drives upstream timeouts, and release's bookkeeping) is the
    real Pool's.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        resolver: Any = None  # never asked: acquire() does not dial
        reactor: Any = clock
        super().__init__(
            reactor=reactor,
            clock=clock,
            resolver=resolver,
            host=UPSTREAM_HOST.decode(),
            port=443,
            tls=None,
            connect_timeout=TIMEOUTS.connect,
            idle_timeout=TIMEOUTS.pool_idle,
            max_age=600.0,
            max_idle=8,
        )
        self.pending: list[defer.Deferred[UpstreamConnection]] = []
        self.released: list[tuple[UpstreamConnection, bool]] = []
        self.idle_ready: list[UpstreamConnection] = []  # handed out at once, as idle ones are

    def acquire(self) -> UpstreamConnection | defer.Deferred[UpstreamConnection]:
        if self.idle_ready:
            return self.idle_ready.pop(0)
        d: defer.Deferred[UpstreamConnection] = defer.Deferred()
        self.pending.append(d)
        return d

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.released.append((conn, reusable))
        super().release(conn, reusable)


@attrs.define
class UpstreamSide:
    conn: UpstreamConnection
    transport: StringTransport

    def reply(self, data: bytes) -> None:
        self.conn.dataReceived(data)

    def sent(self) -> bytes:
        return self.transport.value()

    def close(self, reason: Exception | None = None) -> None:
        self.conn.connectionLost(Failure(reason or error.ConnectionDone()))


@attrs.define
class Rig:
    clock: MemoryReactorClock
    pool: RecordingPool
    route: Egress
    down: Downstream
    client: StringTransport
    access: io.StringIO

    def send(self, data: bytes) -> None:
        self.down.dataReceived(data)

    def received(self) -> bytes:
        return self.client.value()

    def upstream(self, conn: UpstreamConnection | None = None) -> UpstreamSide:
        """Answer the oldest pending acquire() with a connected upstream connection."""
        assert self.pool.pending, "nothing asked the pool for a connection"
        d = self.pool.pending.pop(0)
        if conn is None:
            conn = UpstreamConnection(self.pool, "192.0.2.10", None, self.clock.seconds())
            conn.makeConnection(StringTransport(lenient=True))
        d.callback(conn)
        transport: Any = conn.transport
        return UpstreamSide(conn, transport)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.route.sweep(self.clock.seconds())

    def access_records(self) -> list[dict[str, Any]]:
        self.route.access_log.flush()  # lines are written by the sweep, in whole-line batches
        return [json.loads(line) for line in self.access.getvalue().splitlines()]


def make_rig(
    limits: Limits = LIMITS,
    upstream: Upstream | None = None,
    oauth: EgressOAuth | None = None,
    client: StringTransport | None = None,
) -> Rig:
    clock = MemoryReactorClock()
    clock.advance(1000.0)
    pool = RecordingPool(clock)
    config = EgressRoute(
        name="d1-ppr",
        listen=Listen("tcp", host="127.0.0.1", port=8080),
        upstream=upstream or Upstream("https", UPSTREAM_HOST.decode(), 443, ""),
        client_cert=Path("/unused/client.pem"),
        client_key=Path("/unused/client.key"),
        trust=None,
        limits=limits,
        timeouts=TIMEOUTS,
        oauth=oauth,
    )
    access = io.StringIO()
    route = Egress(
        config, clock=clock, pool=pool, metrics=Metrics.create(), access_log=AccessLog(access, True)
    )
    down = Downstream(route)
    if client is None:
        client = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000), lenient=True)
    down.makeConnection(client)
    return Rig(clock, pool, route, down, client, access)


@pytest.fixture
def rig() -> Rig:
    return make_rig()


# --------------------------------------------------------------------------- message reading
@attrs.frozen
class Message:
    start: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def status(self) -> int:
        return int(self.start.split(b" ")[1])

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def one(self, name: bytes) -> bytes:
        (value,) = self.values(name)
        return value

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _trailers, data = data.split(b"\r\n", 1)
            return body, data
        body += data[:size]
        assert data[size : size + 2] == b"\r\n", "chunk not followed by CRLF"
        data = data[size + 2 :]


def messages(
    data: bytes, *, requests: bool = False, no_body: Collection[int] = ()
) -> list[Message]:
    """Split a byte stream into HTTP/1.1 messages by their own framing (strictly)."""
    out: list[Message] = []
    while data:
        head, data = data.split(b"\r\n\r\n", 1)
        start, *lines = head.split(b"\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in lines]
        msg = Message(start, headers, b"")  # type: ignore[arg-type]
        te, cl = msg.values(b"transfer-encoding"), msg.values(b"content-length")
        assert not (te and cl), f"both Transfer-Encoding and Content-Length in {start!r}"
        assert len(te) <= 1 and len(cl) <= 1, f"repeated framing header in {start!r}"
        status = 0 if requests else msg.status
        if len(out) in no_body or (status < 200 and not requests) or status in (204, 304):
            body = b""
        elif te:
            assert te == [b"chunked"]
            body, data = _dechunk(data)
        elif cl:
            n = int(cl[0])
            body, data = data[:n], data[n:]
            assert len(body) == n, f"short body in {start!r}"
        elif requests:
            body = b""
        else:  # close-delimited
            body, data = data, b""
        out.append(Message(start, msg.headers, body))
    return out


def one_request(up: UpstreamSide) -> Message:
    (msg,) = messages(up.sent(), requests=True)
    return msg


def one_response(rig: Rig) -> Message:
    (msg,) = messages(rig.received())
    return msg


def proxy_error(rig: Rig, status: int, code: str) -> Message:
    msg = one_response(rig)
    assert msg.status == status
    assert msg.one(b"content-type") == b"application/json"
    assert msg.json() == {"error": code, "detail": msg.json()["detail"], "route": "d1-ppr"}
    return msg


GET = b"GET /v1/cards HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def serves_the_next_request(rig: Rig) -> None:
    """The same client connection carries another request and its response."""
    rig.client.clear()
    rig.send(GET)
    rig.upstream().reply(OK_HELLO)
    assert one_response(rig).body == b"hello"


# --------------------------------------------------------------------------- request side
def test_request_is_reframed_with_one_content_length_and_host_rewritten(rig: Rig) -> None:
    rig.send(
        b"POST /v1/cards?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 5\r\n"
        b"Connection: keep-alive, X-Hint\r\nX-Hint: a\r\nX-App: b\r\n\r\nhello"
    )
    up = rig.upstream()
    req = one_request(up)
    assert req.start == b"POST /v1/cards?x=1 HTTP/1.1"
    assert req.one(b"host") == UPSTREAM_HOST
    assert req.one(b"content-length") == b"5"
    assert req.values(b"transfer-encoding") == []
    assert req.values(b"connection") == [] and req.values(b"x-hint") == []
    assert req.one(b"x-app") == b"b"
    assert re.fullmatch(rb"[A-Za-z0-9_-]{1,64}", req.one(b"x-correlation-id"))
    assert req.body == b"hello"


def test_chunked_request_is_forwarded_chunked_without_content_length(rig: Rig) -> None:
    rig.send(
        b"POST /v1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n"
    )
    up = rig.upstream()
    rig.send(b"4\r\ndefg\r\n0\r\n\r\n")
    req = one_request(up)
    assert req.one(b"transfer-encoding") == b"chunked"
    assert req.values(b"content-length") == []
    assert req.body == b"abcdefg"
    assert up.sent().endswith(b"0\r\n\r\n")


def test_body_received_before_the_upstream_is_ready_is_sent_after_the_head(rig: Rig) -> None:
    rig.send(b"PUT /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
    rig.send(b"56789")
    up = rig.upstream()
    assert one_request(up).body == b"0123456789"


def test_empty_post_keeps_content_length_zero(rig: Rig) -> None:
    rig.send(b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert one_request(rig.upstream()).values(b"content-length") == [b"0"]


def test_absolute_form_request_goes_out_in_origin_form(rig: Rig) -> None:
    rig.send(b"GET http://api.d1-stg.example/v1/x?q=1 HTTP/1.1\r\nHost: api.d1-stg.example\r\n\r\n")
    assert one_request(rig.upstream()).start == b"GET /v1/x?q=1 HTTP/1.1"


def test_absolute_form_for_another_host_is_403_and_nothing_is_dialled(rig: Rig) -> None:
    rig.send(b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    proxy_error(rig, 403, "forbidden_host")
    assert rig.pool.pending == []


def test_oauth_replace_drops_the_apps_authorization_on_the_wire() -> None:
    oauth = EgressOAuth(
        "https://api.d1-stg.example/token", "MGW_1", Path("/unused/k"), "kid", None, "form"
    )
    rig = make_rig(oauth=oauth)
    rig.send(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer app\r\n\r\n")
    assert one_request(rig.upstream()).values(b"authorization") == []


# --------------------------------------------------------------------------- response side
def test_response_is_relayed_with_its_own_framing_and_body_intact(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
        b"Keep-Alive: timeout=5\r\nConnection: keep-alive, X-Upstream-Hop\r\n"
        b"X-Upstream-Hop: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
        b'{"ok":true}'
    )
    resp = one_response(rig)
    assert resp.start == b"HTTP/1.1 201 Created"
    assert resp.one(b"content-type") == b"application/json"
    assert resp.one(b"content-length") == b"11"
    assert resp.values(b"set-cookie") == [b"a=1", b"b=2"]
    assert resp.values(b"keep-alive") == [] and resp.values(b"x-upstream-hop") == []
    assert resp.values(b"connection") == []
    assert resp.body == b'{"ok":true}'


def test_keep_alive_client_connection_stays_open_and_upstream_is_pooled(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(OK_HELLO)
    assert one_response(rig).body == b"hello"
    assert not rig.client.disconnecting
    assert rig.pool.released == [(up.conn, True)]
    assert rig.pool.idle == [up.conn]
    assert not up.transport.disconnecting


def test_upstream_connection_close_is_not_pooled(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert one_response(rig).values(b"connection") == []
    assert rig.pool.released == [(up.conn, False)]
    assert up.transport.disconnecting
    assert not rig.client.disconnecting  # the client's connection is its own


def test_http10_client_gets_connection_close(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    up = rig.upstream()
    assert one_request(up).start == b"GET / HTTP/1.1"
    up.reply(OK_HELLO)
    resp = one_response(rig)
    assert resp.one(b"connection") == b"close"
    assert resp.one(b"content-length") == b"5"
    assert resp.body == b"hello"
    assert rig.client.disconnecting


def test_http10_client_gets_close_delimited_body_from_chunked_upstream(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up.reply(b"2\r\nde\r\n0\r\n\r\n")
    head, body = rig.received().split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert b"Connection: close" in head
    assert body == b"abcde"
    assert rig.client.disconnecting
    assert rig.pool.released == [(up.conn, True)]


def test_http10_keep_alive_client_keeps_its_connection(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    rig.upstream().reply(OK_HELLO)
    assert one_response(rig).body == b"hello"
    assert not rig.client.disconnecting


def test_chunked_upstream_response_is_rechunked_for_http11_client(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n")
    up.reply(b"1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
    resp = one_response(rig)
    assert resp.one(b"transfer-encoding") == b"chunked"
    assert resp.values(b"content-length") == []
    assert resp.body == b"hello world"
    assert rig.pool.released == [(up.conn, True)]


def test_close_delimited_upstream_response_is_rechunked_and_ends_at_close(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
    up.reply(b"def")
    up.close()
    resp = one_response(rig)
    assert resp.one(b"transfer-encoding") == b"chunked"
    assert resp.body == b"abcdef"
    assert not rig.client.disconnecting
    assert all(not reusable for _, reusable in rig.pool.released)


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_status_has_no_body_and_the_next_response_parses(rig: Rig, status: int) -> None:
    rig.send(GET)
    up = rig.upstream()
    length = b"Content-Length: 42\r\n" if status == 304 else b""
    up.reply(b"HTTP/1.1 %d X\r\nETag: e\r\n%s\r\n" % (status, length) + OK_HELLO)
    first = messages(rig.received())[0]
    assert first.status == status
    assert first.values(b"transfer-encoding") == []
    assert rig.received().endswith(b"ETag: e\r\n" + length + b"\r\n")  # no body bytes
    assert rig.pool.released == [(up.conn, True)]


def test_head_response_has_no_body_and_a_second_request_is_served(rig: Rig) -> None:
    rig.send(b"HEAD /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
    up = rig.upstream()
    assert one_request(up).start == b"HEAD /v1 HTTP/1.1"
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: text/plain\r\n\r\n")
    assert rig.received().endswith(b"Content-Length: 100\r\n\r\n")  # and no body
    assert [m.one(b"content-length") for m in messages(rig.received(), no_body={0})] == [b"100"]
    serves_the_next_request(rig)


def test_after_head_the_same_upstream_connection_reads_the_next_response(rig: Rig) -> None:
    rig.send(b"HEAD /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    rig.client.clear()
    up.transport.clear()
    rig.send(GET)
    again = rig.upstream(up.conn)
    assert one_request(again).start == b"GET /v1/cards HTTP/1.1"
    again.reply(OK_HELLO)
    assert one_response(rig).body == b"hello"


def test_head_response_leaves_the_upstream_connection_reusable(rig: Rig) -> None:
    rig.send(b"HEAD /v1 HTTP/1.1\r\nHost: x\r\n\r\n")
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert rig.pool.released == [(up.conn, True)]


def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    rig.send(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert len(rig.pool.pending) == 1  # one at a time toward the upstream
    assert rig.client.producerState == "paused"  # stop reading while requests queue up
    first = rig.upstream()
    assert one_request(first).start == b"GET /first HTTP/1.1"
    first.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    second = rig.upstream()
    req = one_request(second)
    assert (req.start, req.body) == (b"POST /second HTTP/1.1", b"abc")
    second.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    third = rig.upstream()
    assert one_request(third).start == b"GET /third HTTP/1.1"
    assert rig.client.producerState == "producing"
    third.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n3")
    assert [m.body for m in messages(rig.received())] == [b"1", b"2", b"3"]
    assert [r["path"] for r in rig.access_records()] == ["/first", "/second", "/third"]


def test_interim_1xx_responses_are_not_forwarded(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
    assert rig.received() == b""
    up.reply(OK_HELLO)
    resp = one_response(rig)
    assert (resp.status, resp.body) == (200, b"hello")
    assert resp.values(b"link") == []


def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(rig: Rig) -> None:
    rig.send(b"PUT /v1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert rig.received() == b"HTTP/1.1 100 Continue\r\n\r\n"
    rig.send(b"abc")
    up = rig.upstream()
    req = one_request(up)
    assert req.values(b"expect") == []
    assert req.body == b"abc"
    up.reply(OK_HELLO)
    interim, final = messages(rig.received())
    assert (interim.status, final.status, final.body) == (100, 200, b"hello")


def test_expect_without_a_body_gets_no_100_continue(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
    assert rig.received() == b""
    assert one_request(rig.upstream()).values(b"expect") == []


def test_http10_client_gets_no_100_continue(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert rig.received() == b""


# --------------------------------------------------------------------------- limits and errors
def test_too_many_header_fields_is_431(rig: Rig) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(LIMITS.max_headers + 1))
    rig.send(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    resp = proxy_error(rig, 431, "headers_too_large")
    assert resp.one(b"connection") == b"close"
    assert rig.pool.pending == []
    assert rig.client.disconnecting


def test_as_many_header_fields_as_allowed_are_forwarded(rig: Rig) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(LIMITS.max_headers))
    rig.send(b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
    assert one_request(rig.upstream()).one(b"x-h9") == b"v"


def test_header_bytes_over_the_limit_across_reads_is_431(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    for _ in range(4):
        rig.send(b"X-Filler: " + b"f" * 300 + b"\r\n")
    proxy_error(rig, 431, "headers_too_large")
    assert rig.pool.pending == []
    assert rig.client.disconnecting


def test_header_bytes_over_the_limit_in_one_read_is_431(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * 2000 + b"\r\n\r\n")
    assert rig.pool.pending == []
    proxy_error(rig, 431, "headers_too_large")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_malformed_request_is_400_json_naming_the_route(rig: Rig, request_bytes: bytes) -> None:
    rig.send(request_bytes)
    resp = proxy_error(rig, 400, "bad_request")
    assert resp.one(b"connection") == b"close"
    assert rig.client.disconnecting
    assert all(d.called for d in rig.pool.pending)  # any acquire() was cancelled, never answered


def test_connect_gets_exactly_one_response(rig: Rig) -> None:
    rig.send(b"CONNECT api.d1-stg.example:443 HTTP/1.1\r\nHost: api.d1-stg.example:443\r\n\r\n")
    assert len(messages(rig.received())) == 1


def test_connect_is_never_forwarded(rig: Rig) -> None:
    rig.send(b"CONNECT api.d1-stg.example:443 HTTP/1.1\r\nHost: api.d1-stg.example:443\r\n\r\n")
    assert rig.pool.pending == []
    assert messages(rig.received())[0].status in (400, 405)
    assert rig.client.disconnecting


def test_announced_body_over_the_limit_is_413_before_anything_is_sent(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    resp = proxy_error(rig, 413, "payload_too_large")
    assert resp.one(b"connection") == b"close"
    assert rig.pool.pending == []
    assert rig.client.disconnecting


def test_body_exactly_at_the_limit_is_forwarded(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"b" * 100)
    assert one_request(rig.upstream()).body == b"b" * 100


def test_chunked_body_over_the_limit_is_counted_and_the_upstream_aborted(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    up = rig.upstream()
    rig.send(b"32\r\n" + b"a" * 50 + b"\r\n")
    assert not up.transport.disconnected
    rig.send(b"33\r\n" + b"a" * 51 + b"\r\n")
    resp = proxy_error(rig, 413, "payload_too_large")
    assert resp.one(b"connection") == b"close"
    assert up.transport.disconnected  # the upstream must not take a truncated body as whole
    assert not up.sent().endswith(b"0\r\n\r\n")
    assert rig.pool.released == []
    assert rig.client.disconnecting


def test_chunked_body_over_the_limit_before_the_upstream_cancels_the_acquire(rig: Rig) -> None:
    rig.send(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"65\r\n" + b"a" * 101 + b"\r\n"
    )
    proxy_error(rig, 413, "payload_too_large")
    (pending,) = rig.pool.pending
    assert pending.called  # cancelled: no connection will be used for it


def test_body_over_the_limit_after_the_response_started_aborts_the_client(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    rig.send(b"64\r\n" + b"x" * 100 + b"\r\n")
    assert b"413" not in rig.received()
    assert rig.client.disconnected


def test_invalid_upstream_response_is_502(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"NOT HTTP AT ALL\r\n\r\n")
    proxy_error(rig, 502, "bad_gateway")
    assert up.transport.disconnected
    assert rig.pool.released == []


# --------------------------------------------------------------------------- timeouts
def test_response_timeout_is_504_and_the_upstream_is_aborted(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    rig.advance(TIMEOUTS.response - 1)
    assert rig.received() == b""
    rig.advance(2)
    resp = proxy_error(rig, 504, "upstream_timeout")
    assert "30s" in resp.json()["detail"]
    assert up.transport.disconnected
    assert rig.pool.released == []
    assert rig.access_records()[-1]["status"] == 504


def test_silence_inside_a_response_body_aborts_the_client(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    rig.advance(TIMEOUTS.response - 1)
    up.reply(b"de")  # progress restarts the clock
    rig.advance(TIMEOUTS.response - 1)
    assert not rig.client.disconnected
    rig.advance(2)
    assert rig.client.disconnected  # the client must see a broken response, not a short one
    assert up.transport.disconnected
    assert rig.received().endswith(b"abcde")


def test_incomplete_request_head_times_out_with_408(rig: Rig) -> None:
    rig.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    rig.advance(TIMEOUTS.header - 1)
    assert rig.received() == b""
    rig.advance(2)
    resp = proxy_error(rig, 408, "request_timeout")
    assert resp.one(b"connection") == b"close"
    assert rig.client.disconnecting
    assert rig.pool.pending == []


def test_connection_that_sends_nothing_is_closed_at_the_header_timeout(rig: Rig) -> None:
    rig.advance(TIMEOUTS.header + 1)
    assert rig.client.disconnecting
    assert rig.received() == b""


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(rig: Rig) -> None:
    rig.send(GET)
    rig.upstream().reply(OK_HELLO)
    rig.advance(TIMEOUTS.idle - 1)
    assert not rig.client.disconnecting
    rig.advance(2)
    assert rig.client.disconnecting


def test_a_new_request_on_a_kept_alive_connection_resets_the_idle_timer(rig: Rig) -> None:
    rig.send(GET)
    rig.upstream().reply(OK_HELLO)
    rig.advance(TIMEOUTS.idle - 1)
    rig.send(GET)
    rig.advance(2)
    assert not rig.client.disconnecting
    rig.upstream().reply(OK_HELLO)
    assert len(messages(rig.received())) == 2


# --------------------------------------------------------------------------- connection loss
def test_upstream_closing_before_answering_is_502_and_not_retried(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    up = rig.upstream()
    up.close()
    resp = proxy_error(rig, 502, "upstream_closed")
    assert "not retried" in resp.json()["detail"]
    assert (up.conn, True) not in rig.pool.released
    assert rig.pool.pending == []  # no second attempt
    assert up.conn not in rig.pool.idle


def test_upstream_closing_mid_response_aborts_the_client(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    up.close(error.ConnectionLost())
    assert rig.client.disconnected
    assert rig.received().endswith(b"abc")
    assert rig.pool.released == []


def test_client_disconnect_mid_response_aborts_the_upstream(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    rig.down.connectionLost(Failure(error.ConnectionLost()))
    assert up.transport.disconnected
    assert up.conn.exchange is None
    assert rig.pool.released == []
    assert rig.route.connections == set()


def test_client_disconnect_while_waiting_for_the_upstream_cancels_the_acquire(rig: Rig) -> None:
    rig.send(GET)
    rig.down.connectionLost(Failure(error.ConnectionDone()))
    (pending,) = rig.pool.pending
    assert pending.called
    assert rig.access_records()[-1]["status"] == 499


# --------------------------------------------------------------------------- back-pressure
def test_client_write_buffer_full_pauses_the_upstream_and_resumes_after(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    producer: Any = rig.client.producer
    assert producer is not None and rig.client.streaming
    producer.pauseProducing()
    assert up.transport.producerState == "paused"
    producer.resumeProducing()
    assert up.transport.producerState == "producing"
    up.reply(b"def")
    assert one_response(rig).body == b"abcdef"


def test_client_already_full_when_the_upstream_arrives_pauses_it(rig: Rig) -> None:
    rig.send(GET)
    producer: Any = rig.client.producer
    producer.pauseProducing()
    up = rig.upstream()
    assert up.transport.producerState == "paused"
    producer.resumeProducing()
    assert up.transport.producerState == "producing"


def test_upstream_write_buffer_full_pauses_reading_the_client(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
    up = rig.upstream()
    producer: Any = up.transport.producer
    assert producer is not None and up.transport.streaming
    producer.pauseProducing()
    assert rig.client.producerState == "paused"
    producer.resumeProducing()
    assert rig.client.producerState == "producing"


def test_a_pooled_connection_is_handed_back_unpaused(rig: Rig) -> None:
    rig.send(GET)
    up = rig.upstream()
    producer: Any = rig.client.producer
    producer.pauseProducing()
    up.reply(OK_HELLO)
    assert rig.pool.released == [(up.conn, True)]
    assert up.transport.producerState == "producing"


# --------------------------------------------------------------------------- access log
def test_access_log_has_one_line_per_request_without_credentials(rig: Rig) -> None:
    rig.send(
        b"POST /v1/cards?pan=4111 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
        b"x-correlation-id: corr-1\r\nContent-Length: 4\r\n\r\nbody"
    )
    rig.upstream().reply(OK_HELLO)
    (record,) = rig.access_records()
    assert record["route"] == "d1-ppr"
    assert record["method"] == "POST"
    assert record["path"] == "/v1/cards"
    assert record["status"] == 200
    assert record["bytes"] == 5
    assert record["correlation_id"] == "corr-1"
    assert record["upstream"] == "192.0.2.10:443"
    assert "s3cret" not in rig.access.getvalue() and "pan=4111" not in rig.access.getvalue()


def test_upgrade_request_is_forwarded_without_upgrade_and_the_connection_then_closes(
    rig: Rig,
) -> None:
    rig.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    up = rig.upstream()
    sent = up.sent()
    assert sent.startswith(b"GET /ws HTTP/1.1\r\n")
    assert b"upgrade" not in sent.lower().split(b"\r\n\r\n")[0].replace(b"get /ws", b"")
    up.reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rig.received().startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in rig.received()
    assert rig.client.disconnecting


# --------------------------------------------------------------------------- idle connections
def assert_holds_nothing(down: Downstream) -> None:
    assert down.exchange is None and down.current is None and not down.queue
    assert down.parser is None
    assert (down.url, down.headers) == (b"", [])


def test_an_idle_keep_alive_connection_holds_nothing_of_its_last_request(rig: Rig) -> None:
    rig.send(b"GET /v1/cards HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 500 + b"\r\n\r\n")
    rig.upstream().reply(OK_HELLO)
    assert one_response(rig).body == b"hello"
    assert_holds_nothing(rig.down)
    rig.client.clear()
    # the next request on the same connection, its head split across reads, is served
    rig.send(b"GET /v1/next HTTP/1.1\r\nHo")
    assert rig.down.parser is not None
    rig.send(b"st: x\r\n\r\n")
    up = rig.upstream()
    assert one_request(up).start == b"GET /v1/next HTTP/1.1"
    up.reply(OK_HELLO)
    assert one_response(rig).status == 200
    assert_holds_nothing(rig.down)


def test_a_request_answered_while_its_bytes_are_parsed_leaves_nothing_held(rig: Rig) -> None:
    rig.send(b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
    proxy_error(rig, 403, "forbidden_host")
    assert_holds_nothing(rig.down)
    serves_the_next_request(rig)


def test_pipelined_requests_answered_locally_in_one_read_are_all_answered(rig: Rig) -> None:
    foreign = b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
    rig.send(foreign + foreign + GET)
    up = rig.upstream()
    up.reply(OK_HELLO)
    assert [m.status for m in messages(rig.received())] == [403, 403, 200]
    assert_holds_nothing(rig.down)


class ReleasingTransport(StringTransport):
    """A client transport with the TLS layer's release_buffers, counting the calls."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000), lenient=True)
        self.released = 0

    def release_buffers(self) -> None:
        self.released += 1


def test_tls_buffers_go_at_the_sweep_after_a_response_not_with_every_response() -> None:
    client = ReleasingTransport()
    rig = make_rig(client=client)
    rig.send(GET)
    rig.upstream().reply(OK_HELLO)
    assert one_response(rig).body == b"hello"
    assert client.released == 0  # a busy connection would grow them again at once
    rig.advance(0.25)
    assert client.released == 1
    rig.advance(0.25)
    assert client.released == 1  # once per rest, not once per sweep
    rig.send(GET)
    rig.upstream().reply(OK_HELLO)
    rig.send(b"GET /next HTTP/1.1\r\nHo")  # the next head is arriving: its buffers are in use
    rig.advance(0.25)
    assert client.released == 1


# --------------------------------------------------------------------------- answered early
POST_HEAD = b"POST /notify HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


def test_a_response_before_the_body_ends_keeps_the_connection_and_drops_the_rest(
    rig: Rig,
) -> None:
    """The upstream answers before the request body arrived (nginx's `return` does): the rest
    of the body is read and dropped, and the next request on the connection is served."""
    rig.send(POST_HEAD + b"abc")
    up = rig.upstream()
    up.reply(OK_HELLO)
    response = one_response(rig)
    assert response.body == b"hello" and not response.values(b"connection")
    assert rig.access_records() == []  # not finished until the body is read
    rig.send(b"defghij")  # the rest: dropped, never written upstream
    assert up.sent().endswith(b"\r\n\r\nabc")
    assert rig.pool.released == [(up.conn, False)]  # part of a body went up: not reused
    assert [r["status"] for r in rig.access_records()] == [200]
    assert not rig.client.disconnecting
    serves_the_next_request(rig)


def test_a_dropped_body_over_the_body_limit_closes_the_connection(rig: Rig) -> None:
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    rig.upstream().reply(OK_HELLO)
    assert one_response(rig).body == b"hello"
    assert not rig.client.disconnecting
    rig.send(b"64\r\n" + b"x" * 100 + b"\r\n")  # past max_body_bytes (100)
    assert rig.client.disconnecting
    assert b"413" not in rig.received()


def test_a_dropped_body_that_stalls_is_closed_at_the_body_deadline(rig: Rig) -> None:
    rig.send(POST_HEAD + b"abc")
    rig.upstream().reply(OK_HELLO)
    assert one_response(rig).body == b"hello"
    rig.advance(TIMEOUTS.body - 1)
    assert not rig.client.disconnecting
    rig.advance(1.5)
    assert rig.client.disconnecting
    assert messages(rig.received())[0].status == 200 and b"408" not in rig.received()
