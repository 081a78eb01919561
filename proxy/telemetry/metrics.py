"""Prometheus metrics, one registry per process; names are part of the product contract."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# label values known in advance: exported at 0 from the first scrape, so increase() sees a first one
RELOAD_RESULTS = ("success", "failure")
ACCEPT_ERROR_REASONS = ("emfile", "enfile", "enobufs", "enomem")
INGRESS_HANDSHAKE_REASONS = (
    "certificate_expired", "certificate_not_yet_valid", "certificate_untrusted",
    "no_client_certificate", "protocol_version", "no_shared_cipher", "handshake_timeout",
    "handshake_failed",
)  # fmt: skip
EGRESS_HANDSHAKE_REASONS = (
    "certificate_expired", "certificate_not_yet_valid", "hostname_mismatch",
    "certificate_untrusted", "protocol_version", "timeout", "peer_closed", "handshake_failed",
)  # fmt: skip

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RouteStats:
    """Per-route request counts and durations as plain numbers: recording one request is a few
    additions on the hot path; the Prometheus families are built only when /metrics is read."""

    __slots__ = ("buckets", "codes", "count", "direction", "route", "total")

    def __init__(self, route: str, direction: str) -> None:
        self.route, self.direction = route, direction
        self.codes: dict[int, int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def record(self, status: int, seconds: float) -> None:
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds

    def count_only(self, status: int) -> None:
        """A request answered before any timing made sense (e.g. refused at accept)."""
        self.codes[status] = self.codes.get(status, 0) + 1


class _RequestCollector(Collector):
    def __init__(self, stats: list[RouteStats]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "mtls_sidecar_requests", "Requests answered.", labels=["route", "direction", "code"]
        )
        durations = HistogramMetricFamily(
            "mtls_sidecar_request_duration_seconds",
            "Time from request head to end of response.",
            labels=["route", "direction"],
        )
        for s in self.stats:
            for code, n in sorted(s.codes.items()):
                requests.add_metric([s.route, s.direction, str(code)], n)
            cumulative, buckets = 0, []
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), s.buckets, strict=True):
                cumulative += n
                buckets.append(
                    ("+Inf" if bound == float("inf") else repr(float(bound)), cumulative)
                )
            durations.add_metric([s.route, s.direction], buckets, s.total)
        yield requests
        yield durations


class _PoolCollector(Collector):
    """Upstream connections by state, read from the pools at scrape time."""

    def __init__(self) -> None:
        self.pools: list[tuple[str, Callable[[], dict[str, int]]]] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mtls_sidecar_upstream_connections",
            "Upstream connections by route and state (connecting, active, idle).",
            labels=["route", "state"],
        )
        for route, states in self.pools:
            for state, n in states().items():
                family.add_metric([route, state], n)
        yield family


class _BeforeCollect(Collector):
    """Registered first: brings gauges read from state (route_up, certificate expiry) up to
    date when a scrape begins. Yields nothing itself."""

    def __init__(self) -> None:
        self.hooks: list[Callable[[], None]] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for hook in self.hooks:
            hook()
        return iter(())


@attrs.define
class Metrics:
    registry: CollectorRegistry
    routes: list[RouteStats]
    handshake_errors: Counter
    certificate_expiry: Gauge
    reloads: Counter
    connections_open: Gauge
    upstream_connects: Counter
    upstream_tls_handshakes: Counter
    oauth_token_fetches: Counter
    oauth_token_failures: Counter
    oauth_token_expiry: Gauge
    accept_errors: Counter
    connections_refused: Counter
    route_up: Gauge
    trace_spans_exported: Counter
    trace_spans_dropped: Counter

    pools: _PoolCollector = attrs.field(factory=_PoolCollector)
    before_collect: list[Callable[[], None]] = attrs.field(factory=list)

    def known_labels(self, route: str, direction: str, oauth: bool) -> None:
        """A route's counters with known label values, at 0 until the first one happens."""
        reasons = EGRESS_HANDSHAKE_REASONS if direction == "egress" else INGRESS_HANDSHAKE_REASONS
        for reason in reasons:
            self.handshake_errors.labels(route, reason)
        if oauth:
            self.oauth_token_failures.labels(route)
            self.oauth_token_fetches.labels(route)

    def watch_pool(self, route: str, states: Callable[[], dict[str, int]]) -> None:
        self.pools.pools.append((route, states))

    def route_stats(self, route: str, direction: str) -> RouteStats:
        stats = RouteStats(route, direction)
        self.routes.append(stats)
        return stats

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        r = registry if registry is not None else CollectorRegistry()
        p = "mtls_sidecar_"
        routes: list[RouteStats] = []
        hooks = _BeforeCollect()
        r.register(hooks)
        r.register(_RequestCollector(routes))
        pools = _PoolCollector()
        r.register(pools)
        ProcessCollector(registry=r)  # memory and CPU of this process (per worker once merged)
        metrics = cls(
            pools=pools,
            before_collect=hooks.hooks,
            registry=r,
            routes=routes,
            handshake_errors=Counter(
                p + "tls_handshake_errors",
                "TLS handshakes that failed, by route and reason.",
                ["route", "reason"],
                registry=r,
            ),
            certificate_expiry=Gauge(
                p + "certificate_expiry_timestamp_seconds",
                "notAfter of each certificate in use, Unix time; role: client, server, their"
                " chains' next certificates client_chain_N / server_chain_N, client_ca[_N].",
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
            upstream_tls_handshakes=Counter(
                p + "upstream_tls_handshakes",
                "Verified TLS handshakes toward the upstream by route and kind (full, resumed).",
                ["route", "kind"],
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
            accept_errors=Counter(
                p + "accept_errors",
                "Connections the kernel handed over but could not be accepted, by reason.",
                ["reason"],
                registry=r,
            ),
            connections_refused=Counter(
                p + "connections_refused",
                "Accepted connections closed at once: over max_connections, or draining.",
                ["route", "reason"],
                registry=r,
            ),
            route_up=Gauge(
                p + "route_up",
                "1 when the route can serve (listener open, certificates valid now, a token for"
                " OAuth egress), else 0; /status says why.",
                ["route", "direction"],
                registry=r,
            ),
            trace_spans_exported=Counter(
                p + "trace_spans_exported",
                "Spans the OTLP collector accepted ([tracing]).",
                registry=r,
            ),
            trace_spans_dropped=Counter(
                p + "trace_spans_dropped",
                "Spans lost: the export queue was full, or the collector did not take them.",
                ["reason"],
                registry=r,
            ),
        )
        for result in RELOAD_RESULTS:
            metrics.reloads.labels(result)
        for reason in ACCEPT_ERROR_REASONS:
            metrics.accept_errors.labels(reason)
        return metrics
