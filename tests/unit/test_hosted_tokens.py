"""Hosted ingress tokens are RFC 9068 JWT access tokens (ES256, kid = RFC 7638 thumbprint):
any endpoint built from the same key files accepts any other's tokens, and every token that is
not exactly ours and current is refused with 401 on the route."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock

from proxy import config as cfg
from proxy.oauth import glue
from proxy.oauth.server import key_id
from proxy.ops import audit
from proxy.ops.service import key_material_paths
from proxy.tls import contexts as tls
from proxy.tls import pki
from proxy.tls.throwaway import make_ca, write_ca
from proxy.wire.http import ProxyError, RequestHead

SECRET = "s3cret-value"
NOW = 1_700_000_000.0


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(ca, tmp_path / "client-ca.pem")
    ca.issue("CN=localhost", dns=("localhost",), server=True).write(tmp_path, "server")
    (tmp_path / "clients").write_text(f"d1-tenant:{SECRET}\n")
    for name in ("old", "new"):
        key = pki.make_oauth_key()
        (tmp_path / f"{name}.key").write_bytes(pki.private_key_pem(key))
        (tmp_path / f"{name}.key").chmod(0o600)
        (tmp_path / f"{name}.pub").write_bytes(public_pem(key))
    return tmp_path


def write_config(folder: Path, oauth: str, name: str = "d1-callbacks") -> Path:
    conf = folder / f"{name}.toml"
    conf.write_text(
        f"""
[[ingress]]
name = "{name}"
listen = "127.0.0.1:0"
server_cert = "server.pem"
server_key = "server.key"
client_ca = "client-ca.pem"
upstream = "http://127.0.0.1:9000"
  [ingress.oauth]
  clients_file = "clients"
  {oauth}
