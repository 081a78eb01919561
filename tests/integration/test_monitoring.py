"""What ships for monitoring meets a live sidecar: every metric the Grafana dashboard queries is
in a real /metrics scrape, and the status page at / renders in a real browser."""

from __future__ import annotations

import datetime
import html
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    PEERS,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_origin,
    origin_pki,
    stop,
    wait_port,
    write_config,
    write_oauth_key,
)
from tests.pkifactory import make_ca, write_ca

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "mtls-sidecar.json"
# Exported only by the supervisor with [service] workers > 1 (it owns the worker processes);
# the single-process scrape below cannot have them. Nothing else may be listed here.
WORKERS_ONLY = {
    "mtls_sidecar_worker_resident_bytes",
    "mtls_sidecar_worker_restarts_total",
    "mtls_sidecar_worker_recycles_total",
}
# PromQL words that look like metric names in an expression
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "le", "inf", "nan"}  # fmt: skip


@attrs.frozen
class Env:
    dir: Path
    admin: int
    egress: int
    ingress: int
    sidecar: Sidecar

    def mtls(self) -> list[str]:
        d = self.dir
        return ["--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
                "--key", str(d / "client.key")]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """One sidecar with an OAuth egress route and an ingress route, after traffic on both."""
    d = tmp_path_factory.mktemp("monitoring")
    origin_pki(d)
    write_oauth_key(d)
    (d / "oauth.key").chmod(0o600)
    nginx, origin = mtls_origin(
        d, 'location /boom { return 502 "no"; }\nlocation / { return 200 "ok"; }'
    )
    upstream = tokens = sidecar = None
    try:
        upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen")]).start()
        tokens = Peer(
            [str(PEERS / "token_server.py"), "--port", "0", "--cert", str(d / "origin.pem"),
             "--key", str(d / "origin.key"), "--client-ca", str(d / "client-ca.pem"),
             "--public-key", str(d / "oauth.pub"), "--stats", str(d / "token-stats")]
        ).start()  # fmt: skip
        ports = {k: free_port() for k in ("egress", "ingress", "admin")}
        conf = write_config(
            d / "sidecar.toml",
            f"""
            [admin]
            listen = "127.0.0.1:{ports["admin"]}"
            [[egress]]
            name = "d1-ppr"
            listen = "127.0.0.1:{ports["egress"]}"
            upstream = "https://localhost:{origin}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
              [egress.oauth]
              token_url = "https://localhost:{tokens.port}/authz/v1/oauth2/token"
              issuer = "MGW0000001"
              signing_key = "oauth.key"
              key_id = "kid-ppr-1"
              body = "json"
            [[ingress]]
            name = "d1-callbacks"
            listen = "127.0.0.1:{ports["ingress"]}"
            server_cert = "origin.pem"
            server_key = "origin.key"
            client_ca = "client-ca.pem"
            upstream = "http://127.0.0.1:{upstream.port}"
            """,
        )
        sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
        e = Env(d, ports["admin"], ports["egress"], ports["ingress"], sidecar)
        for path in ("/a", "/b", "/boom"):
            assert curl(f"http://127.0.0.1:{e.egress}{path}").status in (200, 502)
        assert curl(*e.mtls(), f"https://localhost:{e.ingress}/cb").status == 200
        # a client without a certificate: a failed ingress handshake, counted by reason
        no_cert = curl("--cacert", str(d / "server-ca.pem"), f"https://localhost:{e.ingress}/")
        assert no_cert.status == 0
        yield e
    finally:
        for thing in (sidecar, tokens, upstream, nginx):
            if thing is not None:
                thing.stop()


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers not inside {...} or quotes,
    not followed by "(" (functions), not after "by (" / "without (" (label lists)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)
    expr = re.sub(r"label_values\(([^,]*),\s*\w+\)", r"\1", expr)  # (metric, label)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)
    names = set()
    for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _NOT_METRICS or word.startswith("__"):
            continue
        names.add(word)
    return names


def scraped(port: int) -> set[str]:
    page = curl(f"http://127.0.0.1:{port}/metrics")
    assert page.status == 200
    return {s.name for f in text_string_to_metric_families(page.body.decode()) for s in f.samples}


