"""W3C Trace Context through the proxy, and with [tracing] one span per exchange exported over
OTLP/HTTP by OpenTelemetry's SDK (an optional extra: imported only when [tracing] is set).

The export runs in the SDK's BatchSpanProcessor thread, off the request path: a collector that
is down or slow fills a bounded queue, and what does not fit is dropped and counted."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.config import TracingConfig
    from proxy.telemetry.metrics import Metrics

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
# version 00 and later versions read as 00 (W3C Trace Context 3.2.4); all-zero ids are invalid
_TRACEPARENT = re.compile(
    rb"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


class TracingError(Exception):
    """[tracing] cannot be set up; the message names the key and the file."""


def trace_id_of(traceparent: bytes | None) -> str | None:
    """The trace id of a valid traceparent header value, else None."""
    if not traceparent:
        return None
    m = _TRACEPARENT.match(traceparent.strip())
    return m.group(1).decode() if m else None


def read_headers(path: Path) -> dict[str, str]:
    """headers_file: one "Name: value" per line (blank lines and # comments skipped)."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TracingError(f"tracing.headers_file {path}: cannot read: {e}") from None
    headers: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, value = line.partition(":")
        if not colon or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name.strip()):
            raise TracingError(
                f"tracing.headers_file {path}: line {n}: expected 'Name: value'"
            )  # the line itself may hold a secret: not repeated
        headers[name.strip().lower()] = value.strip()
    return headers


class Tracer:
    """Starts and ends the span of an exchange; SERVER on ingress, CLIENT on egress."""

    def __init__(
        self,
        config: TracingConfig,
        metrics: Metrics,
        warn: Callable[[str, str], None] = lambda key, message: None,
    ) -> None:
        """`warn(key, message)` gets the SDK's warnings (a dead collector, a full queue), from
        any thread; the caller rate-limits them into the sidecar's own log."""
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as e:
            raise TracingError(
                f"[tracing] needs the tracing extra (pip install 'mtls-sidecar[tracing]'): {e}"
            ) from None
        headers = read_headers(config.headers_file) if config.headers_file else {}
        _route_sdk_logs(warn)
        self._kinds = {"ingress": SpanKind.SERVER, "egress": SpanKind.CLIENT}
        self._error = Status(StatusCode.ERROR)
        self._in_context = set_span_in_context
        self.propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(
            # the pid tells apart the workers, each exporting its own spans
            resource=Resource.create(
                {"service.name": config.service_name, "process.pid": os.getpid()}
            ),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        exporter = _CountingExporter(
            OTLPSpanExporter(
                endpoint=config.otlp_endpoint, headers=headers, timeout=config.export_timeout
            ),
            metrics,
        )
        self.processor = _bounded_processor(exporter, config.max_queue_size, metrics)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("mtls-sidecar")

    def start(
        self, direction: str, name: str, headers: dict[str, str], started: float
    ) -> tuple[Any, str, list[tuple[bytes, bytes]]]:
        """A span continuing the caller's trace (if any): (span, trace id, headers for the
        upstream: traceparent with this span as the parent, and the caller's tracestate)."""
        parent = self.propagator.extract(headers)
        span = self.tracer.start_span(
            name, context=parent, kind=self._kinds[direction], start_time=int(started * 1e9)
        )
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._in_context(span))
        out = [(k.encode(), v.encode()) for k, v in carrier.items()]
        return span, f"{span.get_span_context().trace_id:032x}", out

    def end(
        self, span: Any, ended: float, attributes: Callable[[], dict[str, Any]], failed: bool
    ) -> None:
        if span.is_recording():  # an unsampled span costs no attributes
            span.set_attributes(attributes())
            if failed:
                span.set_status(self._error)
        span.end(end_time=int(ended * 1e9))

    def close(self, wait: float = 2.0) -> None:
        """Export what is queued, waiting at most `wait` seconds (a dead collector must not
        hold up the exit)."""
        t = threading.Thread(target=self.provider.shutdown, daemon=True, name="trace-shutdown")
        t.start()
        t.join(wait)


class _SdkLogs(logging.Handler):
    def __init__(self, warn: Callable[[str, str], None]) -> None:
        super().__init__(logging.WARNING)
        self.warn = warn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.warn(record.name, record.getMessage())
        except Exception:
            self.handleError(record)


def _route_sdk_logs(warn: Callable[[str, str], None]) -> None:
    """OpenTelemetry logs through Python's logging, which would print plain lines on stderr
    beside the sidecar's JSON: send its warnings to `warn` instead."""
    logger = logging.getLogger("opentelemetry")
    for handler in [h for h in logger.handlers if isinstance(h, _SdkLogs)]:
        logger.removeHandler(handler)
    logger.addHandler(_SdkLogs(warn))
    logger.setLevel(logging.WARNING)
    logger.propagate = False


class _CountingExporter:
    """The OTLP exporter, counting spans exported and spans lost to a failed export."""

    def __init__(self, exporter: Any, metrics: Metrics) -> None:
        self.exporter = exporter
        self.exported = metrics.trace_spans_exported
        self.dropped = metrics.trace_spans_dropped.labels("export_failed")
        self.on_taken: Any = lambda n: None

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.on_taken(len(spans))
        try:
            result = self.exporter.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            self.exported.inc(len(spans))
        else:
            self.dropped.inc(len(spans))
        return result

    def shutdown(self, *args: Any, **kw: Any) -> None:
        self.exporter.shutdown(*args, **kw)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return bool(self.exporter.force_flush(timeout_millis))


def _bounded_processor(exporter: _CountingExporter, size: int, metrics: Metrics) -> Any:
    """A BatchSpanProcessor with a queue of `size` spans. The SDK drops a span silently when
    its queue is full; the spans waiting are counted here (ended minus taken for export) so
    each one dropped is counted too."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    dropped = metrics.trace_spans_dropped.labels("queue_full")
    lock = threading.Lock()
    waiting = [0]

    def taken(n: int) -> None:
        with lock:
            waiting[0] = max(0, waiting[0] - n)

    exporter.on_taken = taken

    class Bounded(BatchSpanProcessor):
        def on_end(self, span: Any) -> None:
            if not span.context.trace_flags.sampled:
                return
            with lock:
                if waiting[0] >= size:
                    dropped.inc()  # the SDK's queue drops its oldest span for this one
                else:
                    waiting[0] += 1
            super().on_end(span)

    return Bounded(exporter, max_queue_size=size, max_export_batch_size=min(512, size),  # type: ignore[arg-type]
                   schedule_delay_millis=1000)  # fmt: skip
