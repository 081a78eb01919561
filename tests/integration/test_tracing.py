"""W3C Trace Context through the sidecar, checked at a real OTLP/HTTP receiver that decodes the
protobuf the sidecar sends: trace ids, parent links, attributes, no secret; and without
[tracing], traceparent/tracestate untouched in both directions with trace_id in the access line."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.harness import (
    PEERS,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_origin,
    origin_pki,
    write_config,
)

pytestmark = pytest.mark.integration

trace_pb2 = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="opentelemetry-proto not installed: pip install -e '.[test]'",
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
UPSTREAM_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SECRETS = ("Bearer sk-live-TOKEN-0123456789", "pan=4111111111111111", "BODY-SECRET-CVV-123")


class Receiver:
    """An OTLP/HTTP collector on 127.0.0.1: keeps every request's raw body and its spans."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = trace_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.raw.append(body)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    for rs in request.resource_spans:
                        resource = {
                            a.key: a.value.string_value or a.value.int_value
                            for a in rs.resource.attributes
                        }
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                receiver.spans.append(span)
                                receiver.resources.append(resource)
                out = trace_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, n: int, timeout: float = 15) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            time.sleep(0.1)
        raise AssertionError(f"{len(self.spans)} spans received, expected {n}")


@attrs.frozen
class Env:
    dir: Path
    origin: int
    upstream: Peer

    def mtls(self) -> list[str]:
        d = self.dir
        return ["--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
                "--key", str(d / "client.key")]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("tracing")
    origin_pki(d)
    # the partner: echoes what it received of the trace headers, and sends its own traceparent
    nginx, origin = mtls_origin(
        d,
        f'location / {{ add_header traceparent "{UPSTREAM_TRACEPARENT}" always;\n'
        'add_header tracestate "up=1" always;\n'
        'return 200 "tp=$http_traceparent|ts=$http_tracestate|cid=$http_x_correlation_id"; }',
    )
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen")]).start()
    try:
        yield Env(d, origin, upstream)
    finally:
        upstream.stop()
        nginx.stop()


def start(env: Env, name: str, tracing: str = "") -> tuple[Sidecar, dict[str, int]]:
    ports = {k: free_port() for k in ("egress", "ingress", "admin")}
    conf = write_config(
        env.dir / f"{name}.toml",
        f"""
        [admin]
        listen = "127.0.0.1:{ports["admin"]}"
        {tracing}
        [[egress]]
        name = "d1"
        listen = "127.0.0.1:{ports["egress"]}"
        upstream = "https://localhost:{env.origin}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        [[ingress]]
        name = "callbacks"
        listen = "127.0.0.1:{ports["ingress"]}"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{env.upstream.port}"
        """,
    )
    return Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()]), ports


def echoed(body: bytes) -> dict[str, str]:
    return dict(part.split("=", 1) for part in body.decode().split("|"))


