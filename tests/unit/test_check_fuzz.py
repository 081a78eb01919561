"""`check` on arbitrary text in every string-valued key: exit 0 or 1 with findings, never a
traceback. Run in-process (the function `mtls-sidecar check` calls) on a config whose every
other value is valid, with real key material, so the audit behind the parser runs too."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.commands.check import run_check
from proxy.tls import pki
from tests.harness import CLIENT_SUBJECT
from tests.pkifactory import make_ca, write_ca

BASE: dict[str, Any] = {
    "log": {"format": "json", "level": "info"},
    "service": {"workers": 1},
    "admin": {"listen": "127.0.0.1:0", "status_from": ["127.0.0.1/32"]},
    "resolver": {"nameservers": ["127.0.0.1:53"]},
    "egress": [
        {
            "name": "d1",
            "listen": "127.0.0.1:0",
            "upstream": "https://api.d1-stg.thalescloud.io",
            "client_cert": "client.pem",
            "client_key": "client.key",
            "trust": "server-ca.pem",
            "profile": "d1",
            "env": "PPR",
            "server_name": "api.d1-stg.thalescloud.io",
            "max_body_bytes": "1MiB",
            "oauth": {
                "token_url": "https://api.d1-stg.thalescloud.io/authz/v1/oauth2/token",
                "issuer": "MGW0000001",
                "signing_key": "oauth.key",
                "key_id": "kid-1",
                "audience": "d1",
                "body": "form",
                "authorization": "replace",
            },
        }
    ],
    "ingress": [
        {
            "name": "callbacks",
            "listen": "127.0.0.1:0",
            "server_cert": "server.pem",
            "server_key": "server.key",
            "client_ca": "client-ca.pem",
            "upstream": "http://127.0.0.1:9000",
            "allow_subjects": ["CN=*.d1.example"],
            "identity_headers": ["xfcc"],
            "upstream_trust": "server-ca.pem",
            "server_name": "localhost",
            "profile": "generic",
            "oauth": {
                "clients_file": "clients",
                "signing_key": "oauth.key",
                "verify_keys": ["oauth.key"],
                "issuer": "mtls-sidecar",
                "audience": "callbacks",
                "token_path": "/oauth2/token",
            },
        }
    ],
}


def string_keys(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from string_keys(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from string_keys(v, (*path, i))
    elif isinstance(value, str):
        yield path


# the integer-valued keys that also take a string ("auto", "1MiB") are included
KEYS = [*string_keys(BASE), ("service", "workers")]


def toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(header: str, body: dict[str, Any]) -> None:
        lines.append(header)
        subs = {k: v for k, v in body.items() if isinstance(v, dict)}
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items() if k not in subs)
        for k, v in subs.items():
            table(f"[{header.strip('[]')}.{k}]", v)

    for key, value in data.items():
        if isinstance(value, list):
            for item in value:
                table(f"[[{key}]]", item)
        else:
            table(f"[{key}]", value)
    return "\n".join(lines) + "\n"


def with_value(path: tuple[Any, ...], text: str) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    node = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = text
    return data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    server_ca = make_ca("C=FR,O=Origin PKI,CN=Origin Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    server_ca.issue("CN=localhost", dns=("localhost",), server=True).write(d, "server")
    client_ca.issue(CLIENT_SUBJECT, client=True).write(d, "client")
    (d / "oauth.key").write_bytes(pki.private_key_pem(pki.make_oauth_key()))
    (d / "clients").write_text("d1-tenant:a-long-enough-secret-for-the-test\n")
    for name in ("client.key", "server.key", "oauth.key"):
        (d / name).chmod(0o600)
    return d


def check(folder: Path, data: dict[str, Any]) -> tuple[int, str]:
    path = folder / "sidecar.toml"
    path.write_text(to_toml(data), "utf-8")
    out = io.StringIO()
    return run_check(str(path), out=out), out.getvalue()


def test_the_base_config_passes(folder: Path) -> None:
    code, text = check(folder, BASE)
    assert code == 0, text


NASTY = ["", " ", "\x00", "d1.example:443", "https://d1.example", "[::1]:x", "unix:", "auto",
         "*", "/", "file:", "${CREDENTIALS_DIRECTORY}/x", "CN=", "\u202e", "a" * 300, "../" * 9,
         "1e999MiB", "-1", "0.0.0.0:99999", "::", "%", "é.example", "x" * 64 + ".a"]  # fmt: skip
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@pytest.mark.parametrize("path", KEYS, ids=[".".join(map(str, k)) for k in KEYS])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(st.sampled_from(NASTY), TEXT))
@example(text="d1.example:443")
def test_any_text_in_a_string_key_is_a_finding_not_a_traceback(
    folder: Path, path: tuple[Any, ...], text: str
) -> None:
    code, out = check(folder, with_value(path, text))
    assert code in (0, 1), out
    assert "Traceback" not in out
    assert out.rstrip().splitlines()[-1] in ("OK: 0 error(s)",) or out.rstrip().endswith("error(s)")
