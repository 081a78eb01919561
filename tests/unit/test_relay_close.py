"""Our close of a client connection, in memory: FIN after close_notify, reading on to see the
peer's close, and what close_grace does to a peer that reads, has read, or stopped reading."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from tests.unit.test_relay import GET, OK_HELLO, TIMEOUTS, make_rig

GRACE = TIMEOUTS.close_grace


class Client(StringTransport):
    """The TLS transport the relay writes to; records an abort."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000), lenient=True)
        self.aborted = False
        self.resumed = 0

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def resumeProducing(self) -> None:
        self.resumed += 1


class Tcp:
    """The TCP descriptor under it: what is still unsent, and how it was closed."""

    def __init__(self, unsent: int) -> None:
        self.dataBuffer, self.offset, self._tempDataLen = b"x" * unsent, 0, 0
        self.disconnecting = False
        self.write_shut = False
        self.closed = False

    def fileno(self) -> int:
        raise ValueError("no socket")  # only Twisted's buffer counts here

    def take(self, n: int) -> None:
        self.dataBuffer = self.dataBuffer[n:]

    def loseWriteConnection(self) -> None:
        self.write_shut = True

    def loseConnection(self) -> None:
        self.closed = True


def closing(unsent: int) -> tuple[Any, Client, Tcp]:
    client = Client()
    rig = make_rig(client=client)
    tcp = Tcp(unsent)
    rig.down.raw = tcp
    rig.send(GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    rig.upstream().reply(OK_HELLO)
    return rig, client, tcp


def test_our_close_is_close_notify_then_fin_and_reading_resumes() -> None:
    _rig, client, tcp = closing(0)
    assert client.disconnecting  # TLS: our close_notify
    assert tcp.write_shut and not tcp.closed  # then FIN; the peer's close is awaited
    assert client.resumed  # reading again, to see that close at once


def test_a_peer_that_took_everything_is_closed_at_close_grace_not_aborted() -> None:
    rig, client, tcp = closing(0)
    rig.advance(GRACE)
    assert tcp.closed and not client.aborted


def test_a_peer_that_stopped_reading_is_aborted_at_close_grace() -> None:
    rig, client, tcp = closing(5000)
    rig.advance(GRACE)
    assert client.aborted and not tcp.closed


def test_a_peer_still_reading_gets_more_grace_up_to_send_timeout() -> None:
    rig, client, tcp = closing(10_000_000)
    for _ in range(int(TIMEOUTS.send / GRACE) - 1):
        tcp.take(1000)
        rig.advance(GRACE)
        assert not client.aborted
    tcp.take(1000)
    rig.advance(2 * GRACE)  # past send_timeout after our close: still reading, still cut
    assert client.aborted
