"""proxy.wire.reactor on real loopback sockets, the reactor stepped by hand (never run):
writes reach the socket in the same call, a full socket queues the rest in order, and a
listener shared by workers takes one connection per wakeup."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from proxy.wire.reactor import EagerServer, SidecarReactor


class Server(Protocol):
    made: list[Server]

    def connectionMade(self) -> None:
        self.made.append(self)


@pytest.fixture
def reactor() -> Iterator[SidecarReactor]:
    r = SidecarReactor()
    yield r
    for selectable in r.removeAll():
        selectable.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    r.waker.connectionLost(None)  # type: ignore[no-untyped-call]
    r._poller.close()


def listen(reactor: SidecarReactor) -> tuple[Any, list[Server]]:
    made: list[Server] = []
    Server.made = made
    factory = Factory.forProtocol(Server)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port, made


def connect(port: Any, n: int = 1) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(n)]


def accepted(reactor: SidecarReactor, made: list[Server], n: int) -> None:
    for _ in range(50):
        if len(made) >= n:
            return
        reactor.doIteration(0.05)
    raise AssertionError(f"{len(made)} of {n} connections accepted")


def one_connection(reactor: SidecarReactor) -> tuple[socket.socket, Any]:
    """A client socket and the server transport the reactor accepted for it."""
    port, made = listen(reactor)
    (client,) = connect(port)
    accepted(reactor, made, 1)
    transport = made[0].transport
    assert isinstance(transport, EagerServer)
    return client, transport


def test_a_write_with_nothing_queued_is_on_the_socket_when_write_returns(
    reactor: SidecarReactor,
) -> None:
    client, transport = one_connection(reactor)
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    client.settimeout(0)  # no reactor turn in between: the bytes must already be sent
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert not transport.dataBuffer and not transport._tempDataLen
    client.close()


def test_a_write_the_kernel_cannot_take_is_queued_and_delivered_whole_in_order(
    reactor: SidecarReactor,
) -> None:
    client, transport = one_connection(reactor)
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the socket buffers hold
    transport.write(big)
    transport.write(b"after")  # behind the queued rest, never before it
    assert transport._tempDataLen or transport.offset < len(transport.dataBuffer)
    client.settimeout(0)
    got = bytearray()
    while len(got) < len(big) + 5:
        try:
            got += client.recv(1 << 20)
        except BlockingIOError:
            reactor.doIteration(0.05)
    assert bytes(got) == big + b"after"
    client.close()


@pytest.mark.parametrize(("shared", "per_wakeup"), [(True, 1), (False, 5)])
def test_a_shared_listener_takes_one_connection_per_wakeup(
    reactor: SidecarReactor, shared: bool, per_wakeup: int
) -> None:
    reactor.shared_listeners = shared
    port, made = listen(reactor)
    clients = connect(port, 5)  # all five in the backlog before the listener reads
    port.doRead()
    assert len(made) == per_wakeup
    for c in clients:
        c.close()
