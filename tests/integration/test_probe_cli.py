"""`mtls-sidecar probe` against real origins: nginx over mutual TLS, a test DNS server and a
D1-like token endpoint, and our own ingress listener (a sidecar started through its CLI), all on
127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from tests.harness import (
    PEERS,
    SIDECAR,
    Nginx,
    Peer,
    Sidecar,
    free_port,
    origin_pki,
    running,
    write_config,
    write_oauth_key,
)
from tests.pkifactory import make_ca, write_ca

pytestmark = pytest.mark.integration


@attrs.frozen
class Probe:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        doc = json.loads(self.stdout)
        assert isinstance(doc, dict)
        return doc


@attrs.frozen
class Env:
    dir: Path
    ports: dict[str, int]

    def config(self, name: str, upstream: str, extra: str = "", top: str = "") -> Path:
        return write_config(
            self.dir / f"{name}.toml",
            f"""
            {top}
            [[egress]]
            name = "{name}"
            listen = "127.0.0.1:{free_port()}"
            upstream = "{upstream}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
            connect_timeout = 2
            response_timeout = 3
            {extra}
            """,
        )

    def peer_args(self, client_ca: str = "client-ca.pem", stem: str = "origin") -> list[str]:
        d = self.dir
        return ["--cert", str(d / f"{stem}.pem"), "--key", str(d / f"{stem}.key"),
                "--client-ca", str(d / client_ca)]  # fmt: skip


def probe(config: Path, *args: str) -> Probe:
    out = subprocess.run(
        [SIDECAR, "probe", "-c", str(config), *args], capture_output=True, text=True, timeout=30
    )
    return Probe(out.returncode, out.stdout, out.stderr)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("probe")
    server_ca, _ = origin_pki(d, dns=("localhost", "probe.test"))
    server_ca.issue("CN=elsewhere", dns=("elsewhere.test",), server=True).write(d, "elsewhere")
    other_ca = make_ca("C=FR,O=Someone Else,CN=Other Root")
    stranger_ca = make_ca("C=FR,O=Stranger,CN=Stranger Client CA")
    write_ca(stranger_ca, d / "stranger-ca.pem")
    names: dict[str, object] = {"dns": ("localhost", "probe.test"), "ips": ("127.0.0.1",)}
    other_ca.issue("CN=localhost", server=True, **names).write(d, "wrongca")  # type: ignore[arg-type]
    write_oauth_key(d)
    ports = {k: free_port() for k in ("good", "wrongca", "refuses")}

    def server(port: int, stem: str, client_ca: str) -> str:
        return f"""
        server {{
          listen 127.0.0.1:{port} ssl;
          ssl_certificate {d}/{stem}.pem;
          ssl_certificate_key {d}/{stem}.key;
          ssl_client_certificate {d}/{client_ca};
          ssl_verify_client on;
          ssl_protocols TLSv1.2 TLSv1.3;
          location / {{ return 200 "hello\\n"; }}
        }}"""

    nginx = Nginx(
        d / "nginx",
        server(ports["good"], "origin", "client-ca.pem")
        + server(ports["wrongca"], "wrongca", "client-ca.pem")
        + server(ports["refuses"], "origin", "stranger-ca.pem"),
    ).start([("127.0.0.1", p) for p in ports.values()])
    try:
        yield Env(d, ports)
    finally:
        nginx.stop()


def test_good_origin_reports_tls_chain_verification_and_accepted_certificate(env: Env) -> None:
    conf = env.config("good", f"https://localhost:{env.ports['good']}")
    r = probe(conf)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"TLS: +TLSv1\.[23], [A-Z0-9_-]+, ALPN http/1\.1", r.stdout), r.stdout
    assert "subject CN=localhost" in r.stdout
    assert "issuer CN=Origin Root,O=Origin PKI,C=FR" in r.stdout
    assert "SANs DNS:localhost, DNS:probe.test, IP:127.0.0.1" in r.stdout
    assert "verified against trust; name localhost matches" in r.stdout
    assert "client certificate accepted" in r.stdout and "HTTP 200" in r.stdout
    assert "acceptable CAs: CN=Client CA,O=Thales-like,C=FR" in r.stdout
    assert "TCP:" in r.stdout and "connected" in r.stdout
    assert "TTL not available from the system resolver" in r.stdout
    assert "result:" in r.stdout and "OK" in r.stdout.splitlines()[-1]


def test_json_output_is_one_parsable_document(env: Env) -> None:
    conf = env.config("good-json", f"https://localhost:{env.ports['good']}")
    r = probe(conf, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = r.json()
    assert doc["ok"] is True
    (route,) = doc["routes"]  # type: ignore[misc]
    assert route["name"] == "good-json" and route["ok"] is True
    first = route["addresses"][0]
    assert first["address"] == "127.0.0.1" and first["tcp_ok"] is True
    assert first["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert first["cipher"] and first["alpn"] == "http/1.1"
    assert first["verified"] is True and first["client_cert_accepted"] is True
    assert first["http_status"] == 200
    assert first["peer_chain"][0]["subject"] == "CN=localhost"
    assert (
        route["client_certificate"]["subject"] == "CN=TLSMA-ECDSA/MGW0000001/D1.PPR,O=Merchant,C=FR"
    )


def test_origin_under_an_untrusted_ca_reports_the_reason_and_exit_1(env: Env) -> None:
    conf = env.config("wrongca", f"https://localhost:{env.ports['wrongca']}")
    r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not trusted: unable to get local issuer certificate" in r.stdout
    assert "issuer CN=Other Root,O=Someone Else,C=FR" in r.stdout  # the chain it did present
    assert "client certificate accepted" not in r.stdout
    assert "FAILED" in r.stdout
    doc = probe(conf, "--json").json()
    address = doc["routes"][0]["addresses"][0]  # type: ignore[index]
    assert address["verified"] is False and "unable to get local issuer" in address["verification"]


def test_name_mismatch_is_reported_as_a_verification_failure(env: Env) -> None:
    conf = env.config(
        "othername", f"https://localhost:{env.ports['good']}", 'server_name = "elsewhere.example"'
    )
    r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert (
        "hostname mismatch: certificate is for localhost, probe.test, 127.0.0.1, not " in r.stdout
    )
    assert "elsewhere.example" in r.stdout and "client certificate accepted" not in r.stdout


def test_origin_that_refuses_our_client_certificate_is_reported_exit_1(env: Env) -> None:
    conf = env.config("refuses", f"https://localhost:{env.ports['refuses']}")
    r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "verified against trust" in r.stdout  # the server itself is fine
    assert "client certificate refused" in r.stdout
    assert "SSL certificate error" in r.stdout  # nginx's own words, after the handshake
    assert "acceptable CAs: CN=Stranger Client CA" in r.stdout


def test_tls_alert_after_the_handshake_is_reported_as_refusal(env: Env, tmp_path: Path) -> None:
    peer = Peer(
        [str(PEERS / "tls_origin.py"), "--mode", "slow", "--delay", "0",
         "--record", str(tmp_path / "rec"), *env.peer_args("stranger-ca.pem")]
    ).start()  # fmt: skip
    conf = env.config("alert", f"https://localhost:{peer.port}")
    with running(peer):
        r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "client certificate refused" in r.stdout
    assert re.search(r"alert|closed the connection", r.stdout), r.stdout


def test_stalled_handshake_times_out_after_connect_timeout(env: Env, tmp_path: Path) -> None:
    peer = Peer(
        [str(PEERS / "tls_origin.py"), "--mode", "stall", "--record", str(tmp_path / "rec"),
         *env.peer_args()]
    ).start()  # fmt: skip
    with running(peer):
        r = probe(env.config("stall", f"https://localhost:{peer.port}"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(
        r"handshake: +connect/TLS handshake to 127\.0\.0\.1:\d+ timed out after 2s", r.stdout
    )
    assert "TLS:" not in r.stdout  # nothing was negotiated


def test_closed_port_reports_connection_refused_and_exit_1(env: Env) -> None:
    conf = env.config("closed", f"https://localhost:{free_port()}")
    r = probe(conf)
    assert r.returncode == 1
    assert re.search(r"TCP: +connection refused", r.stdout), r.stdout


def test_unknown_route_name_exits_2_listing_the_routes(env: Env) -> None:
    conf = env.config("only-one", f"https://localhost:{env.ports['good']}")
    r = probe(conf, "nope")
    assert r.returncode == 2
    assert "nope" in r.stderr and "only-one" in r.stderr


def test_named_route_is_the_only_one_probed(env: Env) -> None:
    conf = write_config(
        env.dir / "two.toml",
        f"""
        [[egress]]
        name = "a-good"
        listen = "127.0.0.1:{free_port()}"
        upstream = "https://localhost:{env.ports["good"]}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        [[egress]]
        name = "b-bad"
        listen = "127.0.0.1:{free_port()}"
        upstream = "https://localhost:{env.ports["wrongca"]}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        """,
    )
    assert probe(conf, "a-good").returncode == 0
    every = probe(conf, "--json")
    assert every.returncode == 1
    assert [r["ok"] for r in every.json()["routes"]] == [True, False]  # type: ignore[attr-defined]


