"""Egress through an HTTP forward proxy: `CONNECT host:port` by name, then TLS in the tunnel.

The upstream's name, never an address, goes in the CONNECT request: the proxy resolves it, on
every new connection (each one is a new CONNECT), so DNS freshness is the proxy's job. Our TLS
starts only once the proxy answered 2xx, over the same TCP connection; everything after that
(verification, the name check, resumption, the pool) is as without a proxy.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy import config as cfg
from proxy.tls.contexts import MaterialError, tls_factory

MAX_ANSWER_HEAD = 16 * 1024  # a proxy's answer to CONNECT: a status line and a few headers
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?$")


def read_proxy_auth(path: Path) -> bytes:
    """The Proxy-Authorization value from a file holding one line `user:password`.
    Errors name the file, never what is in it."""
    what = f"proxy_auth_file {path}"
    try:
        text = path.read_bytes()
    except OSError as e:
        raise MaterialError(f"{what}: cannot read: {e.strerror or e}") from None
    lines = text.rstrip(b"\r\n").split(b"\n")
    if len(lines) != 1 or not lines[0]:
        raise MaterialError(f"{what}: expected exactly one line 'user:password'")
    line = lines[0].rstrip(b"\r")
    user, colon, _password = line.partition(b":")
    if not colon or not user:
        raise MaterialError(f"{what}: expected 'user:password' (no ':' after a user name)")
    if any(b < 0x20 or b == 0x7F for b in line):
        raise MaterialError(f"{what}: holds control characters")
    return b"Basic " + base64.b64encode(line)


def proxy_auth(forward: cfg.ForwardProxy) -> bytes | None:
    return read_proxy_auth(forward.auth_file) if forward.auth_file is not None else None


def hop_for(forward: cfg.ForwardProxy | None) -> ProxyHop | None:
    """A route's forward proxy with its credentials read (MaterialError naming the file)."""
    if forward is None:
        return None
    return ProxyHop(forward.host, forward.port, proxy_auth(forward))


