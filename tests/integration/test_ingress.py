"""Ingress end to end: curl / openssl s_client as D1 -> the sidecar via its CLI -> a recording
internal app. Certificates are made here; the sidecar trusts only the test's client CA."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from tests.harness import (
    PEERS,
    SIDECAR,
    Peer,
    Sidecar,
    curl,
    free_port,
    running,
    wait_port,
    write_config,
)
from tests.pkifactory import DAY, NOW, Issued, make_ca, write_ca

pytestmark = pytest.mark.integration


@attrs.frozen
class Env:
    dir: Path
    client_ca: Issued
    intermediate: Issued
    server_ca: Issued
    upstream: Peer
    record: Path

    def config(self, name: str, port: int, extra: str = "", client_ca: str = "client-ca.pem",
               listen: str | None = None) -> Path:  # fmt: skip
        return write_config(
            self.dir / f"{name}.toml",
            f"""
            [log]
            format = "json"
            [[ingress]]
            name = "{name}"
            listen = "{listen or f"127.0.0.1:{port}"}"
            server_cert = "server.pem"
            server_key = "server.key"
            client_ca = "{client_ca}"
            upstream = "http://127.0.0.1:{self.upstream.port}"
            {extra}
            """,
        )

    def seen(self) -> list[dict[str, object]]:
        if not self.record.exists():
            return []
        return [json.loads(x) for x in self.record.read_text().splitlines()]

    def mtls(self, port: int, stem: str, *args: str) -> list[str]:
        return [
            "--cacert", str(self.dir / "server-ca.pem"),
            "--cert", str(self.dir / f"{stem}.pem"), "--key", str(self.dir / f"{stem}.key"),
            *args, f"https://localhost:{port}/merchant-gateways/MGW0000001/notify",
        ]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("ingress")
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Merchant Root")
    client_root = make_ca("C=FR,O=Thales-like,CN=Thales Root")
    client_ca = client_root.issue("C=FR,O=Thales-like,CN=Thales Client CA 01", ca=True)
    other = make_ca("C=US,O=Other,CN=Other CA")
    write_ca(server_ca, d / "server-ca.pem")
    (d / "client-ca.pem").write_bytes(client_ca.cert_pem())  # intermediate as the only anchor
    write_ca(client_root, d / "client-root.pem")
    server_ca.issue("CN=localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(
        d, "server"
    )
    subject = 'C=FR,O=Thales D1 "PPR",OU=TLSMA,CN=d1-client.d1.example'
    client_ca.issue(
        subject, client=True, dns=("d1-client.d1.example",), uris=("spiffe://d1/caller",)
    ).write(d, "d1")
    client_ca.issue("C=FR,O=Thales D1,CN=d1-client-rotated.d1.example", client=True).write(
        d, "rotated"
    )
    client_ca.issue("C=FR,O=Elsewhere,CN=intruder.example", client=True).write(d, "outsider")
    other.issue("C=FR,O=Thales D1,CN=d1-client.d1.example", client=True).write(d, "otherca")
    client_ca.issue(
        "CN=d1-client.d1.example", client=True, not_before=NOW - 60 * DAY, not_after=NOW - DAY
    ).write(d, "expired")
    record = d / "upstream.jsonl"
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(record)]).start()
    try:
        yield Env(d, client_ca, client_ca, server_ca, upstream, record)
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def ingress(env: Env) -> Iterator[int]:
    port = free_port()
    sidecar = Sidecar(env.config("d1-callbacks", port)).start([("127.0.0.1", port)])
    try:
        yield port
    finally:
        sidecar.stop()


def headers_of(seen: dict[str, object]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in seen["headers"]:  # type: ignore[attr-defined]
        out.setdefault(name.lower(), []).append(value)
    return out


def test_verified_identity_reaches_the_app_exactly(env: Env, ingress: int) -> None:
    r = curl(*env.mtls(ingress, "d1", "-H", "x-correlation-id: c-1", "--data", '{"a":1}'))
    assert r.status == 200
    seen = json.loads(r.body)
    h = headers_of(seen)
    pem = (env.dir / "d1.pem").read_bytes()
    from cryptography import x509

    leaf = x509.load_pem_x509_certificates(pem)[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert h["client-cert"] == [f":{base64.b64encode(der).decode()}:"]
    chain = h["client-cert-chain"][0]
    assert base64.b64decode(chain.strip(":")) == env.client_ca.cert.public_bytes(
        serialization.Encoding.DER
    )
    xfcc = h["x-forwarded-client-cert"][0]
    assert xfcc.startswith(f"Hash={hashlib.sha256(der).hexdigest()};")
    assert 'Subject="CN=d1-client.d1.example,OU=TLSMA,O=Thales D1 \\\\"PPR\\\\",C=FR"' in xfcc or (
        "Subject=" in xfcc and "d1-client.d1.example" in xfcc
    )
    assert "URI=spiffe://d1/caller" in xfcc and "DNS=d1-client.d1.example" in xfcc
    assert h["x-client-subject"] == [leaf.subject.rfc4514_string()]
    assert h["x-client-verify"] == ["SUCCESS"]
    assert h["x-client-fingerprint-sha256"] == [hashlib.sha256(der).hexdigest()]
    assert h["x-client-serial"][0].lstrip("0") == f"{leaf.serial_number:X}".lstrip("0")
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-correlation-id"] == ["c-1"]
    assert seen["body_len"] == 7 and seen["path"] == "/merchant-gateways/MGW0000001/notify"


def test_spoofed_identity_headers_never_reach_the_app(env: Env, ingress: int) -> None:
    r = curl(
        *env.mtls(
            ingress, "d1",
            "-H", "X-Forwarded-Client-Cert: Hash=deadbeef;Subject=\"CN=admin\"",
            "-H", "Client-Cert: :AAAA:",
            "-H", "Client-Cert-Chain: :BBBB:",
            "-H", "X-Client-Subject: CN=admin",
            "-H", "X-Client-Verify: SUCCESS",
            "-H", "X-Client-Role: root",
            "-H", "X-Forwarded-For: 6.6.6.6",
        )
    )  # fmt: skip
    assert r.status == 200
    h = headers_of(json.loads(r.body))
    assert (
        len(h["x-forwarded-client-cert"]) == 1 and "deadbeef" not in h["x-forwarded-client-cert"][0]
    )
    assert h["client-cert"] != [":AAAA:"] and len(h["client-cert"]) == 1
    assert "BBBB" not in h["client-cert-chain"][0]
    assert h["x-client-subject"] == ['CN=d1-client.d1.example,OU=TLSMA,O=Thales D1 \\"PPR\\",C=FR']
    assert "x-client-role" not in h
    assert h["x-forwarded-for"] == ["127.0.0.1"]


def test_no_client_certificate_is_refused_at_the_handshake(env: Env, ingress: int) -> None:
    before = len(env.seen())
    r = curl("--cacert", str(env.dir / "server-ca.pem"), f"https://localhost:{ingress}/x")
    assert r.returncode != 0 and r.status == 0
    assert len(env.seen()) == before


@pytest.mark.parametrize("stem", ["otherca", "expired"])
def test_wrong_ca_or_expired_client_certificate_is_refused(
    env: Env, ingress: int, stem: str
) -> None:
    before = len(env.seen())
    r = curl(*env.mtls(ingress, stem))
    assert r.returncode != 0 and r.status == 0
    assert len(env.seen()) == before


def test_tls_1_1_is_refused(env: Env, ingress: int) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{ingress}", "-tls1_1",
         "-cert", str(env.dir / "d1.pem"), "-key", str(env.dir / "d1.key"),
         "-CAfile", str(env.dir / "server-ca.pem"), "-cipher", "DEFAULT@SECLEVEL=0"],
        input=b"", capture_output=True, timeout=10,
    )  # fmt: skip
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode != 0
    assert (
        "Cipher is (NONE)" in text or "protocol version" in text or "no protocols available" in text
    )


def test_tls_1_2_with_client_certificate_is_accepted(env: Env, ingress: int) -> None:
    r = curl(*env.mtls(ingress, "d1", "--tls-max", "1.2"))
    assert r.status == 200


def test_openssl_s_client_sees_only_http11_alpn_and_the_client_ca_name(
    env: Env, ingress: int
) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{ingress}", "-alpn", "h2,http/1.1",
         "-cert", str(env.dir / "d1.pem"), "-key", str(env.dir / "d1.key"),
         "-CAfile", str(env.dir / "server-ca.pem")],
        input=b"", capture_output=True, timeout=10,
    )  # fmt: skip
    text = out.stdout.decode(errors="replace")
    assert "ALPN protocol: http/1.1" in text
    assert "Thales Client CA 01" in text.split("Acceptable client certificate CA names")[1][:400]


def test_rotated_client_certificate_from_the_same_ca_just_works(env: Env, ingress: int) -> None:
    r = curl(*env.mtls(ingress, "rotated"))
    assert r.status == 200
    assert headers_of(json.loads(r.body))["x-client-subject"] == [
        "CN=d1-client-rotated.d1.example,O=Thales D1,C=FR"
    ]


def test_subject_outside_allow_subjects_gets_403_and_nothing_is_forwarded(env: Env) -> None:
    port = free_port()
    conf = env.config("gated", port, 'allow_subjects = ["CN=*.d1.example"]')
    sidecar = Sidecar(conf).start([("127.0.0.1", port)])
    with running(sidecar):
        before = len(env.seen())
        refused = curl(*env.mtls(port, "outsider"))
        assert refused.status == 403
        assert json.loads(refused.body) == {
            "error": "forbidden",
            "detail": "client certificate subject is not allowed",
            "route": "gated",
        }
        assert len(env.seen()) == before
        assert curl(*env.mtls(port, "d1")).status == 200
        time.sleep(0.6)
    assert "CN=intruder.example" in sidecar.log()


def openssl_subject(cert: Path, *nameopt: str) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", *nameopt, "-in", str(cert)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.strip().removeprefix("subject=").strip()


def test_allow_subjects_as_openssl_prints_them_admit_the_d1_subject(env: Env) -> None:
    """Each form an operator copies from openssl (or RFC 4514) admits the D1-shaped client,
    whose CN holds literal '/'; the same subject for the other environment gets 403."""
    subject = "C=FR,ST=IDF,O=Merchant SAS,OU=Payments,CN=TLSMA-ECDSA/abcdefghij/D1.PPR"
    env.client_ca.issue(subject, client=True).write(env.dir, "d1shaped")
    pem = env.dir / "d1shaped.pem"
    forms = {
        "oneline": openssl_subject(pem),
        "compat": openssl_subject(pem, "-nameopt", "compat"),
        "rfc4514": openssl_subject(pem, "-nameopt", "RFC2253"),
    }
    normalised = "CN=TLSMA-ECDSA/abcdefghij/D1.PPR,OU=Payments,O=Merchant SAS,ST=IDF,C=FR"
    # OpenSSL 3 writes the CN's '/' as '\\/' in the compat form; OpenSSL 1.1 and people don't
    raw = "/C=FR/ST=IDF/O=Merchant SAS/OU=Payments/CN=TLSMA-ECDSA/abcdefghij/D1.PPR"
    assert forms == {
        "oneline": "C = FR, ST = IDF, O = Merchant SAS, OU = Payments, "
        "CN = TLSMA-ECDSA/abcdefghij/D1.PPR",
        "compat": raw.replace("A/abcdefghij/", "A\\/abcdefghij\\/"),
        "rfc4514": normalised,
    }
    forms["compat-unescaped"] = raw
    forms["other-env"] = raw.replace("D1.PPR", "D1.PRD")
    for form, entry in forms.items():
        port = free_port()
        conf = env.config(f"form-{form}", port, f"allow_subjects = [{json.dumps(entry)}]")
        check = subprocess.run([SIDECAR, "check", "-c", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        compared = normalised.replace("PPR", "PRD") if form == "other-env" else normalised
        assert f"allow_subjects[0]: {entry!r} compares the whole subject with {compared}\n" in (
            check.stdout
        )
        sidecar = Sidecar(conf).start([("127.0.0.1", port)])
        with running(sidecar):
            before = len(env.seen())
            r = curl(*env.mtls(port, "d1shaped"))
            if form == "other-env":
                assert r.status == 403, form
                assert json.loads(r.body)["error"] == "forbidden"
                assert len(env.seen()) == before
                time.sleep(0.6)
            else:
                assert r.status == 200, form
                assert len(env.seen()) == before + 1
                assert headers_of(env.seen()[-1])["x-client-subject"] == [normalised]
    refusals = [json.loads(x) for x in sidecar.log().splitlines() if "refused" in x]
    assert [x["msg"] for x in refusals] == [
        f"form-other-env: client subject {normalised} refused: not in allow_subjects"
    ]


def test_only_enabled_identity_families_are_set(env: Env) -> None:
    port = free_port()
    conf = env.config("xfcc-only", port, 'identity_headers = ["xfcc"]')
    with running(Sidecar(conf).start([("127.0.0.1", port)])):
        r = curl(*env.mtls(port, "d1", "-H", "X-Client-Subject: CN=admin"))
    h = headers_of(json.loads(r.body))
    assert "x-forwarded-client-cert" in h
    assert "client-cert" not in h and "x-client-subject" not in h


def test_handshake_errors_are_counted_by_reason(env: Env) -> None:
    port, admin = free_port(), free_port()
    conf = env.config("counted", port)
    conf.write_text(conf.read_text() + f'\n[admin]\nlisten = "127.0.0.1:{admin}"\n')
    with running(Sidecar(conf).start([("127.0.0.1", port), ("127.0.0.1", admin)])):
        curl(*env.mtls(port, "expired"))
        curl(*env.mtls(port, "otherca"))
        assert curl(*env.mtls(port, "d1")).status == 200
        metrics = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    assert (
        'mtls_sidecar_tls_handshake_errors_total{reason="certificate_expired",route="counted"} 1.0'
        in metrics
    )
    assert (
        "mtls_sidecar_tls_handshake_errors_total"
        '{reason="certificate_untrusted",route="counted"} 1.0' in metrics
    )
    assert (
        'mtls_sidecar_requests_total{code="200",direction="ingress",route="counted"} 1.0' in metrics
    )
    assert (
        'mtls_sidecar_certificate_expiry_timestamp_seconds{role="server",route="counted"}'
        in metrics
    )


def test_systemd_socket_activation_hands_over_the_listener(env: Env) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate not installed")
    port = free_port()
    conf = env.config("activated", port, listen="systemd:d1-callbacks")
    log = (env.dir / "activated.log").open("wb")
    proc = subprocess.Popen(
        [activate, "-l", f"127.0.0.1:{port}", "--fdname=d1-callbacks",
         SIDECAR, "run", "-c", str(conf)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_port("127.0.0.1", port, proc)
        r = curl(*env.mtls(port, "d1"))
        assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert "activated: ingress listening on" in (env.dir / "activated.log").read_text()


def test_internal_upstream_down_gives_502_json(env: Env) -> None:
    port, dead = free_port(), free_port()
    conf = env.config("down", port)
    conf.write_text(conf.read_text().replace(f"127.0.0.1:{env.upstream.port}", f"127.0.0.1:{dead}"))
    with running(Sidecar(conf).start([("127.0.0.1", port)])):
        r = curl(*env.mtls(port, "d1"))
    assert r.status == 502
    assert json.loads(r.body)["error"] == "upstream_unreachable"
    assert json.loads(r.body)["route"] == "down"


def test_https_internal_upstream_is_verified_with_upstream_trust(env: Env, tmp_path: Path) -> None:
    from tests.harness import Nginx

    backend = free_port()
    env.server_ca.issue("CN=backend", dns=("localhost",), server=True).write(tmp_path, "backend")
    nginx = Nginx(
        tmp_path / "nginx",
        f"""
        server {{
          listen 127.0.0.1:{backend} ssl;
          ssl_certificate {tmp_path}/backend.pem;
          ssl_certificate_key {tmp_path}/backend.key;
          location / {{ return 200 "backend saw $http_x_client_subject"; }}
        }}""",
    ).start([("127.0.0.1", backend)])
    port, untrusted_port = free_port(), free_port()
    good = env.config("https-up", port, 'upstream_trust = "server-ca.pem"')
    good.write_text(
        good.read_text().replace(
            f"http://127.0.0.1:{env.upstream.port}", f"https://localhost:{backend}"
        )
    )
    bad = env.config("https-up-untrusted", untrusted_port, 'upstream_trust = "client-root.pem"')
    bad.write_text(
        bad.read_text().replace(
            f"http://127.0.0.1:{env.upstream.port}", f"https://localhost:{backend}"
        )
    )
    with running(nginx, Sidecar(good).start([("127.0.0.1", port)]),
                 Sidecar(bad).start([("127.0.0.1", untrusted_port)])):  # fmt: skip
        ok = curl(*env.mtls(port, "d1"))
        refused = curl(*env.mtls(untrusted_port, "d1"))
    assert ok.status == 200
    assert ok.body == b'backend saw CN=d1-client.d1.example,OU=TLSMA,O=Thales D1 \\"PPR\\",C=FR'
    assert refused.status == 502
    assert json.loads(refused.body)["error"] == "upstream_tls_failed"


def test_not_yet_valid_client_certificate_is_refused(env: Env, ingress: int) -> None:
    env.client_ca.issue(
        "CN=d1-client.d1.example", client=True, not_before=NOW + DAY, not_after=NOW + 60 * DAY
    ).write(env.dir, "future")
    before = len(env.seen())
    r = curl(*env.mtls(ingress, "future"))
    assert r.returncode != 0 and r.status == 0
    assert len(env.seen()) == before


@pytest.mark.parametrize("cipher", ["AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA", "AES256-SHA256"])
def test_tls_1_2_without_ecdhe_and_aead_is_refused(env: Env, ingress: int, cipher: str) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{ingress}", "-tls1_2", "-cipher", cipher,
         "-cert", str(env.dir / "d1.pem"), "-key", str(env.dir / "d1.key"),
         "-CAfile", str(env.dir / "server-ca.pem")],
        input=b"", capture_output=True, timeout=10,
    )  # fmt: skip
    assert out.returncode != 0
    assert b"Cipher is (NONE)" in out.stdout or b"handshake failure" in out.stderr


def test_the_full_server_chain_is_served(env: Env, tmp_path: Path) -> None:
    inter = env.server_ca.issue("C=FR,O=Merchant PKI,CN=Merchant Issuing CA", ca=True)
    inter.issue("CN=localhost", dns=("localhost",), server=True).write(tmp_path, "chained")
    port = free_port()
    conf = env.config("chained", port)
    conf.write_text(
        conf.read_text()
        .replace('server_cert = "server.pem"', f'server_cert = "{tmp_path}/chained.pem"')
        .replace('server_key = "server.key"', f'server_key = "{tmp_path}/chained.key"')
    )
    with running(Sidecar(conf).start([("127.0.0.1", port)])):
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts",
             "-cert", str(env.dir / "d1.pem"), "-key", str(env.dir / "d1.key"),
             "-CAfile", str(env.dir / "server-ca.pem"), "-verify_return_error"],
            input=b"", capture_output=True, timeout=10,
        )  # fmt: skip
    text = out.stdout.decode()
    assert text.count("-----BEGIN CERTIFICATE-----") == 2
    assert "Merchant Issuing CA" in text and "Verify return code: 0 (ok)" in text


def _raw_tls(env: Env, port: int, request: bytes) -> bytes:
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(env.dir / "server-ca.pem"))
    ctx.load_cert_chain(str(env.dir / "d1.pem"), str(env.dir / "d1.key"))
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    ) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
         "more than one Host header"),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", "HTTP/1.1 request without a Host header"),
    ],
)  # fmt: skip
def test_two_host_headers_or_none_in_http11_is_400_and_nothing_forwarded(
    env: Env, ingress: int, request_bytes: bytes, detail: str
) -> None:
    before = len(env.seen())
    got = _raw_tls(env, ingress, request_bytes)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"error": "bad_request", "detail": detail, "route": "d1-callbacks"}
    assert len(env.seen()) == before


def test_http10_without_host_is_forwarded_with_the_upstreams(env: Env, ingress: int) -> None:
    got = _raw_tls(env, ingress, b"GET /old HTTP/1.0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ")
    assert headers_of(env.seen()[-1])["host"] == [f"127.0.0.1:{env.upstream.port}"]


@pytest.mark.parametrize("forward", [False, True])
def test_a_validated_bearer_token_is_removed_unless_forward_authorization(
    env: Env, forward: bool
) -> None:
    import base64

    (env.dir / "clients").write_text("d1-tenant:s3cret-value\n")
    from proxy.tls import pki

    (env.dir / "hosted.key").write_bytes(pki.private_key_pem(pki.make_oauth_key()))
    (env.dir / "hosted.key").chmod(0o600)
    port = free_port()
    extra = f"""
        [ingress.oauth]
        clients_file = "clients"
        signing_key = "hosted.key"
        forward_authorization = {"true" if forward else "false"}
    """
    conf = env.config(f"bearer-{forward}", port, extra)
    with running(Sidecar(conf).start([("127.0.0.1", port)])):
        basic = base64.b64encode(b"d1-tenant:s3cret-value").decode()
        r = curl("--cacert", str(env.dir / "server-ca.pem"), "--cert", str(env.dir / "d1.pem"),
                 "--key", str(env.dir / "d1.key"), "-H", f"Authorization: Basic {basic}",
                 "--data", "grant_type=client_credentials",
                 f"https://localhost:{port}/oauth2/token")  # fmt: skip
        token = json.loads(r.body)["access_token"]
        admitted = curl(*env.mtls(port, "d1", "-H", f"Authorization: Bearer {token}"))
    assert admitted.status == 200
    seen = headers_of(json.loads(admitted.body))
    assert seen.get("authorization") == ([f"Bearer {token}"] if forward else None)


class _Interactive:
    """openssl s_client driven line by line (-crlf: each line ends in CRLF), its output read
    as it comes, so a command (K: a KeyUpdate, R: a renegotiation) lands between requests."""

    REQUEST = "GET /merchant-gateways/MGW0000001/notify HTTP/1.1\nHost: localhost\n\n"

    def __init__(self, env: Env, port: int, *args: str) -> None:
        import threading

        self.proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-crlf",
             "-servername", "localhost", "-cert", str(env.dir / "d1.pem"),
             "-key", str(env.dir / "d1.key"), "-CAfile", str(env.dir / "server-ca.pem"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.out = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.out += chunk

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # s_client gone: what it said is the outcome
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()

    def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.out.count(text.encode()) >= count:
                return True
            if self.proc.poll() is not None and not self.reader.is_alive():
                return self.out.count(text.encode()) >= count
            time.sleep(0.02)
        return False

    def answered(self, count: int, timeout: float = 10.0) -> bool:
        """`count` whole responses (head and Content-Length body) are in, so no record of
        theirs is still on its way when a command follows."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            done, rest = 0, self.out
            while (at := rest.find(b"HTTP/1.1 ")) >= 0 and b"\r\n\r\n" in rest[at:]:
                head, _, body = rest[at:].partition(b"\r\n\r\n")
                size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) < size:
                    break
                done, rest = done + 1, body[size:]
            if done >= count:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=5)


