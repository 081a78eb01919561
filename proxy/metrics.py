"""Prometheus metrics, one registry per process; names are part of the product contract."""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@attrs.define
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    handshake_errors: Counter
    certificate_expiry: Gauge
    reloads: Counter
    connections_open: Gauge
    upstream_connects: Counter
    oauth_token_fetches: Counter
    oauth_token_failures: Counter
    oauth_token_expiry: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        p = "mtls_sidecar_"
        return cls(
            registry=r,
            requests=Counter(
                p + "requests", "Requests answered.", ["route", "direction", "code"], registry=r
            ),
            request_duration=Histogram(
                p + "request_duration_seconds",
                "Time from request head to end of response.",
                ["route", "direction"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                registry=r,
            ),
            handshake_errors=Counter(
                p + "tls_handshake_errors",
                "TLS handshakes that failed, by route and reason.",
                ["route", "reason"],
                registry=r,
            ),
            certificate_expiry=Gauge(
                p + "certificate_expiry_timestamp_seconds",
                "notAfter of the certificate in use, Unix time.",
                ["route", "role"],
                registry=r,
            ),
            reloads=Counter(
                p + "reloads", "Key material reloads by result.", ["result"], registry=r
            ),
            connections_open=Gauge(
                p + "connections_open",
                "Open connections by route and side.",
                ["route", "side"],
                registry=r,
            ),
            upstream_connects=Counter(
                p + "upstream_connects",
                "New upstream connections by route and result.",
                ["route", "result"],
                registry=r,
            ),
            oauth_token_fetches=Counter(
                p + "oauth_token_fetches", "OAuth token fetches.", ["route"], registry=r
            ),
            oauth_token_failures=Counter(
                p + "oauth_token_failures",
                "OAuth token fetches that failed.",
                ["route"],
                registry=r,
            ),
            oauth_token_expiry=Gauge(
                p + "oauth_token_expiry_seconds",
                "Seconds until the cached OAuth token expires.",
                ["route"],
                registry=r,
            ),
        )
