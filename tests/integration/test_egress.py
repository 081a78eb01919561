"""Egress end to end: curl (the app) -> the sidecar via its CLI -> nginx (mTLS origin)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import (
    PEERS,
    Nginx,
    Peer,
    Sidecar,
    curl,
    free_port,
    origin_pki,
    running,
    write_config,
)
from tests.pkifactory import DAY, NOW, Issued, make_ca

pytestmark = pytest.mark.integration

ECHO = (
    'return 200 "subject=$ssl_client_s_dn\\nhost=$host\\nuri=$request_uri\\n'
    "corr=$http_x_correlation_id\\nxff=$http_x_forwarded_for\\nsecret=$http_x_secret\\n"
    'keepalive=$http_keep_alive\\nproto=$ssl_protocol\\n";'
)


@attrs.frozen
class Env:
    dir: Path
    server_ca: Issued
    client_ca: Issued
    ports: dict[str, int]
    nginx: Nginx

    def sidecar(
        self, name: str, upstream: str, extra: str = "", trust: str = "server-ca.pem"
    ) -> tuple[Sidecar, int]:
        port = free_port()
        conf = write_config(
            self.dir / f"{name}.toml",
            f"""
            [log]
            format = "json"
            [[egress]]
            name = "{name}"
            listen = "127.0.0.1:{port}"
            upstream = "{upstream}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "{trust}"
            connect_timeout = 2
            response_timeout = 2
            {extra}
            """,
        )
        return Sidecar(conf), port


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("egress")
    server_ca, client_ca = origin_pki(d)
    other_ca = make_ca("C=FR,O=Someone Else,CN=Other Root")
    names = {"dns": ("localhost",), "ips": ("127.0.0.1",), "server": True}
    other_ca.issue("CN=localhost", **names).write(d, "wrongca")  # type: ignore[arg-type]
    server_ca.issue(
        "CN=localhost",
        not_before=NOW - 30 * DAY,
        not_after=NOW - DAY,
        **names,  # type: ignore[arg-type]
    ).write(d, "expired")
    server_ca.issue("CN=elsewhere", dns=("elsewhere.example",), server=True).write(d, "othername")
    ports = {k: free_port() for k in ("good", "wrongca", "expired", "othername", "tls11", "plain")}
    (d / "big.bin").write_bytes(b"")
    with (d / "big.bin").open("r+b") as f:
        f.truncate(100 * 1024 * 1024)

    def server(port: int, stem: str, extra: str = "", body: str = ECHO) -> str:
        return f"""
        server {{
          listen 127.0.0.1:{port} ssl;
          ssl_certificate {d}/{stem}.pem;
          ssl_certificate_key {d}/{stem}.key;
          ssl_client_certificate {d}/client-ca.pem;
          ssl_verify_client on;
          {extra}
          location / {{ {body} }}
          location ~ /big$ {{ root {d}; try_files /big.bin =404; }}
          location ~ /upload {{
            client_max_body_size 50m;
            proxy_pass http://127.0.0.1:{ports["plain"]};
          }}
        }}"""

    servers = (
        f"""
        server {{
          listen 127.0.0.1:{ports["plain"]};
          client_max_body_size 50m;
          location / {{ return 200 "got $content_length\\n"; }}
        }}"""
        + server(ports["good"], "origin")
        + server(ports["wrongca"], "wrongca")
        + server(ports["expired"], "expired")
        + server(ports["othername"], "othername")
        + server(
            ports["tls11"], "origin", "ssl_protocols TLSv1 TLSv1.1; ssl_ciphers DEFAULT@SECLEVEL=0;"
        )
    )
    nginx = Nginx(d / "nginx", servers).start([("127.0.0.1", p) for p in ports.values()])
    try:
        yield Env(d, server_ca, client_ca, ports, nginx)
    finally:
        nginx.stop()


@pytest.fixture(scope="module")
def good(env: Env) -> Iterator[int]:
    sidecar, port = env.sidecar(
        "d1-ppr", f"https://localhost:{env.ports['good']}/base", 'max_body_bytes = "1MiB"'
    )
    sidecar.start([("127.0.0.1", port)])
    try:
        yield port
    finally:
        sidecar.stop()


def echo(body: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)


def test_origin_sees_our_client_certificate_and_rewritten_host(env: Env, good: int) -> None:
    r = curl(f"http://127.0.0.1:{good}/v1/ping?a=1", "-H", "Host: app.internal")
    assert r.status == 200
    seen = echo(r.body)
    assert seen["subject"] == "CN=TLSMA-ECDSA/MGW0000001/D1.PPR,O=Merchant,C=FR"
    assert seen["host"] == "localhost"
    assert seen["uri"] == "/base/v1/ping?a=1"
    assert seen["proto"] in ("TLSv1.2", "TLSv1.3")


def test_correlation_id_added_when_missing_and_kept_when_sent(good: int) -> None:
    added = echo(curl(f"http://127.0.0.1:{good}/x").body)["corr"]
    assert len(added) == 32 and all(c in "0123456789abcdef" for c in added)
    assert echo(curl(f"http://127.0.0.1:{good}/x").body)["corr"] != added
    kept = curl(f"http://127.0.0.1:{good}/x", "-H", "x-correlation-id: abc_DEF-123")
    assert echo(kept.body)["corr"] == "abc_DEF-123"


def test_internal_addresses_and_hop_by_hop_headers_do_not_reach_the_partner(good: int) -> None:
    r = curl(
        f"http://127.0.0.1:{good}/x",
        "-H", "X-Forwarded-For: 10.0.0.7",
        "-H", "Connection: keep-alive, X-Secret",
        "-H", "X-Secret: internal-only",
        "-H", "Keep-Alive: timeout=5",
    )  # fmt: skip
    seen = echo(r.body)
    assert seen["xff"] == "" and seen["secret"] == "" and seen["keepalive"] == ""


def test_absolute_form_for_the_upstream_host_is_proxied(env: Env, good: int) -> None:
    r = curl("-x", f"http://127.0.0.1:{good}", f"http://localhost:{env.ports['good']}/abs")
    assert r.status == 200 and echo(r.body)["uri"] == "/base/abs"


def test_absolute_form_for_a_foreign_host_is_refused_403(good: int) -> None:
    r = curl("-x", f"http://127.0.0.1:{good}", "http://evil.example/steal")
    assert r.status == 403
    body = json.loads(r.body)
    assert body["error"] == "forbidden_host" and body["route"] == "d1-ppr"
    assert "evil.example" in body["detail"]


def test_connect_method_is_refused(good: int) -> None:
    r = curl("-p", "-x", f"http://127.0.0.1:{good}", "https://localhost/")
    assert r.returncode != 0 or r.status in (400, 405)


def test_request_body_over_limit_gets_413(good: int) -> None:
    r = curl(
        f"http://127.0.0.1:{good}/upload",
        "--data-binary",
        "@-",
        "-H",
        "Content-Length: 2000000",
        "--data",
        "x",
    )
    assert r.status == 413 and json.loads(r.body)["error"] == "payload_too_large"


def test_chunked_request_body_over_limit_gets_413(tmp_path: Path, good: int) -> None:
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"y" * (2 * 1024 * 1024))
    r = curl(
        f"http://127.0.0.1:{good}/upload",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{payload}",
    )
    assert r.status == 413


def test_body_under_limit_is_forwarded(tmp_path: Path, good: int) -> None:
    payload = tmp_path / "p.bin"
    payload.write_bytes(b"z" * 500_000)
    r = curl(f"http://127.0.0.1:{good}/upload", "--data-binary", f"@{payload}")
    assert r.status == 200 and r.body.strip() == b"got 500000"
    r = curl(
        f"http://127.0.0.1:{good}/upload",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{payload}",
    )
    assert r.status == 200  # re-framed as chunked toward nginx


def raw(port: int, data: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_smuggling_content_length_with_transfer_encoding_is_400(good: int) -> None:
    out = raw(
        good,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b'"error": "bad_request"' in out
    assert out.count(b"HTTP/1.1") == 1  # the smuggled request was not answered


def test_smuggling_transfer_encoding_other_than_chunked_is_400(good: int) -> None:
    out = raw(
        good, b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 400 ") and b"chunked" in out


def test_pipelined_requests_are_answered_in_order(good: int) -> None:
    out = raw(
        good,
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 200 OK") == 2
    assert out.index(b"uri=/base/one") < out.index(b"uri=/base/two")


def test_100_mb_response_streams_in_flat_memory(env: Env, good: int, tmp_path: Path) -> None:
    sidecar_pid = _listener_pid(good)
    rss_before = _rss_mb(sidecar_pid)
    proc = subprocess.Popen(
        [
            "curl",
            "-sS",
            "-o",
            str(tmp_path / "out.bin"),
            "--limit-rate",
            "40M",
            f"http://127.0.0.1:{good}/big",
        ]
    )
    peak = rss_before
    while proc.poll() is None:
        peak = max(peak, _rss_mb(sidecar_pid))
        time.sleep(0.05)
    assert proc.returncode == 0
    assert (tmp_path / "out.bin").stat().st_size == 100 * 1024 * 1024
    assert peak - rss_before < 30, f"RSS grew {peak - rss_before:.0f} MB while relaying 100 MB"


def _listener_pid(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True
    ).stdout
    return int(out.split("pid=")[1].split(",")[0])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.parametrize(
    ("origin", "needle"),
    [
        ("wrongca", "not trusted: unable to get local issuer certificate"),
        ("expired", "not trusted: certificate has expired"),
        ("othername", "hostname mismatch: certificate is for elsewhere.example, not localhost"),
        ("tls11", "TLS handshake failed"),
    ],
)
def test_untrusted_or_outdated_origin_gives_502_naming_the_reason(
    env: Env, origin: str, needle: str
) -> None:
    sidecar, port = env.sidecar(f"bad-{origin}", f"https://localhost:{env.ports[origin]}")
    with running(sidecar.start([("127.0.0.1", port)])):
        r = curl(f"http://127.0.0.1:{port}/x")
    assert r.status == 502
    body = json.loads(r.body)
    assert body["error"] == "upstream_tls_failed"
    assert needle in body["detail"]
    if origin == "tls11":
        assert "protocol" in body["detail"].lower()


def test_refused_upstream_gives_502_quickly(env: Env) -> None:
    closed = free_port()
    sidecar, port = env.sidecar("refused", f"https://localhost:{closed}")
    with running(sidecar.start([("127.0.0.1", port)])):
        start = time.monotonic()
        r = curl(f"http://127.0.0.1:{port}/x")
        took = time.monotonic() - start
    assert r.status == 502 and json.loads(r.body)["error"] == "upstream_unreachable"
    assert "connection refused" in json.loads(r.body)["detail"]
    assert took < 1.5


def _misbehaving(env: Env, mode: str, record: Path) -> Peer:
    return Peer(
        [str(PEERS / "tls_origin.py"), "--mode", mode, "--cert", str(env.dir / "origin.pem"),
         "--key", str(env.dir / "origin.key"), "--client-ca", str(env.dir / "client-ca.pem"),
         "--record", str(record), "--delay", "5"]
    ).start()  # fmt: skip


def test_slow_upstream_gives_504(env: Env, tmp_path: Path) -> None:
    peer = _misbehaving(env, "slow", tmp_path / "rec")
    sidecar, port = env.sidecar("slow", f"https://localhost:{peer.port}")
    with running(peer, sidecar.start([("127.0.0.1", port)])):
        r = curl(f"http://127.0.0.1:{port}/x")
    assert r.status == 504 and json.loads(r.body)["error"] == "upstream_timeout"


def test_stalled_tls_handshake_gives_504(env: Env, tmp_path: Path) -> None:
    peer = _misbehaving(env, "stall", tmp_path / "rec")
    sidecar, port = env.sidecar("stall", f"https://localhost:{peer.port}")
    with running(peer, sidecar.start([("127.0.0.1", port)])):
        r = curl(f"http://127.0.0.1:{port}/x")
    assert r.status == 504 and "timed out" in json.loads(r.body)["detail"]


def test_request_is_never_sent_twice_when_upstream_drops_it(env: Env, tmp_path: Path) -> None:
    record = tmp_path / "rec"
    peer = _misbehaving(env, "close", record)
    sidecar, port = env.sidecar("close", f"https://localhost:{peer.port}")
    with running(peer, sidecar.start([("127.0.0.1", port)])):
        r = curl(f"http://127.0.0.1:{port}/pay", "--data", "amount=10")
        time.sleep(0.3)
    assert r.status == 502 and json.loads(r.body)["error"] == "upstream_closed"
    assert record.read_bytes().count(b"POST /pay") == 1


def test_dns_answer_change_reaches_the_new_address_within_max_connection_age(
    env: Env, tmp_path: Path
) -> None:
    port = free_port("127.0.0.2")
    cert = env.server_ca.issue("CN=d1.test", dns=("d1.test",), server=True)
    cert.write(tmp_path, "d1test")
    servers = "".join(
        f"""
        server {{
          listen {ip}:{port} ssl;
          ssl_certificate {tmp_path}/d1test.pem;
          ssl_certificate_key {tmp_path}/d1test.key;
          ssl_client_certificate {env.dir}/client-ca.pem;
          ssl_verify_client on;
          location / {{ return 200 "origin={ip}\\n"; }}
        }}"""
        for ip in ("127.0.0.2", "127.0.0.3")
    )
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"d1.test": {"a": ["127.0.0.2"], "ttl": 1}}))
    dns_peer = Peer([str(PEERS / "dns_server.py"), "--zone", str(zone)]).start()
    origins = Nginx(tmp_path / "nginx", servers)
    sidecar, sport = env.sidecar(
        "dns",
        f"https://d1.test:{port}",
        "max_connection_age = 1\n",
        trust=str(env.dir / "server-ca.pem"),
    )
    conf = (
        sidecar.config.read_text() + f'\n[resolver]\nnameservers = ["127.0.0.1:{dns_peer.port}"]\n'
    )
    sidecar.config.write_text(conf)
    origins.start([("127.0.0.2", port), ("127.0.0.3", port)])
    with running(dns_peer, origins), running(sidecar.start([("127.0.0.1", sport)])):
        first = curl(f"http://127.0.0.1:{sport}/", "--keepalive-time", "60")
        assert first.body.strip() == b"origin=127.0.0.2"
        zone.write_text(json.dumps({"d1.test": {"a": ["127.0.0.3"], "ttl": 1}}))
        time.sleep(1.5)  # > max_connection_age: the pooled connection must be retired
        second = curl(f"http://127.0.0.1:{sport}/")
        assert second.body.strip() == b"origin=127.0.0.3"
    queries = (tmp_path / "zone.json.log").read_text()
    assert queries.count("d1.test A") >= 2  # asked again for the new connection


def test_access_log_line_per_request_without_secrets(env: Env) -> None:
    sidecar, port = env.sidecar("logged", f"https://localhost:{env.ports['good']}")
    with running(sidecar.start([("127.0.0.1", port)])):
        curl(
            f"http://127.0.0.1:{port}/acct?card=4111",
            "-H",
            "Authorization: Bearer sekret-token",
            "-H",
            "x-correlation-id: corr-1",
        )
        time.sleep(0.6)
    lines = [
        json.loads(x)
        for x in sidecar.log().splitlines()
        if x.startswith('{"time"') and '"status"' in x
    ]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "logged" and line["status"] == 200 and line["path"] == "/acct"
    assert line["correlation_id"] == "corr-1" and line["method"] == "GET"
    assert "sekret-token" not in sidecar.log() and "4111" not in sidecar.log()


def test_an_address_upstream_sends_server_name_as_the_host(env: Env) -> None:
    """The partner's virtual host is chosen by name: with `upstream` an address, the Host is
    `server_name` (the name its certificate carries and SNI sends), not the address."""
    sidecar, port = env.sidecar(
        "by-address", f"https://127.0.0.1:{env.ports['good']}", 'server_name = "localhost"'
    )
    sidecar.start([("127.0.0.1", port)])
    try:
        r = curl(f"http://127.0.0.1:{port}/v1/cards")
    finally:
        sidecar.stop()
    assert r.status == 200, r.body
    assert echo(r.body)["host"] == "localhost"
