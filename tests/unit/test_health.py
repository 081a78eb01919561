"""Route health in memory: certificates lapse on a fake clock, routes go down and up by a timer
on the reactor, warnings and errors are logged, readiness and route_up follow."""

from __future__ import annotations

import datetime
import io
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import capturedLogs

from proxy import config as cfg
from proxy.ops import audit
from proxy.ops.service import Sidecar
from proxy.routes.egress import Egress
from proxy.telemetry.logs import AccessLog, LineObserver
from proxy.tls.throwaway import DAY, make_ca, write_ca
from tests.unit.test_service_reload import D1_SUBJECT, Reactor

T0 = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, tmp_path / "server-ca.pem")
    write_ca(client_ca, tmp_path / "client-ca.pem")
    client_ca.issue(D1_SUBJECT, client=True).write(tmp_path, "client")
    # the lapsing one: valid for 30 s from T0
    client_ca.issue(
        D1_SUBJECT, client=True, not_before=T0 - DAY, not_after=T0 + datetime.timedelta(seconds=30)
    ).write(tmp_path, "short")
    # one that becomes valid 60 s after T0
    client_ca.issue(
        D1_SUBJECT, client=True, not_before=T0 + datetime.timedelta(seconds=60),
        not_after=T0 + 90 * DAY,
    ).write(tmp_path, "later")  # fmt: skip
    client_ca.issue(D1_SUBJECT, client=True, not_before=T0 - DAY, not_after=T0 + 10 * DAY).write(
        tmp_path, "soon"
    )
    server_ca.issue("CN=localhost", dns=("localhost",), server=True,
                    not_before=T0 - DAY, not_after=T0 + datetime.timedelta(seconds=30),
                    ).write(tmp_path, "server")  # fmt: skip
    return tmp_path


def conf(folder: Path, short: str = "short", extra: str = "") -> Path:
    path = folder / "sidecar.toml"
    path.write_text(
        textwrap.dedent(f"""
        [service]
        reload_interval = 0
        [[egress]]
        name = "lapsing"
        listen = "127.0.0.1:18001"
        upstream = "https://127.0.0.1:9443"
        client_cert = "{short}.pem"
        client_key = "{short}.key"
        trust = "server-ca.pem"
        [[egress]]
        name = "steady"
        listen = "127.0.0.1:18002"
        upstream = "https://127.0.0.1:9443"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        [[ingress]]
        name = "callbacks"
        listen = "127.0.0.1:18003"
        server_cert = "server.pem"
        server_key = "server.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:9000"
        """)
        + textwrap.dedent(extra)
    )
    return path


def start(path: Path) -> tuple[Sidecar, Reactor]:
    reactor = Reactor()
    config = cfg.load(path)
    sidecar = Sidecar(config, reactor, access_log=AccessLog(None, False),
                      wall=lambda: T0.timestamp() + reactor.seconds())  # fmt: skip
    sidecar.build()
    sidecar.start()
    return sidecar, reactor


def metric(sidecar: Sidecar, name: str, **labels: str) -> float | None:
    value: float | None = sidecar.metrics.registry.get_sample_value(name, labels)
    return value


def answer(reactor: Reactor, port: int) -> bytes:
    down = reactor.opened[port].accept()
    down.dataReceived(REQUEST)
    out: bytes = down.transport.value()  # type: ignore[attr-defined]
    return out


