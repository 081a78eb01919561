"""What an on-call person reads: /readyz with its reasons, and /status and `mtls-sidecar status`
with certificates, token state, the last upstream connect and the config in effect."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.harness import (
    PEERS,
    SIDECAR,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_origin,
    origin_pki,
    running,
    write_config,
    write_oauth_key,
)

pytestmark = pytest.mark.integration


@attrs.frozen
class Env:
    dir: Path
    origin: int
    upstream: Peer


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("status")
    origin_pki(d)
    write_oauth_key(d)
    (d / "oauth.key").chmod(0o600)
    nginx, origin = mtls_origin(d, 'location / { return 200 "ok"; }')
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen")]).start()
    try:
        yield Env(d, origin, upstream)
    finally:
        upstream.stop()
        nginx.stop()


def config(env: Env, name: str, oauth: str = "") -> tuple[Path, dict[str, int]]:
    ports = {k: free_port() for k in ("egress", "ingress", "admin")}
    conf = write_config(
        env.dir / f"{name}.toml",
        f"""
        [admin]
        listen = "127.0.0.1:{ports["admin"]}"
        [[egress]]
        name = "d1"
        listen = "127.0.0.1:{ports["egress"]}"
        upstream = "https://localhost:{env.origin}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        {oauth}
        [[ingress]]
        name = "callbacks"
        listen = "127.0.0.1:{ports["ingress"]}"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{env.upstream.port}"
        """,
    )
    return conf, ports


def status(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SIDECAR, "status", "-c", str(conf), *args], capture_output=True,
                          text=True, timeout=20)  # fmt: skip


def test_status_shows_certificates_last_connect_and_config(env: Env) -> None:
    conf, ports = config(env, "plain")
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    with running(sidecar):
        assert curl(f"http://127.0.0.1:{ports['egress']}/x").status == 200
        ready = curl(f"http://127.0.0.1:{ports['admin']}/readyz")
        out = status(conf, "--json")
        text = status(conf)
    assert ready.status == 200 and json.loads(ready.body) == {"ready": True, "reasons": []}
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    routes = {r["name"]: r for r in report["routes"]}
    client = x509.load_pem_x509_certificate((env.dir / "client.pem").read_bytes())
    (mine,) = routes["d1"]["certificates"]
    assert mine["role"] == "client"
    assert mine["serial"] == f"{client.serial_number:x}"
    assert mine["sha256"] == client.fingerprint(hashes.SHA256()).hex()
    assert mine["subject"] == client.subject.rfc4514_string()
    assert [c["role"] for c in routes["callbacks"]["certificates"]] == ["server", "client_ca"]
    assert routes["d1"]["last_upstream_connect"]["result"] == "ok"
    assert routes["d1"]["oauth"] is None
    assert report["config"]["egress"][0]["upstream"]["port"] == env.origin
    key_pem = (env.dir / "client.key").read_text()
    assert key_pem.splitlines()[1] not in out.stdout  # paths, never key material
    assert text.returncode == 0 and text.stdout.startswith("ready\n")
    assert f"serial {client.serial_number:x}" in text.stdout


def test_a_token_outage_leaves_readyz_ready_and_takes_that_route_out(env: Env) -> None:
    """A pod's readiness routes D1's callbacks to it: no D1 token must not pull it out of the
    Service. The route's own readiness tells an app to wait."""
    dead = free_port()
    oauth = f"""
        [egress.oauth]
        token_url = "https://localhost:{dead}/authz/v1/oauth2/token"
        issuer = "MGW0000001"
        signing_key = "oauth.key"
        key_id = "kid-1"
    """
    conf, ports = config(env, "notoken", oauth)
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    admin = f"http://127.0.0.1:{ports['admin']}"
    with running(sidecar):
        ready = curl(f"{admin}/readyz")
        deadline = time.monotonic() + 10
        while True:  # the first fetch fails within the connect timeout; then the error shows
            out = status(conf, "--json")
            routes = {r["name"]: r for r in json.loads(out.stdout)["routes"]}
            if routes["d1"]["oauth"]["last_error"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        again = curl(f"{admin}/readyz")
        route = curl(f"{admin}/readyz/d1")
        verbose = curl(f"{admin}/readyz/d1?verbose")
        callbacks = curl(f"{admin}/readyz/callbacks")
        unknown = curl(f"{admin}/readyz/nosuch")
        pod_verbose = curl(f"{admin}/readyz?verbose")
        metrics = curl(f"{admin}/metrics").body.decode()
    assert ready.status == 200 and json.loads(ready.body) == {"ready": True, "reasons": []}
    assert again.status == 200
    assert route.status == 503
    (reason,) = json.loads(route.body)["reasons"]
    assert reason.startswith("no valid OAuth token (last error: "), reason
    assert verbose.status == 503
    assert verbose.body.decode().splitlines() == [
        "[+]listener ok",
        "[+]certificates ok",
        verbose.body.decode().splitlines()[2],
        "readyz d1 check failed",
    ]
    assert verbose.body.decode().splitlines()[2].startswith("[-]oauth_token failed: no valid")
    assert callbacks.status == 200
    assert unknown.status == 404 and json.loads(unknown.body)["error"] == "unknown_route"
    assert pod_verbose.status == 200 and pod_verbose.body.decode().endswith("readyz check passed\n")
    assert "[+]listener:callbacks ok" in pod_verbose.body.decode()
    assert 'mtls_sidecar_route_up{direction="egress",route="d1"} 0.0' in metrics
    assert 'mtls_sidecar_route_up{direction="ingress",route="callbacks"} 1.0' in metrics
    report = json.loads(out.stdout)
    assert out.returncode == 0  # the pod is ready; the route is not
    routes = {r["name"]: r for r in report["routes"]}
    assert routes["d1"]["state"] == "down" and routes["callbacks"]["state"] == "up"
    token = routes["d1"]["oauth"]
    assert token["valid_until"] is None and token["last_error"]


def test_a_fresh_process_exports_its_failure_counters_at_zero(env: Env) -> None:
    """So that increase() sees the first failure: a counter born at 1 has no increase."""
    oauth = f"""
        [egress.oauth]
        token_url = "https://localhost:{free_port()}/authz/v1/oauth2/token"
        issuer = "MGW0000001"
        signing_key = "oauth.key"
        key_id = "kid-1"
    """
    conf, ports = config(env, "zeros", oauth)
    sidecar = Sidecar(conf).start([("127.0.0.1", ports["admin"])])
    with running(sidecar):
        text = curl(f"http://127.0.0.1:{ports['admin']}/metrics").body.decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    for name in (
        'mtls_sidecar_reloads_total{result="success"}',
        'mtls_sidecar_reloads_total{result="failure"}',
        'mtls_sidecar_accept_errors_total{reason="emfile"}',
        'mtls_sidecar_tls_handshake_errors_total{reason="certificate_untrusted",route="callbacks"}',
        'mtls_sidecar_tls_handshake_errors_total{reason="no_client_certificate",route="callbacks"}',
        'mtls_sidecar_tls_handshake_errors_total{reason="certificate_expired",route="d1"}',
    ):
        assert samples.get(name) == "0.0", name
    # the token endpoint is closed: its failure may already be counted, but it is there
    assert 'mtls_sidecar_oauth_token_failures_total{route="d1"}' in samples
    roles = {line.split('role="')[1].split('"')[0] for line in samples
             if line.startswith("mtls_sidecar_certificate_expiry_timestamp_seconds")}  # fmt: skip
    assert roles == {"client", "server", "client_ca"}


def test_status_without_a_running_sidecar_says_so(env: Env) -> None:
    conf, _ = config(env, "down")
    out = status(conf)
    assert out.returncode == 2
    assert out.stderr.startswith("mtls-sidecar: error: http://127.0.0.1:")
    assert "is the sidecar running?" in out.stderr


def test_status_answers_only_peers_in_status_from(env: Env) -> None:
    """/status names files, issuers and key ids: only [admin] status_from may read it; the
    probes and the scrape stay open to all. 127.0.0.2 stands for a pod on the cluster network."""
    conf, ports = config(env, "gated")
    conf.write_text(
        conf.read_text().replace("[admin]\n", '[admin]\nstatus_from = ["127.0.0.1/32"]\n')
    )
    admin = f"http://127.0.0.1:{ports['admin']}"
    with running(Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])):
        stranger = {p: curl("--interface", "127.0.0.2", admin + p) for p in
                    ("/status", "/healthz", "/readyz", "/metrics")}  # fmt: skip
        local = curl(admin + "/status")
    assert stranger["/status"].status == 403
    assert json.loads(stranger["/status"].body) == {
        "error": "forbidden",
        "detail": "this address is not in [admin] status_from",
    }
    assert b"client.pem" not in stranger["/status"].body
    assert [stranger[p].status for p in ("/healthz", "/readyz", "/metrics")] == [200, 200, 200]
    assert b"mtls_sidecar_requests_total" in stranger["/metrics"].body
    assert local.status == 200 and json.loads(local.body)["ready"] is True


def test_status_from_holds_with_workers_and_status_says_why(env: Env) -> None:
    conf, ports = config(env, "gated-workers")
    conf.write_text(
        conf.read_text().replace(
            "[admin]\n", '[service]\nworkers = 2\n[admin]\nstatus_from = ["127.0.0.2"]\n'
        )
    )
    admin = f"http://127.0.0.1:{ports['admin']}"
    with running(Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])):
        deadline = time.monotonic() + 30
        while (ready := curl(admin + "/readyz")).status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the workers start
        local = curl(admin + "/status")
        listed = curl("--interface", "127.0.0.2", admin + "/status")
        out = status(conf)
    assert local.status == 403 and ready.status == 200
    assert listed.status == 200 and len(json.loads(listed.body)["workers"]) == 2
    assert out.returncode == 2
    assert out.stderr.endswith("/status: 403: this address is not in [admin] status_from\n")
