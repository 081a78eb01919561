"""Every downstream and upstream state has a bound, in memory: body rate, pipelining, our own
answers under back-pressure, close grace, handshake timeout, the listener paused at
max_connections, upstream response heads, and upstream connections whose client left."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import directlyProvides

from proxy.wire.pool import Pool, UpstreamConnection
from proxy.wire.relay import Downstream
from tests.unit.test_relay import GET, LIMITS, Rig, make_rig, messages, proxy_error


@pytest.fixture
def rig() -> Rig:
    return make_rig()


FOREIGN = b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"


class Client(StringTransport):
    """A client transport that records an abort apart from a clean close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def connect(rig: Rig, tls: bool = False) -> tuple[Downstream, Client]:
    down = Downstream(rig.route)
    client = Client(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001), lenient=True)
    if tls:
        directlyProvides(client, ISSLTransport)
    down.makeConnection(client)
    return down, client


# --------------------------------------------------------------------------- request body
def test_body_slower_than_min_body_rate_gets_408_after_its_allowance() -> None:
    rig = make_rig(attrs.evolve(LIMITS, min_body_rate=100, max_body_bytes=10_000))
    rig.send(b"POST /v1/cards HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
    up = rig.upstream()
    body = rig.route.timeouts.body
    rig.advance(body + 0.9)  # 100 bytes earned 1 s on top of the allowance
    assert rig.received() == b"" and not up.transport.disconnecting
    rig.advance(0.3)
    msg = proxy_error(rig, 408, "request_timeout")
    assert "slower than 100 bytes/s" in msg.json()["detail"]
    assert up.transport.disconnecting  # the half-sent request is not completed upstream
    assert rig.client.disconnecting


def test_body_deadline_does_not_blame_a_client_we_are_not_reading() -> None:
    rig = make_rig(attrs.evolve(LIMITS, min_body_rate=100, max_body_bytes=10_000))
    rig.send(b"POST /v1/cards HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
    rig.upstream()
    rig.down.pause("upstream-full")
    rig.advance(rig.route.timeouts.body + 5)  # the upstream's own response timeout is 30 s
    assert rig.received() == b""
    rig.down.resume("upstream-full")
    rig.advance(rig.route.timeouts.body + 0.3)
    proxy_error(rig, 408, "request_timeout")


# --------------------------------------------------------------------------- pipelining
def test_pipelined_requests_past_max_pipelined_get_503_and_the_rest_is_not_parsed() -> None:
    rig = make_rig(attrs.evolve(LIMITS, max_pipelined=2))
    rig.send(GET * 6)
    assert len(rig.pool.pending) == 1  # one in flight
    queued = list(rig.down.queue)
    assert len(queued) == 3  # two queued and the refusal
    assert queued[-1].error is not None and queued[-1].error.code == "too_many_pipelined"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for _ in range(3):
        rig.upstream().reply(ok)
    got = messages(rig.received())
    assert [m.status for m in got] == [200, 200, 200, 503]
    assert got[2].values(b"connection") == []  # not the last answer
    assert got[3].one(b"connection") == b"close"
    assert rig.client.disconnecting and rig.pool.pending == []


def test_own_answers_wait_while_the_clients_write_buffer_is_full(rig: Rig) -> None:
    producer: Any = rig.client.producer
    producer.pauseProducing()  # the client is not reading
    rig.send(FOREIGN * 3)
    assert rig.received() == b""
    assert "pipelined" in rig.down.paused  # and we stop reading it
    producer.resumeProducing()
    assert [m.status for m in messages(rig.received())] == [403, 403, 403]
    assert not rig.down.paused


def test_a_client_that_never_reads_its_held_answers_is_cut_after_send_timeout(rig: Rig) -> None:
    producer: Any = rig.client.producer
    producer.pauseProducing()
    rig.send(FOREIGN * 2)
    rig.advance(rig.route.timeouts.send - 0.3)
    assert not rig.client.disconnecting
    rig.advance(0.6)
    assert rig.client.disconnecting and rig.received() == b""


# --------------------------------------------------------------------------- closing
def test_close_does_not_wait_for_the_peer_beyond_close_grace() -> None:
    rig = make_rig()
    down, client = connect(rig)
    down.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    rig.upstream().reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.disconnecting and client.producer is None  # producer gone: TLS can shut down
    assert not client.aborted
    rig.advance(rig.route.timeouts.close_grace + 0.3)
    assert client.aborted


def test_close_lets_a_full_write_buffer_drain_first_within_send_timeout() -> None:
    rig = make_rig()
    down, client = connect(rig)
    producer: Any = client.producer
    producer.pauseProducing()
    down.close()
    assert not client.disconnecting  # what we owe the client goes first
    producer.resumeProducing()
    assert client.disconnecting and not client.aborted
    down2, client2 = connect(rig)
    p2: Any = client2.producer
    p2.pauseProducing()
    down2.close()
    rig.advance(rig.route.timeouts.send + 0.3)
    assert client2.aborted


def test_a_tls_connection_without_a_handshake_is_cut_at_handshake_timeout() -> None:
    rig = make_rig()
    down, client = connect(rig, tls=True)
    rig.advance(rig.route.timeouts.handshake - 0.3)
    assert not client.disconnecting
    rig.advance(0.6)
    assert client.aborted and down.handshake_timed_out


# --------------------------------------------------------------------------- max_connections
@attrs.define
class Listener:
    reading: bool = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_listener_pauses_at_max_connections_and_resumes_when_one_closes() -> None:
    rig = make_rig(attrs.evolve(LIMITS, max_connections=3))  # the rig's own connection is one
    listener = Listener()
    rig.route.listener = listener
    connect(rig)
    assert listener.reading
    third, _ = connect(rig)
    assert not listener.reading
    over, client = connect(rig)  # accepted in the same burst
    assert over.closing and client.disconnecting
    assert b'"overloaded"' in client.value() and client.value().startswith(b"HTTP/1.1 503 ")
    assert rig.route.metrics.connections_refused.labels("d1-ppr", "max_connections")._value.get()
    from twisted.python.failure import Failure

    over.connectionLost(Failure(Exception("gone")))
    assert not listener.reading  # the refused one never held a slot
    third.connectionLost(Failure(Exception("gone")))
    assert listener.reading


def test_over_the_limit_tls_connection_is_cut_without_a_handshake() -> None:
    rig = make_rig(attrs.evolve(LIMITS, max_connections=1))
    _, client = connect(rig, tls=True)
    assert client.aborted and client.value() == b""


# --------------------------------------------------------------------------- upstream heads
def test_upstream_response_with_too_many_fields_is_502_and_closed() -> None:
    rig = make_rig()
    rig.send(GET)
    up = rig.upstream()
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(rig.route.pool.max_head_fields + 1))
    up.reply(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
    msg = proxy_error(rig, 502, "upstream_header_too_large")
    assert "header fields" in msg.json()["detail"]
    assert up.transport.disconnecting


def test_upstream_response_head_over_the_byte_limit_across_reads_is_502() -> None:
    rig = make_rig(attrs.evolve(LIMITS, max_response_header_bytes=4096))
    rig.route.pool.max_head_bytes = 4096
    rig.send(GET)
    up = rig.upstream()
    up.reply(b"HTTP/1.1 200 OK\r\nX-Big: ")
    for _ in range(5):
        up.reply(b"v" * 1000)
    msg = proxy_error(rig, 502, "upstream_header_too_large")
    assert "over 4096 bytes" in msg.json()["detail"]


# --------------------------------------------------------------------------- orphans
def _pool(max_idle: int) -> tuple[Pool, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    resolver: Any = None
    pool = Pool(reactor=reactor, clock=reactor, resolver=resolver, host="h", port=443, tls=None,
                connect_timeout=5, idle_timeout=15, max_age=60, max_idle=max_idle)  # fmt: skip
    return pool, reactor


def _dial_and_cancel(pool: Pool, reactor: MemoryReactorClock) -> UpstreamConnection:
    ready = pool._dial("127.0.0.1")
    failures: list[Any] = []
    ready.addErrback(failures.append)
    ready.cancel()  # the client left while we were connecting
    assert failures and failures[0].check(defer.CancelledError)
    conn: UpstreamConnection = reactor.tcpClients[-1][2].buildProtocol(None)
    conn.makeConnection(StringTransport())
    return conn


def test_an_upstream_connection_whose_client_left_is_pooled_when_there_is_room() -> None:
    pool, reactor = _pool(max_idle=4)
    conn = _dial_and_cancel(pool, reactor)
    assert pool.idle == [conn] and not conn.transport.disconnecting
    assert pool.states() == {"connecting": 0, "idle": 1, "active": 0}


def test_an_upstream_connection_whose_client_left_is_closed_when_the_pool_is_full() -> None:
    pool, reactor = _pool(max_idle=0)
    conn = _dial_and_cancel(pool, reactor)
    assert pool.idle == [] and conn.transport.disconnecting


def test_header_timeout_is_a_total_from_the_connection_not_renewed_by_the_first_byte() -> None:
    rig = make_rig()
    header = rig.route.timeouts.header
    rig.advance(header - 1)
    rig.send(b"GET / HTTP/1.1\r\n")  # the first byte, late
    rig.advance(1.3)
    proxy_error(rig, 408, "request_timeout")
