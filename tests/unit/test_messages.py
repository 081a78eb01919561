"""The words `check` (and `run`) use for mistakes a new operator makes: each says what the
file holds and what to do, never a position or a misleading category."""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from OpenSSL import crypto

from proxy import config as cfg
from proxy.ops.audit import findings_for
from proxy.tls import pki
from tests.pkifactory import make_ca
from tests.unit.test_audit import PPR, found, setup


def errors(conf: Path) -> list[str]:
    return [m for level, _, m in found(conf) if level == "error"]


def _sha1_signed(cert: x509.Certificate, issuer_key: object) -> x509.Certificate:
    # cryptography refuses to sign with SHA-1; OpenSSL's own X509_sign still can
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        x = crypto.X509.from_cryptography(cert)
        x.sign(crypto.PKey.from_cryptography_key(issuer_key), "sha1")  # type: ignore[arg-type]
        return x.to_cryptography()


def test_a_sha1_certificate_is_reported_as_sha1_not_as_chain_order(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    web = make_ca("C=FR,O=Web,CN=Old Root", key_type="rsa")
    leaf = web.issue("CN=localhost", dns=("localhost",), server=True, key_type="rsa")
    sha1 = _sha1_signed(leaf.cert, web.key)
    pem = sha1.public_bytes(serialization.Encoding.PEM) + web.cert_pem()
    (tmp_path / "server.pem").write_bytes(pem)
    (tmp_path / "server.key").write_bytes(leaf.key_pem())
    messages = errors(conf)
    assert any("is signed with SHA-1" in m and "reissued with SHA-256" in m for m in messages), (
        messages
    )
    assert not any("chain order" in m for m in messages), messages


def _p7b(tmp_path: Path, encoding: serialization.Encoding) -> bytes:
    issued = make_ca().issue(PPR, client=True)
    return pkcs7.serialize_certificates([issued.cert], encoding)


@pytest.mark.parametrize(
    ("encoding", "command"),
    [
        (serialization.Encoding.PEM, "`openssl pkcs7 -print_certs -in "),
        (serialization.Encoding.DER, "`openssl pkcs7 -inform der -print_certs -in "),
    ],
)
def test_a_p7b_bundle_gets_a_conversion_hint(
    tmp_path: Path, encoding: serialization.Encoding, command: str
) -> None:
    conf = setup(tmp_path)
    (tmp_path / "client.pem").write_bytes(_p7b(tmp_path, encoding))
    messages = errors(conf)
    assert any("is a PKCS#7 bundle (.p7b/.p7c)" in m and command in m for m in messages), messages


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_a_csr_given_as_the_certificate_says_so(
    tmp_path: Path, encoding: serialization.Encoding
) -> None:
    conf = setup(tmp_path)
    key = pki.make_key("ecdsa")
    subject = dict(env="PPR", gateway_id="MGW0000001", country="FR", state="IDF",
                   locality="Paris", org="M", org_unit="P")  # fmt: skip
    csr = pki.make_csr(key, **subject)
    (tmp_path / "client.pem").write_bytes(csr.public_bytes(encoding))
    messages = errors(conf)
    assert any(
        "is a certificate signing request (CSR), not a certificate: send it to the CA" in m
        for m in messages
    ), messages


def test_a_config_with_a_utf8_bom_gets_a_sentence(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    conf.write_bytes(b"\xef\xbb\xbf" + conf.read_bytes())
    findings, config = findings_for(conf)
    assert config is None
    (finding,) = findings
    assert finding.message.startswith("starts with a byte order mark (BOM)"), finding
    assert "line" not in finding.message and "column" not in finding.message


def test_a_latin1_config_gets_a_sentence(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    conf.write_bytes(b"# Soci\xe9t\xe9 G\xe9n\xe9rale\n" + conf.read_bytes())
    findings, config = findings_for(conf)
    assert config is None
    (finding,) = findings
    assert finding.message.startswith("is not UTF-8 (byte 0xe9 on line 1; Latin-1"), finding
    assert "TOML files are UTF-8" in finding.message and "position" not in finding.message


@pytest.mark.parametrize(
    ("expired_for", "words"),
    [
        (datetime.timedelta(hours=5, minutes=10), "expired 5 hours ago"),
        (datetime.timedelta(minutes=20), "expired 20 minutes ago"),
        (datetime.timedelta(hours=30), "expired 1 day ago"),
        (datetime.timedelta(days=3, hours=2), "expired 3 days ago"),
    ],
)
def test_expiry_less_than_a_day_ago_says_hours(
    tmp_path: Path, expired_for: datetime.timedelta, words: str
) -> None:
    conf = setup(tmp_path)
    ca = make_ca("C=FR,O=Thales-like,CN=Root")
    (tmp_path / "client-ca.pem").write_bytes(ca.cert_pem())
    leaf = ca.issue(PPR, client=True)
    after = leaf.cert.not_valid_after_utc
    now = after + expired_for
    findings, _ = findings_for(conf, now)
    messages = [f.message for f in findings if f.key.endswith("client_cert")]
    assert any(words in m for m in messages), messages
    assert not any("0 days" in m for m in messages), messages


def test_expiring_within_hours_says_hours(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    leaf = x509.load_pem_x509_certificate((tmp_path / "client.pem").read_bytes())
    now = leaf.not_valid_after_utc - datetime.timedelta(hours=7, minutes=50)
    findings, _ = findings_for(conf, now)
    warned = [f.message for f in findings if f.level == "warning" and "client" in f.key]
    assert any("expires in 8 hours" in m for m in warned), warned


@pytest.mark.parametrize(
    ("line", "key", "hint"),
    [
        ("respons_timeout = 3", "egress[0] (d1).respons_timeout",
         "did you mean 'response_timeout'?"),
        ("client_certs = 'x'", "egress[0] (d1).client_certs", "did you mean 'client_cert'?"),
        ("max_body_size = 1", "egress[0] (d1).max_body_size", "did you mean 'max_body_bytes'?"),
    ],
)  # fmt: skip
def test_an_unknown_key_gets_did_you_mean(tmp_path: Path, line: str, key: str, hint: str) -> None:
    conf = setup(tmp_path, egress=line)
    _, findings = cfg.parse(conf)
    (finding,) = [f for f in findings if f.key == key]
    assert finding.level == "error"
    assert finding.message == f"unknown key; {hint}"


def test_an_unknown_key_with_no_near_name_gets_no_guess(tmp_path: Path) -> None:
    conf = setup(tmp_path, egress="colour = 'blue'")
    _, findings = cfg.parse(conf)
    (finding,) = [f for f in findings if f.key.endswith(".colour")]
    assert finding.message == "unknown key"


@pytest.mark.parametrize(
    ("line", "warned"),
    [
        ("response_timeout = 30000", "30000 s (8 h 20 min) is far above 600 s"),
        ("connect_timeout = 5000", "5000 s (1 h 23 min) is far above 60 s"),
        ("idle_timeout = 60000", "60000 s (16 h 40 min) is far above 3600 s"),
    ],
)
def test_timeouts_far_above_sane_bounds_warn(tmp_path: Path, line: str, warned: str) -> None:
    conf = setup(tmp_path, egress=line)
    key = line.split(" ")[0]
    findings, config = findings_for(conf)
    assert config is not None  # a warning, not an error: `run` still starts
    (finding,) = [f for f in findings if f.key == f"egress[0] (d1).{key}"]
    assert finding.level == "warning"
    assert finding.message.startswith(warned), finding.message
    assert "seconds, not milliseconds" in finding.message


def test_a_timeout_at_its_bound_does_not_warn(tmp_path: Path) -> None:
    conf = setup(tmp_path, egress="response_timeout = 600\nconnect_timeout = 60")
    assert found(conf) == []
