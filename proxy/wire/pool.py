"""Upstream connections: DNS asked on every connect, max age, idle timeout, connect/TLS timeout.

A connection is handed out only once it is ready: TCP connected and, for https, the handshake
done, the chain verified against `trust` and the name checked (both by ClientTLS's connection).
Until then no request byte has been written, so failing over to the next DNS answer on a
refused connect is always safe.

TLS resumption: the pool keeps the last session of a verified connection (TLS 1.2: right after
the handshake; TLS 1.3: its tickets come after the handshake, so once the first response bytes
arrived) and offers it on the next new connection. OpenSSL does not verify the chain again on a
resumed session: its server certificate was verified when the session was made, under the same
context (so the same trust store and client certificate: a reload or renew() drops the
session), for the same name, which is checked again on the resumed connection before it is
handed out; a session is not offered past its server certificate's notAfter.
"""

from __future__ import annotations

import fcntl
import sys
import termios
from collections.abc import Callable
from typing import Any
from typing import Protocol as Interface

import httptools
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IHandshakeListener,
    IHostnameResolver,
    IReactorTCP,
    IWriteDescriptor,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.tls.contexts import ClientTLS, PeerRejected, session_reused
from proxy.tls.transport import TLSFactory
from proxy.wire.http import ProxyError, tokens_of
from proxy.wire.resolver import ResolveError, resolve
from proxy.wire.tunnel import ProxyHop, Tunnel, TunnelError, unreachable_text


class ResponseSink(Interface):
    """What an upstream connection reports to (relay.Exchange; probe's bare response reader)."""

    def response_head(self, up: UpstreamConnection) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self) -> None: ...
    def upstream_lost(self, reason: Failure) -> None: ...
    def upstream_failed(self, err: ProxyError) -> None: ...
    def upstream_timeout(self) -> None: ...
    def upstream_full(self, full: bool) -> None: ...


_NOTHING: frozenset[bytes] = frozenset()


def forget_traceback(reason: Failure) -> None:
    """Drop a failure's traceback once it is handled: its frames hold the protocols that saw it
    (and they the failure), a cycle left to the cyclic collector's rare full collections."""
    if reason.tb is not None or getattr(reason.value, "__traceback__", None) is not None:
        reason.cleanFailure()


def socket_of(transport: Any) -> Any:
    """The reactor's TCP descriptor under a transport, or None for transports no reactor drives
    (in-memory ones in tests). Looked up once per connection. Twisted's TLS wrapper copies the
    TCP transport's interfaces onto itself, so it is told apart by what it wraps, not by them."""
    inner = getattr(transport, "transport", None)
    if inner is not None and IWriteDescriptor.providedBy(inner):
        return inner  # TLS over TCP
    return transport if IWriteDescriptor.providedBy(transport) else None