"""
    )
    return conf


def route(folder: Path, oauth: str) -> cfg.IngressRoute:
    return cfg.load(write_config(folder, oauth)).ingress[0]


def endpoint(
    folder: Path, oauth: str = 'signing_key = "old.key"', clock: Clock | None = None
) -> glue.IngressTokens:
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    return glue.ingress_token_endpoint(clock, route(folder, oauth))


def get_token(tokens: glue.IngressTokens, scope: str | None = None) -> str:
    basic = base64.b64encode(f"d1-tenant:{SECRET}".encode())
    body = b"grant_type=client_credentials" + (f"&scope={scope}".encode() if scope else b"")
    head = request(b"POST", [(b"authorization", b"Basic " + basic),
                             (b"content-type", b"application/x-www-form-urlencoded")])  # fmt: skip
    status, _headers, answer = tokens.answer(head, body)
    assert status == 200, answer
    token: str = json.loads(answer)["access_token"]
    return token


def request(method: bytes, headers: list[tuple[bytes, bytes]]) -> RequestHead:
    fields = [(name, name, value) for name, value in headers]
    return RequestHead(method, b"/notify", b"1.1", fields, None, False, True)


def status_of_call(tokens: glue.IngressTokens, token: str) -> int:
    """What the ingress route answers a call bearing `token`: 200 forwards it, else the error."""
    try:
        tokens.check(request(b"POST", [(b"authorization", f"Bearer {token}".encode())]))
    except ProxyError as e:
        assert e.code == "unauthorized"
        return e.status
    return 200


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reassembled(token: str, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """`token` with its header or claims changed and its original signature kept."""
    head, payload, signature = token.split(".")
    if header is not None:
        head = b64(json.dumps(header).encode())
    if claims:
        doc = jwt.decode(token, options={"verify_signature": False})
        payload = b64(json.dumps({**doc, **claims}).encode())
    return f"{head}.{payload}.{signature}"


def old_key(folder: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((folder / "old.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def claims_of(token: str) -> dict[str, Any]:
    doc: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return doc


# --------------------------------------------------------------------------- the token


def test_token_is_an_rfc9068_access_token_signed_es256_with_the_thumbprint_kid(
    folder: Path,
) -> None:
    tokens = endpoint(folder)
    token = get_token(tokens, scope="notify")
    signing = old_key(folder)
    kid = pki.jwk_thumbprint(pki.public_jwk(signing.public_key(), None))
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "typ": "at+jwt", "kid": kid}
    claims = jwt.decode(
        token, signing.public_key(), algorithms=["ES256"], audience="d1-callbacks",
        options={"verify_exp": False, "verify_iat": False},
    )  # fmt: skip
    assert set(claims) == {"iss", "aud", "sub", "client_id", "iat", "exp", "jti", "scope"}
    assert claims["iss"] == "mtls-sidecar"  # the default issuer
    assert claims["aud"] == "d1-callbacks"  # the default audience: the route's name
    assert claims["sub"] == claims["client_id"] == "d1-tenant"
    assert claims["iat"] == int(NOW) and claims["exp"] == int(NOW) + 900
    assert claims["scope"] == "notify" and len(claims["jti"]) >= 22


def test_issuer_and_audience_come_from_the_config(folder: Path) -> None:
    oauth = 'signing_key = "old.key"\n  issuer = "https://merchant.example"\n  audience = "cb"'
    token = get_token(endpoint(folder, oauth))
    assert (claims_of(token)["iss"], claims_of(token)["aud"]) == ("https://merchant.example", "cb")


def test_round_trip_a_token_from_one_process_admits_the_call_on_another(folder: Path) -> None:
    issuing, other = endpoint(folder), endpoint(folder)
    token = get_token(issuing)
    assert status_of_call(issuing, token) == 200
    assert status_of_call(other, token) == 200  # nothing shared but the key file


def test_a_rotated_replica_signs_with_the_new_key_and_accepts_the_old_keys_tokens(
    folder: Path,
) -> None:
    old = endpoint(folder)
    rotated = endpoint(folder, 'signing_key = "new.key"\n  verify_keys = ["old.pub"]')
    old_token, new_token = get_token(old), get_token(rotated)
    assert (
        jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(old_token)["kid"]
    )
    assert status_of_call(rotated, old_token) == 200
    assert status_of_call(rotated, new_token) == 200
    assert status_of_call(old, new_token) == 401  # old replicas do not know the new key yet


def test_verify_keys_may_be_private_key_files(folder: Path) -> None:
    rotated = endpoint(folder, 'signing_key = "new.key"\n  verify_keys = ["old.key"]')
    assert status_of_call(rotated, get_token(endpoint(folder))) == 200


# --------------------------------------------------------------------------- refusals: 401


def test_a_token_signed_by_a_removed_key_is_refused_with_401(folder: Path) -> None:
    token = get_token(endpoint(folder))
    removed = endpoint(folder, 'signing_key = "new.key"')  # old.key no longer listed
    assert status_of_call(removed, token) == 401


def test_an_expired_token_is_refused_with_401_with_no_leeway(folder: Path) -> None:
    clock = Clock()
    clock.advance(NOW)
    tokens = endpoint(folder, 'signing_key = "old.key"\n  token_lifetime = 60', clock)
    token = get_token(tokens)
    clock.advance(59.9)
    assert status_of_call(tokens, token) == 200
    clock.advance(0.1)
    assert status_of_call(tokens, token) == 401  # also once it was verified and remembered
    fresh = endpoint(folder, 'signing_key = "old.key"', clock)
    assert status_of_call(fresh, token) == 401


def test_a_token_for_another_audience_is_refused_with_401(folder: Path) -> None:
    other = endpoint(folder, 'signing_key = "old.key"\n  audience = "another-route"')
    assert status_of_call(endpoint(folder), get_token(other)) == 401


def test_a_token_from_another_issuer_is_refused_with_401(folder: Path) -> None:
    other = endpoint(folder, 'signing_key = "old.key"\n  issuer = "someone-else"')
    assert status_of_call(endpoint(folder), get_token(other)) == 401


@pytest.mark.parametrize(
    "change",
    [{"client_id": "other", "sub": "other"}, {"exp": int(NOW) + 86_400}, {"scope": "admin"}],
)
def test_a_tampered_token_is_refused_with_401(folder: Path, change: dict[str, Any]) -> None:
    tokens = endpoint(folder)
    token = get_token(tokens)
    tampered = reassembled(token, **change)
    assert tampered != token
    assert status_of_call(endpoint(folder), tampered) == 401
    assert status_of_call(tokens, tampered) == 401
    assert status_of_call(tokens, token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")) == 401


def test_alg_none_is_refused_with_401(folder: Path) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    header = {**jwt.get_unverified_header(good), "alg": "none"}
    unsigned = jwt.encode(claims_of(good), "", algorithm="none", headers=header)
    assert status_of_call(tokens, unsigned) == 401
    assert status_of_call(tokens, reassembled(good, header).rsplit(".", 1)[0] + ".") == 401


def test_hs256_signed_with_the_public_key_bytes_is_refused_with_401(folder: Path) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    header = {**jwt.get_unverified_header(good), "alg": "HS256"}
    signing_input = f"{b64(json.dumps(header).encode())}.{good.split('.')[1]}"
    for secret in ((folder / "old.pub").read_bytes(), (folder / "old.pub").read_bytes().strip()):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        assert status_of_call(tokens, f"{signing_input}.{b64(mac)}") == 401


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+JWS", None])
def test_a_token_whose_typ_is_not_at_jwt_is_refused_with_401(folder: Path, typ: str | None) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    signing = old_key(folder)
    # PyJWT leaves out a typ of None: no typ at all
    header = {"kid": jwt.get_unverified_header(good)["kid"], "typ": typ}
    token = jwt.encode(claims_of(good), signing, algorithm="ES256", headers=header)
    assert status_of_call(tokens, token) == 401


def test_rfc9068_media_type_form_of_typ_is_accepted(folder: Path) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    signing = old_key(folder)
    header = {"kid": jwt.get_unverified_header(good)["kid"], "typ": "application/at+jwt"}
    token = jwt.encode(claims_of(good), signing, algorithm="ES256", headers=header)
    assert status_of_call(tokens, token) == 200


@pytest.mark.parametrize("kid", ["not-a-known-kid", None])
def test_a_token_with_an_unknown_or_no_kid_is_refused_with_401(
    folder: Path, kid: str | None
) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    signing = old_key(folder)
    header: dict[str, Any] = {"typ": "at+jwt"} | ({"kid": kid} if kid else {})
    token = jwt.encode(claims_of(good), signing, algorithm="ES256", headers=header)
    assert status_of_call(tokens, token) == 401


@pytest.mark.parametrize("missing", ["iss", "aud", "sub", "client_id", "iat", "exp", "jti"])
def test_a_token_missing_a_required_claim_is_refused_with_401(folder: Path, missing: str) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    signing = old_key(folder)
    claims = {k: v for k, v in claims_of(good).items() if k != missing}
    header = jwt.get_unverified_header(good)
    token = jwt.encode(claims, signing, algorithm="ES256", headers=header)
    assert status_of_call(tokens, token) == 401


def test_a_token_issued_in_the_future_is_refused_with_401(folder: Path) -> None:
    tokens = endpoint(folder)
    good = get_token(tokens)
    signing = old_key(folder)
    header = jwt.get_unverified_header(good)
    later = {**claims_of(good), "iat": int(NOW) + 60, "exp": int(NOW) + 960}
    token = jwt.encode(later, signing, algorithm="ES256", headers=header)
    assert status_of_call(tokens, token) == 401
    skewed = {**claims_of(good), "iat": int(NOW) + 2}  # another replica's clock, a bit ahead
    token = jwt.encode(skewed, signing, algorithm="ES256", headers=header)
    assert status_of_call(tokens, token) == 200


def test_no_bearer_at_all_is_refused_with_401(folder: Path) -> None:
    tokens = endpoint(folder)
    with pytest.raises(ProxyError) as info:
        tokens.check(request(b"GET", []))
    assert info.value.status == 401


# --------------------------------------------------------------------------- config and check


def test_signing_key_is_required_and_named(folder: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        route(folder, "")
    assert "ingress[0] (d1-callbacks).oauth.signing_key: missing (required)" in str(info.value)


def test_an_unreadable_verify_key_names_the_key_and_its_index(folder: Path) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        route(folder, 'signing_key = "new.key"\n  verify_keys = ["old.pub", "gone.pub"]')
    assert "ingress[0] (d1-callbacks).oauth.verify_keys[1]: cannot read" in str(info.value)
    assert str(folder / "gone.pub") in str(info.value)


@pytest.mark.parametrize(
    ("oauth", "key"),
    [
        ('signing_key = "old.key"\n  issuer = ""', "issuer"),
        ('signing_key = "old.key"\n  audience = ""', "audience"),
        ('signing_key = "old.key"\n  verify_keys = "old.pub"', "verify_keys"),
        ('signing_key = "old.key"\n  token_lifetime = 0.5', "token_lifetime"),
        ('signing_key = "old.key"\n  kid = "x"', "kid"),
    ],
)
def test_bad_values_name_the_file_and_the_key(folder: Path, oauth: str, key: str) -> None:
    with pytest.raises(cfg.ConfigError) as info:
        route(folder, oauth)
    assert f"d1-callbacks.toml: ingress[0] (d1-callbacks).oauth.{key}:" in str(info.value)


def test_key_material_paths_include_the_token_keys(folder: Path) -> None:
    r = route(folder, 'signing_key = "new.key"\n  verify_keys = ["old.pub"]')
    paths = key_material_paths(r)
    assert folder / "new.key" in paths and folder / "old.pub" in paths


def _findings(folder: Path, oauth: str) -> list[tuple[str, str, str]]:
    config = cfg.load(write_config(folder, oauth))
    return [
        (f.level, f.key.split(".oauth.")[1], f.message)
        for f in audit.audit(config)
        if ".oauth." in f.key
    ]


def test_check_names_a_signing_key_that_is_not_p256(folder: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "rsa.key").write_bytes(pki.private_key_pem(rsa_key))
    (folder / "p384.pub").write_bytes(
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (folder / "junk.pub").write_text("not a key\n")
    found = _findings(
        folder, 'signing_key = "rsa.key"\n  verify_keys = ["old.pub", "p384.pub", "junk.pub"]'
    )
    errors = {key: message for level, key, message in found if level == "error"}
    assert set(errors) == {"signing_key", "verify_keys[1]", "verify_keys[2]"}
    assert str(folder / "rsa.key") in errors["signing_key"] and "P-256" in errors["signing_key"]
    assert "P-384" in errors["verify_keys[1]"]
    assert str(folder / "junk.pub") in errors["verify_keys[2]"]
    with pytest.raises(tls.MaterialError, match=r"^oauth\.signing_key .*rsa\.key"):
        endpoint(folder, 'signing_key = "rsa.key"')


def test_check_reports_the_kids_of_good_keys(folder: Path) -> None:
    found = _findings(folder, 'signing_key = "new.key"\n  verify_keys = ["old.pub"]')
    old = serialization.load_pem_public_key((folder / "old.pub").read_bytes())
    assert isinstance(old, ec.EllipticCurvePublicKey)
    assert [(level, key) for level, key, _ in found] == [
        ("info", "signing_key"),
        ("info", "verify_keys[0]"),
    ]
    assert found[1][2].endswith(f"kid {key_id(old)}")
