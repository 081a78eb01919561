"""Admin listener: /healthz, /readyz, /readyz/<route>, /metrics, /status (twisted.web: it is off
the data path)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

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
    isLeaf = True

    def __init__(self, state: State) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.state = state

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.state.status(), indent=2, default=str).encode() + b"\n"


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        out: bytes = generate_latest(self.registry)
        return out


def admin_site(state: State, registry: CollectorRegistry) -> Any:
    root = Resource()
    root.putChild(b"healthz", _Health())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", _Ready(state))
    root.putChild(b"status", _Status(state))
    root.putChild(b"metrics", _Metrics(registry))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