def unsent(tcp: Any) -> int:
    """Bytes written to a TCP descriptor that the peer has not taken yet: Twisted's buffer plus
    the kernel's send queue (SIOCOUTQ). A count that does not fall means the peer stopped
    reading."""
    left: int = len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
    try:
        queued = fcntl.ioctl(tcp.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        left += int.from_bytes(queued, sys.byteorder, signed=True)
    except (OSError, ValueError, AttributeError):
        pass
    return left


@implementer(IHandshakeListener)
class UpstreamConnection(Protocol):
    """One connection to the upstream; parses responses for the exchange attached to it."""

    transport: Any  # TCP, or TLS (ITLSTransport) toward https upstreams

    def __init__(self, pool: Pool, address: str, tls_name: str | None, now: float) -> None:
        self.pool = pool
        self.address = address
        self.label = f"{address}:{pool.port}"  # for logs
        self.via = ""  # " through proxy URL" for a connection tunnelled through a forward proxy
        self.tls_name = tls_name
        self.created = now
        self.generation = pool.generation
        self.deadline = now + pool.connect_timeout
        self.ready: defer.Deferred[UpstreamConnection] | None = defer.Deferred(self._orphan)
        self.orphaned = False  # the exchange that asked for it went away before it was ready
        self.closing = False
        self.exchange: ResponseSink | None = None
        self.connected = False
        self.in_head = False
        self.head_bytes = 0
        self.head_size = 0  # the response head's fields so far, as on_headers_complete counts
        self.head_error: str | None = None
        self.max_fields = pool.max_head_fields  # read per header field
        self.raw: Any = None  # the TCP descriptor under TLS, closed with it
        self.connector: Any = None
        self.backpressure: _Backpressure | None = None
        self.verify_error: str | None = None
        self.failure_detail: str | None = None
        self.session_offered = False  # a cached TLS session was offered to resume
        self.session_wanted = False  # TLS 1.3: keep the session once response bytes arrive
        self.parser: Any = httptools.HttpResponseParser(self)  # None once the connection is lost
        self.feeding = False  # inside parser.feed_data: the parser must not be dropped
        self.paused: set[str] = set()
        self.status = 0
        self.keep_alive = False
        self.reason = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.listed: frozenset[bytes] = _NOTHING  # names the response's Connection lists

    # ---- connection lifecycle
    def connectionMade(self) -> None:
        self.connected = True
        self.raw = socket_of(self.transport)
        self.pool.live.add(self)
        self.backpressure = _Backpressure(self)
        self.transport.registerProducer(self.backpressure, True)
        if self.tls_name is None:
            self._ready()

    def handshakeCompleted(self) -> None:
        assert self.tls_name is not None
        handle = self.transport.getHandle()
        # resumed or not, ClientTLS's connection checked the name as the handshake completed
        # (on a resumed session against the certificate the session was verified with) and
        # failed the connection on a mismatch: it is never handed out
        if getattr(handle, "rejection", None) is not None or self.transport.disconnecting:
            return
        resumed = self.session_offered and session_reused(handle)
        self.pool.on_handshake("resumed" if resumed else "full")
        if handle.get_protocol_version() == SSL.TLS1_2_VERSION:
            self.pool.keep_session(self, handle)
        else:
            self.session_wanted = True
        self._ready()

    def tls_session_for(self, context: SSL.Context) -> SSL.Session | None:
        """Asked by ClientTLS as this connection's TLS is made: the session to offer."""
        session = self.pool.session_for(context)
        self.session_offered = session is not None
        return session

    def _orphan(self, d: defer.Deferred[UpstreamConnection]) -> None:
        """The request waiting for this connection is gone (the client gave up)."""
        self.orphaned = True

    def _ready(self) -> None:
        self.deadline = 0.0
        d, self.ready = self.ready, None
        if self.orphaned:  # nobody waits for it: keep it for the next request, or close it
            self.pool.release(self, reusable=True)
        elif d is not None:
            d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self.session_wanted:  # TLS 1.3 tickets come before the first response bytes
            self.session_wanted = False
            self.pool.keep_session(self, self.transport.getHandle())
        down = getattr(self.exchange, "down", None)  # probe attaches a bare response reader
        if down is not None:
            down.cork()
        self.feeding = True
        try:
            self.parser.feed_data(data)
            if self.in_head and self.head_error is None:  # httptools holds a partial head
                self.head_bytes += len(data)
                if self.head_bytes > self.pool.max_head_bytes:
                    self.head_error = f"response head over {self.pool.max_head_bytes} bytes"
            if self.head_error is not None:
                self._protocol_error(
                    f"{self.head_error} (max_response_header_bytes/max_response_headers)",
                    "upstream_header_too_large",
                )
        except httptools.HttpParserUpgrade:
            self._protocol_error("upstream switched protocols; not supported")
        except httptools.HttpParserError as e:
            self._protocol_error(f"invalid HTTP response from upstream: {e}")
        finally:
            self.feeding = False
            if not self.connected:
                self.parser = None
            if down is not None:
                down.uncork()

    def _protocol_error(self, detail: str, code: str = "bad_gateway") -> None:
        ex = self.exchange
        self.exchange = None
        self.transport.abortConnection()
        if ex is not None:
            ex.upstream_failed(ProxyError(502, code, detail))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.connector = None  # it holds our factory, which holds us
        if self.backpressure is not None:  # registered on a TLS transport, it would hold us
            self.backpressure.conn = None
        self.pool.forget(self)
        if self.ready is not None:
            d, self.ready = self.ready, None
            if self.session_offered:  # never let a session that ended this way be offered again
                self.pool.drop_session()
            d.errback(self._handshake_failure(reason))
            forget_traceback(reason)
            self.parser = None  # nothing was parsed yet
            return
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.upstream_lost(reason)
        forget_traceback(reason)
        if not self.feeding:  # else dataReceived drops it once feed_data returns
            self.parser = None  # its callbacks are this protocol's bound methods: a cycle

    def _handshake_failure(self, reason: Failure) -> ProxyError:
        rejected = reason.value if isinstance(reason.value, PeerRejected) else None
        if rejected is not None and rejected.check == "name" and not self.failure_detail:
            self.failure_detail = rejected.detail
        if self.failure_detail:
            detail = self.failure_detail
        elif rejected is not None:
            detail = f"upstream {rejected.detail}"
        elif self.verify_error:
            detail = f"upstream certificate not trusted: {self.verify_error}"
        elif reason.check(error.ConnectionDone, error.ConnectionLost):
            detail = (
                "connection closed during the TLS handshake "
                "(the upstream may have refused our client certificate)"
            )
        else:
            detail = f"TLS handshake failed: {ssl_text(reason)}"
        self.pool.handshake_failed(detail)
        return ProxyError(502, "upstream_tls_failed", f"{detail}{self.via} [{self.address}]")

    # ---- response parsing (httptools callbacks)
    def on_message_begin(self) -> None:
        self.headers = []
        self.reason = b""
        self.listed = _NOTHING
        self.in_head = True
        self.head_bytes = 0
        self.head_size = 0

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        if len(headers) < self.max_fields and self.head_error is None:
            lname = name.lower()
            if lname == b"connection":
                self.listed = self.listed | tokens_of(value)
            self.head_size += len(name) + len(value) + 4
            headers.append((lname, name, value))
        elif self.head_error is None:
            self.head_error = f"more than {self.max_fields} response header fields"

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.head_error is None and len(self.reason) + self.head_size > self.pool.max_head_bytes:
            self.head_error = f"response head over {self.pool.max_head_bytes} bytes"
        if self.head_error is not None:
            return  # answered 502 once feed_data returns; nothing of this head is forwarded
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.status < 200 or self.exchange is None:
            return  # interim 1xx: not forwarded (Expect is answered by us)
        self.exchange.response_head(self)

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None and self.head_error is None:
            self.exchange.response_body(data)

    def on_message_complete(self) -> None:
        if self.status >= 200 and self.exchange is not None and self.head_error is None:
            self.exchange.response_complete()

    def reset_parser(self) -> None:
        """After a response that has no body by the request method (HEAD)."""
        self.parser = httptools.HttpResponseParser(self)

    # ---- flow control
    def pause(self, reason: str) -> None:
        if not self.paused:
            self.transport.pauseProducing()
        self.paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and self.connected:
                self.transport.resumeProducing()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        """Our close_notify, then FIN; the connection ends on the upstream's close_notify or
        FIN (the producer is unregistered first: the shutdown waits until it is); the sweep
        aborts what is still open after close_grace."""
        if self.connected and not self.closing:
            self.closing = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()  # under TLS: close_notify, then FIN
            self.deadline = self.pool.clock.seconds() + self.pool.close_grace

    def abort(self) -> None:
        if self.connected:
            self.transport.abortConnection()


class _Backpressure:
    """Registered on the upstream transport: its write buffer full -> stop reading the client."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn: UpstreamConnection | None = conn  # None once the connection is lost

    def pauseProducing(self) -> None:
        ex = self.conn.exchange if self.conn is not None else None
        if ex is not None:
            ex.upstream_full(True)

    def resumeProducing(self) -> None:
        ex = self.conn.exchange if self.conn is not None else None
        if ex is not None:
            ex.upstream_full(False)

    def stopProducing(self) -> None:
        pass


def ssl_text(reason: Failure) -> str:
    value = reason.value
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):  # OpenSSL.SSL.Error: [(lib, func, reason), ...]
        texts = [str(item[-1]) for item in args[0] if isinstance(item, tuple)]
        if texts:
            return "; ".join(texts)
    return str(value) or type(value).__name__


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn: UpstreamConnection | None = conn

    def buildProtocol(self, addr: Any) -> UpstreamConnection | None:
        # connected: the connector keeps this factory, the connection its transport and the
        # transport its connector; let go of the connection so that chain holds no cycle
        conn, self.conn = self.conn, None
        return conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.pool.forget(conn)
        if conn.ready is not None:
            d, conn.ready = conn.ready, None
            d.errback(reason)


class _TunnelFactory(_Factory):
    """TCP to the proxy; CONNECT; then `inner` (our TLS, or the bare connection) in the tunnel.
    Stands as the connection's connector, so the connect deadline can stop either phase."""

    def __init__(self, conn: UpstreamConnection, hop: ProxyHop, inner: Any) -> None:
        super().__init__(conn)
        self.hop, self.inner = hop, inner
        self.tunnel: Tunnel | None = None
        self.connector: Any = None

    def buildProtocol(self, addr: Any) -> Tunnel:  # type: ignore[override]
        assert self.conn is not None  # kept until the tunnel is up: a refusal fails it
        pool = self.conn.pool
        self.tunnel = Tunnel(
            self.hop,
            pool.host,  # the name, as configured: the proxy resolves it
            pool.port,
            build=lambda: self.inner.buildProtocol(addr),
            failed=self._refused,
            max_head=pool.max_head_bytes,
        )
        return self.tunnel

    def _refused(self, e: TunnelError) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.pool.forget(conn)
        if conn.ready is not None:
            d, conn.ready = conn.ready, None
            d.errback(ProxyError(502, e.code, e.detail))

    def stopConnecting(self) -> None:
        """The connect deadline passed: in the TCP connect, or waiting for the proxy."""
        if self.tunnel is not None:
            self.tunnel.abort()
        elif self.connector is not None:
            self.connector.stopConnecting()


class Pool:
    """Idle keep-alive connections to one upstream (host, port), newest first."""

    def __init__(
        self,
        *,
        reactor: IReactorTCP,
        clock: Any,
        resolver: IHostnameResolver,
        host: str,
        port: int,
        tls: ClientTLS | None,
        connect_timeout: float,
        idle_timeout: float,
        max_age: float,
        max_idle: int,
        max_head_bytes: int = 32 * 1024,
        max_head_fields: int = 100,
        close_grace: float = 1.0,
        on_connect: Callable[[str], None] = lambda result: None,
        on_handshake_error: Callable[[str], None] = lambda detail: None,
        on_handshake: Callable[[str], None] = lambda kind: None,
        proxy: ProxyHop | None = None,
    ) -> None:
        self.reactor, self.clock, self.resolver = reactor, clock, resolver
        self.host, self.port, self.tls = host, port, tls
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self.max_age, self.max_idle = max_age, max_idle
        self.max_head_bytes, self.max_head_fields = max_head_bytes, max_head_fields
        self.close_grace = close_grace
        self.on_connect, self.on_handshake_error = on_connect, on_handshake_error
        self.on_handshake = on_handshake  # "full" or "resumed", per verified TLS handshake
        self.proxy = proxy  # a forward proxy: connect to it, CONNECT host:port by name
        self.idle: list[UpstreamConnection] = []
        self.live: set[UpstreamConnection] = set()
        self.generation = 0
        self.session: SSL.Session | None = None  # the last verified TLS session, to resume
        self.session_context: SSL.Context | None = None  # the context it was made under
        self.session_until = 0.0  # its server certificate's notAfter (Unix time)

    def acquire(self) -> UpstreamConnection | defer.Deferred[UpstreamConnection]:
        """A ready idle connection at once, or a Deferred for a new one."""
        now = self.clock.seconds()
        while self.idle:
            conn = self.idle.pop()
            if conn.connected and not conn.closing and now - conn.created < self.max_age:
                conn.deadline = 0.0
                return conn
            conn.close()
        return defer.ensureDeferred(self._connect())

    async def _connect(self) -> UpstreamConnection:
        if self.proxy is not None:
            return await self._connect_via(self.proxy)
        try:
            addresses = await resolve(self.resolver, self.host, self.port)
        except ResolveError as e:
            self.on_connect("dns_error")
            raise ProxyError(502, "upstream_unreachable", str(e)) from None
        except defer.CancelledError:
            raise  # the client went away while we were resolving
        except Exception as e:
            self.on_connect("dns_error")
            raise ProxyError(502, "upstream_unreachable", f"DNS: {self.host}: {e}") from None
        last = ""
        for address in addresses:
            try:
                conn = await self._dial(address)
            except error.ConnectError as e:  # refused/unreachable/timeout: nothing was sent
                last = f"{address}:{self.port}: {_connect_text(e)}"
                if isinstance(e, error.TimeoutError):
                    self.on_connect("timeout")
                    raise ProxyError(
                        504, "upstream_timeout", f"connect to {address}:{self.port} timed out"
                    ) from None
                continue
            self.on_connect("ok")
            return conn
        self.on_connect("refused")
        raise ProxyError(502, "upstream_unreachable", f"cannot connect to {self.host}: {last}")

    async def _connect_via(self, hop: ProxyHop) -> UpstreamConnection:
        """Through a forward proxy: DNS is asked for the proxy's name on every connect; the
        upstream's name goes in the CONNECT request, for the proxy to resolve."""
        try:
            addresses = await resolve(self.resolver, hop.host, hop.port)
        except defer.CancelledError:
            raise
        except Exception as e:
            self.on_connect("proxy_unreachable")
            raise ProxyError(
                502, "proxy_unreachable", f"cannot connect to proxy {hop}: DNS: {e}"
            ) from None
        last = ""
        for address in addresses:
            try:
                conn = await self._dial(address, hop)
            except error.ConnectError as e:  # nothing was sent: the next address is safe
                last = unreachable_text(hop, e)
                shown = f"[{address}]" if ":" in address else address
                last = f"{last} ({shown}:{hop.port})"
                if isinstance(e, error.TimeoutError):
                    break
                continue
            except ProxyError as e:
                if e.code in ("proxy_refused", "bad_gateway"):
                    self.on_connect("proxy_refused")
                raise
            self.on_connect("ok")
            return conn
        self.on_connect("proxy_unreachable")
        raise ProxyError(502, "proxy_unreachable", last)

    def _dial(
        self, address: str, hop: ProxyHop | None = None
    ) -> defer.Deferred[UpstreamConnection]:
        conn = UpstreamConnection(
            self, address, self.tls.server_name if self.tls else None, self.clock.seconds()
        )
        assert conn.ready is not None
        ready = conn.ready
        factory: Any = _Factory(conn)
        if self.tls is not None:
            factory = TLSFactory(self.tls, True, factory)
        if hop is None:
            conn.connector = self.reactor.connectTCP(
                address, self.port, factory, timeout=self.connect_timeout
            )
        else:
            shown = f"[{address}]" if ":" in address else address
            conn.label = f"{self.host}:{self.port} via {shown}:{hop.port}"
            conn.via = f" through proxy {hop}"
            tunnelled = _TunnelFactory(conn, hop, factory)
            tunnelled.connector = self.reactor.connectTCP(
                address, hop.port, tunnelled, timeout=self.connect_timeout
            )
            conn.connector = tunnelled
        self.live.add(conn)
        return ready

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.exchange = None
        now = self.clock.seconds()
        if (
            reusable
            and conn.connected
            and not conn.closing
            and conn.generation == self.generation
            and now - conn.created < self.max_age
            and len(self.idle) < self.max_idle
        ):
            if conn.paused:
                for reason in list(conn.paused):
                    conn.resume(reason)
            conn.deadline = now + self.idle_timeout
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        self.live.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def handshake_failed(self, detail: str) -> None:
        self.on_handshake_error(detail)

    # ---- TLS session resumption
    def session_for(self, context: SSL.Context) -> SSL.Session | None:
        """The session to offer on a new connection made under context, if there is one."""
        if self.session is None:
            return None
        if context is not self.session_context or self.clock.seconds() >= self.session_until:
            self.drop_session()  # material reloaded, or the certificate it vouches for expired
            return None
        return self.session

    def keep_session(self, conn: UpstreamConnection, handle: SSL.Connection) -> None:
        """Keep the session of a connection that passed verification, for the next one."""
        context = handle.get_context()
        if (
            self.tls is None
            or conn.generation != self.generation
            or context is not self.tls.material.context  # made before a reload
        ):
            return
        session = handle.get_session()
        cert = handle.get_peer_certificate(as_cryptography=True)
        if session is None or cert is None:
            return
        self.session, self.session_context = session, context
        self.session_until = cert.not_valid_after_utc.timestamp()

    def drop_session(self) -> None:
        self.session = self.session_context = None

    def renew(self) -> None:
        """New key material: idle connections go now, busy ones after their response; the
        cached TLS session goes too (it belongs to the old context and client certificate)."""
        self.generation += 1
        self.drop_session()
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def states(self) -> dict[str, int]:
        """Upstream connections by state, for /metrics."""
        connecting = sum(1 for c in self.live if c.ready is not None)
        idle = len(self.idle)
        active = len(self.live) - connecting - idle
        return {"connecting": connecting, "idle": idle, "active": active}

    def sweep(self, now: float) -> None:
        for conn in list(self.live):
            if conn.deadline and now >= conn.deadline:
                conn.deadline = 0.0
                if conn.closing:  # the upstream did not finish our close in time
                    conn.abort()
                elif conn.ready is not None:
                    conn.failure_detail = (
                        f"connect/TLS handshake to {conn.label} timed out "
                        f"after {self.connect_timeout:g}s"
                    )
                    d, conn.ready = conn.ready, None
                    if conn.connected:
                        conn.abort()
                    elif conn.connector is not None:
                        conn.connector.stopConnecting()
                    self.forget(conn)
                    d.errback(ProxyError(504, "upstream_timeout", conn.failure_detail))
                elif conn.exchange is not None:
                    conn.exchange.upstream_timeout()
                else:
                    conn.close()
            elif conn.exchange is None and conn in self.idle and now - conn.created >= self.max_age:
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.live):
            conn.abort()


def _connect_text(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
