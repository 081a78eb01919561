"""What both directions share around the data path: connections, timeouts, metrics, access log."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from proxy.config import Limits, Timeouts
from proxy.telemetry.logs import AccessLog, RateLimitedLog, fields, route_fields
from proxy.telemetry.metrics import Metrics
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
    ) -> None:
        self.name, self.clock = name, clock
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

    def access_fields(self, ex: Exchange, down: Downstream) -> dict[str, Any]:
        return {}

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
        if self.access_log.enabled:
            head = ex.head
            method = head.method.decode("latin-1")
            path = head.target.split(b"?", 1)[0].decode("latin-1")
            extra = self.access_fields(ex, down)
            if ex.error is not None:
                extra = {"error": ex.error.code, **extra}
            self.access_log.request(
                now,
                self._route_fields,
                method,
                path,
                status,
                ex.bytes_out,
                now - ex.started,
                ex.up_address,
                down.peer_host,
                _correlation(ex).decode("latin-1"),
                fields(extra) if extra else "",
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
