"""Egress: plain HTTP from the local app -> mutual TLS to the partner (e.g. Thales D1).

Origin-form requests go to the route's upstream; absolute-form ones (an app with HTTP_PROXY set)
only when they name the upstream's own host: never an open proxy.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer

from proxy.config import EgressRoute as EgressConfig
from proxy.routes.route import Route
from proxy.wire.http import HOP_BY_HOP, ProxyError, RequestHead
from proxy.wire.relay import Downstream, Exchange

# Never toward the partner: our internal addresses and proxy bookkeeping.
INTERNAL = frozenset(
    {b"host", b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto",
     b"x-forwarded-port", b"x-real-ip", b"via", b"expect"}
)  # fmt: skip
CORRELATION = b"x-correlation-id"


_CORRELATION_PREFIX = os.urandom(10).hex()
_correlation_counter = itertools.count(int.from_bytes(os.urandom(4)))


def new_correlation_id() -> bytes:
    """D1's pattern ^[A-Za-z0-9_-]{1,64}$: 32 hex characters, a random per-process prefix and a
    counter (unique in the process, never derived from request data, no syscall per call)."""
    return f"{_CORRELATION_PREFIX}{next(_correlation_counter) & 0xFFFFFFFFFFFF:012x}".encode()


def _host_header(config: EgressConfig) -> str:
    """The upstream's authority; with `upstream` an IP address and `server_name` set, the name
    instead: the partner's virtual host is chosen by name, as the certificate is."""
    up, name = config.upstream, config.server_name
    if name and _is_address(up.host):
        return name if up.port == 443 else f"{name}:{up.port}"
    return up.authority


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Egress(Route):
    direction = "egress"

    def __init__(self, config: EgressConfig, *, token_source: Any = None, **kw: Any) -> None:
        super().__init__(name=config.name, limits=config.limits, timeouts=config.timeouts, **kw)
        self.config = config
        up = config.upstream
        self.host_header = _host_header(config).encode("idna")
        self.base_path = up.base_path.encode()
        self.upstream_host = up.host.lower()
        self.upstream_port = up.port
        self.token_source = token_source
        self.fault: ProxyError | None = None  # set while a lapsed certificate holds it down
        self.replace_authorization = config.oauth is not None and (
            config.oauth.authorization == "replace"
        )
        # never forwarded: hop-by-hop, internal, and the app's Authorization when we set ours
        self.drop = (
            HOP_BY_HOP | INTERNAL | ({b"authorization"} if self.replace_authorization else set())
        )

    def prepare(
        self, head: RequestHead, down: Downstream
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if self.fault is not None:
            raise self.fault
        target = head.target
        if not target.startswith(b"/"):
            target = self._absolute_form(target)
        listed = head.listed  # "Connection: keep-alive" lists nothing self.drop lacks
        drop = self.drop if listed <= self.drop else self.drop | listed
        out: list[tuple[bytes, bytes]] = [(b"Host", self.host_header)]
        has_correlation = False
        hosts = 0
        for lname, name, value in head.headers:
            if lname in drop or lname.startswith(b"proxy-"):
                hosts += lname == b"host"
                continue
            if lname == CORRELATION:
                has_correlation = True
            out.append((name, value))
        if hosts > 1:  # RFC 9112 3.2: a server answers 400 to more than one Host
            raise ProxyError(400, "bad_request", "more than one Host header")
        if self.tracer is not None:
            trace_id = self.traced(head, down, out)
            if not has_correlation:  # so the partner's support and our traces meet
                out.append((b"x-correlation-id", trace_id.encode()))
        elif not has_correlation:
            out.append((b"x-correlation-id", new_correlation_id()))
        return self.base_path + target, out

    def _absolute_form(self, target: bytes) -> bytes:
        if target == b"*":
            raise ProxyError(400, "bad_request", "asterisk-form is not supported")
        try:
            parts = urlsplit(target.decode("ascii"))
            port = parts.port
        except (UnicodeDecodeError, ValueError):
            raise ProxyError(400, "bad_request", "malformed request target") from None
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ProxyError(400, "bad_request", "request target must be /path or http://host/path")
        default = 443 if parts.scheme == "https" else 80
        if host != self.upstream_host or (port not in (None, default, self.upstream_port)):
            shown = f"{host}:{port}" if port else host
            raise ProxyError(
                403,
                "forbidden_host",
                f"{shown} is not this route's upstream ({self.config.upstream.authority}); "
                "not an open proxy",
            )
        path = parts.path or "/"
        return (path + (f"?{parts.query}" if parts.query else "")).encode("ascii")

    def before_upstream(self, ex: Exchange) -> defer.Deferred[list[tuple[bytes, bytes]]] | None:
        source = self.token_source
        if source is None:
            return None
        if not self.replace_authorization and ex.head.get(b"authorization") is not None:
            return None
        headers: defer.Deferred[list[tuple[bytes, bytes]]] = source.headers()
        return headers.addCallback(self._still_up)

    def _still_up(self, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The certificate may have lapsed while the token was awaited."""
        if self.fault is not None:
            raise self.fault
        return extra

    def finished(self, ex: Exchange, down: Downstream) -> None:
        if ex.status == 401 and self.token_source is not None and ex.extra:
            self.token_source.rejected(ex.extra)
        super().finished(ex, down)
