"""The data path shared by both directions: a downstream HTTP/1.1 connection, its exchanges,
and their upstream connections, with bodies streamed under back-pressure.

Built on twisted.internet protocols and httptools rather than twisted.web: this is the per-
request hot path. A route (egress.EgressRoute / ingress.IngressRoute) supplies the policy:
what to forward, where, and with which headers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.wire.http import (
    HOP_BY_HOP,
    LAST_CHUNK,
    Header,
    ProxyError,
    RequestHead,
    check_request_framing,
    chunk,
    error_response,
    response,
    tokens_of,
)
from proxy.wire.pool import UpstreamConnection, forget_traceback, socket_of, unsent

_NO_BODY_STATUS = frozenset({204, 304})
# request fields on_headers_complete reads (the rest are only forwarded)
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"expect"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUFFER_HIGH = 64 * 1024
LOCAL_BODY_LIMIT = 16 * 1024  # bodies answered by the sidecar itself are small forms
_READING: frozenset[str] = frozenset()  # no pause reason: shared by every connection that reads

# (head, body) -> (status, headers, body): a request the sidecar answers itself
LocalHandler = Callable[[RequestHead, bytes], tuple[int, Sequence[tuple[bytes, bytes]], bytes]]


class Exchange:
    """One request and its response."""

    __slots__ = (
        "body_buffer",
        "body_seen",
        "bytes_out",
        "close_delimited",
        "down",
        "error",
        "extra",
        "head",
        "headers_out",
        "held",
        "local",
        "out_chunked",
        "request_done",
        "response_done",
        "response_started",
        "route",
        "started",
        "status",
        "target",
        "trace",
        "up",
        "up_address",
        "up_chunked",
        "waiting",
    )

    def __init__(self, down: Downstream, head: RequestHead, err: ProxyError | None) -> None:
        self.down = down
        self.route = down.route
        self.head = head
        self.error = err
        self.started = down.clock.seconds()
        self.status = 0
        self.bytes_out = 0
        self.body_seen = 0
        self.body_buffer: list[bytes] | None = []
        self.up: UpstreamConnection | None = None
        self.up_address = ""
        self.up_chunked = head.chunked
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.out_chunked = False
        self.close_delimited = False
        self.target = b""
        self.headers_out: list[tuple[bytes, bytes]] = []
        self.extra: list[tuple[bytes, bytes]] = []
        self.waiting: defer.Deferred[Any] | None = None
        self.local: LocalHandler | None = None
        self.held: list[bytes] | None = None  # bytes for the upstream, until the read is parsed
        self.trace: tuple[Any, str] | None = None  # (span, trace id) with [tracing]

    # ---- request side
    def start(self) -> None:
        """The request head is complete and this exchange is at the front of the queue."""
        if self.error is not None:
            self.fail(self.error)
            return
        head = self.head
        try:
            check_request_framing(head)
            limit = self.route.limits.max_body_bytes
            if head.content_length is not None and head.content_length > limit:
                raise ProxyError(413, "payload_too_large", f"request body over {limit} bytes")
            self.local = self.route.local_handler(head, self.down)
            if self.local is None:
                self.target, self.headers_out = self.route.prepare(head, self.down)
        except ProxyError as e:
            self.fail(e)
            return
        if self.local is not None:  # answered by the sidecar itself (e.g. the token endpoint)
            if self.request_done:
                self._answer_locally()
            return
        if head.version == b"1.1" and head.expect and (head.chunked or head.content_length):
            self.down.write(_CONTINUE)
        d = self.route.before_upstream(self)
        if d is None:
            self._acquire()
        else:
            self.waiting = d
            d.addCallbacks(self._authorized, self._fail_failure)

    def _authorized(self, extra: list[tuple[bytes, bytes]]) -> None:
        self.waiting = None
        self.extra = extra
        self._acquire()

    def _acquire(self) -> None:
        if self.down.gone:
            return
        got = self.route.pool.acquire()
        if isinstance(got, UpstreamConnection):  # an idle pooled connection: no waiting
            self._attached(got)
        else:
            self.waiting = got
            got.addCallbacks(self._attached, self._fail_failure)

    def _fail_failure(self, failure: Failure) -> None:
        self.waiting = None
        forget_traceback(failure)
        if failure.check(defer.CancelledError):
            return
        if isinstance(failure.value, ProxyError):
            self.fail(failure.value)
        else:
            self.route.log.failure("unexpected error before upstream", failure)
            self.fail(ProxyError(502, "bad_gateway", "internal error reaching the upstream"))

    def _attached(self, up: UpstreamConnection) -> None:
        self.waiting = None
        if self.down.gone or self.response_done:
            self.route.pool.release(up, reusable=True)  # fresh and unused: keep it
            return
        self.up = up
        self.up_address = up.label
        up.exchange = self
        head = self.head
        framing = (
            b"Transfer-Encoding: chunked\r\n"
            if self.up_chunked
            else (
                b"Content-Length: %d\r\n" % head.content_length
                if head.content_length is not None
                else b""
            )
        )
        parts = [head.method, b" ", self.target, b" HTTP/1.1\r\n"]
        for name, value in self.headers_out:
            parts += (name, b": ", value, b"\r\n")
        for name, value in self.extra:
            parts += (name, b": ", value, b"\r\n")
        parts += (framing, b"\r\n")
        buffered = self.body_buffer or ()
        self.body_buffer = None
        for data in buffered:
            parts.append(chunk(data) if self.up_chunked else data)
        if self.request_done and self.up_chunked:
            parts.append(LAST_CHUNK)
        # From here on bytes may reach the upstream: this request is never sent again.
        self._up_write(b"".join(parts))
        up.deadline = self.down.clock.seconds() + self.route.timeouts.response
        self.down.resume("waiting-upstream")
        if self.down.write_paused:
            up.pause("client-full")

    def request_body(self, data: bytes) -> None:
        if self.response_done and self.error is None and not self.request_done:
            self._drop_body(data)
            return
        if self.response_done or self.error is not None:
            return
        self.body_seen += len(data)
        self.down.deadline += len(data) / self.route.limits.min_body_rate
        if self.body_seen > self.route.limits.max_body_bytes:
            self.error = ProxyError(
                413,
                "payload_too_large",
                f"request body over {self.route.limits.max_body_bytes} bytes",
            )
            if self.up is not None:  # part of it went out: the upstream must not see the rest
                up, self.up = self.up, None
                up.exchange = None
                up.abort()
            if self.response_started:  # too late for a 413: the client sees a broken response
                self.response_done = True
                self.down.abort(self)
            else:
                self.fail(self.error)
            return
        if self.local is not None:
            if self.body_seen > LOCAL_BODY_LIMIT:
                self.fail(ProxyError(413, "payload_too_large", "request body too large"))
            elif self.body_buffer is not None:
                self.body_buffer.append(data)
            return
        if self.up is not None:
            self._up_write(chunk(data) if self.up_chunked else data)
            self.up.deadline = self.down.clock.seconds() + self.route.timeouts.response
        elif self.body_buffer is not None:
            self.body_buffer.append(data)
            if self.body_seen > _BUFFER_HIGH:  # all of it is buffered until attached
                self.down.pause("waiting-upstream")

    def request_complete(self) -> None:
        self.request_done = True
        self.down.deadline = 0.0
        if self.local is not None and not self.response_done:
            self._answer_locally()
            return
        if self.up is not None:
            if self.up_chunked:
                self._up_write(LAST_CHUNK)
            self.up.deadline = self.down.clock.seconds() + self.route.timeouts.response
        if self.response_done:
            self.down.exchange_finished(self)

    def _up_write(self, data: bytes) -> None:
        """To the upstream, but only once every byte of the client's read is parsed: writes go
        out at once, so a head written mid-parse would be on the wire before the parser reached
        a framing error later in the same read (see Downstream.dataReceived)."""
        if self.down.parsing:
            if self.held is None:
                self.held = []
                self.down.holding.append(self)
            self.held.append(data)
        else:
            assert self.up is not None
            self.up.write(data)

    def _answer_locally(self) -> None:
        assert self.local is not None
        status, headers, body = self.local(self.head, b"".join(self.body_buffer or ()))
        self.body_buffer = None
        self.status = status
        self.response_done = True
        down = self.down
        down.write(response(status, headers, body, keep_alive=down.keep_alive))
        self.bytes_out = len(body)
        down.exchange_finished(self)

    # ---- response side (called by UpstreamConnection)
    def response_head(self, up: UpstreamConnection) -> None:
        self.response_started = True
        self.status = status = up.status
        down = self.down
        listed = up.listed  # "Connection: keep-alive" lists nothing HOP_BY_HOP lacks
        drop = HOP_BY_HOP if listed <= HOP_BY_HOP else HOP_BY_HOP | listed
        no_body = self.head.method == b"HEAD" or status in _NO_BODY_STATUS
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, up.reason or b"")]
        length: bytes | None = None
        chunked_in = False
        for lname, name, value in up.headers:
            if lname in drop:  # (Content-Length and Transfer-Encoding are in HOP_BY_HOP)
                if lname == b"content-length":
                    length = value
                elif lname == b"transfer-encoding":
                    chunked_in = True
            elif not lname.startswith(b"proxy-"):
                parts += (name, b": ", value, b"\r\n")
        if no_body:
            if length is not None:
                parts += (b"Content-Length: ", length, b"\r\n")
        elif length is not None and not chunked_in:
            parts += (b"Content-Length: ", length, b"\r\n")
        elif down.version_11:
            self.out_chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            down.keep_alive = False  # HTTP/1.0 client: the end of the body is the close
        if not chunked_in and length is None and not no_body:
            self.close_delimited = True
        if not down.keep_alive:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        down.write(b"".join(parts))
        up.deadline = down.clock.seconds() + self.route.timeouts.response
        if no_body and self.head.method == b"HEAD":
            up.reset_parser()
            self.response_complete()

    def response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.down.write(chunk(data) if self.out_chunked else data)
        if self.up is not None:
            self.up.deadline = self.down.clock.seconds() + self.route.timeouts.response

    def response_complete(self) -> None:
        if self.out_chunked:
            self.down.write(LAST_CHUNK)
        self.response_done = True
        up, self.up = self.up, None
        if up is not None:
            up.deadline = 0.0
            reusable = self.request_done and not self.close_delimited and up.keep_alive
            self.route.pool.release(up, reusable)
        if not self.request_done:
            # The upstream answered before the request body ended (nginx's `return` does):
            # the rest of the body is read and dropped, within the body's limits and deadline,
            # and the connection then serves the next request, as nginx does. Closing it
            # instead would cut a client that already read a keep-alive response.
            return
        self.down.exchange_finished(self)

    def _drop_body(self, data: bytes) -> None:
        """The rest of a request body whose response is already complete."""
        self.body_seen += len(data)
        self.down.deadline += len(data) / self.route.limits.min_body_rate
        if self.body_seen > self.route.limits.max_body_bytes:
            self.down.keep_alive = False  # no more of it is read: the connection closes
            self.down.exchange_finished(self)

    def upstream_lost(self, reason: Failure) -> None:
        self.up = None
        if self.response_started and self.close_delimited and reason.check(error.ConnectionDone):
            self.response_complete()
            return
        if self.response_started:
            self.route.log.warn(
                "{route}: upstream {address} closed mid-response: {why}",
                route=self.route.name,
                address=self.up_address,
                why=reason.getErrorMessage(),
            )
            self.response_done = True
            self.down.abort(self)
            return
        self.fail(
            ProxyError(
                502,
                "upstream_closed",
                "the upstream closed the connection before answering; "
                "the request was not retried (it may have been received)",
            )
        )

    def upstream_failed(self, err: ProxyError) -> None:
        self.up = None
        if self.response_started:
            self.response_done = True
            self.down.abort(self)
        else:
            self.fail(err)

    def upstream_full(self, full: bool) -> None:
        """The upstream's write buffer is over (or back under) its mark: stop reading the body."""
        if full:
            self.down.pause("upstream-full")
        else:
            self.down.resume("upstream-full")

    def upstream_timeout(self) -> None:
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            up.abort()
        if self.response_started:
            self.response_done = True
            self.down.abort(self)
        else:
            self.fail(
                ProxyError(
                    504,
                    "upstream_timeout",
                    f"no response from the upstream within {self.route.timeouts.response:g}s",
                )
            )

    # ---- errors answered by us
    def fail(self, err: ProxyError) -> None:
        if self.response_done:
            return
        if self.waiting is not None:
            w, self.waiting = self.waiting, None
            w.cancel()
        # kept on the exchange: its traceback's frames would hold the exchange in a cycle
        self.error = err = err.with_traceback(None)
        self.status = err.status
        self.response_done = True
        down = self.down
        if not self.request_done or err.status in (400, 408, 431):
            down.keep_alive = False  # framing unknown or body unread: close after this
        extra = self.route.error_headers(err)
        body = error_response(err, self.route.name, keep_alive=down.keep_alive, extra=extra)
        down.write(body)
        self.bytes_out = len(body) - body.index(b"\r\n\r\n") - 4  # the body, not the head
        self.route.rejected(self, err)
        if self.request_done or not down.keep_alive:
            down.exchange_finished(self)

    def abandon(self) -> None:
        """The downstream is gone: stop everything this exchange holds."""
        if self.waiting is not None:
            w, self.waiting = self.waiting, None
            w.cancel()
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            up.abort()


