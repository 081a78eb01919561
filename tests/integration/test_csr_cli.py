"""`mtls-sidecar csr` and `oauth-key` as an operator runs them, checked with openssl."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.tls import pki

pytestmark = pytest.mark.integration

COMMAND = Path(sys.executable).parent / "mtls-sidecar"
OPENSSL = shutil.which("openssl")
D1_RULE = "D1 requires RSA 4096 or ECDSA P-256"
SUBJECT_ARGS = [
    "--gateway-id",
    "MGW_000001",
    "--country",
    "FR",
    "--state",
    "Ile-de-France",
    "--locality",
    "Paris",
    "--org",
    "Acme, Inc.",
    "--org-unit",
    "Payments",
]


def sidecar(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(COMMAND), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def csr(
    cwd: Path, *extra: str, key: str = "client.key", out: str = "client.csr"
) -> subprocess.CompletedProcess[str]:
    return sidecar("csr", *SUBJECT_ARGS, "--key-out", key, "--csr-out", out, *extra, cwd=cwd)


def openssl_req_text(path: Path) -> str:
    if OPENSSL is None:
        pytest.skip("openssl not installed")
    done = subprocess.run(
        [OPENSSL, "req", "-in", str(path), "-noout", "-verify", "-text"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # openssl 3 reports the self-signature check on stderr, older versions on stdout
    assert "verify OK" in done.stdout + done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("mtls-sidecar: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def rsa_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    # RSA 4096 generation takes about a second: done once for the module.
    cwd = tmp_path_factory.mktemp("rsa")
    done = csr(cwd, "--env", "PRD", "--key-type", "rsa")
    assert done.returncode == 0, done.stderr
    return cwd, done.stdout


def test_ecdsa_csr_verifies_with_openssl_and_follows_d1_dn_policy(tmp_path: Path) -> None:
    done = csr(tmp_path, "--env", "PPR")
    assert done.returncode == 0, done.stderr
    text = openssl_req_text(tmp_path / "client.csr")
    assert (
        'Subject: C = FR, ST = Ile-de-France, L = Paris, O = "Acme, Inc.", OU = Payments,'
        " CN = TLSMA-ECDSA/MGW_000001/D1.PPR\n" in text
    )
    assert "Signature Algorithm: ecdsa-with-SHA256" in text
    assert "NIST CURVE: P-256" in text
    assert "subject: CN=TLSMA-ECDSA/MGW_000001/D1.PPR," in done.stdout
    assert "send client.csr to Thales" in done.stdout


def test_key_file_is_0600_unencrypted_pkcs8_matching_the_csr(tmp_path: Path) -> None:
    assert csr(tmp_path, "--env", "PPR").returncode == 0
    key_path = tmp_path / "client.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    pem = key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(pem, password=None)
    request = (tmp_path / "client.csr").read_bytes()
    assert x509.load_pem_x509_csr(request).public_key() == key.public_key()


def test_rsa_csr_is_4096_bits_sha256(rsa_run: tuple[Path, str]) -> None:
    cwd, stdout = rsa_run
    text = openssl_req_text(cwd / "client.csr")
    assert "CN = TLSMA-RSA/MGW_000001/D1.PRD\n" in text
    assert "Public-Key: (4096 bit)" in text
    assert "Signature Algorithm: sha256WithRSAEncryption" in text
    assert "(RSA 4096, mode 0600)" in stdout
    assert stat.S_IMODE((cwd / "client.key").stat().st_mode) == 0o600


def test_second_run_refuses_and_leaves_both_files_untouched(tmp_path: Path) -> None:
    assert csr(tmp_path, "--env", "PPR").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    done = csr(tmp_path, "--env", "PPR")
    assert done.returncode == 1
    line = one_line_error(done)
    assert line.endswith("already exists; refusing to overwrite it")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_existing_csr_file_stops_before_the_key_is_written(tmp_path: Path) -> None:
    (tmp_path / "client.csr").write_text("someone else's request\n")
    done = csr(tmp_path, "--env", "PPR", key="new.key")
    assert done.returncode == 1
    assert one_line_error(done) == (
        "mtls-sidecar: error: client.csr already exists; refusing to overwrite it"
    )
    assert not (tmp_path / "new.key").exists()
    assert (tmp_path / "client.csr").read_text() == "someone else's request\n"


@pytest.mark.parametrize(
    ("key_type", "reason"),
    [("rsa2048", f"RSA 2048 bits; {D1_RULE}"), ("ecdsa-p384", f"ECDSA P-384; {D1_RULE}")],
)
def test_key_types_d1_refuses_fail_with_the_reason(
    tmp_path: Path, key_type: str, reason: str
) -> None:
    done = csr(tmp_path, "--env", "PPR", "--key-type", key_type)
    assert done.returncode == 2
    assert f"argument --key-type: {reason}" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_key_size_is_not_an_option(tmp_path: Path) -> None:
    done = csr(tmp_path, "--env", "PPR", "--key-size", "2048")
    assert done.returncode == 2
    assert "unrecognized arguments: --key-size 2048" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_gateway_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    args = [a if a != "MGW_000001" else "MGW_1" for a in SUBJECT_ARGS]
    done = sidecar("csr", "--env", "PPR", *args, "--key-out", "k", "--csr-out", "c", cwd=tmp_path)
    assert done.returncode == 1
    assert "gateway id 'MGW_1': D1's merchantGatewayId is exactly 10 characters" in (
        one_line_error(done)
    )
    assert list(tmp_path.iterdir()) == []


def test_oauth_key_prints_a_jwk_matching_the_written_key(tmp_path: Path) -> None:
    done = sidecar(
        "oauth-key",
        "--key-out",
        "oauth.key",
        "--jwk-out",
        "oauth.jwk",
        "--public-out",
        "oauth.pub",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    key_path = tmp_path / "oauth.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"

    printed, _ = json.JSONDecoder().raw_decode(done.stdout, done.stdout.index("{"))
    expected = pki.public_jwk(key.public_key(), None)
    assert (printed["x"], printed["y"]) == (expected["x"], expected["y"])
    assert printed["kid"] == pki.jwk_thumbprint(expected)
    assert json.loads((tmp_path / "oauth.jwk").read_text()) == printed
    assert pki.public_jwk(key.public_key(), printed["kid"]) == printed

    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (tmp_path / "oauth.pub").read_bytes() == public_pem
    assert public_pem.decode() in done.stdout

    # What D1 will do with the registered JWK: verify an ES256 assertion signed by the key.
    token = jwt.encode({"iss": "MGW_000001"}, key, algorithm="ES256")
    verifier = jwt.PyJWK.from_json(json.dumps(printed))
    assert jwt.decode(token, verifier, algorithms=["ES256"])["iss"] == "MGW_000001"


def test_oauth_key_uses_the_given_kid_and_never_overwrites(tmp_path: Path) -> None:
    done = sidecar("oauth-key", "--key-out", "oauth.key", "--kid", "ppr-2026", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert '"kid": "ppr-2026"' in done.stdout
    before = (tmp_path / "oauth.key").read_bytes()
    again = sidecar("oauth-key", "--key-out", "oauth.key", cwd=tmp_path)
    assert again.returncode == 1
    assert one_line_error(again) == (
        "mtls-sidecar: error: oauth.key already exists; refusing to overwrite it"
    )
    assert (tmp_path / "oauth.key").read_bytes() == before


def test_write_new_file_names_the_file_in_the_way(tmp_path: Path) -> None:
    # the last guard, should the path change between the checks and the write
    (tmp_path / "keys").write_text("not a folder\n")
    with pytest.raises(NotADirectoryError) as blocked:
        pki.write_new_file(tmp_path / "keys" / "sub" / "client.key", b"secret", 0o600)
    assert str(blocked.value) == (
        f"{tmp_path}/keys/sub/client.key: {tmp_path}/keys is a file, not a folder"
    )
    with pytest.raises(FileNotFoundError) as missing:
        pki.write_new_file(tmp_path / "nowhere" / "client.key", b"secret", 0o600)
    assert (
        str(missing.value)
        == f"{tmp_path}/nowhere/client.key: folder {tmp_path}/nowhere does not exist"
    )


# --------------------------------------------------------------------------- --server
def server_csr(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return sidecar("csr", "--server", "--key-out", "server.key", "--csr-out", "server.csr",
                   *extra, cwd=cwd)  # fmt: skip


def test_server_csr_names_every_dns_name_and_verifies_with_openssl(tmp_path: Path) -> None:
    names = ["--dns", "callbacks.merchant.example", "--dns", "*.cb.merchant.example"]
    done = server_csr(tmp_path, *names, "--org", "Acme, Inc.", "--country", "fr")
    assert done.returncode == 0, done.stderr
    text = openssl_req_text(tmp_path / "server.csr")
    assert 'Subject: C = FR, O = "Acme, Inc.", CN = callbacks.merchant.example\n' in text
    assert "DNS:callbacks.merchant.example, DNS:*.cb.merchant.example" in text
    assert "TLS Web Server Authentication" in text
    assert "Signature Algorithm: ecdsa-with-SHA256" in text and "NIST CURVE: P-256" in text
    assert "TLSMA" not in text  # not D1's client DN policy
    key_path = tmp_path / "server.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    request = x509.load_pem_x509_csr((tmp_path / "server.csr").read_bytes())
    assert request.public_key() == key.public_key()
    assert "hand that CA's bundle (PEM) to Thales" in done.stdout


@pytest.mark.parametrize(
    ("key_type", "described"),
    [("rsa2048", "RSA 2048"), ("ecdsa-p384", "ECDSA P-384")],
)
def test_server_csr_takes_keys_d1_refuses_for_clients_but_generic_allows(
    tmp_path: Path, key_type: str, described: str
) -> None:
    done = server_csr(tmp_path, "--dns", "cb.merchant.example", "--key-type", key_type)
    assert done.returncode == 0, done.stderr
    assert f"({described}, mode 0600)" in done.stdout
    assert "Public-Key:" in openssl_req_text(tmp_path / "server.csr")


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        ((), 2, "argument --dns: --server needs at least one --dns NAME"),
        (("--dns", "cb.example", "--key-type", "rsa1024"), 2, "argument --key-type: RSA 1024 bits"),
        (("--dns", "cb.example", "--env", "PPR"), 2, "argument --env: not with --server"),
        (("--dns", "127.0.0.1"), 1, "--dns '127.0.0.1': an IP address, not a DNS name"),
        (("--dns", "localhost"), 1, "--dns 'localhost': not a fully qualified DNS name"),
        (("--dns", "bad_name.example"), 1, "--dns 'bad_name.example': not a fully qualified"),
    ],
)
def test_server_csr_refusals_write_nothing(
    tmp_path: Path, extra: tuple[str, ...], code: int, message: str
) -> None:
    done = server_csr(tmp_path, *extra)
    assert done.returncode == code
    assert message in done.stderr.splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_dns_without_server_is_a_usage_error(tmp_path: Path) -> None:
    done = csr(tmp_path, "--env", "PPR", "--dns", "cb.example")
    assert done.returncode == 2
    assert "argument --dns: only with --server" in done.stderr
    assert list(tmp_path.iterdir()) == []
