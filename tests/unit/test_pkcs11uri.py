"""RFC 7512 URIs for signing_key, and what happens without python-pkcs11."""

from __future__ import annotations

import builtins
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy import config as cfg
from proxy.oauth import hsm
from proxy.pkcs11uri import URIError, parse

URI = "pkcs11:token=sidecar;object=oauth;type=private?module-path=/usr/lib/x.so&pin-source=file:pin"


def test_a_uri_names_token_object_module_and_pin_file(tmp_path: Path) -> None:
    uri = parse(URI, tmp_path)
    assert (uri.token, uri.object, uri.id) == ("sidecar", "oauth", None)
    assert uri.module_path == Path("/usr/lib/x.so")
    assert uri.pin_source == tmp_path / "pin"  # relative: next to the config
    assert uri.part("pin-source") == f"pin-source=file:{tmp_path / 'pin'}"


def test_percent_encoding_and_a_binary_id() -> None:
    uri = parse("pkcs11:token=my%20token;id=%01%02?module-path=/m.so")
    assert (uri.token, uri.id, uri.object) == ("my token", b"\x01\x02", None)


def test_a_pin_value_is_never_shown() -> None:
    uri = parse("pkcs11:object=k?module-path=/m.so&pin-value=1234")
    assert uri.pin_value == "1234"
    assert "1234" not in str(uri) and "1234" not in repr(uri)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("pkcs11:object=k", "module-path= is required"),
        ("pkcs11:token=t?module-path=/m.so", "no object= (the key's label) or id="),
        ("pkcs11:object=k;type=cert?module-path=/m.so", "type=cert: the signing key is a private"),
        ("pkcs11:object=k;slot-id=1?module-path=/m.so", "slot-id= is not understood here"),
        ("pkcs11:object=k;object=j?module-path=/m.so", "object= given twice"),
        ("pkcs11:object=k?module-path=/m.so&pin-source=https://x/pin", "only file: sources"),
    ],
)
def test_a_uri_that_names_no_usable_key_says_which_part(text: str, says: str) -> None:
    with pytest.raises(URIError, match=None) as e:
        parse(text)
    assert says in str(e.value)


def test_config_reads_a_uri_as_signing_key_and_names_the_key_when_it_is_wrong(
    tmp_path: Path,
) -> None:
    for name in ("client.pem", "client.key"):
        (tmp_path / name).write_text("x")
    body = textwrap.dedent(
        """
        [[egress]]
        name = "out"
        listen = "127.0.0.1:0"
        upstream = "https://h.example"
        client_cert = "client.pem"
        client_key = "client.key"
          [egress.oauth]
          token_url = "https://h.example/token"
          issuer = "MGW1"
          key_id = "k"
        """
    )
    path = tmp_path / "c.toml"
    path.write_text(body + f'  signing_key = "{URI}"\n')
    oauth = cfg.load(path).egress[0].oauth
    assert oauth is not None and str(oauth.signing_key) == URI
    path.write_text(body + '  signing_key = "pkcs11:object=k"\n')
    _, findings = cfg.parse(path)
    errors = {f.key: f.message for f in findings if f.level == "error"}
    assert "module-path= is required" in errors["egress[0] (out).oauth.signing_key"]


def test_without_python_pkcs11_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_pkcs11(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pkcs11" or name.startswith("pkcs11."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pkcs11)
    with pytest.raises(hsm.HsmError) as e:
        hsm.open_key(parse("pkcs11:object=k?module-path=/m.so"))
    assert "pip install 'mtls-sidecar[hsm]'" in str(e.value)


def test_status_never_shows_a_pin_value() -> None:
    import attrs

    from proxy.ops.service import _redacted
    from proxy.pkcs11uri import parse

    uri = parse("pkcs11:object=k?module-path=/m.so&pin-value=98765")
    shown = str(_redacted({"signing_key": attrs.asdict(uri)}))
    assert "98765" not in shown
