"""Admin listener: /healthz, /readyz, /metrics (twisted.web: it is off the data path)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from proxy.service import Sidecar


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class _Ready(Resource):
    isLeaf = True

    def __init__(self, sidecar: Sidecar) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.sidecar = sidecar

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if self.sidecar.draining:
            request.setResponseCode(503)
            return b"draining\n"
        if not self.sidecar.ready:
            request.setResponseCode(503)
            return b"starting\n"
        return b"ready\n"


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, sidecar: Sidecar) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.sidecar = sidecar

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        out: bytes = generate_latest(self.sidecar.metrics.registry)
        return out


def admin_site(sidecar: Sidecar) -> Any:
    root = Resource()
    root.putChild(b"healthz", _Health())  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", _Ready(sidecar))
    root.putChild(b"metrics", _Metrics(sidecar))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