class _PausedTransport:
    """Registered on the downstream transport: its write buffer full -> stop reading upstream."""

    __slots__ = ("down",)

    def __init__(self, down: Downstream) -> None:
        self.down = down

    def pauseProducing(self) -> None:
        self.down.write_paused = True
        ex = self.down.exchange
        if ex is not None and ex.up is not None:
            ex.up.pause("client-full")

    def resumeProducing(self) -> None:
        down = self.down
        down.write_paused = False
        if down.closing:
            down.close_now()
            return
        ex = down.exchange
        if ex is not None and ex.up is not None:
            ex.up.resume("client-full")
        elif ex is None and down.queue:  # answers held back while the client did not read
            down.next_exchange()

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class Downstream(Protocol):
    """A connection from a client (the app for egress, the partner for ingress).

    Every state has a deadline (route.sweep enforces it): TLS handshake, request head, request
    body (an allowance plus a minimum rate), keep-alive idle, a client that does not read what
    we owe it, and the grace after our close. Nothing a peer does keeps a connection for ever.
    """

    transport: Any  # TCP, or TLS (ITLSTransport) for ingress

    def __init__(self, route: Any) -> None:
        self.route = route
        self.clock = route.clock
        # made on the first bytes of a request and dropped between requests: an idle
        # keep-alive connection holds no parser
        self.parser: Any = None
        self.parsing = False  # inside parser.feed_data: the parser must not be dropped
        self.exchange: Exchange | None = None
        self.current: Exchange | None = None  # the last request parsed, until it is answered
        self.had_request = False
        self.resting = False  # idle since its last response: the sweep releases its buffers
        # a list, not a deque: almost always empty, and a deque allocates a block up front
        self.queue: list[Exchange] = []
        self.keep_alive = True
        self.version_11 = True
        self.gone = False
        self.closing = False
        self.producing = False  # our producer is registered on the transport
        self.refusing = False  # input past a fatal error is not parsed into requests
        self.handshake_done = True
        self.handshake_timed_out = False
        self.paused = _READING
        self.write_paused = False
        self.deadline = 0.0
        self.in_head = False
        self.head_bytes = 0
        self.url = b""
        self.headers: list[Header] = []
        self.header_bytes = 0
        self.max_headers = route.limits.max_headers  # read per header field
        self.header_error: ProxyError | None = None
        self.peer: Any = None  # set by the route: e.g. the verified client certificate
        self.corked: list[bytes] | None = None
        self.raw: Any = None  # the TCP descriptor under TLS, closed with it
        self.peer_host = ""
        self.holding: list[Exchange] = []  # exchanges with upstream bytes held (see _up_write)
        self.closed_now = False  # our close is sent: waiting for the peer's
        self.close_unsent = 0  # bytes of ours the peer had not taken, when last looked at
        self.close_by = 0.0  # after our close, no more grace past this

    def connectionMade(self) -> None:
        self.raw = socket_of(self.transport)
        peer = self.transport.getPeer()
        self.peer_host = getattr(peer, "host", "") or "unix"
        timeouts = self.route.timeouts
        if ISSLTransport.providedBy(self.transport):
            self.handshake_done = False
            self.deadline = self.clock.seconds() + timeouts.handshake
        else:
            self.deadline = self.clock.seconds() + timeouts.header
        if self.route.connection_opened(self):
            self.transport.registerProducer(_PausedTransport(self), True)
            self.producing = True

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        if not self.closing and self.exchange is None:
            self.deadline = self.clock.seconds() + self.route.timeouts.header
        self.route.handshake_completed(self)

    def dataReceived(self, data: bytes) -> None:
        if self.refusing or self.closing:
            return
        if self.in_head or self.exchange is None:
            self.head_bytes += len(data)
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        self.parsing = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.parsing = False
            self._release_held(None)
            # CONNECT (answered 405) or an Upgrade request (forwarded without its Upgrade
            # header): the parser cannot go on, so this connection ends after that exchange.
            self.refusing = True
            self.pause("upgrade")
            if not self.queue:
                self.keep_alive = False
                if self.exchange is None:
                    self.close()
            return
        except httptools.HttpParserError as e:
            self.parsing = False
            # nothing of the request the error is in goes upstream from this read; what went
            # out from earlier reads is cut off by _bad (the upstream connection is aborted)
            self._release_held(self.current)
            self._bad(ProxyError(400, "bad_request", f"malformed HTTP request: {e}"))
            return
        finally:
            self.parsing = False
        if self.holding:
            self._release_held(None)
        if self.in_head and self.head_bytes > self.route.limits.max_header_bytes:
            self._bad(
                ProxyError(
                    431,
                    "headers_too_large",
                    f"request head over {self.route.limits.max_header_bytes} bytes",
                )
            )
            return
        if self.gone or (
            self.exchange is None and self.current is None and not self.in_head and not self.queue
        ):
            self.parser = None  # answered (see _rest) or closed while these bytes were parsed

    def _release_held(self, refused: Exchange | None) -> None:
        """Write what exchanges held for the upstream while a read was parsed; the refused
        one's bytes are dropped, as are those of an exchange that lost its upstream meanwhile."""
        holding, self.holding = self.holding, []
        for ex in holding:
            held, ex.held = ex.held, None
            if held and ex is not refused and ex.up is not None:
                ex.up.write(b"".join(held) if len(held) > 1 else held[0])

    def _bad(self, err: ProxyError) -> None:
        """Unparseable input: answer it after what is queued, then close; nothing more is read."""
        self.refusing = True
        self.pause("bad")
        ex = self.current if self.current is not None and not self.current.response_done else None
        if ex is not None and ex is not self.exchange:
            # a queued request whose own bytes are bad: it is answered with the error when its
            # turn comes, and nothing of it is ever sent upstream
            ex.error = err
            ex.request_done = True
            ex.body_buffer = None
            return
        if ex is None:
            ex = Exchange(self, RequestHead(b"-", b"-", b"1.1", [], None, False, False), err)
            if self.exchange is None and not self.queue:
                self.exchange = ex
            else:
                ex.request_done = True
                self.queue.append(ex)
                return
        self.keep_alive = False
        if ex.up is not None or ex.waiting is not None:
            ex.abandon()
        if ex.response_started:
            self.abort(ex)
        else:
            ex.request_done = True
            ex.fail(err)

    # ---- httptools callbacks
    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        self.header_error = None
        if self.exchange is None and not self.queue:
            # a total for the head: a running header deadline is never pushed back
            limit = self.clock.seconds() + self.route.timeouts.header
            self.deadline = min(self.deadline, limit) if self.deadline else limit

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        headers = self.headers
        if len(headers) < self.max_headers:
            headers.append((name.lower(), name, value))
        else:
            self.header_error = ProxyError(
                431, "headers_too_large", f"more than {self.max_headers} header fields"
            )

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        if self.refusing:
            return
        limit = self.route.limits.max_header_bytes
        if self.header_error is None and self.header_bytes + len(self.url) > limit:
            self.header_error = ProxyError(
                431, "headers_too_large", f"request head over {limit} bytes"
            )
        parser = self.parser
        version = parser.get_http_version()
        content_length: int | None = None
        chunked = False
        listed: frozenset[bytes] = frozenset()
        te: bytes | None = None
        expect = False
        for lname, _name, value in self.headers:
            if lname not in _FRAMING:
                continue
            if lname == b"content-length":
                content_length = int(value)
            elif lname == b"transfer-encoding":
                chunked = True
                te = value
            elif lname == b"connection":
                listed = listed | tokens_of(value) if listed else tokens_of(value)
            else:
                expect = True
        keep_alive = parser.should_keep_alive()
        head = RequestHead(
            parser.get_method(),
            self.url,
            b"1.1" if version == "1.1" else b"1.0",
            self.headers,
            content_length,
            chunked,
            keep_alive,
            listed,
            te,
            expect,
        )
        err = self.header_error
        queued = len(self.queue) + (self.exchange is not None)
        if err is None and queued > self.route.limits.max_pipelined:
            # A client that sends requests faster than it reads answers: refuse the rest.
            self.refusing = True
            self.pause("bad")
            err = ProxyError(
                503,
                "too_many_pipelined",
                f"more than {self.route.limits.max_pipelined} pipelined requests queued",
            )
        ex = Exchange(self, head, err)
        if (head.content_length is None and not chunked) or self.refusing:
            ex.request_done = True
        self.current = ex
        self.had_request = True
        if self.exchange is None and not self.queue and not self.write_paused:
            self._begin(ex)
        else:
            self.queue.append(ex)
            self.pause("pipelined")
            if self.exchange is None:  # held back until the client reads what it was sent
                self.deadline = self.clock.seconds() + self.route.timeouts.send

    def on_body(self, data: bytes) -> None:
        ex = self.current
        if ex is not None and not self.refusing:
            if ex is self.exchange or ex.body_buffer is None:
                ex.request_body(data)
            else:
                ex.body_buffer.append(data)

    def on_message_complete(self) -> None:
        ex = self.current
        if ex is not None and not ex.request_done:
            if ex is self.exchange:
                ex.request_complete()
            else:
                ex.request_done = True

    # ---- exchange lifecycle
    def _begin(self, ex: Exchange) -> None:
        self.exchange = ex
        timeouts = self.route.timeouts
        # a body still to come must arrive within its allowance plus 1 s per min_body_rate
        self.deadline = 0.0 if ex.request_done else self.clock.seconds() + timeouts.body
        self.keep_alive = ex.head.keep_alive and self.keep_alive and not self.route.draining
        if self.refusing and not self.queue:  # the last answer on this connection
            self.keep_alive = False
        self.version_11 = ex.head.version == b"1.1"
        ex.start()

    def next_exchange(self) -> None:
        nxt = self.queue.pop(0)
        if not self.queue:
            self.resume("pipelined")
        self._begin(nxt)

    def exchange_finished(self, ex: Exchange) -> None:
        if ex is not self.exchange:
            return
        self.exchange = None
        self.route.finished(ex, self)
        if self.gone or self.closing:
            return
        if not self.keep_alive or self.route.draining or (self.refusing and not self.queue):
            self.close()
            return
        if self.queue:
            if self.write_paused:  # the client is not reading: answer the next when it does
                self.deadline = self.clock.seconds() + self.route.timeouts.send
            else:
                self.next_exchange()
            return
        self.deadline = self.clock.seconds() + self.route.timeouts.idle
        self._rest()

    def _rest(self) -> None:
        """Idle between requests: hold nothing of the last one. A keep-alive connection may
        stay idle for minutes, by thousands: its last exchange (head, headers, the headers sent
        upstream), the parser and TLS buffers grown by past traffic would all stay with it.
        The TLS buffers go at the route's next sweep (see release_idle): given back after every
        response, they would be grown again by the next request on a busy connection, at about
        8 us a request."""
        self.current = None
        if not self.in_head:  # else the next head is arriving: its url and headers so far
            self.url = b""
            self.headers = []
            if not self.parsing:  # else dataReceived drops it once feed_data returns
                self.parser = None
        self.resting = True

    def release_idle(self) -> None:
        """From the route's sweep: a connection still idle gives back its TLS buffers."""
        self.resting = False
        if self.exchange is None and not self.in_head and not self.queue and not self.gone:
            release = getattr(self.transport, "release_buffers", None)
            if release is not None:
                release()

    def abort(self, ex: Exchange) -> None:
        """The response cannot be completed: the client must see a broken connection."""
        if self.exchange is ex:
            self.exchange = None
            self.route.finished(ex, self)
        self.keep_alive = False
        self.transport.abortConnection()

    def timed_out(self, now: float) -> None:
        self.deadline = 0.0
        if self.closed_now:
            self._close_grace_over(now)
            return
        if self.closing or not self.handshake_done:
            # our close waited for a client that does not read, or the TLS handshake stalled
            self.handshake_timed_out = not self.handshake_done and not self.closing
            self.transport.abortConnection()
            return
        ex = self.exchange
        if ex is not None:
            if ex.response_done and not ex.request_done:  # a dropped body, too slow: close
                self.keep_alive = False
                self.exchange_finished(ex)
                return
            if ex.request_done or ex.response_done:
                return
            if self.paused - {"pipelined"}:  # we are not reading: the client is not to blame
                self.deadline = now + self.route.timeouts.body
                return
            rate = self.route.limits.min_body_rate
            err = ProxyError(
                408,
                "request_timeout",
                f"request body slower than {rate} bytes/s after "
                f"{self.route.timeouts.body:g}s ({ex.body_seen} bytes received)",
            )
            if ex.response_started:
                ex.response_done = True
                self.abort(ex)
            else:
                ex.abandon()
                ex.fail(err)
            return
        if self.queue:  # answers held back for a client that stopped reading
            self.transport.abortConnection()
            return
        if self.in_head:
            ex = Exchange(self, RequestHead(b"-", b"-", b"1.1", [], None, False, False), None)
            self.exchange = ex
            ex.request_done = True
            self.refusing = True
            ex.fail(
                ProxyError(
                    408,
                    "request_timeout",
                    f"request head not received within {self.route.timeouts.header:g}s",
                )
            )
        else:
            self.close()

    def drain(self) -> None:
        """Stop after the exchange in flight. An idle keep-alive connection closes now; one whose
        first request is not in yet (just accepted, or mid-handshake) is answered once, then
        closed: its client sent nothing it could retry on a connection we cut."""
        self.keep_alive = False
        idle = self.exchange is None and not self.in_head and not self.queue
        if idle and self.had_request:
            self.close()

    # ---- transport helpers
    def write(self, data: bytes) -> None:
        if self.gone:
            return
        if self.corked is not None:
            self.corked.append(data)
        else:
            self.transport.write(data)

    def cork(self) -> None:
        """Collect writes until uncork(): one TLS record (one send) for head and body."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        out, self.corked = self.corked, None
        if out and not self.gone:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def close(self) -> None:
        """Close after what is written reaches the client, within bounded time whatever the
        client does: a client that reads nothing is cut after send_timeout, one that does not
        answer our close after close_grace."""
        self.uncork()
        if self.closing or self.gone:
            return
        self.closing = True
        self.keep_alive = False
        self.pause("closing")
        if not self.handshake_done:  # nothing of ours can reach a peer without a session
            self.transport.abortConnection()
        elif self.write_paused:
            self.deadline = self.clock.seconds() + self.route.timeouts.send
        else:
            self.close_now()

    def close_now(self) -> None:
        """Send what is queued and our close: close_notify under TLS, then TCP's FIN once it is
        flushed (a write shutdown, so the client reads the whole response and then EOF). The
        connection then reads again, dropping what comes, only to see the peer's close_notify or
        FIN, and closes on either at once; a peer that does neither is closed at close_grace
        (see _close_grace_over). The producer is unregistered first: Twisted's TLS postpones
        its shutdown until it is."""
        if self.gone:
            return
        if self.producing:
            self.producing = False
            self.transport.unregisterProducer()
        self.closed_now = True
        tcp = self.raw
        if tcp is not None and tcp is not self.transport:  # TLS over TCP
            self.transport.loseConnection()  # our close_notify, into TCP's buffer
            if not tcp.disconnecting:  # (the peer's close_notify, already in, closed TCP)
                tcp.loseWriteConnection()  # FIN once close_notify and all before it are sent
        elif tcp is not None:
            tcp.loseWriteConnection()
        else:  # a transport no reactor drives (tests)
            self.transport.loseConnection()
        if tcp is not None and self.paused and not self.gone:  # read again: the peer's close
            # (its close_notify or FIN) is what we wait for
            self.paused = _READING
            self.transport.resumeProducing()
        now = self.clock.seconds()
        self.deadline = now + self.route.timeouts.close_grace
        self.close_by = now + self.route.timeouts.send
        self.close_unsent = unsent(tcp) if tcp is not None else 0

    def _close_grace_over(self, now: float) -> None:
        """close_grace after our close: a peer still taking our bytes gets another grace (up to
        send_timeout after our close); one that took them all is closed (FIN already sent:
        nothing lost); one that stopped reading is aborted."""
        tcp = self.raw
        if tcp is None or self.gone:
            self.transport.abortConnection()
            return
        left = unsent(tcp)
        # taking our bytes, and not for longer than a client may take them (send_timeout): a
        # reader slow on purpose does not hold its slot for ever
        reading = left < self.close_unsent and now < self.close_by
        if left and reading:
            self.close_unsent = left
            self.deadline = now + self.route.timeouts.close_grace
        elif left:
            self.transport.abortConnection()
        else:
            tcp.loseConnection()

    def pause(self, reason: str) -> None:
        if not self.paused and not self.gone:
            self.transport.pauseProducing()
        self.paused = self.paused | {reason}

    def resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused = self.paused - {reason} or _READING
            if not self.paused and not self.gone:
                self.transport.resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.abandon()
            if not ex.response_done:
                ex.status = 499  # the client went away before the response was complete
                self.route.finished(ex, self)
        for queued in self.queue:
            queued.abandon()
        self.queue.clear()
        # Nothing of the connection outlives it by a cycle (the parser's callbacks are this
        # protocol's bound methods; the last exchange points back here): with the collector's
        # high thresholds, cycles wait for a full collection and the heap grows in steps.
        self.current = None
        self.headers = []
        if not self.parsing:  # else dataReceived drops it once feed_data returns
            self.parser = None
        self.route.connection_closed(self, reason)
        forget_traceback(reason)


class DownstreamFactory(Factory):
    noisy = False

    def __init__(self, route: Any) -> None:
        self.route = route

    def buildProtocol(self, addr: Any) -> Downstream:
        return Downstream(self.route)
