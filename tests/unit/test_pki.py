"""Key and DN policy, chain inspection, CSRs, JWKs and key files (proxy.pki)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.tls import pki
from tests.pkifactory import DAY, NOW, Issued, make_ca, name, new_key

D1_RULE = "D1 requires RSA 4096 or ECDSA P-256"
GOOD_CN = "TLSMA-ECDSA/MGW_000001/D1.PPR"
SUBJECT = dict(
    env="PPR",
    gateway_id="MGW_000001",
    country="FR",
    state="Ile-de-France",
    locality="Paris",
    org="Acme, Inc.",
    org_unit="Payments",
)


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca()


@pytest.fixture(scope="module")
def rsa4096() -> pki.CsrKey:
    # The one RSA 4096 generation of this module (it takes about a second).
    return pki.make_key("rsa")


def client_cert(ca: Issued, cn: str, key_type: str = "ec") -> x509.Certificate:
    return ca.issue(f"C=FR,O=Acme,CN={cn}", client=True, key_type=key_type).cert


def self_signed(
    key: ec.EllipticCurvePrivateKey, cn: str, digest: hashes.SHA256 | hashes.SHA384
) -> x509.Certificate:
    subject = name(f"CN={cn}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .sign(key, digest)
    )


def b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


# --- DN policy ---------------------------------------------------------------------------------


def test_d1_common_name_has_literal_slashes_and_key_type() -> None:
    assert pki.d1_common_name("ecdsa", "MGW_000001", "PPR") == "TLSMA-ECDSA/MGW_000001/D1.PPR"
    assert pki.d1_common_name("rsa", "a-b_C12345", "PRD") == "TLSMA-RSA/a-b_C12345/D1.PRD"


@pytest.mark.parametrize(
    ("gateway_id", "env", "message"),
    [
        ("MGW_01", "PPR", "merchantGatewayId is exactly 10 characters"),
        ("MGW/000001", "PPR", "merchantGatewayId is exactly 10 characters"),
        ("MGW_000001", "DEV", "expected PPR or PRD"),
    ],
)
def test_d1_common_name_refuses_bad_id_or_env(gateway_id: str, env: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pki.d1_common_name("ecdsa", gateway_id, env)


def test_d1_cn_pattern_captures_parts_and_refuses_near_misses() -> None:
    match = pki.D1_CN.match("TLSMA-RSA/MGW_000001/D1.PRD")
    assert match is not None
    assert (match["alg"], match["gateway_id"], match["env"]) == ("RSA", "MGW_000001", "PRD")
    for bad in (
        "TLSMA-EC/MGW_000001/D1.PPR",
        "TLSMA-ECDSA/MGW_000001/D1.DEV",
        "TLSMA-ECDSA/MGW_0000011/D1.PPR",
        "TLSMA-ECDSA/MGW_000001/D1.PPR ",
        "tlsma-ecdsa/MGW_000001/D1.PPR",
    ):
        assert pki.D1_CN.match(bad) is None, bad


def test_d1_client_cert_with_good_cn_has_no_problem(ca: Issued) -> None:
    assert pki.d1_client_cert_problems(client_cert(ca, GOOD_CN), "PPR") == []
    assert pki.d1_client_cert_problems(client_cert(ca, GOOD_CN), None) == []


def test_d1_client_cert_cn_not_matching_pattern(ca: Issued) -> None:
    problems = pki.d1_client_cert_problems(client_cert(ca, "client.example"), "PPR")
    assert problems == [
        "CN 'client.example' does not match D1's pattern"
        " TLSMA-<RSA|ECDSA>/<merchantGatewayId>/D1.<PPR|PRD>"
    ]


def test_d1_client_cert_without_cn(ca: Issued) -> None:
    cert = ca.issue("C=FR,O=Acme", client=True).cert
    assert pki.d1_client_cert_problems(cert, "PPR") == [
        "subject has no CN; D1 requires one CN=TLSMA-<RSA|ECDSA>/<merchantGatewayId>/D1.<PPR|PRD>"
    ]


def test_d1_client_cert_env_mismatch(ca: Issued) -> None:
    problems = pki.d1_client_cert_problems(client_cert(ca, GOOD_CN), "PRD")
    assert problems == [f"CN '{GOOD_CN}' is for D1.PPR but the route expects PRD"]


def test_d1_client_cert_key_type_mismatch(ca: Issued) -> None:
    cert = client_cert(ca, "TLSMA-RSA/MGW_000001/D1.PPR", key_type="ec")
    assert pki.d1_client_cert_problems(cert, "PPR") == [
        "CN 'TLSMA-RSA/MGW_000001/D1.PPR' names RSA but the key is ECDSA P-256"
    ]
    cert = client_cert(ca, GOOD_CN, key_type="rsa2048")
    assert pki.d1_client_cert_problems(cert, "PPR") == [
        f"CN '{GOOD_CN}' names ECDSA but the key is RSA 2048 bits"
    ]


def test_d1_client_cert_signed_with_sha384_is_a_problem() -> None:
    cert = self_signed(ec.generate_private_key(ec.SECP256R1()), GOOD_CN, hashes.SHA384())
    assert pki.d1_client_cert_problems(cert, "PPR") == [
        "signature uses SHA-384; D1 requires SHA-256"
    ]


# --- key policy --------------------------------------------------------------------------------


def test_d1_refuses_rsa_2048_with_the_reason() -> None:
    key = new_key("rsa2048").public_key()
    assert pki.key_policy_problem(key, "d1") == f"RSA 2048 bits; {D1_RULE}"


def test_d1_accepts_rsa_4096_and_p256(rsa4096: pki.CsrKey) -> None:
    assert pki.key_policy_problem(rsa4096.public_key(), "d1") is None
    assert pki.key_policy_problem(new_key("ec").public_key(), "d1") is None


def test_p384_refused_under_d1_accepted_under_generic() -> None:
    key = new_key("ec384").public_key()
    assert pki.key_policy_problem(key, "d1") == f"ECDSA P-384; {D1_RULE}"
    assert pki.key_policy_problem(key, "generic") is None


def test_ed25519_refused_under_d1_accepted_under_generic() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    assert pki.key_policy_problem(key, "d1") == f"Ed25519; {D1_RULE}"
    assert pki.key_policy_problem(key, "generic") is None


def test_generic_is_security_level_2() -> None:
    assert pki.key_policy_problem(new_key("rsa2048").public_key(), "generic") is None
    weak_rsa = rsa.generate_private_key(65537, 1024).public_key()
    assert pki.key_policy_problem(weak_rsa, "generic") == (
        "RSA 1024 bits; profile generic requires RSA >= 2048 bits"
    )
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    assert pki.key_policy_problem(k1, "generic") == (
        "ECDSA secp256k1; profile generic accepts RSA >= 2048, ECDSA P-256/P-384/P-521,"
        " Ed25519 or Ed448"
    )


def test_unknown_profile_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown key profile 'd2'"):
        pki.key_policy_problem(new_key("ec").public_key(), "d2")


# --- certificate inspection --------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(ca: Issued) -> tuple[Issued, Issued]:
    intermediate = ca.issue("C=FR,O=Test PKI,CN=Test Intermediate", ca=True)
    leaf = intermediate.issue("CN=api.example", dns=("api.example",), server=True)
    return intermediate, leaf


def test_load_pem_chain_keeps_file_order_and_skips_keys(chain: tuple[Issued, Issued]) -> None:
    intermediate, leaf = chain
    loaded = pki.load_pem_chain(leaf.chain_pem() + leaf.key_pem())
    assert loaded == [leaf.cert, intermediate.cert]


def test_load_pem_chain_without_certificate_is_an_error(chain: tuple[Issued, Issued]) -> None:
    with pytest.raises(ValueError, match="no PEM certificate found"):
        pki.load_pem_chain(chain[1].key_pem())


def test_chain_in_order_has_no_problem(chain: tuple[Issued, Issued], ca: Issued) -> None:
    intermediate, leaf = chain
    assert pki.chain_order_problems([leaf.cert, intermediate.cert, ca.cert]) == []


def test_chain_in_wrong_order_is_detected(chain: tuple[Issued, Issued]) -> None:
    intermediate, leaf = chain
    problems = pki.chain_order_problems([intermediate.cert, leaf.cert])
    assert problems == [
        "certificate 1 (CN=Test Intermediate,O=Test PKI,C=FR) is issued by"
        " CN=Test Root CA,O=Test PKI,C=FR but certificate 2 is CN=api.example:"
        " order the file leaf first, then each issuer"
    ]


def test_chain_with_same_name_but_other_key_is_detected(chain: tuple[Issued, Issued]) -> None:
    _, leaf = chain
    impostor = make_ca("C=FR,O=Test PKI,CN=Test Intermediate")
    problems = pki.chain_order_problems([leaf.cert, impostor.cert])
    assert len(problems) == 1
    assert problems[0].startswith(
        "certificate 1 (CN=api.example) is not signed by certificate 2"
        " (CN=Test Intermediate,O=Test PKI,C=FR)"
    )


def test_days_left_counts_to_not_after(ca: Issued) -> None:
    cert = ca.issue("CN=x", not_after=NOW + 10 * DAY).cert
    # notAfter has one-second resolution
    assert pki.days_left(cert, NOW) == pytest.approx(10, abs=2 / 86400)
    assert pki.days_left(cert, NOW + 11 * DAY) == pytest.approx(-1, abs=2 / 86400)
    with pytest.raises(ValueError, match="timezone-aware"):
        pki.days_left(cert, NOW.replace(tzinfo=None))


def test_key_matches_cert_detects_a_foreign_key(chain: tuple[Issued, Issued]) -> None:
    _, leaf = chain
    assert pki.key_matches_cert(leaf.key, leaf.cert)
    assert not pki.key_matches_cert(new_key("ec"), leaf.cert)
    assert not pki.key_matches_cert(new_key("rsa2048"), leaf.cert)


@pytest.fixture(scope="module")
def wildcard_cert(ca: Issued) -> x509.Certificate:
    return ca.issue(
        "CN=not-a-san.example",
        dns=("*.d1.example", "api.example"),
        ips=("127.0.0.1", "::1"),
        server=True,
    ).cert


@pytest.mark.parametrize(
    ("hostname", "covered"),
    [
        ("api.example", True),
        ("x.d1.example", True),
        ("X.D1.Example", True),
        ("a.b.d1.example", False),  # a wildcard covers one label only
        ("d1.example", False),
        ("other.example", False),
        ("not-a-san.example", False),  # never the CN
        ("127.0.0.1", True),
        ("127.0.0.2", False),
        ("::1", True),
        ("[::1]", True),
    ],
)
def test_san_covers(wildcard_cert: x509.Certificate, hostname: str, covered: bool) -> None:
    assert pki.san_covers(wildcard_cert, hostname) is covered


def test_san_covers_is_false_without_san(ca: Issued) -> None:
    assert not pki.san_covers(ca.issue("CN=api.example").cert, "api.example")


def test_describe(chain: tuple[Issued, Issued]) -> None:
    _, leaf = chain
    cert = leaf.cert
    facts = pki.describe(cert)
    assert facts["subject"] == "CN=api.example"
    assert facts["issuer"] == "CN=Test Intermediate,O=Test PKI,C=FR"
    assert int(facts["serial"], 16) == cert.serial_number
    assert datetime.datetime.fromisoformat(facts["not_after"]) == cert.not_valid_after_utc
    assert datetime.datetime.fromisoformat(facts["not_before"]) == cert.not_valid_before_utc
    der = cert.public_bytes(serialization.Encoding.DER)
    assert facts["sha256"] == hashlib.sha256(der).hexdigest()
    assert facts["key"] == "ECDSA P-256"
    assert facts["signature_hash"] == "SHA-256"


def test_describe_key(rsa4096: pki.CsrKey) -> None:
    assert pki.describe_key(rsa4096.public_key()) == "RSA 4096"
    assert pki.describe_key(new_key("ec384").public_key()) == "ECDSA P-384"


# --- CSR ---------------------------------------------------------------------------------------


def test_make_key_ecdsa_is_p256() -> None:
    key = pki.make_key("ecdsa")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_make_key_rsa_is_4096(rsa4096: pki.CsrKey) -> None:
    assert isinstance(rsa4096, rsa.RSAPrivateKey)
    assert rsa4096.key_size == 4096


@pytest.mark.parametrize(
    ("key_type", "reason"),
    [
        ("rsa2048", f"RSA 2048 bits; {D1_RULE}"),
        ("rsa:2048", f"RSA 2048 bits; {D1_RULE}"),
        ("ecdsa-p384", f"ECDSA P-384; {D1_RULE}"),
        ("ed25519", "key type 'ed25519': expected ecdsa (P-256) or rsa (4096 bits)"),
    ],
)
def test_make_key_refuses_what_d1_refuses(key_type: str, reason: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        pki.make_key(key_type)
    assert str(excinfo.value) == reason


def test_make_csr_ecdsa_subject_and_signature() -> None:
    key = pki.make_key("ecdsa")
    csr = pki.make_csr(key, **SUBJECT)
    assert csr.is_signature_valid
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert [(a.oid._name, a.value) for a in csr.subject] == [
        ("countryName", "FR"),
        ("stateOrProvinceName", "Ile-de-France"),
        ("localityName", "Paris"),
        ("organizationName", "Acme, Inc."),
        ("organizationalUnitName", "Payments"),
        ("commonName", GOOD_CN),
    ]
    assert csr.public_key() == key.public_key()


def test_make_csr_rsa_names_rsa_in_cn(rsa4096: pki.CsrKey) -> None:
    csr = pki.make_csr(rsa4096, **{**SUBJECT, "env": "PRD"})
    cn = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "TLSMA-RSA/MGW_000001/D1.PRD"
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)


def test_make_csr_refuses_a_key_d1_refuses() -> None:
    key = rsa.generate_private_key(65537, 2048)
    with pytest.raises(ValueError) as excinfo:
        pki.make_csr(key, **SUBJECT)
    assert str(excinfo.value) == f"RSA 2048 bits; {D1_RULE}"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("country", "FRA", "country 'FRA': expected a two-letter ISO 3166 code"),
        ("org", "", "--org '': empty or surrounded by spaces"),
        ("org_unit", " Payments", "--org-unit ' Payments': empty or surrounded by spaces"),
        ("locality", "Pa\nris", "--locality 'Pa\\\\nris': contains a control character"),
        ("org", "x" * 65, "--org: longer than 64 characters"),
        ("gateway_id", "MGW_1", "gateway id 'MGW_1'"),
    ],
)
def test_make_csr_refuses_bad_subject_values(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pki.make_csr(new_key("ec"), **{**SUBJECT, field: value})


# --- OAuth assertion key -----------------------------------------------------------------------


def test_public_jwk_coordinates_decode_to_the_key() -> None:
    key = pki.make_oauth_key()
    assert key.curve.name == "secp256r1"
    jwk = pki.public_jwk(key.public_key(), "k1")
    numbers = key.public_key().public_numbers()
    assert b64url_int(jwk["x"]) == numbers.x
    assert b64url_int(jwk["y"]) == numbers.y
    assert len(jwk["x"]) == len(jwk["y"]) == 43  # 32 bytes, no padding
    assert {k: v for k, v in jwk.items() if k not in "xy"} == {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ES256",
        "use": "sig",
        "kid": "k1",
    }
    assert "kid" not in pki.public_jwk(key.public_key(), None)


def test_public_jwk_verifies_an_es256_token_signed_by_the_key() -> None:
    key = pki.make_oauth_key()
    jwk = pki.public_jwk(key.public_key(), "k1")
    token = jwt.encode({"iss": "MGW_000001"}, key, algorithm="ES256", headers={"kid": "k1"})
    verifier = jwt.PyJWK.from_json(json.dumps(jwk))
    assert jwt.decode(token, verifier, algorithms=["ES256"]) == {"iss": "MGW_000001"}


def test_public_jwk_refuses_other_curves() -> None:
    with pytest.raises(ValueError, match="ECDSA P-384: ES256 needs an ECDSA P-256 key"):
        pki.public_jwk(new_key("ec384").public_key(), None)


def test_jwk_thumbprint_of_the_rfc_7638_example() -> None:
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6"
        "tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-"
        "65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLy"
        "rdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzK"
        "nqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert pki.jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwk_thumbprint_ignores_optional_members() -> None:
    public = pki.make_oauth_key().public_key()
    with_kid = pki.public_jwk(public, "k1")
    required_only = {k: with_kid[k] for k in ("kty", "crv", "x", "y")}
    assert pki.jwk_thumbprint(with_kid) == pki.jwk_thumbprint(required_only)
    assert pki.jwk_thumbprint(with_kid) != pki.jwk_thumbprint(
        pki.public_jwk(pki.make_oauth_key().public_key(), "k1")
    )


# --- key files ---------------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_write_new_file_sets_mode_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    pki.write_new_file(path, b"secret", 0o600)
    assert path.read_bytes() == b"secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_new_file_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    path.write_bytes(b"original")
    with pytest.raises(FileExistsError) as excinfo:
        pki.write_new_file(path, b"new", 0o600)
    assert str(excinfo.value) == f"{path} already exists; refusing to overwrite it"
    assert path.read_bytes() == b"original"


def test_write_new_file_does_not_follow_a_dangling_symlink(tmp_path: Path) -> None:
    link, target = tmp_path / "client.key", tmp_path / "elsewhere.key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        pki.write_new_file(link, b"secret", 0o600)
    assert not target.exists()
