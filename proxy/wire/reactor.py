"""The sidecar's reactor: Twisted's epoll reactor with two changes on the request path.

1. A write to a TCP connection with nothing queued goes to the socket at once. Twisted queues
   every write and sends it when epoll says the socket is writable: two epoll_ctl calls and a
   dispatch per message, on a path that writes one message per request in each direction.
   When the kernel takes only part (or none), the rest is queued exactly as before: order,
   back-pressure on producers, error reporting and loseConnection are Twisted's own.
2. Events are dispatched without the legacy log context (log.callWithLogger), which costs
   four Python calls per event for a "system" prefix the JSON log never prints.
   _doReadOrWrite still catches what a handler raises and closes that connection; what
   escapes it is logged here, as before.

`install()` must run before anything imports twisted.internet.reactor (the CLI does it first).
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.python import log


def _write(self: Any, data: bytes) -> None:
    if (
        data
        and self.connected
        and not self.disconnecting
        and not self._writeDisconnected
        and not self.TLS
        and not self._tempDataLen
        and self.offset == len(self.dataBuffer)
    ):
        try:
            sent = self.socket.send(data)
        except OSError:  # full (EAGAIN) or broken: the queued write below sends or reports it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    tcp.Connection.write(self, data)


class EagerServer(tcp.Server):
    """An accepted connection whose writes go out at once when nothing is queued."""

    write = _write


class EagerClient(tcp.Client):
    """An outgoing connection whose writes go out at once when nothing is queued."""

    write = _write


class EagerPort(tcp.Port):
    """A listener of eager connections. On a socket shared by worker processes it takes one
    connection per wakeup (nginx's `multi_accept off`): every worker is woken for a new
    connection, the least busy one gets there first, and a burst spreads over the workers.
    Twisted's default accepts up to a growing batch at once, which hands a burst of keep-alive
    connections (wrk's 50, a load balancer's pool) to whichever worker woke first, for good."""

    transport = EagerServer

    def doRead(self) -> None:
        if getattr(self.reactor, "shared_listeners", False):
            self.numberAccepts = 1
        super().doRead()  # type: ignore[no-untyped-call]


class EagerConnector(tcp.Connector):
    def _makeTransport(self) -> EagerClient:
        make: Any = EagerClient
        return make(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-any-return]

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        if self.state == "disconnected":  # not reconnecting: the transport holds us, not back
            self.transport = None


class SidecarReactor(EPollReactor):
    """EPollReactor whose TCP connections write eagerly and whose dispatch skips log context."""

    shared_listeners = False  # a worker sets it: its listening sockets are shared (EagerPort)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        p = EagerPort(port, factory, backlog, interface, self)
        p.startListening()
        return p

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> Any:
        c = EagerConnector(host, port, factory, timeout, bindAddress, self)
        c.connect()
        return c

    def adoptStreamPort(
        self, fileDescriptor: int, addressFamily: socket.AddressFamily, factory: Any
    ) -> Any:
        if addressFamily not in (socket.AF_INET, socket.AF_INET6):
            adopt: Any = super().adoptStreamPort
            return adopt(fileDescriptor, addressFamily, factory)
        port: Any = EagerPort._fromListeningDescriptor
        p = port(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p

    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch: Any = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except Exception:  # e.g. from a connectionLost: log it, serve the others
                    log.err(None, "error dispatching an I/O event")

    doIteration = doPoll


def install() -> bool:
    """Make SidecarReactor the global reactor; False when one was already chosen."""
    if "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(SidecarReactor())  # type: ignore[no-untyped-call]
    return True
