"""A closed connection is freed by reference counting alone: no reference cycle is left for the
cyclic collector, whose full collections (rare under the sidecar's thresholds) would otherwise
let the heap grow in steps under a stream of rejected requests."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from twisted.internet import error
from twisted.python.failure import Failure

from proxy.wire.pool import UpstreamConnection
from tests.unit.test_relay import make_rig, proxy_error


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _raised(exc: Exception) -> Failure:
    """A failure with a traceback, as Twisted makes them in an except clause."""
    try:
        raise exc
    except Exception:
        return Failure()


def test_connection_closed_after_an_announced_413_is_freed_without_the_collector(
    no_collector: None,
) -> None:
    rig = make_rig()
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"a" * 50)
    proxy_error(rig, 413, "payload_too_large")
    down = weakref.ref(rig.down)
    rig.down.connectionLost(_raised(error.ConnectionLost()))
    del rig
    assert down() is None


def test_connection_closed_after_a_streamed_413_frees_both_sides_without_the_collector(
    no_collector: None,
) -> None:
    rig = make_rig()
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    up = rig.upstream()
    rig.send(b"65\r\n" + b"a" * 101 + b"\r\n")
    proxy_error(rig, 413, "payload_too_large")
    assert up.transport.disconnected
    down, upstream = weakref.ref(rig.down), weakref.ref(up.conn)
    up.close(error.ConnectionAborted())
    rig.down.connectionLost(_raised(error.ConnectionLost()))
    del rig, up
    assert upstream() is None
    assert down() is None


def test_rejected_request_waiting_for_a_connection_keeps_no_cycle(no_collector: None) -> None:
    rig = make_rig()
    rig.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    rig.send(b"65\r\n" + b"a" * 101 + b"\r\n")  # over the limit before the upstream is there
    proxy_error(rig, 413, "payload_too_large")
    (pending,) = rig.pool.pending
    assert pending.called
    down = weakref.ref(rig.down)
    rig.down.connectionLost(_raised(error.ConnectionLost()))
    del rig, pending
    assert down() is None


def test_upstream_connection_lost_while_connecting_is_freed_without_the_collector(
    no_collector: None,
) -> None:
    rig = make_rig()
    conn = UpstreamConnection(rig.pool, "192.0.2.10", None, rig.clock.seconds())
    assert conn.ready is not None
    conn.ready.addErrback(lambda _f: None)
    ref = weakref.ref(conn)
    conn.connectionLost(_raised(error.ConnectionRefusedError()))
    del conn, rig
    assert ref() is None