def _after_one_answer(env: Env, port: int, version: str) -> _Interactive:
    """s_client connected with `version`, one request sent and wholly answered."""
    client = _Interactive(env, port, version)
    client.send(_Interactive.REQUEST)
    if not client.answered(1):
        client.stop()
        raise AssertionError(client.out.decode(errors="replace"))
    return client


def test_a_tls13_key_update_both_ways_keeps_the_connection_serving(env: Env, ingress: int) -> None:
    """The client updates its keys and asks ours to follow (s_client's K): the requests before
    and after both get their answer on the same connection."""
    before = len(env.seen())
    client = _after_one_answer(env, ingress, "-tls1_3")
    try:
        client.send("K\n")
        assert client.wait_for("KEYUPDATE")
        client.send(_Interactive.REQUEST)
        assert client.answered(2), client.out.decode(errors="replace")
        assert client.proc.poll() is None  # still connected
    finally:
        client.stop()
    assert len(env.seen()) == before + 2


def test_a_tls12_renegotiation_is_refused_with_openssls_alert_and_ends_the_session(
    env: Env, ingress: int
) -> None:
    """s_client's R asks for a new handshake on the session: the listener's answer is the
    no_renegotiation alert, and the client ends the session on it."""
    before = len(env.seen())
    client = _after_one_answer(env, ingress, "-tls1_2")
    try:
        client.send("R\n")
        client.proc.wait(timeout=10)  # no second handshake: s_client exits on the alert
        text = client.out.decode(errors="replace")
        assert "RENEGOTIATING" in text
        assert "ssl3_read_bytes:no renegotiation" in text
    finally:
        client.stop()
    assert len(env.seen()) == before + 1
