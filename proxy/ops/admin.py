"""Admin listener: /healthz, /readyz, /readyz/<route>, /metrics (twisted.web: it is off the data
path), and /status and the page at / only to the peers in [admin] status_from (they name files,
issuers, key ids)."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from proxy.ops import page
from proxy.ops.health import Check, render_checks


class State(Protocol):
    """What the admin listener reads of the running service."""

    def readiness(self) -> list[str]:
        """Why the service is not ready to take traffic; empty when it is."""
        ...

    def status(self) -> dict[str, Any]:
        """What it holds: config (secrets redacted), certificates, tokens, upstreams."""
        ...

    def readiness_checks(self, route: str | None = None) -> list[Check] | None:
        """The checks of /readyz (route None) or /readyz/<route>; None: no such route."""
        ...


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class _Ready(Resource):
    isLeaf = True

    def __init__(self, state: State) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.sidecar = state

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        code, kind, body = readyz_answer(self.sidecar.readiness_checks, request)
        request.setResponseCode(code)
        request.setHeader(b"content-type", kind)
        return body


def readyz_target(request: Request) -> tuple[str | None, bool]:
    """(route or None for the pod, verbose) from /readyz[/<route>][?verbose]."""
    parts = [p for p in request.postpath or [] if p]
    route = parts[0].decode("utf-8", "replace") if parts else None
    query = (request.uri or b"").partition(b"?")[2]
    verbose = any(p.partition(b"=")[0] == b"verbose" for p in query.split(b"&"))
    return route, verbose


def readyz_answer(
    checks_of: Callable[[str | None], list[Check] | None], request: Request
) -> tuple[int, bytes, bytes]:
    route, verbose = readyz_target(request)
    checks = checks_of(route)
    if checks is None:
        body = json.dumps({"error": "unknown_route", "route": route}).encode() + b"\n"
        return 404, b"application/json", body
    return render_checks(checks, verbose, "readyz" if route is None else f"readyz {route}")


class _Status(Resource):
    """/status (JSON) and / (the same report as a page for people): one handler, one gate."""

    isLeaf = True

    def __init__(self, state: State, clock: Callable[[], float], page: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.state = state
        self.clock = clock
        self.page = page

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if self.page:
            code, kind, body = status_page(request.args, self.state.status(), self.clock())
            request.setResponseCode(code)
            request.setHeader(b"content-type", kind)
            return body
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.state.status(), indent=2, default=str).encode() + b"\n"


class PeerGate(Resource):
    """Answers with `inner` only to peers in `allowed` (a unix-socket peer passes: the socket's
    file mode guards it); anyone else gets 403 JSON and nothing of what `inner` holds."""

    isLeaf = True

    def __init__(self, inner: Resource, allowed: Sequence[Any]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner, self.allowed = inner, tuple(allowed)

    def render(self, request: Request) -> Any:
        if peer_allowed(request.getClientAddress(), self.allowed):
            return self.inner.render(request)  # type: ignore[no-untyped-call]
        request.setResponseCode(403)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        detail = "this address is not in [admin] status_from"
        return json.dumps({"error": "forbidden", "detail": detail}).encode() + b"\n"


def peer_allowed(address: Any, allowed: Sequence[Any]) -> bool:
    host = getattr(address, "host", None)
    if host is None:
        return True  # a unix socket
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return any(ip.version == net.version and ip in net for net in allowed)


def status_page(
    args: dict[bytes, list[bytes]], status: dict[str, Any], now: float
) -> tuple[int, bytes, bytes]:
    """(code, content type, body) of the HTML page for a /status report; 400 for a bad ?refresh=."""
    try:
        refresh = page.refresh_seconds(args.get(b"refresh"))
    except page.RefreshError as e:
        return 400, b"text/plain; charset=utf-8", f"{e}\n".encode()
    return 200, b"text/html; charset=utf-8", page.render(status, now, refresh)


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        out: bytes = generate_latest(self.registry)
        return out


def admin_site(
    state: State,
    registry: CollectorRegistry,
    status_from: Sequence[Any],
    clock: Callable[[], float] = time.time,
) -> Any:
    root = Resource()
    root.putChild(b"", PeerGate(_Status(state, clock, page=True), status_from))
    root.putChild(b"healthz", _Health())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", _Ready(state))
    root.putChild(b"status", PeerGate(_Status(state, clock), status_from))
    root.putChild(b"metrics", _Metrics(registry))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
