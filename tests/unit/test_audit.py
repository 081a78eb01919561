"""proxy.ops.audit in process: each finding `check` adds beyond syntax, with its level and key;
and the loaders' plain words for a DER file, a reversed chain and a leaf given as client_ca."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy import config as cfg
from proxy.ops.audit import errors, findings_for
from proxy.tls import pki
from tests.pkifactory import Issued, make_ca, write_ca

PPR = "C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR"


def setup(d: Path, egress: str = "", ingress: str = "", oauth: str = "", top: str = "") -> Path:
    ca = make_ca("C=FR,O=Thales-like,CN=Root")
    server_ca = make_ca("C=FR,O=Web,CN=Web Root")
    write_ca(ca, d / "client-ca.pem")
    write_ca(server_ca, d / "server-ca.pem")
    ca.issue("C=FR,O=Thales-like,CN=Client Issuing", ca=True).issue(PPR, client=True).write(
        d, "client"
    )
    issuing = server_ca.issue("C=FR,O=Web,CN=Web Issuing", ca=True)
    issuing.issue("CN=localhost", dns=("localhost",), server=True).write(d, "server")
    (d / "oauth.key").write_bytes(pki.private_key_pem(pki.make_oauth_key()))
    (d / "oauth.key").chmod(0o600)
    conf = d / "c.toml"
    conf.write_text(
        f"""{top}
[[egress]]
name = "d1"
listen = "127.0.0.1:18080"
upstream = "https://api.d1-stg.thalescloud.io"
client_cert = "client.pem"
client_key = "client.key"
{egress}
{oauth}
[[ingress]]
name = "cb"
listen = "systemd:cb"
server_cert = "server.pem"
server_key = "server.key"
client_ca = "client-ca.pem"
upstream = "http://127.0.0.1:9000"
{ingress}
"""
    )
    return conf


OAUTH = """[egress.oauth]
token_url = "https://api.d1-stg.thalescloud.io/authz/v1/oauth2/token"
issuer = "MGW0000001"
signing_key = "oauth.key"
key_id = "kid-1"
"""


def found(conf: Path) -> list[tuple[str, str, str]]:
    findings, config = findings_for(conf)
    assert config is not None
    return [(f.level, f.key, f.message) for f in findings if f.level != "info"]


def test_a_clean_config_has_no_finding(tmp_path: Path) -> None:
    assert found(setup(tmp_path, oauth=OAUTH)) == []


@pytest.mark.parametrize(
    ("oauth", "key", "value"),
    [
        (OAUTH.replace('"kid-1"', '"CHANGE-ME"'), "egress[0].oauth.key_id", "CHANGE-ME"),
        (OAUTH.replace('"kid-1"', '"REPLACE-WITH-KID"'), "egress[0].oauth.key_id",
         "REPLACE-WITH-KID"),
    ],
)  # fmt: skip
def test_placeholders_left_in_are_errors(tmp_path: Path, oauth: str, key: str, value: str) -> None:
    assert ("error", key, f"{value!r} is a placeholder: put the real value here") in found(
        setup(tmp_path, oauth=oauth)
    )


def test_an_empty_key_id_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    conf = setup(tmp_path, oauth=OAUTH.replace('"kid-1"', '""'))
    assert [f for f in found(conf) if f[0] == "error"] == [
        ("error", "egress[0] (d1).oauth.key_id", "must not be empty")
    ]
    with pytest.raises(cfg.ConfigError):
        cfg.load(conf)


def test_oauth_issuer_other_than_the_certificates_gateway_id_is_an_error(tmp_path: Path) -> None:
    conf = setup(tmp_path, oauth=OAUTH.replace('"MGW0000001"', '"MGW0000002"'))
    ((level, key, message),) = found(conf)
    assert (level, key) == ("error", "egress[0] (d1).oauth.issuer")
    assert "'MGW0000002' is not the merchantGatewayId 'MGW0000001'" in message


def test_env_against_d1s_host_is_an_error(tmp_path: Path) -> None:
    conf = setup(tmp_path, egress='env = "PRD"')
    keys = {(level, key) for level, key, _ in found(conf)}
    assert ("error", "egress[0] (d1).env") in keys


def test_token_url_on_another_host_is_a_warning(tmp_path: Path) -> None:
    oauth = OAUTH.replace("https://api.d1-stg.thalescloud.io/", "https://login.example/")
    assert [(lvl, k) for lvl, k, _ in found(setup(tmp_path, oauth=oauth))] == [
        ("warning", "egress[0] (d1).oauth.token_url")
    ]


def test_egress_listening_off_loopback_is_a_warning(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    conf.write_text(conf.read_text().replace("127.0.0.1:18080", "0.0.0.0:18080"))
    ((level, key, message),) = found(conf)
    assert (level, key) == ("warning", "egress[0] (d1).listen") and "plain text" in message


def test_a_key_readable_by_others_is_a_warning(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    (tmp_path / "client.key").chmod(0o644)
    ((level, key, message),) = found(conf)
    assert (level, key) == ("warning", "egress[0] (d1).client_key")
    assert "mode 0644" in message and "chmod 600" in message


def test_a_listen_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        conf = setup(tmp_path, top=f'[admin]\nlisten = "127.0.0.1:{port}"')
        assert ("warning", "admin.listen", f"127.0.0.1:{port}: in use (by this sidecar if it is "
                "running, or by another process)") in found(conf)  # fmt: skip
        config = cfg.load(conf)
        assert errors(config) == []  # `run` does not bind twice: the listener itself says so


def test_client_ca_that_is_a_leaf_is_an_error(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    (tmp_path / "client-ca.pem").write_bytes((tmp_path / "client.pem").read_bytes())
    messages = [m for lvl, k, m in found(conf) if lvl == "error"]
    assert any("is not a CA certificate" in m and "never a leaf" in m for m in messages), messages


def test_a_der_certificate_is_named_as_der(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    issued: Issued = make_ca().issue(PPR, client=True)
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    (tmp_path / "client.pem").write_bytes(der)
    messages = [m for lvl, k, m in found(conf) if lvl == "error"]
    assert any("is a DER (binary) certificate; PEM is expected" in m for m in messages), messages


def test_a_chain_in_reverse_order_says_chain_order(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    root = make_ca("C=FR,O=X,CN=Root")
    inter = root.issue("C=FR,O=X,CN=Issuing", ca=True)
    leaf = inter.issue(PPR, client=True)
    (tmp_path / "client.pem").write_bytes(inter.cert_pem() + leaf.cert_pem())
    (tmp_path / "client.key").write_bytes(leaf.key_pem())
    messages = [m for lvl, k, m in found(conf) if lvl == "error"]
    assert any("chain order: the certificate matching" in m for m in messages), messages
    assert not any("does not match" in m for m in messages)


def test_the_server_key_gets_the_generic_policy_not_d1s(tmp_path: Path) -> None:
    conf = setup(tmp_path)
    web = make_ca("C=FR,O=Web,CN=Web Root 2").issue("C=FR,O=Web,CN=Issuing 2", ca=True)
    # P-384 and RSA 2048 are refused for D1 client certificates, fine for a public server one
    web.issue("CN=localhost", dns=("localhost",), server=True, key_type="rsa").write(
        tmp_path, "server"
    )
    assert [f for f in found(conf) if f[0] == "error"] == []


def test_a_key_readable_by_our_own_group_only_is_fine(tmp_path: Path) -> None:
    import os

    conf = setup(tmp_path)
    key = tmp_path / "client.key"
    os.chown(key, -1, os.getegid())
    key.chmod(0o440)  # a Kubernetes Secret mounted with fsGroup
    assert found(conf) == []