def test_dns_answer_and_its_ttl_come_from_the_configured_nameserver(
    env: Env, tmp_path: Path
) -> None:
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"probe.test": {"a": ["127.0.0.1"], "ttl": 42}}))
    dns = Peer([str(PEERS / "dns_server.py"), "--zone", str(zone)]).start()
    conf = env.config(
        "dns",
        f"https://probe.test:{env.ports['good']}",
        top=f'[resolver]\nnameservers = ["127.0.0.1:{dns.port}"]',
    )
    with running(dns):
        r = probe(conf)
        j = probe(conf, "--json").json()
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"resolver 127\.0\.0\.1:{dns.port}\b", r.stdout)
    assert re.search(r"answer: +127\.0\.0\.1 \(TTL 42 s\)", r.stdout), r.stdout
    assert "verified against trust; name probe.test matches" in r.stdout
    assert j["routes"][0]["dns"]["answers"] == [{"address": "127.0.0.1", "ttl": 42}]  # type: ignore[index]


def _oauth_conf(env: Env, name: str, token_port: int) -> Path:
    return env.config(
        name,
        f"https://localhost:{env.ports['good']}",
        f"""
        [egress.oauth]
        token_url = "https://localhost:{token_port}/authz/v1/oauth2/token"
        issuer = "MGW0000001"
        signing_key = "oauth.key"
        key_id = "kid-ppr-1"
        body = "json"
        """,
    )