def test_the_name_extraction_finds_names_and_skips_functions_and_labels() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(mtls_x_bucket{code=~"5..", '
            'route=~"$route"}[$__rate_interval]))) / on (route) mtls_y - time()')  # fmt: skip
    assert metric_names(expr) == {"mtls_x_bucket", "mtls_y"}
    assert metric_names('label_values(mtls_z{job=~"$job"}, instance)') == {"mtls_z"}


def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(env: Env) -> None:
    wanted = set().union(*(metric_names(e) for e in dashboard_queries()))
    assert len(wanted) >= 15 and "mtls_sidecar_route_up" in wanted
    assert wanted >= WORKERS_ONLY  # the list names only what the dashboard uses
    have = scraped(env.admin)
    missing = sorted(wanted - have - WORKERS_ONLY)
    assert not missing, f"queried by deploy/grafana/mtls-sidecar.json, not exported: {missing}"


def test_a_renamed_metric_would_fail_the_dashboard_check(env: Env) -> None:
    have = scraped(env.admin)
    renamed = "mtls_sidecar_request_duration_seconds_bucket".replace("request", "req")
    assert "mtls_sidecar_request_duration_seconds_bucket" in have
    assert renamed not in have


def test_the_dashboard_is_importable_with_a_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for wanted in ("requests", "errors", "latency", "days left", "token", "handshake",
                   "workers", "memory per worker"):  # fmt: skip
        assert wanted in titles, wanted


def test_with_workers_the_supervisor_exports_the_workers_panels_metrics(env: Env) -> None:
    admin, port = free_port(), free_port()
    conf = write_config(
        env.dir / "workers.toml",
        f"""
        [service]
        workers = 2
        [admin]
        listen = "127.0.0.1:{admin}"
        [[egress]]
        name = "d1-ppr"
        listen = "127.0.0.1:{port}"
        upstream = "https://localhost:{free_port()}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        """,
    )
    sidecar = Sidecar(conf).start([("127.0.0.1", admin), ("127.0.0.1", port)])
    try:
        deadline = time.monotonic() + 60
        while curl(f"http://127.0.0.1:{admin}/readyz").status != 200:  # the workers are up
            assert time.monotonic() < deadline, sidecar.log()
            time.sleep(0.2)
        have = scraped(admin)
    finally:
        sidecar.stop()
    assert {"mtls_sidecar_worker_resident_bytes", "mtls_sidecar_worker_restarts_total",
            "process_resident_memory_bytes", "mtls_sidecar_route_up"} <= have  # fmt: skip


def chromium_dom(url: str, profile: Path) -> str:
    """The page as Debian's chromium renders it, headless, with nothing fetched but `url`."""
    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required: apt-get install chromium (.ci/run does)")
        pytest.skip("chromium not installed (Debian package chromium)")
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"(?s)<(style|head)\b.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def test_the_status_page_renders_in_a_real_browser(env: Env, tmp_path: Path) -> None:
    dom = chromium_dom(f"http://127.0.0.1:{env.admin}/?refresh=30", tmp_path / "profile")
    text = visible_text(dom)
    client = x509.load_pem_x509_certificate((env.dir / "client.pem").read_bytes())
    days = (client.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
    assert "Pod readiness: ready" in text, text
    # routes with their state and counts: three egress requests (one 502), one ingress request
    assert re.search(r"d1-ppr egress up 3 0 1 ", text), text
    assert re.search(r"d1-callbacks ingress up 1 0 0 ", text), text
    # the client certificate with its days left, in words
    assert f"{client.subject.rfc4514_string()} " in text
    assert re.search(rf"{days} days \((ok|renew soon|warning|critical)\)", text), text
    # the OAuth token's state, never the token
    assert re.search(r"d1-ppr valid, \d+ s left", text), text
    assert '<meta http-equiv="refresh" content="30">' in dom
    assert "<script" not in dom.lower()


def test_the_status_page_refuses_a_bad_refresh(env: Env) -> None:
    bad = curl(f"http://127.0.0.1:{env.admin}/?refresh=0")
    assert bad.status == 400
    assert b"refresh must be whole seconds from 1 to 3600" in bad.body


def test_a_partner_refusing_our_client_certificate_counts_as_unknown_ca(env: Env) -> None:
    """What MtlsSidecarHandshakeFailures names: the partner's unknown_ca alert (TLS 1.2; under
    TLS 1.3 the alert comes after the handshake and the request fails as upstream_closed)."""
    d = env.dir
    write_ca(make_ca("C=FR,O=Other,CN=Other CA"), d / "other-ca.pem")
    origin, port, admin = free_port(), free_port(), free_port()
    partner = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{origin}", "-cert", str(d / "origin.pem"),
         "-key", str(d / "origin.key"), "-CAfile", str(d / "other-ca.pem"), "-Verify", "1",
         "-verify_return_error", "-tls1_2", "-www", "-quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sidecar = None
    try:
        wait_port("127.0.0.1", origin, partner)
        conf = write_config(
            d / "unknown-ca.toml",
            f"""
            [admin]
            listen = "127.0.0.1:{admin}"
            [[egress]]
            name = "wrong-cert"
            listen = "127.0.0.1:{port}"
            upstream = "https://localhost:{origin}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
            """,
        )
        sidecar = Sidecar(conf).start([("127.0.0.1", port), ("127.0.0.1", admin)])
        answer = curl(f"http://127.0.0.1:{port}/x")
        page = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    finally:
        if sidecar is not None:
            sidecar.stop()
        stop(partner)
    assert answer.status == 502 and b"unknown ca" in answer.body
    assert (
        'mtls_sidecar_tls_handshake_errors_total{reason="unknown_ca",route="wrong-cert"} 1.0'
        in page
    )
