"""Admin listener: /healthz, /readyz, /metrics, /status and the page at / (twisted.web: it is
off the data path)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from proxy.ops import page


class State(Protocol):
    """What the admin listener reads of the running service."""

    def readiness(self) -> list[str]:
        """Why the service is not ready to take traffic; empty when it is."""
        ...

    def status(self) -> dict[str, Any]:
        """What it holds: config (secrets redacted), certificates, tokens, upstreams."""
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
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        reasons = self.sidecar.readiness()
        if reasons:
            request.setResponseCode(503)
        return json.dumps({"ready": not reasons, "reasons": reasons}).encode() + b"\n"


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
    state: State, registry: CollectorRegistry, clock: Callable[[], float] = time.time
) -> Any:
    root = Resource()
    root.putChild(b"", _Status(state, clock, page=True))
    root.putChild(b"healthz", _Health())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", _Ready(state))
    root.putChild(b"status", _Status(state, clock))
    root.putChild(b"metrics", _Metrics(registry))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