def test_oauth_token_fetch_is_reported_without_the_token(env: Env, tmp_path: Path) -> None:
    stats = tmp_path / "stats.jsonl"
    tokens = Peer(
        [str(PEERS / "token_server.py"), "--port", "0", *env.peer_args(),
         "--public-key", str(env.dir / "oauth.pub"), "--expires-in", "777",
         "--stats", str(stats)]
    ).start()  # fmt: skip
    conf = _oauth_conf(env, "oauth", tokens.port)
    with running(tokens):
        r = probe(conf)
        j = probe(conf, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"OAuth token: +OK from https://localhost:\d+/authz/v1/oauth2/token", r.stdout)
    assert "expires_in 777 s" in r.stdout
    assert j.json()["routes"][0]["oauth"] == {  # type: ignore[index]
        "token_url": f"https://localhost:{tokens.port}/authz/v1/oauth2/token",
        "ok": True,
        "expires_in": 777,
        "error": None,
    }
    calls = [json.loads(line) for line in stats.read_text().splitlines()]
    assert len(calls) == 2 and all(c["token_issued"] for c in calls)
    for text in (r.stdout + r.stderr, j.stdout + j.stderr):
        # the issued tokens are 43 base64url characters; nothing that long is printed
        assert not re.search(r"[A-Za-z0-9_-]{40,}", text), text
        assert "access_token" not in text and "Bearer" not in text