class IdleConnection:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_an_egress_route_goes_down_at_the_moment_its_certificate_lapses(folder: Path) -> None:
    sidecar, reactor = start(conf(folder))
    lapsing = sidecar.routes[0].route
    assert isinstance(lapsing, Egress) and lapsing.fault is None
    idle = IdleConnection()
    lapsing.pool.idle.append(idle)  # type: ignore[arg-type]
    assert metric(sidecar, "mtls_sidecar_route_up", route="lapsing", direction="egress") == 1.0
    with capturedLogs() as events:
        reactor.advance(30.0)  # notAfter itself is still valid (RFC 5280)
        assert lapsing.fault is None and not idle.closed
        reactor.advance(0.01)
    assert lapsing.fault is not None and idle.closed  # pooled connections go at that moment
    (error,) = [e for e in events if e["log_level"].name == "error" and e["route"] == "lapsing"]
    assert error["route"] == "lapsing" and error["reason"] == "client_certificate_expired"
    head, _, body = answer(reactor, 18001).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    got = json.loads(body)
    assert got["error"] == "client_certificate_expired" and got["route"] == "lapsing"
    assert got["not_after"] == (T0 + datetime.timedelta(seconds=30)).strftime(
        "%Y-%m-%dT%H:%M:%S.000Z"
    )
    assert not lapsing.pool.live and not reactor.tcpClients  # no new upstream connection
    steady = sidecar.routes[1].route
    assert isinstance(steady, Egress) and steady.fault is None
    assert metric(sidecar, "mtls_sidecar_route_up", route="lapsing", direction="egress") == 0.0
    assert metric(sidecar, "mtls_sidecar_route_up", route="steady", direction="egress") == 1.0


def test_an_ingress_route_with_a_lapsed_server_certificate_serves_and_is_reported_down(
    folder: Path,
) -> None:
    sidecar, reactor = start(conf(folder))
    reactor.advance(31)
    ingress = sidecar.routes[2]
    assert not hasattr(ingress.route, "fault")  # the partner decides, as with nginx
    assert reactor.opened[18003].reading
    checks = sidecar.readiness_checks("callbacks")
    assert checks is not None
    assert [c.name for c in checks if c.failure] == ["certificates"]
    assert sidecar.readiness() == []  # the pod stays in its Service
    status = {r["name"]: r for r in sidecar.status()["routes"]}
    assert status["callbacks"]["state"] == "down"
    assert "server certificate CN=localhost expired at " in status["callbacks"]["reasons"][0]
    assert status["steady"]["state"] == "up" and status["steady"]["reasons"] == []


def test_a_route_not_yet_valid_comes_up_when_its_certificate_starts(folder: Path) -> None:
    sidecar, reactor = start(conf(folder, "later"))
    lapsing = sidecar.routes[0].route
    assert isinstance(lapsing, Egress) and lapsing.fault is not None
    assert lapsing.fault.code == "client_certificate_not_yet_valid"
    with capturedLogs() as events:
        reactor.advance(60.01)
    assert lapsing.fault is None
    assert any("route up" in e["log_format"] for e in events)


def test_the_timer_is_one_delayed_call_at_the_next_edge_not_a_poll(folder: Path) -> None:
    _, reactor = start(conf(folder))
    edges = sorted(c.getTime() for c in reactor.getDelayedCalls())
    assert any(abs(t - 30.001) < 1e-6 for t in edges), edges  # the first lapse
    assert 86400.0 in edges  # the daily warning


def test_expiry_warnings_at_start_and_daily_name_route_role_subject_days(folder: Path) -> None:
    with capturedLogs() as events:
        _, reactor = start(conf(folder, "soon"))  # 10 days left; the server one: 30 s
    warned = [
        e for e in events if e["log_level"].name == "warn" and "expires in" in e["log_format"]
    ]
    assert [(e["route"], e["role"]) for e in warned] == [
        ("lapsing", "client"),
        ("callbacks", "server"),
    ]
    assert (
        warned[0]["subject"]
        == D1_SUBJECT.replace("C=FR,O=Merchant,CN=", "CN=") + ",O=Merchant,C=FR"
    )
    assert round(warned[0]["days_left"]) == 10 and warned[1]["days_left"] < 1
    with capturedLogs() as events:
        reactor.advance(86400)
    daily = [e for e in events if "expires in" in e["log_format"]]
    assert [(e["route"], round(e["days_left"])) for e in daily] == [("lapsing", 9)]


def test_a_reload_applies_other_changes_while_a_route_is_down(folder: Path) -> None:
    sidecar, reactor = start(conf(folder))
    reactor.advance(31)
    path = conf(folder, extra="""
        [[egress]]
        name = "added"
        listen = "127.0.0.1:18004"
        upstream = "https://127.0.0.1:9443"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        """)  # fmt: skip
    assert audit.mistakes(audit.audit(cfg.load(path), T0 + datetime.timedelta(seconds=31))) == []
    assert sidecar.reload()
    assert [s.config.name for s in sidecar.routes] == ["lapsing", "steady", "added", "callbacks"]
    lapsing = sidecar.routes[0].route
    assert isinstance(lapsing, Egress) and lapsing.fault is not None
    assert sidecar.status()["last_reload"]["result"] == "success"


