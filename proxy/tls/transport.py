"""The data path's TLS: pyOpenSSL over memory BIOs, driven directly, one layer over TCP.

Twisted's TLSMemoryBIOProtocol reads decrypted bytes with `recv` until it raises WantReadError
(a fresh 32 KiB buffer per call and an exception per read), drains the outgoing BIO the same
way, and reaches its methods through a ProtocolWrapper. Here the steady state raises nothing:
records go in with one BIO write, application bytes come out of SSL_read into one buffer shared
by every connection (the reactor runs one callback at a time), until OpenSSL holds nothing more
to read; what OpenSSL wants sent is taken out of the outgoing BIO by its size and written to
TCP in the same call, one write per application write. Errors, the handshake and shutdown go
through pyOpenSSL's own calls, so failures carry the exceptions and texts they always had.

Closing is TLS's, then TCP's: our close_notify, then FIN (TCP shut for writing) once it is
flushed; the connection ends when the peer answers with its close_notify or its FIN. A peer
that does neither is the caller's to abort (the relay does at close_grace).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet import error
from twisted.internet.interfaces import (
    IHandshakeListener,
    INegotiated,
    IPushProducer,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

# One buffer for every connection: decrypted bytes and outgoing records are copied out of it
# before anything else can run.
_SIZE = 1 << 18
_RECORD = 1 << 14  # the most a TLS record carries
_BUFFER = _ffi.new("char[]", _SIZE)
_CALLS = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_pending", "BIO_read", "BIO_get_mem_data")
_DIRECT = all(hasattr(_lib, name) for name in _CALLS)
_WANT_READ = getattr(_lib, "SSL_ERROR_WANT_READ", 2)


def _eof(failure: Failure) -> Failure:
    """An EOF in violation of TLS reads as a lost connection, as Twisted reports it."""
    value = failure.value
    if isinstance(value, SSL.SysCallError) and value.args == (-1, "Unexpected EOF"):
        return Failure(error.ConnectionLost())
    return failure


@implementer(ITransport, ISSLTransport, IPushProducer, INegotiated)
class TLSConnection(Protocol):
    """The TCP connection's protocol, and the transport of the protocol it carries.

    `transport` is the TCP transport; `wrappedProtocol` the HTTP side (the name the connection
    creators and verify callbacks look for through the SSL object's app data)."""

    transport: Any  # the TCP connection

    def __init__(self, creator: Any, is_client: bool, wrapped: Any) -> None:
        self.creator = creator
        self.is_client = is_client
        self.wrappedProtocol = wrapped
        self.conn: SSL.Connection | None = None
        self.connected = False
        self.disconnecting = False
        self.handshake_done = False
        self.aborted = False
        self.lost = False  # the TLS session is over: no more application bytes either way
        self.reason: Failure | None = None
        self.pending: list[bytes] = []  # written before the handshake ended
        self.producer: Any = None

    # ---- from TCP
    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        if self.is_client:
            self.conn = self.creator.clientConnectionForTLS(self)
            self.conn.set_connect_state()
        else:
            self.conn = self.creator.serverConnectionForTLS(self)
            self.conn.set_accept_state()
        self.connected = True
        self.wrappedProtocol.makeConnection(self)
        self._handshake()

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.lost or self.aborted or not data:
            return
        conn.bio_write(data)
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done:
                return
        if self.pending:
            self._write_pending()
        self._read()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        conn = self.conn
        if not self.lost and conn is not None:
            if _DIRECT and not buffered(conn._into_ssl):
                # nothing left to decrypt: the read could only raise OpenSSL's unexpected-EOF
                # error, read as a lost connection; that outcome, without the exception
                if self.reason is None:
                    self.reason = Failure(error.ConnectionLost())
            else:
                conn.bio_shutdown()  # what is buffered is still delivered, then the EOF
                self._read()
            self.lost = True
        self.connected = False
        why, self.reason = self.reason or reason, None
        self.wrappedProtocol.connectionLost(why)
        # break the cycles (the SSL object holds this as app data; the protocol holds this as
        # its transport), as Twisted's wrappers do: the connection is freed by refcount alone
        self.conn = None
        self.wrappedProtocol = None

    # ---- TLS work
    def _handshake(self) -> None:
        conn = self.conn
        if self.aborted or conn is None:
            return
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error:
            self._tls_over(Failure())
            return
        self.handshake_done = True
        if self.aborted:  # refused from inside the handshake (a name check)
            return
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        self._flush()

    def _read(self) -> None:
        """Hand the protocol every application byte the records received so far hold: the
        records are decrypted into the shared buffer back to back and delivered in one call."""
        conn = self.conn
        while conn is not None and not self.lost and not self.aborted:
            if _DIRECT:
                ssl = conn._ssl
                got = 0
                last = 0
                while got <= _SIZE - _RECORD:
                    last = _lib.SSL_read(ssl, _BUFFER + got, _SIZE - got)
                    if last <= 0:
                        break
                    got += last
                want_read = last <= 0 and _lib.SSL_get_error(ssl, last) == _WANT_READ
                if got:
                    self.wrappedProtocol.dataReceived(_ffi.buffer(_BUFFER, got)[:])
                    if last > 0:  # the buffer filled up: there may be more
                        continue
                if want_read:
                    break
            try:  # the exception path: pyOpenSSL names what ended the session
                data = conn.recv(_RECORD)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:  # the peer's close_notify: answer it, then close TCP
                self._shutdown()
                self._tls_over(None)
                break
            except SSL.Error:
                self._tls_over(Failure())
                break
            self.wrappedProtocol.dataReceived(data)
        self._flush()  # a KeyUpdate answer, a refused renegotiation's alert

    def _flush(self) -> None:
        """Write what OpenSSL has for the peer to TCP, in one write."""
        conn = self.conn
        if conn is None:
            return
        if _DIRECT:
            out = conn._from_ssl
            size = buffered(out)
            if not size:
                return
            if size <= _SIZE:
                got = _lib.BIO_read(out, _BUFFER, size)
                data = _ffi.buffer(_BUFFER, got)[:]
            else:
                data = conn.bio_read(size)
        else:
            chunks = []
            while True:
                try:
                    chunks.append(conn.bio_read(_SIZE))
                except SSL.WantReadError:
                    break
            data = b"".join(chunks)
        if data and not self.aborted:
            self.transport.write(data)

    def _encrypt(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.lost or not data:
            return
        if _DIRECT:
            # pyOpenSSL's contexts allow partial writes: SSL_write may take one record at a time
            size = len(data)
            done = 0
            with _ffi.from_buffer(data) as view:
                while done < size:
                    sent = _lib.SSL_write(conn._ssl, view + done, size - done)
                    if sent <= 0:
                        break
                    done += sent
            if done == size:
                return
            data = data[done:]
        try:  # the exception path: pyOpenSSL names the failure
            conn.sendall(data)
        except SSL.WantReadError:
            self.pending.append(data)
            if self.producer is not None:
                self.producer.pauseProducing()
        except SSL.Error:
            self._tls_over(Failure())

    def _write_pending(self) -> None:
        pending, self.pending = self.pending, []
        for data in pending:
            self._encrypt(data)
        self._flush()
        if self.pending:
            return
        if self.producer is not None:
            self.producer.resumeProducing()
        elif self.disconnecting:
            self._shutdown()

    def _shutdown(self) -> None:
        """Our close_notify (or the answer to the peer's), then FIN once it is flushed; TCP
        closes fully when both close_notify have crossed, else when the peer's FIN comes."""
        conn = self.conn
        if conn is None:
            return
        try:
            both = conn.shutdown()
        except SSL.Error:  # mid-handshake, or the session already failed
            both = False
        self._flush()
        if both:
            self.transport.loseConnection()
        else:
            getattr(self.transport, "loseWriteConnection", self.transport.loseConnection)()

    def _tls_over(self, reason: Failure | None) -> None:
        """The session ended (an error, or the peer's close_notify): send what OpenSSL has
        (an alert), then close TCP. reason: what the protocol's connectionLost gets instead of
        TCP's own reason, or None for TCP's."""
        if reason is not None:
            reason = _eof(reason)
        if self.reason is None:
            self.reason = reason
        self.lost = True
        self._flush()
        self.transport.loseConnection()

    # ---- ITransport, for the protocol carried
    def write(self, data: bytes) -> None:
        if self.disconnecting and self.producer is None:
            return
        if not self.handshake_done or self.pending:
            self.pending.append(data)
            return
        self._encrypt(data)
        self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        if not self.handshake_done and not self.pending:
            self.abortConnection()  # nothing of ours can be sent without a session
            return
        self.disconnecting = True
        if not self.pending and self.producer is None:
            self._shutdown()

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self.transport.abortConnection()

    def failVerification(self, reason: Failure) -> None:
        """A connection creator refused the peer during the handshake."""
        self.reason = reason
        self.abortConnection()

    def loseWriteConnection(self) -> None:
        """Half-close: our close_notify, then FIN; the peer's bytes are still delivered."""
        if self.handshake_done and not self.lost and not self.pending:
            self._shutdown()

    def getTcpNoDelay(self) -> bool:
        return bool(self.transport.getTcpNoDelay())

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self.transport.getTcpKeepAlive())

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getHandle(self) -> SSL.Connection | None:
        return self.conn

    def getPeerCertificate(self) -> Any:
        return self.conn.get_peer_certificate() if self.conn is not None else None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        proto = self.conn.get_alpn_proto_negotiated() if self.conn is not None else b""
        return proto or None

    # ---- producers: the TCP transport's back-pressure, passed through
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.lost:
            producer.stopProducing()
            return
        self.transport.registerProducer(producer, streaming)
        self.producer = producer

    def unregisterProducer(self) -> None:
        if self.producer is None:
            return
        self.producer = None
        self.transport.unregisterProducer()
        if self.disconnecting and not self.pending:
            self._shutdown()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    # ---- memory
    def release_buffers(self) -> None:
        """An idle connection's memory BIOs, grown by past bursts, swapped for empty ones."""
        if self.conn is not None and self.handshake_done and not self.lost:
            swap_idle_bios(self.conn)


def buffered(bio: Any) -> int:
    """Bytes written to a memory BIO and not read yet."""
    return int(_lib.BIO_get_mem_data(bio, _ffi.NULL))


MEM_BIO_CALLS = all(
    hasattr(_lib, name) for name in ("BIO_new", "BIO_s_mem", "BIO_free", "BIO_get_mem_data")
) and hasattr(_lib, "SSL_set_bio")


def swap_idle_bios(conn: SSL.Connection) -> None:
    """Give back the memory of the two memory BIOs between OpenSSL and the socket.

    Each BIO's buffer grows to the largest burst it ever held (the handshake flights, a
    request body read 64 KiB at a time, the 16 KiB records of a response) and never
    shrinks; MODE_RELEASE_BUFFERS frees OpenSSL's own record buffers, not these. When both
    are empty they are swapped for new ones, which allocate nothing until written to: an
    idle connection then holds a few hundred bytes here instead of up to ~100 KiB."""
    into = getattr(conn, "_into_ssl", None)  # pyOpenSSL's BIOs: no public accessor
    out = getattr(conn, "_from_ssl", None)
    if not MEM_BIO_CALLS or into is None or out is None or buffered(into) or buffered(out):
        return
    fresh_in = _lib.BIO_new(_lib.BIO_s_mem())
    fresh_out = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh_in == _ffi.NULL or fresh_out == _ffi.NULL:
        for bio in (fresh_in, fresh_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return
    _lib.SSL_set_bio(conn._ssl, fresh_in, fresh_out)  # frees the old pair
    conn._into_ssl, conn._from_ssl = fresh_in, fresh_out


class TLSFactory(ClientFactory):
    """Wraps a factory's protocols in TLSConnection; connection events reach the wrapped one."""

    noisy = False

    def __init__(self, creator: Any, is_client: bool, wrapped: Any) -> None:
        self.creator = creator
        self.is_client = is_client
        self.wrappedFactory = wrapped

    def buildProtocol(self, addr: Any) -> TLSConnection | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        tls = TLSConnection(self.creator, self.is_client, inner)
        tls.factory = self
        return tls

    def startedConnecting(self, connector: Any) -> None:
        started = getattr(self.wrappedFactory, "startedConnecting", None)
        if started is not None:
            started(connector)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        failed = getattr(self.wrappedFactory, "clientConnectionFailed", None)
        if failed is not None:
            failed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        lost = getattr(self.wrappedFactory, "clientConnectionLost", None)
        if lost is not None:
            lost(connector, reason)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