def test_oauth_endpoint_error_is_reported_and_exit_1(env: Env, tmp_path: Path) -> None:
    tokens = Peer(
        [str(PEERS / "token_server.py"), "--port", "0", *env.peer_args(),
         "--public-key", str(env.dir / "oauth.pub"), "--fail-status", "400"]
    ).start()  # fmt: skip
    conf = _oauth_conf(env, "oauth-fail", tokens.port)
    with running(tokens):
        r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "OAuth token:" in r.stdout and "FAILED" in r.stdout
    assert "answered HTTP 400: invalid_grant" in r.stdout


def test_oauth_token_server_named_elsewhere_fails_the_probe_and_gets_no_call(
    env: Env, tmp_path: Path
) -> None:
    stats = tmp_path / "stats.jsonl"
    tokens = Peer(
        [str(PEERS / "token_server.py"), "--port", "0", *env.peer_args(stem="elsewhere"),
         "--public-key", str(env.dir / "oauth.pub"), "--stats", str(stats)]
    ).start()  # fmt: skip
    conf = _oauth_conf(env, "oauth-elsewhere", tokens.port)
    with running(tokens):
        r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "OAuth token:" in r.stdout and "FAILED" in r.stdout
    assert (
        "TLS check failed, no request sent: hostname mismatch: certificate is for "
        "elsewhere.test, not localhost" in r.stdout
    )
    assert not stats.exists() or stats.read_text() == ""


# --------------------------------------------------------------------------- ingress
@attrs.frozen
class Ingress:
    port: int
    client_cas: list[str]  # the subjects in the route's client_ca bundle, in file order


def ingress_route(name: str, listen: str, client_ca: str = "client-cas.pem") -> str:
    return f"""
    [[ingress]]
    name = "{name}"
    listen = "{listen}"
    server_cert = "origin.pem"
    server_key = "origin.key"
    client_ca = "{client_ca}"
    upstream = "http://127.0.0.1:{free_port()}"
    server_name = "localhost"
    """


@pytest.fixture(scope="module")
def ingress(env: Env) -> Iterator[Ingress]:
    """A sidecar serving the test PKI's origin.pem (under Origin Root, in no root program) and
    asking clients for two CAs, one with RFC 4514 specials in its name."""
    partner = make_ca("C=FR,O=Partner+Co;EU,CN=Partner Client CA")
    bundle = env.dir / "client-cas.pem"
    bundle.write_bytes((env.dir / "client-ca.pem").read_bytes() + partner.cert_pem())
    subjects = [
        c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(bundle.read_bytes())
    ]
    port = free_port()
    conf = write_config(
        env.dir / "ingress-run.toml", ingress_route("d1-callbacks", f"127.0.0.1:{port}")
    )
    sidecar = Sidecar(conf).start([("127.0.0.1", port)])
    with running(sidecar):
        yield Ingress(port, subjects)


def test_ingress_probe_warns_that_a_private_ca_bundle_goes_to_thales(
    env: Env, ingress: Ingress
) -> None:
    r = probe(env.dir / "ingress-run.toml")
    assert r.returncode == 0, r.stdout + r.stderr  # a private CA is allowed: a warning
    assert f"dialed 127.0.0.1:{ingress.port} as the partner would" in r.stdout
    assert re.search(r"TLS: +TLSv1\.[23], [A-Z0-9_-]+, ALPN http/1\.1", r.stdout), r.stdout
    assert re.search(r"served chain \[0\]: +subject CN=localhost", r.stdout), r.stdout
    assert "issuer CN=Origin Root,O=Origin PKI,C=FR" in r.stdout
    assert re.search(r"Mozilla root: +NO: the served chain builds to no Mozilla root", r.stdout)
    assert re.search(
        r"warning: +a private CA \(CN=Origin Root,O=Origin PKI,C=FR\) is fine for D1 only if"
        r" Thales holds it: hand this CA's bundle \(PEM\) to Thales",
        r.stdout,
    ), r.stdout
    assert "Mozilla bundle (certifi)" in r.stdout
    assert re.search(r"name: +localhost matches", r.stdout), r.stdout
    assert "the served certificate is the route's server_cert" in r.stdout
    # the probe presents no client certificate, and says so; the listener refuses it
    assert re.search(r"client certificate: +none presented", r.stdout), r.stdout
    assert re.search(r"client auth: +required: the listener refused the connection", r.stdout)
    assert r.stdout.rstrip().splitlines()[-1].split() == [
        "result:", "OK", "(warning:", "private", "CA)"
    ]  # fmt: skip


