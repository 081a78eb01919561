"""The example configs in conf/ pass `mtls-sidecar check` once given matching key material."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.tls import pki
from tests.harness import SIDECAR
from tests.pkifactory import make_ca, write_ca

pytestmark = pytest.mark.integration

CONF = Path(__file__).resolve().parents[2] / "conf"
EXAMPLES = {
    "d1-preprod.toml": ("PPR", "https://api.d1-stg.thalescloud.io", "127.0.0.1:8080"),
    "d1-production.toml": ("PRD", "https://api.d1.thalescloud.io", "127.0.0.1:8081"),
}
CREDS = "${CREDENTIALS_DIRECTORY}/"


def _target(folder: Path, creds: Path, value: str) -> Path:
    """Where a path from the config lands: in the credentials folder or next to the config."""
    if value.startswith(CREDS):
        return creds / value.removeprefix(CREDS)
    return folder / value


def _oauth_key_pem() -> bytes:
    return pki.private_key_pem(pki.make_oauth_key())


def _material_for(example: Path, folder: Path, creds: Path) -> dict[str, Any]:
    """Test key material under the names the example uses, matching its env and gateway id."""
    doc = tomllib.loads(example.read_text())
    (egress,) = doc["egress"]
    (ingress,) = doc["ingress"]
    env, gateway_id = egress["env"], egress["oauth"]["issuer"]

    thales = make_ca("C=FR,O=Thales-like,CN=Thales-like Client Root")
    issuing = thales.issue("C=FR,O=Thales-like,CN=Thales-like Client Issuing CA", ca=True)
    client = issuing.issue(f"C=FR,O=Merchant,CN=TLSMA-ECDSA/{gateway_id}/D1.{env}", client=True)
    for key, data in (
        (egress["client_cert"], client.chain_pem()),
        (egress["client_key"], client.key_pem()),
        (egress["oauth"]["signing_key"], _oauth_key_pem()),
    ):
        path = _target(folder, creds, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    web_root = make_ca("C=US,O=Public-like,CN=Web Root")
    web_issuing = web_root.issue("C=US,O=Public-like,CN=Web Issuing CA", ca=True)
    server = web_issuing.issue("CN=callbacks.merchant.example", dns=("callbacks.merchant.example",),
                               server=True)  # fmt: skip
    for key, data in (
        (ingress["server_cert"], server.chain_pem()),
        (ingress["server_key"], server.key_pem()),
    ):
        path = _target(folder, creds, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for key in (egress["client_key"], egress["oauth"]["signing_key"], ingress["server_key"]):
        _target(folder, creds, key).chmod(0o600)
    write_ca(thales, _target(folder, creds, ingress["client_ca"]))
    return doc


def _check(config: Path, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [SIDECAR, "check", "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    return out.returncode, json.loads(out.stdout)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_passes_check_with_matching_material(name: str, tmp_path: Path) -> None:
    folder, creds = tmp_path / "etc", tmp_path / "credentials"
    folder.mkdir()
    creds.mkdir()
    config = folder / "config.toml"
    shutil.copy(CONF / name, config)
    text = config.read_text()
    config.write_text(text.replace('key_id = "CHANGE-ME-', 'key_id = "registered-'))
    doc = _material_for(config, folder, creds)

    env, upstream, listen = EXAMPLES[name]
    (egress,) = doc["egress"]
    assert (egress["env"], egress["upstream"], egress["listen"]) == (env, upstream, listen)
    assert egress["oauth"]["token_url"] == f"{upstream}/authz/v1/oauth2/token"
    assert egress["oauth"]["body"] == "json" and len(egress["oauth"]["issuer"]) == 10
    assert "trust" not in egress  # the Mozilla bundle holds the Amazon roots
    (ingress,) = doc["ingress"]
    assert ingress["listen"] == "systemd:d1-callbacks"
    assert ingress["upstream"] == "http://127.0.0.1:9000"
    assert doc["admin"]["listen"] == "127.0.0.1:9901" and doc["log"]["format"] == "json"

    code, report = _check(config, {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    errors = [f for f in report["findings"] if f["level"] != "info"]
    assert code == 0 and report["ok"] is True, errors
    assert errors == []  # no error, and no warning either
    keys = {f["key"] for f in report["findings"]}
    assert {
        f"egress[0] (d1-{env.lower()}).client_cert",
        "ingress[0] (d1-callbacks).server_cert",
    } <= keys


def test_example_without_credentials_directory_names_the_variable(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    shutil.copy(CONF / "d1-preprod.toml", config)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    code, report = _check(config, env)
    assert code == 1
    messages = [f["message"] for f in report["findings"] if f["level"] == "error"]
    assert any("$CREDENTIALS_DIRECTORY, which is not set" in m for m in messages), messages


def test_example_with_its_placeholder_left_in_fails_check_naming_the_key(tmp_path: Path) -> None:
    folder, creds = tmp_path / "etc", tmp_path / "credentials"
    folder.mkdir()
    creds.mkdir()
    config = folder / "config.toml"
    shutil.copy(CONF / "d1-preprod.toml", config)
    _material_for(config, folder, creds)
    code, report = _check(config, {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    errors = [(f["key"], f["message"]) for f in report["findings"] if f["level"] == "error"]
    assert code == 1
    assert errors == [
        ("egress[0].oauth.key_id", "'CHANGE-ME-ppr-kid' is a placeholder: put the real value here")
    ]
