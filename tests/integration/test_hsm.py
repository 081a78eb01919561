"""The OAuth key inside a PKCS#11 token: SoftHSM2 with a token made per test, the sidecar via
its CLI (oauth-key, check, run), the D1 token stand-in verifying the assertions it signs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.harness import (
    PEERS,
    SIDECAR,
    Nginx,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_server,
    need,
    origin_pki,
    running,
    write_config,
)

pytestmark = pytest.mark.integration

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4321"


@attrs.frozen
class Token:
    dir: Path
    env: dict[str, str]  # SOFTHSM2_CONF for this test's token only

    def uri(self, obj: str = "oauth", pin: str | None = None, module: str = MODULE) -> str:
        pin_file = pin or str(self.dir / "pin")
        return (f"pkcs11:token=sidecar;object={obj};type=private"
                f"?module-path={module}&pin-source=file:{pin_file}")  # fmt: skip

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIDECAR, *args], capture_output=True, text=True, timeout=60,
            env={**os.environ, **self.env},
        )  # fmt: skip


@pytest.fixture
def token(tmp_path: Path) -> Token:
    need(MODULE)
    need("softhsm2-util")
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "sidecar", "--pin", PIN,
         "--so-pin", "87654321"],
        check=True, capture_output=True, env={**os.environ, **env},
    )  # fmt: skip
    pin = tmp_path / "pin"
    pin.write_text(PIN + "\n")
    pin.chmod(0o600)
    return Token(tmp_path, env)


@contextlib.contextmanager
def in_process(token: Token) -> Iterator[None]:
    """This test's token in this process: SoftHSM reads SOFTHSM2_CONF when initialized, and
    the module stays loaded between tests, so initialize it again, with no session kept."""
    import pkcs11

    from proxy.oauth import hsm

    os.environ["SOFTHSM2_CONF"] = token.env["SOFTHSM2_CONF"]
    hsm._SESSIONS.clear()
    pkcs11.lib(MODULE).reinitialize()
    try:
        yield
    finally:
        hsm._SESSIONS.clear()
        del os.environ["SOFTHSM2_CONF"]


def make_key(token: Token, *extra: str) -> subprocess.CompletedProcess[str]:
    out = token.run("oauth-key", "--pkcs11", token.uri(), *extra)
    assert out.returncode == 0, out.stderr
    return out


def oauth_config(token: Token, signing_key: str, name: str = "hsm") -> Path:
    origin_pki(token.dir)
    return write_config(
        token.dir / f"{name}.toml",
        f"""
        [[egress]]
        name = "{name}"
        listen = "127.0.0.1:0"
        upstream = "https://localhost:1"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
          [egress.oauth]
          token_url = "https://localhost:1/token"
          issuer = "MGW0000001"
          signing_key = "{signing_key}"
          key_id = "kid-hsm"
        """,
    )


def check_errors(token: Token, path: Path) -> tuple[int, str, list[dict[str, str]]]:
    out = token.run("check", "-c", str(path), "--json")
    findings = json.loads(out.stdout)["findings"] if out.stdout.strip() else []
    return out.returncode, out.stderr, [f for f in findings if f["level"] == "error"]


def test_oauth_key_makes_a_sensitive_never_extractable_p256_key_in_the_token(
    token: Token,
) -> None:
    out = make_key(token, "--public-out", str(token.dir / "oauth.pub"))
    assert "-----BEGIN PUBLIC KEY-----" in out.stdout
    jwk = json.loads(out.stdout.split("public key (JWK):\n", 1)[1].split("\nnext steps", 1)[0])
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    assert "in the token, never extractable" in out.stdout
    need("pkcs11-tool")
    listed = subprocess.run(
        ["pkcs11-tool", "--module", MODULE, "--token-label", "sidecar", "--login",
         "--pin", PIN, "--list-objects", "--type", "privkey"],
        capture_output=True, text=True, env={**os.environ, **token.env}, check=True,
    ).stdout  # fmt: skip
    assert "label:      oauth" in listed
    assert "sensitive" in listed and "never extractable" in listed
    # a second run refuses to add another key of the same name
    again = token.run("oauth-key", "--pkcs11", token.uri())
    assert again.returncode == 1
    assert "object=oauth: a private key by that name exists already" in again.stderr


def test_check_logs_in_and_signs_a_test_digest(token: Token) -> None:
    make_key(token)
    code, _, errors = check_errors(token, oauth_config(token, token.uri()))
    assert errors == [] and code == 0, errors
    out = token.run("check", "-c", str(token.dir / "hsm.toml"))
    assert "signed and verified a test digest in the token" in out.stdout


def one_line_error(token: Token, signing_key: str, says: str) -> None:
    code, stderr, errors = check_errors(token, oauth_config(token, signing_key))
    assert code == 1
    assert "Traceback" not in stderr
    messages = [e["message"] for e in errors if e["key"].endswith("oauth.signing_key")]
    assert len(messages) == 1, errors
    assert "\n" not in messages[0]
    assert says in messages[0], messages[0]


def test_check_names_pin_source_for_a_wrong_pin(token: Token) -> None:
    make_key(token)
    wrong = token.dir / "wrong-pin"
    wrong.write_text("0000\n")
    one_line_error(
        token, token.uri(pin=str(wrong)), f"pin-source=file:{wrong}: the token refused the PIN"
    )


def test_check_names_pin_source_for_a_missing_pin_file(token: Token) -> None:
    make_key(token)
    missing = token.dir / "no-such-pin"
    one_line_error(
        token, token.uri(pin=str(missing)), f"pin-source=file:{missing}: cannot read the PIN"
    )


def test_check_names_object_for_a_missing_key(token: Token) -> None:
    make_key(token)
    one_line_error(token, token.uri(obj="nothing-here"), "object=nothing-here: no private key")


def test_check_names_object_for_a_key_of_the_wrong_type(token: Token) -> None:
    need("pkcs11-tool")
    subprocess.run(
        ["pkcs11-tool", "--module", MODULE, "--token-label", "sidecar", "--login", "--pin", PIN,
         "--keypairgen", "--key-type", "rsa:2048", "--label", "rsa-key", "--id", "0b"],
        check=True, capture_output=True, env={**os.environ, **token.env},
    )  # fmt: skip
    one_line_error(
        token, token.uri(obj="rsa-key"), "object=rsa-key: an RSA key; ES256 needs an EC P-256 key"
    )


def test_check_names_module_path_for_a_module_that_will_not_load(token: Token) -> None:
    not_a_module = token.dir / "libnot-pkcs11.so"
    not_a_module.write_text("not a shared object\n")
    one_line_error(
        token,
        token.uri(module=str(not_a_module)),
        f"module-path={not_a_module}: does not load as a PKCS#11 module",
    )
    one_line_error(
        token, token.uri(module="/nonexistent/libpkcs11.so"), "module-path=/nonexistent/"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_d1_stand_in_verifies_the_assertion_signed_in_the_token(token: Token, workers: int) -> None:
    """The whole path: run, token fetch through mutual TLS, assertion signed in SoftHSM, the
    stand-in checking it with the public key oauth-key printed, then the call with the token.
    With two workers the supervisor signs and fetches once for both."""
    d = token.dir
    origin_pki(d)
    make_key(token, "--public-out", str(d / "oauth.pub"))
    stats = d / "stats.jsonl"
    tokens = Peer(
        [str(PEERS / "token_server.py"), "--port", "0", "--cert", str(d / "origin.pem"),
         "--key", str(d / "origin.key"), "--client-ca", str(d / "client-ca.pem"),
         "--public-key", str(d / "oauth.pub"), "--stats", str(stats)]
    ).start()  # fmt: skip
    origin_port, port = free_port(), free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(f"127.0.0.1:{origin_port}", d / "origin.pem", d / "origin.key",
                    d / "client-ca.pem", 'location / { return 200 "$http_authorization"; }'),
    )  # fmt: skip
    conf = write_config(
        d / "run.toml",
        f"""
        [service]
        workers = {workers}
        [[egress]]
        name = "hsm"
        listen = "127.0.0.1:{port}"
        upstream = "https://localhost:{origin_port}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
          [egress.oauth]
          token_url = "https://localhost:{tokens.port}/authz/v1/oauth2/token"
          issuer = "MGW0000001"
          signing_key = "{token.uri()}"
          key_id = "kid-hsm"
        """,
    )
    sidecar = Sidecar(conf)
    try:
        nginx.start([("127.0.0.1", origin_port)])
        sidecar.start([("127.0.0.1", port)], env=token.env)
        with running(nginx, sidecar):
            for _ in range(6):
                r = curl(f"http://127.0.0.1:{port}/v1/anything")
                assert r.status == 200, (r.body, sidecar.log())
                assert r.body.startswith(b"Bearer ")
    finally:
        tokens.stop()
    seen = [json.loads(x) for x in stats.read_text().splitlines()]
    # one fetch, one assertion, signed in the token and verified by the stand-in
    assert [(s["ok"], s["kid"], s["iss"]) for s in seen] == [(True, "kid-hsm", "MGW0000001")]


def test_hosted_tokens_on_ingress_are_signed_in_the_token(token: Token) -> None:
    from twisted.internet.task import Clock

    from proxy import config as cfg
    from proxy.oauth import glue

    d = token.dir
    origin_pki(d)
    make_key(token, "--public-out", str(d / "oauth.pub"))
    (d / "clients").write_text("d1:s3cret\n")
    conf = write_config(
        d / "hosted.toml",
        f"""
        [[ingress]]
        name = "callbacks"
        listen = "127.0.0.1:0"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:9"
          [ingress.oauth]
          clients_file = "clients"
          signing_key = "{token.uri()}"
        """,
    )
    code, _, errors = check_errors(token, conf)
    assert code == 0, errors
    with in_process(token):
        route = cfg.load(conf).ingress[0]
        clock = Clock()
        clock.advance(1_800_000_000)
        endpoint = glue.ingress_token_endpoint(clock, route)
        issued = endpoint.endpoint.issuer.issue("d1", b"s3cret")
    assert issued is not None
    public = serialization.load_pem_public_key((d / "oauth.pub").read_bytes())
    claims = jwt.decode(
        issued[0], public, algorithms=["ES256"], audience="callbacks",  # type: ignore[arg-type]
        options={"verify_exp": False, "verify_iat": False},
    )  # fmt: skip
    assert claims["sub"] == "d1"
    assert endpoint.endpoint.issuer.check_bearer(b"Bearer " + issued[0].encode()) == "d1"


def test_one_session_is_opened_and_reused_for_every_signature(token: Token) -> None:
    from proxy.oauth import client as oauth
    from proxy.oauth import hsm
    from proxy.pkcs11uri import parse

    make_key(token, "--public-out", str(token.dir / "oauth.pub"))
    with in_process(token):
        key = hsm.open_key(parse(token.uri()))
        settings = oauth.OAuthSettings(
            token_url="https://d1.test/token", issuer="MGW0000001", signing_key=key, key_id="k"
        )
        assertions = [oauth.make_assertion(settings, 1_800_000_000, f"jti-{i}") for i in range(5)]
        again = hsm.open_key(parse(token.uri()))  # a reload opens the key again: same session
        assert len(hsm._SESSIONS) == 1
        assert again._session_key == key._session_key
    public = serialization.load_pem_public_key((token.dir / "oauth.pub").read_bytes())
    for i, assertion in enumerate(assertions):
        claims = jwt.decode(
            assertion, public, algorithms=["ES256"],  # type: ignore[arg-type]
            options={"verify_exp": False, "verify_iat": False},
        )  # fmt: skip
        assert claims["jti"] == f"jti-{i}"
        assert jwt.get_unverified_header(assertion) == {"alg": "ES256", "kid": "k", "typ": "JWT"}