def test_every_certificate_in_use_has_an_expiry_gauge_chain_included(folder: Path) -> None:
    ca = make_ca("C=FR,O=Thales-like,CN=Root")
    issuing = ca.issue("C=FR,O=Thales-like,CN=Issuing", ca=True)
    leaf = issuing.issue(D1_SUBJECT, client=True)
    (folder / "chained.pem").write_bytes(leaf.cert_pem() + issuing.cert_pem())
    (folder / "chained.key").write_bytes(leaf.key_pem())
    sidecar, _ = start(conf(folder, "chained"))
    name = "mtls_sidecar_certificate_expiry_timestamp_seconds"
    chain = metric(sidecar, name, route="lapsing", role="client_chain_1")
    assert chain == issuing.cert.not_valid_after_utc.timestamp()
    assert metric(sidecar, name, route="lapsing", role="client") is not None
    assert metric(sidecar, name, route="callbacks", role="client_ca") is not None


def test_failure_counters_are_exported_at_zero_before_any_failure(folder: Path) -> None:
    sidecar, _ = start(conf(folder))
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="failure") == 0.0
    assert metric(sidecar, "mtls_sidecar_reloads_total", result="success") == 0.0
    assert metric(sidecar, "mtls_sidecar_accept_errors_total", reason="emfile") == 0.0
    for route, reason in (("callbacks", "certificate_untrusted"), ("lapsing", "timeout")):
        labels = {"route": route, "reason": reason}
        assert metric(sidecar, "mtls_sidecar_tls_handshake_errors_total", **labels) == 0.0


def test_a_worker_log_line_carries_its_index_and_pid() -> None:
    out = io.StringIO()
    observer = LineObserver(out, "json", {"worker": 2, "pid": 4242})
    event: dict[str, Any] = {"log_format": "hello", "log_time": 0.0, "log_namespace": "x"}
    observer(event)
    line = json.loads(out.getvalue())
    assert line["worker"] == 2 and line["pid"] == 4242
    text = io.StringIO()
    LineObserver(text, "text", {"worker": 2, "pid": 4242})(event)
    assert "worker=2 pid=4242 hello" in text.getvalue()


def test_a_renewed_certificate_brings_the_route_back_at_the_reload(folder: Path) -> None:
    sidecar, reactor = start(conf(folder))
    reactor.advance(31)
    lapsing = sidecar.routes[0].route
    assert isinstance(lapsing, Egress) and lapsing.fault is not None
    for suffix in ("pem", "key"):  # the renewed certificate, under the same file names
        (folder / f"short.{suffix}").write_bytes((folder / f"client.{suffix}").read_bytes())
    with capturedLogs() as events:
        assert sidecar.reload()
    assert sidecar.routes[0].route is lapsing and lapsing.fault is None
    assert any("route up" in e["log_format"] for e in events)
    assert metric(sidecar, "mtls_sidecar_route_up", route="lapsing", direction="egress") == 1.0


def test_run_logs_checks_warnings_as_lines_naming_file_and_key(folder: Path) -> None:
    from proxy.ops import health

    path = conf(folder).read_text().replace('"127.0.0.1:18002"', '"0.0.0.0:18002"')
    (folder / "open.toml").write_text(path)
    findings = audit.audit(cfg.load(folder / "open.toml"), T0)  # the 30 s certificate: still near
    with capturedLogs() as events:
        health.log_findings(findings)
    warned = {e["key"]: e for e in events if e["log_level"].name == "warn"}
    # near-expiry ones are Health's own lines (with route and role): not twice
    plain = [f for f in findings if f.level == "warning" and not f.fault]
    assert len(warned) == len(events) == len(plain) and len(plain) < len(
        [f for f in findings if f.level == "warning"]
    )
    line = warned["egress[1] (steady).listen"]
    assert line["file"].endswith("open.toml") and "not a loopback address" in line["message"]