def upstream_headers(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def access_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    time.sleep(0.5)  # access lines are written four times a second
    lines = [json.loads(x) for x in sidecar.log().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("kind") == "access"]


def attributes(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def metric(port: int, name: str) -> float:
    page = curl(f"http://127.0.0.1:{port}/metrics").body.decode()
    return sum(float(x.split()[-1]) for x in page.splitlines() if x.startswith(name))


def test_without_tracing_trace_headers_pass_untouched_both_ways(env: Env) -> None:
    sidecar, ports = start(env, "off")
    try:
        out = curl("-H", f"traceparent: {TRACEPARENT}", "-H", f"tracestate: {TRACESTATE}",
                   f"http://127.0.0.1:{ports['egress']}/pay")  # fmt: skip
        plain = curl(f"http://127.0.0.1:{ports['egress']}/plain")
        ingress = f"https://localhost:{ports['ingress']}/cb"
        cb = curl(*env.mtls(), "-H", f"traceparent: {TRACEPARENT}", "-H",
                  f"tracestate: {TRACESTATE}", ingress)  # fmt: skip
        lines = access_lines(sidecar)
    finally:
        sidecar.stop()
    assert out.status == 200
    seen = echoed(out.body)
    assert seen["tp"] == TRACEPARENT and seen["ts"] == TRACESTATE
    # the partner's own trace headers come back to the app unchanged
    assert f"traceparent: {UPSTREAM_TRACEPARENT}" in out.headers
    assert "tracestate: up=1" in out.headers
    assert echoed(plain.body)["tp"] == ""  # nothing added without [tracing]
    assert cb.status == 200
    got = upstream_headers(cb.body)
    assert got["traceparent"] == TRACEPARENT and got["tracestate"] == TRACESTATE
    by_path = {x["path"]: x for x in lines}
    assert by_path["/pay"]["trace_id"] == TRACE
    assert by_path["/cb"]["trace_id"] == TRACE
    assert "trace_id" not in by_path["/plain"]


def test_spans_continue_the_trace_in_both_directions_with_no_secret(env: Env) -> None:
    with Receiver() as receiver:
        headers = env.dir / "otlp-headers"
        headers.write_text("# the collector's auth\nAuthorization: Bearer collector-key\n")
        sidecar, ports = start(
            env,
            "on",
            f"""
            [tracing]
            otlp_endpoint = "http://127.0.0.1:{receiver.port}"
            service_name = "sidecar-under-test"
            headers_file = "otlp-headers"
            """,
        )
        try:
            egress = f"http://127.0.0.1:{ports['egress']}"
            child = curl("-H", f"traceparent: {TRACEPARENT}", "-H", f"tracestate: {TRACESTATE}",
                         "-H", f"Authorization: {SECRETS[0]}", "--data-binary", SECRETS[2],
                         f"{egress}/pay?{SECRETS[1]}")  # fmt: skip
            root = curl(f"{egress}/root")
            kept = curl("-H", "x-correlation-id: app-chosen-id", f"{egress}/kept")
            invalid = curl("-H", f"traceparent: 00-{'0' * 32}-{PARENT}-01", "-H",
                           f"tracestate: {TRACESTATE}", f"{egress}/invalid")  # fmt: skip
            cb = curl(*env.mtls(), "-H", f"traceparent: {TRACEPARENT}",
                      f"https://localhost:{ports['ingress']}/cb?{SECRETS[1]}")  # fmt: skip
            spans = receiver.wait(5)
            lines = access_lines(sidecar)
        finally:
            sidecar.stop()
    assert child.status == root.status == kept.status == cb.status == 200
    by_path = {x["path"]: x for x in lines}
    spans_by_trace: dict[str, list[Any]] = {}
    for s in spans:
        spans_by_trace.setdefault(s.trace_id.hex(), []).append(s)

    # egress, continuing the app's trace: one CLIENT span, child of the app's span
    seen = echoed(child.body)
    version, trace, parent, flags = seen["tp"].split("-")
    assert (version, trace, flags) == ("00", TRACE, "01")
    assert seen["ts"] == TRACESTATE  # the caller's vendor state goes on
    (span,) = [s for s in spans_by_trace[TRACE] if s.kind == s.SPAN_KIND_CLIENT]
    assert span.parent_span_id.hex() == PARENT
    assert span.span_id.hex() == parent  # the partner sees our span as its parent
    assert seen["cid"] == TRACE  # no x-correlation-id from the app: the trace id
    a = attributes(span)
    assert a["mtls_sidecar.route"] == "d1" and a["http.request.method"] == "POST"
    assert a["http.response.status_code"] == 200
    assert a["network.peer.address"].endswith(f":{env.origin}")
    assert span.name == "POST d1"
    assert by_path["/pay"]["trace_id"] == TRACE and by_path["/pay"]["correlation_id"] == TRACE

    # a request without traceparent starts a trace; the partner gets it
    tp = echoed(root.body)["tp"].split("-")
    (span,) = spans_by_trace[tp[1]]
    assert span.parent_span_id == b"" and span.span_id.hex() == tp[2]
    assert echoed(root.body)["cid"] == tp[1] == by_path["/root"]["trace_id"]
    assert echoed(kept.body)["cid"] == "app-chosen-id"
    # an invalid traceparent is replaced by a new trace, and its tracestate dropped (W3C 3.3.1)
    fresh = echoed(invalid.body)
    assert fresh["tp"].split("-")[1] not in ("0" * 32, TRACE) and fresh["ts"] == ""
    assert fresh["tp"].split("-")[1] in spans_by_trace

    # ingress: a SERVER span naming the caller by subject and serial, never the certificate
    got = upstream_headers(cb.body)
    _, trace, parent, _ = got["traceparent"].split("-")
    assert trace == TRACE
    (span,) = [s for s in spans_by_trace[TRACE] if s.kind == s.SPAN_KIND_SERVER]
    assert span.span_id.hex() == parent and span.parent_span_id.hex() == PARENT
    a = attributes(span)
    client = (env.dir / "client.pem").read_bytes()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(client)
    assert a["tls.client.subject"] == cert.subject.rfc4514_string()
    assert a["tls.client.serial_number"] == f"{cert.serial_number:x}"
    assert a["mtls_sidecar.route"] == "callbacks" and a["http.response.status_code"] == 200

    assert {r["service.name"] for r in receiver.resources} == {"sidecar-under-test"}
    assert all(h["authorization"] == "Bearer collector-key" for h in receiver.headers)
    raw = b"".join(receiver.raw)
    for secret in (*SECRETS, "sk-live", "4111111111111111", "CVV", "BEGIN CERTIFICATE"):
        assert secret.encode() not in raw, secret
    assert b"".join(client.split(b"\n")[1:3]) not in raw.replace(b"\n", b"")


def test_a_dead_collector_costs_requests_nothing_and_drops_are_counted(env: Env) -> None:
    dead = free_port()
    sidecar, ports = start(
        env,
        "dead",
        f"""
        [tracing]
        otlp_endpoint = "http://127.0.0.1:{dead}/v1/traces"
        max_queue_size = 5
        export_timeout = 1
        """,
    )
    try:
        codes = [curl(f"http://127.0.0.1:{ports['egress']}/n{i}").status for i in range(40)]
        time.sleep(3)  # the export of the first batch fails within export_timeout
        dropped_full = metric(
            ports["admin"], 'mtls_sidecar_trace_spans_dropped_total{reason="queue_full"}'
        )
        failed = metric(
            ports["admin"], 'mtls_sidecar_trace_spans_dropped_total{reason="export_failed"}'
        )
        exported = metric(ports["admin"], "mtls_sidecar_trace_spans_exported_total")
        slowest = max(x["duration_ms"] for x in access_lines(sidecar))
    finally:
        sidecar.stop()
    log = [line for line in sidecar.log().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in log), log  # the SDK's warnings as JSON too
    warnings = [json.loads(x)["msg"] for x in log if '"tracing: ' in x]
    assert warnings and len(warnings) <= 10, warnings  # rate-limited, not one per span
    assert codes == [200] * 40
    # the export waits up to 1 s on the dead collector: none of that on the request path
    assert slowest < 250, slowest
    assert exported == 0
    assert failed >= 5 and dropped_full > 0, (failed, dropped_full)
    # every span is accounted for: dropped at the queue, lost at export, or still queued (<= 5)
    assert 40 - 5 <= dropped_full + failed <= 40


def test_sample_ratio_zero_still_propagates_and_follows_a_sampled_caller(env: Env) -> None:
    with Receiver() as receiver:
        sidecar, ports = start(
            env,
            "ratio0",
            f"""
            [tracing]
            otlp_endpoint = "http://127.0.0.1:{receiver.port}"
            sample_ratio = 0
            """,
        )
        try:
            egress = f"http://127.0.0.1:{ports['egress']}"
            unsampled = curl(f"{egress}/new")
            followed = curl("-H", f"traceparent: {TRACEPARENT}", f"{egress}/followed")
            spans = receiver.wait(1)
            time.sleep(1.5)  # a second export interval: nothing more arrives
        finally:
            sidecar.stop()
    tp = echoed(unsampled.body)["tp"].split("-")
    # a new trace, propagated with the sampled flag off (0x02, "random", may be set: Level 2)
    assert len(tp[1]) == 32 and int(tp[3], 16) & 1 == 0
    assert echoed(followed.body)["tp"].split("-")[1] == TRACE
    assert [s.trace_id.hex() for s in receiver.spans] == [TRACE]
    assert spans[0].parent_span_id.hex() == PARENT


def test_each_worker_exports_its_own_spans(env: Env) -> None:
    with Receiver() as receiver:
        sidecar, ports = start(
            env,
            "workers",
            f"""
            [service]
            workers = 2
            [tracing]
            otlp_endpoint = "http://127.0.0.1:{receiver.port}"
            """,
        )
        try:
            deadline = time.monotonic() + 60
            while curl(f"http://127.0.0.1:{ports['admin']}/readyz").status != 200:
                assert time.monotonic() < deadline, sidecar.log()
                time.sleep(0.2)
            workers = {w["pid"] for w in json.loads(
                curl(f"http://127.0.0.1:{ports['admin']}/status").body)["workers"]}  # fmt: skip
            codes = [curl(f"http://127.0.0.1:{ports['egress']}/w{i}").status for i in range(10)]
            receiver.wait(10)
        finally:
            sidecar.stop()
    assert codes == [200] * 10
    pids = {r["process.pid"] for r in receiver.resources}
    assert sidecar.proc is not None and sidecar.proc.pid not in pids  # not via the supervisor
    assert pids and pids <= workers, (pids, workers)
