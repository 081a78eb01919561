"""What both directions share around the data path: connections, timeouts, metrics, access log."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.config import Limits, Timeouts
from proxy.telemetry.logs import AccessLog, RateLimitedLog, fields, route_fields
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import TRACEPARENT, TRACESTATE, Tracer, trace_id_of
from proxy.wire.http import ProxyError, RequestHead, error_response
from proxy.wire.pool import Pool
from proxy.wire.relay import Downstream, Exchange, LocalHandler


class Route:
    """A listener's policy. Subclasses say what to forward (prepare) and where (pool)."""

    log = Logger()
    direction = "egress"

    def __init__(
        self,
        *,
        name: str,
        clock: Any,
        limits: Limits,
        timeouts: Timeouts,
        pool: Pool,
        metrics: Metrics,
        access_log: AccessLog,
        tracer: Tracer | None = None,
    ) -> None:
        self.name, self.clock = name, clock
        self.tracer = tracer
        self.limits, self.timeouts, self.pool = limits, timeouts, pool
        self.metrics, self.access_log = metrics, access_log
        self.connections: set[Downstream] = set()
        self.draining = False
        self.listener: Any = None  # the listening port: paused while max_connections are open
        self.accept_paused = False
        self.peer_log = RateLimitedLog(self.log, clock)
        self.stats = metrics.route_stats(name, self.direction)
        self._open = metrics.connections_open.labels(name, "downstream")
        self._route_fields = route_fields(name, self.direction)

    # ---- policy hooks
    def prepare(
        self, head: RequestHead, down: Downstream
    ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        raise NotImplementedError

    def local_handler(self, head: RequestHead, down: Downstream) -> LocalHandler | None:
        """A handler when the sidecar answers this request itself; None to forward it."""
        return None

    def before_upstream(self, ex: Exchange) -> defer.Deferred[list[tuple[bytes, bytes]]] | None:
        """Extra headers that need waiting for (an OAuth token); None when nothing to wait on."""
        return None

    def error_headers(self, err: ProxyError) -> list[tuple[bytes, bytes]]:
        return []

    def handshake_completed(self, down: Downstream) -> None:
        pass

    def access_extra(self, ex: Exchange, down: Downstream) -> str:
        """The route's own members of an access line, encoded (see logs.fields); "" for none."""
        return ""

    def span_attributes(self, ex: Exchange, down: Downstream) -> dict[str, Any]:
        """What a span says of an exchange: never a token, a query string or a body."""
        attributes: dict[str, Any] = {
            "mtls_sidecar.route": self.name,
            "mtls_sidecar.direction": self.direction,
            "http.request.method": ex.head.method.decode("latin-1"),
            "http.response.status_code": ex.status,
        }
        if ex.up_address:
            attributes["network.peer.address"] = ex.up_address
        if ex.error is not None:
            attributes["error.type"] = ex.error.code
        correlation = _correlation(ex)
        if correlation:
            attributes["mtls_sidecar.correlation_id"] = correlation.decode("latin-1")
        return attributes

    # ---- tracing
    def traced(self, head: RequestHead, down: Downstream, out: list[tuple[bytes, bytes]]) -> str:
        """With [tracing]: start the exchange's span as the caller's child and send the
        upstream our span as its parent (`out` is edited). Returns the trace id."""
        assert self.tracer is not None
        carrier = {}
        for name in (TRACEPARENT, TRACESTATE):
            value = head.get(name)
            if value is not None:
                carrier[name.decode()] = value.decode("latin-1")
        ex = down.exchange  # the exchange being prepared
        assert ex is not None
        span, trace_id, headers = self.tracer.start(
            self.direction, f"{head.method.decode('latin-1')} {self.name}", carrier, ex.started
        )
        if carrier:
            out[:] = [h for h in out if h[0].lower() not in (TRACEPARENT, TRACESTATE)]
        out += headers
        ex.trace = (span, trace_id)
        return trace_id

    def _end_span(self, ex: Exchange, down: Downstream, now: float) -> str:
        assert self.tracer is not None
        trace = ex.trace
        if trace is None:  # answered without forwarding (refused, too large, ...): a span too
            carrier = {}
            for name in (TRACEPARENT, TRACESTATE):
                value = ex.head.get(name)
                if value is not None:
                    carrier[name.decode()] = value.decode("latin-1")
            method = ex.head.method.decode("latin-1")
            span, trace_id, _ = self.tracer.start(
                self.direction, f"{method} {self.name}", carrier, ex.started
            )
            trace = (span, trace_id)
        failed = ex.status >= 500 or ex.error is not None
        self.tracer.end(trace[0], now, lambda: self.span_attributes(ex, down), failed)
        return trace[1]

    # ---- connection accounting
    def connection_opened(self, down: Downstream) -> bool:
        """Count a new connection; False when it is refused (and already being closed).

        At max_connections the listener stops accepting, as nginx does at worker_connections:
        newcomers wait in the kernel's backlog and are served as soon as a slot frees, instead
        of each being accepted only to be refused. Connections accepted in the same burst as the
        last slot are over the limit: a plain one gets a 503, a TLS one (nothing can reach it
        before a handshake) is cut."""
        self.connections.add(down)
        self._open.inc()
        count = len(self.connections)
        if count >= self.limits.max_connections and not self.accept_paused:
            self._pause_accepting()
        if count <= self.limits.max_connections and not self.draining:
            return True
        reason = "draining" if self.draining else "max_connections"
        self.metrics.connections_refused.labels(self.name, reason).inc()
        if down.handshake_done:
            err = ProxyError(
                503,
                "draining" if self.draining else "overloaded",
                "shutting down"
                if self.draining
                else f"over {self.limits.max_connections} connections on this route",
            )
            down.keep_alive = False
            down.write(error_response(err, self.name, keep_alive=False))
            self.stats.count_only(err.status)
        down.close()
        return False

    def _pause_accepting(self) -> None:
        if self.listener is None or self.draining:
            return
        self.listener.stopReading()
        self.accept_paused = True
        self.peer_log.warn(
            "max_connections",
            "{route}: {n} connections open (max_connections): not accepting until one closes",
            route=self.name,
            n=self.limits.max_connections,
        )

    def connection_closed(self, down: Downstream, reason: Failure) -> None:
        if down in self.connections:
            self.connections.discard(down)
            self._open.dec()
        if (
            self.accept_paused
            and len(self.connections) < self.limits.max_connections
            and not self.draining
        ):
            self.accept_paused = False
            self.listener.startReading()

    def rejected(self, ex: Exchange, err: ProxyError) -> None:
        if err.status >= 500 and err.code != "draining":
            self.peer_log.warn(
                err.code,
                "{route}: {status} {code}: {detail}",
                route=self.name,
                status=err.status,
                code=err.code,
                detail=err.detail,
            )

    def finished(self, ex: Exchange, down: Downstream) -> None:
        status = ex.status
        now = self.clock.seconds()
        self.stats.record(status, now - ex.started)
        trace_id = self._end_span(ex, down, now) if self.tracer is not None else None
        if self.access_log.enabled:
            head = ex.head
            target = head.target
            query = target.find(b"?")
            extra = self.access_extra(ex, down)
            if ex.error is not None:
                extra = fields({"error": ex.error.code}) + extra
            if trace_id is None:
                trace_id = trace_id_of(head.get(TRACEPARENT))
            if trace_id is not None:
                extra += fields({"trace_id": trace_id})
            self.access_log.request(
                now,
                self._route_fields,
                head.method.decode("latin-1"),
                (target if query < 0 else target[:query]).decode("latin-1"),
                status,
                ex.bytes_out,
                now - ex.started,
                ex.up_address,
                down.peer_host,
                _correlation(ex).decode("latin-1"),
                extra,
            )

    # ---- time and lifecycle
    def sweep(self, now: float) -> None:
        for down in list(self.connections):
            if down.deadline and now >= down.deadline:
                down.timed_out(now)
            elif down.resting:
                down.release_idle()
        self.pool.sweep(now)
        self.peer_log.flush(now)

    def drain(self) -> None:
        self.draining = True
        for down in list(self.connections):
            down.drain()

    def abort_all(self) -> None:
        for down in list(self.connections):
            down.transport.abortConnection()
        self.pool.close_all()


def _correlation(ex: Exchange) -> bytes:
    value = ex.head.get(b"x-correlation-id")
    if value is None:
        for name, v in ex.headers_out:
            if name == b"x-correlation-id":
                return v
    return value or b""