def test_ingress_probe_lists_the_client_ca_names_we_ask_for(env: Env, ingress: Ingress) -> None:
    r = probe(env.dir / "ingress-run.toml", "d1-callbacks", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    (route,) = r.json()["routes"]  # type: ignore[misc]
    assert route["direction"] == "ingress" and route["name"] == "d1-callbacks"
    assert route["client_cas"] == ingress.client_cas
    assert ingress.client_cas[0] == "CN=Client CA,O=Thales-like,C=FR"
    assert ingress.client_cas[1] == "CN=Partner Client CA,O=Partner\\+Co\\;EU,C=FR"
    assert route["cert_requested"] is True and route["client_cert_required"] is True
    assert route["mozilla_root"] is False and route["ok"] is True
    assert "builds to no Mozilla root" in route["verification"]
    assert "hand this CA's bundle (PEM) to Thales" in route["private_ca"]
    assert "unable to get local issuer certificate" in route["verification"]
    assert route["served_chain"][0]["subject"] == "CN=localhost"
    assert route["tls_version"] in ("TLSv1.2", "TLSv1.3") and route["alpn"] == "http/1.1"
    r_text = probe(env.dir / "ingress-run.toml")
    assert re.search(
        r"client CAs asked: +" + re.escape("; ".join(ingress.client_cas)) + "$", r_text.stdout, re.M
    ), r_text.stdout


def test_probe_without_a_route_name_probes_egress_and_ingress_routes(
    env: Env, ingress: Ingress
) -> None:
    conf = write_config(
        env.dir / "both.toml",
        f"""
        [[egress]]
        name = "to-origin"
        listen = "127.0.0.1:{free_port()}"
        upstream = "https://localhost:{env.ports["good"]}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        """
        # a wildcard listener is dialed on loopback, where the sidecar listens
        + ingress_route("from-partner", f"0.0.0.0:{ingress.port}"),
    )
    doc = probe(conf, "--json").json()
    routes = doc["routes"]
    assert [(r["name"], r["direction"]) for r in routes] == [  # type: ignore[index]
        ("to-origin", "egress"),
        ("from-partner", "ingress"),
    ]
    assert routes[0]["ok"] is True  # type: ignore[index]
    assert routes[1]["address"] == f"127.0.0.1:{ingress.port}"  # type: ignore[index]
    assert routes[1]["client_cas"] == ingress.client_cas  # type: ignore[index]
    assert doc["ok"] is True  # the ingress chain is under a private (test) root: a warning
    one = probe(conf, "from-partner")
    assert "ingress from-partner" in one.stdout and "egress" not in one.stdout


def test_socket_activated_ingress_listener_is_not_probed_and_says_why(env: Env) -> None:
    conf = write_config(env.dir / "systemd.toml", ingress_route("d1", "systemd:d1-https"))
    r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr  # nothing could be probed: nothing confirmed
    assert "systemd:d1-https is a socket systemd hands over" in r.stdout
    assert "cannot be probed from here" in r.stdout
    assert re.search(r"result: +not probed", r.stdout), r.stdout


def test_ingress_listener_that_is_not_running_reports_connection_refused(env: Env) -> None:
    conf = write_config(env.dir / "down.toml", ingress_route("down", f"127.0.0.1:{free_port()}"))
    r = probe(conf)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"TCP: +connection refused \(is the sidecar running", r.stdout), r.stdout