class ProxyHop:
    """One route's forward proxy. `authorization` is swapped in place when its file changes."""

    def __init__(self, host: str, port: int, authorization: bytes | None = None) -> None:
        self.host, self.port = host, port
        self.authorization = authorization
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"

    def __str__(self) -> str:
        return self.url

    def request(self, host: str, port: int) -> bytes:
        """The CONNECT request for host:port (a name: the proxy resolves it)."""
        name = host.encode("idna") if not _is_ipv6(host) else b"[%s]" % host.encode("ascii")
        target = b"%s:%d" % (name, port)
        lines = [b"CONNECT %s HTTP/1.1" % target, b"Host: " + target]
        if self.authorization is not None:
            lines.append(b"Proxy-Authorization: " + self.authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _is_ipv6(host: str) -> bool:
    return ":" in host


class TunnelError(Exception):
    """The proxy did not open the tunnel: `code` is the app's error code, `detail` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def quoted(line: bytes, limit: int = 200) -> str:
    text = line.decode("latin-1")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


class Tunnel(Protocol):
    """Sends CONNECT, reads the proxy's answer head, then hands the TCP connection to the
    protocol `build()` makes (our TLS), relaying every later byte and the close to it."""

    def __init__(
        self,
        hop: ProxyHop,
        host: str,
        port: int,
        build: Callable[[], Any],
        failed: Callable[[TunnelError], None],
        opened: Callable[[Any], None] = lambda inner: None,
        max_head: int = MAX_ANSWER_HEAD,
    ) -> None:
        self.hop, self.host, self.port = hop, host, port
        self.build, self.failed, self.opened = build, failed, opened
        self.max_head = max_head
        self.buffer = b""
        self.inner: Any = None
        self.done = False  # the answer was read (tunnel open) or the tunnel failed
        self.answer = ""  # the proxy's status line, quoted
        self.transport: Any = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def connectionMade(self) -> None:
        self.transport.write(self.hop.request(self.host, self.port))

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.done:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > self.max_head:
                self._fail(
                    "bad_gateway", f"answered CONNECT with a head over {self.max_head} bytes"
                )
            return
        head, rest = self.buffer[:end], self.buffer[end + 4 :]
        self.buffer = b""
        line = head.split(b"\r\n", 1)[0]
        match = _STATUS.match(line)
        if match is None:
            self._fail(
                "bad_gateway", f"answered CONNECT with no HTTP status line: {quoted(line)!r}"
            )
            return
        self.answer = quoted(line)
        status = int(match.group(1))
        if not 200 <= status < 300:
            self._fail("proxy_refused", f"refused CONNECT {self.target}: {self.answer}")
            return
        self.done = True
        self.inner = self.build()
        self.inner.makeConnection(self.transport)
        self.opened(self.inner)
        if rest:
            self.inner.dataReceived(rest)

    def _fail(self, code: str, why: str) -> None:
        self.done = True
        self.failed(TunnelError(code, f"proxy {self.hop} {why}"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.done:
            self.done = True
            self.failed(
                TunnelError(
                    "proxy_refused",
                    f"proxy {self.hop} closed the connection before answering CONNECT "
                    f"{self.target}",
                )
            )

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()


class _TunnelFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], Tunnel]) -> None:
        self.make = make
        self.tunnel: Tunnel | None = None

    def buildProtocol(self, addr: Any) -> Tunnel:
        self.tunnel = self.make()
        return self.tunnel


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """A TLS connection to host:port through the proxy, for twisted.web's Agent: connects to
    the proxy with `proxy_endpoint`, opens the tunnel, then runs `creator`'s TLS in it. The
    Deferred fires with the protocol once the tunnel is open; the connect timeout covers the
    proxy's answer too."""

    def __init__(
        self,
        clock: Any,
        proxy_endpoint: IStreamClientEndpoint,
        hop: ProxyHop,
        host: str,
        port: int,
        creator: Any,
        timeout: float,
    ) -> None:
        self.clock, self.proxy_endpoint, self.hop = clock, proxy_endpoint, hop
        self.host, self.port, self.creator, self.timeout = host, port, creator, timeout

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        wrapped = tls_factory(self.creator, True, protocolFactory)
        done: defer.Deferred[Any] = defer.Deferred(lambda d: abort())
        factory = _TunnelFactory(
            lambda: Tunnel(
                self.hop,
                self.host,
                self.port,
                build=lambda: wrapped.buildProtocol(None),
                failed=lambda e: finish(None, e),
                opened=lambda inner: finish(inner.wrappedProtocol, None),
            )
        )
        timer = self.clock.callLater(self.timeout, lambda: timed_out())

        def finish(result: Any, problem: Exception | None) -> None:
            if timer.active():
                timer.cancel()
            if done.called:
                return
            if problem is not None:
                done.errback(problem)
            else:
                done.callback(result)

        def abort() -> None:
            if timer.active():
                timer.cancel()
            if factory.tunnel is not None:
                factory.tunnel.abort()
            elif not dialing.called:
                dialing.cancel()

        def timed_out() -> None:
            where = "answer CONNECT" if factory.tunnel is not None else "accept the connection"
            finish(
                None,
                TunnelError(
                    "proxy_unreachable" if factory.tunnel is None else "upstream_timeout",
                    f"proxy {self.hop} did not {where} within {self.timeout:g} s",
                ),
            )
            abort()

        def unreachable(f: Failure) -> None:
            if not done.called:
                finish(None, TunnelError("proxy_unreachable", unreachable_text(self.hop, f.value)))

        dialing = self.proxy_endpoint.connect(factory)
        dialing.addErrback(unreachable)
        return done


def unreachable_text(hop: ProxyHop, e: BaseException | None) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(e, error.TimeoutError):
        why = "timed out"
    elif isinstance(e, error.DNSLookupError):
        why = f"DNS: no address for {hop.host}"
    else:
        why = str(e) or type(e).__name__
    return f"cannot connect to proxy {hop}: {why}"
