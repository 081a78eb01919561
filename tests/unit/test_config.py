"""proxy.config: TOML -> frozen attrs objects; every mistake names the file and the exact key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import attrs
import pytest

from proxy.config import (
    Config,
    ConfigError,
    EgressOAuth,
    EgressRoute,
    Finding,
    IngressRoute,
    Limits,
    Listen,
    Timeouts,
    Upstream,
    load,
    parse,
)

KEY_FILES = ("client.pem", "client.key", "roots.pem", "oauth.key", "server.pem", "server.key")

EGRESS = """
[[egress]]
name = "d1-ppr"
listen = "127.0.0.1:8080"
upstream = "https://api.d1-stg.example"
client_cert = "client.pem"
client_key = "client.key"
"""

INGRESS = """
[[ingress]]
name = "d1-callbacks"
listen = "127.0.0.1:8443"
server_cert = "server.pem"
server_key = "server.key"
client_ca = "roots.pem"
upstream = "http://127.0.0.1:9000"
"""

OAUTH = """
  [egress.oauth]
  token_url = "https://api.d1-stg.example/authz/v1/oauth2/token"
  issuer = "MGW_000001"
  signing_key = "oauth.key"
  key_id = "kid-1"
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A config folder holding placeholder key material (parse only checks readability)."""
    for name in KEY_FILES:
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def write(folder: Path, text: str, name: str = "sidecar.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def parse_text(
    folder: Path, text: str, environ: dict[str, str] | None = None
) -> tuple[Config | None, list[Finding]]:
    return parse(write(folder, text), environ or {})


def errors(findings: list[Finding]) -> dict[str, str]:
    """key -> message of every error finding."""
    return {f.key: f.message for f in findings if f.level == "error"}


def only_error(findings: list[Finding]) -> Finding:
    errs = [f for f in findings if f.level == "error"]
    assert len(errs) == 1, errs
    return errs[0]


def egress_with(**values: str) -> str:
    """EGRESS with extra or replaced `key = value` lines (values given as TOML literals)."""
    lines = [ln for ln in EGRESS.strip().splitlines() if ln.split(" = ")[0] not in values]
    lines += [f"{k} = {v}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def egress_without(key: str) -> str:
    return "\n".join(ln for ln in EGRESS.splitlines() if not ln.startswith(f"{key} ="))


# --------------------------------------------------------------------------- valid files
def test_minimal_egress_route_parses_with_safe_defaults(folder: Path) -> None:
    config, findings = parse_text(folder, EGRESS)
    assert findings == []
    assert config is not None
    assert config.path == folder / "sidecar.toml"
    (route,) = config.egress
    assert route.name == "d1-ppr"
    assert route.listen == Listen("tcp", host="127.0.0.1", port=8080)
    assert route.upstream == Upstream("https", "api.d1-stg.example", 443, "")
    assert route.client_cert == folder / "client.pem"
    assert route.client_key == folder / "client.key"
    assert route.trust is None
    assert route.profile == "d1"
    assert route.oauth is None
    assert route.limits == Limits()
    assert route.timeouts == Timeouts()
    assert config.ingress == ()
    assert config.admin is None


def test_full_file_parses_every_section(folder: Path) -> None:
    text = (
        """
        [admin]
        listen = "127.0.0.1:9901"
        [log]
        format = "text"
        access = false
        [service]
        drain_timeout = 5
        """
        + textwrap.dedent(egress_with(trust='"roots.pem"', response_timeout="2.5"))
        + 'max_body_bytes = "1MiB"\n'
        + textwrap.dedent(OAUTH)
        + 'authorization = "keep"\n'
        + textwrap.dedent(INGRESS)
        + 'allow_subjects = ["CN=*.d1.example"]\nidentity_headers = ["xfcc"]\n'
    )
    config = load(write(folder, text), {})
    assert config.admin is not None and str(config.admin.listen) == "127.0.0.1:9901"
    assert config.service.log_format == "text"
    assert config.service.access_log is False
    assert config.service.drain_timeout == 5.0
    (eg,) = config.egress
    assert eg.trust == folder / "roots.pem"
    assert eg.timeouts.response == 2.5
    assert eg.limits.max_body_bytes == 1024 * 1024
    assert eg.oauth == EgressOAuth(
        token_url="https://api.d1-stg.example/authz/v1/oauth2/token",
        issuer="MGW_000001",
        signing_key=folder / "oauth.key",
        key_id="kid-1",
        authorization="keep",
    )
    (ing,) = config.ingress
    assert [str(p) for p in ing.allow_subjects] == ["CN=*.d1.example"]
    assert ing.identity_headers == ("xfcc",)
    assert ing.upstream == Upstream("http", "127.0.0.1", 9000, "")
    assert [r.name for r in config.routes()] == ["d1-ppr", "d1-callbacks"]


def test_upstream_keeps_port_and_base_path_without_trailing_slash(folder: Path) -> None:
    config = load(write(folder, egress_with(upstream='"https://API.example:8443/d1/v2/"')), {})
    up = config.egress[0].upstream
    assert (up.host, up.port, up.base_path) == ("api.example", 8443, "/d1/v2")
    assert up.authority == "api.example:8443"
    assert str(up) == "https://api.example:8443/d1/v2"


# --------------------------------------------------------------------------- unknown keys
def test_unknown_top_level_key_is_named(folder: Path) -> None:
    path = write(folder, "colour = 'blue'\n" + EGRESS)
    _, findings = parse(path, {})
    f = only_error(findings)
    assert (f.file, f.key, f.message) == (str(path), "colour", "unknown key")
    assert str(f) == f"error: {path}: colour: unknown key"


def test_unknown_key_in_route_names_route_index_and_name(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(client_crt='"client.pem"'))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).client_crt"
    assert f.message == "unknown key; did you mean 'client_cert'?"


def test_unknown_key_in_egress_oauth_is_named(folder: Path) -> None:
    _, findings = parse_text(folder, EGRESS + OAUTH + "  scope = 'x'\n")
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).oauth.scope"
    assert f.message == "unknown key"


def test_unknown_key_in_admin_and_log_is_named(folder: Path) -> None:
    text = '[admin]\nlisten = "127.0.0.1:9901"\nport = 1\n[log]\nlevels = "debug"\n' + EGRESS
    _, findings = parse_text(folder, text)
    assert errors(findings) == {
        "admin.port": "unknown key",
        "log.levels": "unknown key; did you mean 'level'?",
    }


def test_log_level_is_one_of_the_named_levels(folder: Path) -> None:
    config, _ = parse_text(folder, '[log]\nlevel = "warn"\n' + EGRESS)
    assert config is not None and config.service.log_level == "warn"
    _, findings = parse_text(folder, '[log]\nlevel = "verbose"\n' + EGRESS)
    assert "log.level" in errors(findings)


# --------------------------------------------------------------------------- wrong types
def test_string_for_a_duration_is_a_type_error(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(response_timeout='"30s"'))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).response_timeout"
    assert "expected seconds as a number" in f.message
    assert "'30s'" in f.message


def test_list_for_a_string_is_a_type_error(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(client_key='["client.key"]'))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).client_key"
    assert f.message == "expected a string, got list"


def test_bool_for_a_size_is_a_type_error(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(max_body_bytes="true"))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).max_body_bytes"
    assert "size in bytes" in f.message


def test_bool_for_a_duration_is_a_type_error(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(max_connection_age="true"))
    assert "egress[0] (d1-ppr).max_connection_age" in errors(findings)


def test_bad_size_string_is_named(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(max_header_bytes='"10XB"'))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).max_header_bytes"
    assert "'10XB'" in f.message
    assert "10MiB" in f.message  # says what a valid size looks like


def test_negative_size_is_refused(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(max_body_bytes="-1"))
    assert errors(findings) == {"egress[0] (d1-ppr).max_body_bytes": "must not be negative"}


def test_zero_timeout_is_refused(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(idle_timeout="0"))
    assert errors(findings) == {"egress[0] (d1-ppr).idle_timeout": "must be greater than 0"}


def test_unknown_choice_lists_the_valid_ones(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(profile='"strict"'))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).profile"
    assert "'d1'" in f.message and "'generic'" in f.message and "'strict'" in f.message


def test_unknown_identity_family_is_named(folder: Path) -> None:
    _, findings = parse_text(folder, INGRESS + 'identity_headers = ["xfcc", "x-ssl"]\n')
    f = only_error(findings)
    assert f.key == "ingress[0] (d1-callbacks).identity_headers"
    assert "'x-ssl'" in f.message


def test_string_for_a_list_is_a_type_error(folder: Path) -> None:
    _, findings = parse_text(folder, INGRESS + 'allow_subjects = "CN=*.d1.example"\n')
    assert errors(findings) == {
        "ingress[0] (d1-callbacks).allow_subjects": "expected a list of strings"
    }


def test_empty_allow_subjects_is_an_error_saying_to_omit_the_key(folder: Path) -> None:
    _, findings = parse_text(folder, INGRESS + "allow_subjects = []\n")
    assert errors(findings) == {
        "ingress[0] (d1-callbacks).allow_subjects": "an empty list: omit the key to admit "
        "every certificate the client CA signed, or list the subjects to admit"
    }


def test_an_unparsable_subject_is_an_error_naming_the_entry(folder: Path) -> None:
    text = INGRESS + 'allow_subjects = ["CN=ok.example", "*.d1.example", "XY=1"]\n'
    _, findings = parse_text(folder, text)
    assert errors(findings) == {
        "ingress[0] (d1-callbacks).allow_subjects[1]": "'*.d1.example' is not a distinguished "
        "name: '*.d1.example': expected TYPE=value",
        "ingress[0] (d1-callbacks).allow_subjects[2]": "'XY=1' is not a distinguished name: "
        "unknown attribute type 'XY'; use CN, O, OU, C, ST, L, DC, UID, emailAddress, "
        "serialNumber, ... or a dotted OID",
    }


def test_each_subject_form_is_reported_in_the_form_compared(folder: Path) -> None:
    entries = ["C = FR, O = Acme, CN = TLSMA-ECDSA/*/D1.PPR", "/C=FR/O=Acme/CN=x", "CN=*.a"]
    text = INGRESS + f"allow_subjects = {json.dumps(entries)}\n"
    config, findings = parse_text(folder, text)
    assert config is not None and not errors(findings)
    info = {f.key: f.message for f in findings if f.level == "info"}
    key = "ingress[0] (d1-callbacks).allow_subjects"
    assert info == {
        f"{key}[0]": f"{entries[0]!r} compares the whole subject with "
        "CN=TLSMA-ECDSA/*/D1.PPR,O=Acme,C=FR",
        f"{key}[1]": f"{entries[1]!r} compares the whole subject with CN=x,O=Acme,C=FR",
        f"{key}[2]": "'CN=*.a' compares any common name of the subject with CN=*.a",
    }
    assert [str(p) for p in config.ingress[0].allow_subjects] == [
        "CN=TLSMA-ECDSA/*/D1.PPR,O=Acme,C=FR",
        "CN=x,O=Acme,C=FR",
        "CN=*.a",
    ]


def test_rfc4514_written_in_openssl_order_gets_a_warning(folder: Path) -> None:
    _, findings = parse_text(folder, INGRESS + 'allow_subjects = ["C=FR,O=Acme,CN=x"]\n')
    (warning,) = [f for f in findings if f.level == "warning"]
    assert warning.key == "ingress[0] (d1-callbacks).allow_subjects[0]"
    assert "most specific first" in warning.message


NOT_HOSTS = ["d1.example:443", "https://d1.example", "d1.example/x", "", "a..b", "-a.example",
             "x" * 64 + ".example", "a b"]  # fmt: skip


@pytest.mark.parametrize("value", NOT_HOSTS)
@pytest.mark.parametrize("section", ["egress", "ingress"])
def test_server_name_is_a_host_name_only(folder: Path, section: str, value: str) -> None:
    base = EGRESS if section == "egress" else INGRESS
    route = "d1-ppr" if section == "egress" else "d1-callbacks"
    _, findings = parse_text(folder, base + f"server_name = {json.dumps(value)}\n")
    assert errors(findings) == {
        f"{section}[0] ({route}).server_name": f"{value!r} is not a host name or IP address: "
        "a host name only; the port belongs in `upstream`"
    }


@pytest.mark.parametrize("value", ["d1.example", "localhost", "127.0.0.1", "::1", "bücher.example"])
def test_server_name_takes_host_names_and_addresses(folder: Path, value: str) -> None:
    for base in (EGRESS, INGRESS):
        config, findings = parse_text(folder, base + f"server_name = {json.dumps(value)}\n")
        assert config is not None and not errors(findings)
        assert config.routes()[0].server_name == value


def test_egress_as_a_single_table_is_refused(folder: Path) -> None:
    text = EGRESS.replace("[[egress]]", "[egress]")
    _, findings = parse_text(folder, text)
    assert errors(findings) == {"egress": "expected [[egress]] tables"}


def test_bad_route_name_is_named_by_index(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(name='"d1 ppr"'))
    f = only_error(findings)
    assert f.key == "egress[0].name"
    assert "letters, digits" in f.message


# --------------------------------------------------------------------------- missing keys
@pytest.mark.parametrize("key", ["listen", "upstream", "client_cert", "client_key"])
def test_missing_required_egress_key_is_named(folder: Path, key: str) -> None:
    _, findings = parse_text(folder, egress_without(key))
    f = only_error(findings)
    assert f.key == f"egress[0] (d1-ppr).{key}"
    assert f.message == "missing (required)"


def test_missing_name_is_named_by_index(folder: Path) -> None:
    config, findings = parse_text(folder, egress_without("name"))
    assert errors(findings) == {"egress[0].name": "missing (required)"}
    assert config is not None and config.egress == ()


def test_missing_oauth_key_is_named(folder: Path) -> None:
    text = EGRESS + "\n".join(ln for ln in OAUTH.splitlines() if "key_id" not in ln)
    _, findings = parse_text(folder, text)
    assert errors(findings) == {"egress[0] (d1-ppr).oauth.key_id": "missing (required)"}


def test_status_from_defaults_to_loopback_and_names_a_bad_entry(folder: Path) -> None:
    config, _ = parse_text(folder, '[admin]\nlisten = "0.0.0.0:9901"\n' + EGRESS)
    assert config is not None and config.admin is not None
    assert [str(n) for n in config.admin.status_from] == ["127.0.0.0/8", "::1/128"]
    text = '[admin]\nlisten = "0.0.0.0:9901"\nstatus_from = ["10.0.0.0/8", "::1", "pod"]\n'
    config, findings = parse_text(folder, text + EGRESS)
    assert errors(findings) == {
        "admin.status_from[2]": "'pod' is not an address or CIDR block: "
        "'pod' does not appear to be an IPv4 or IPv6 network"
    }
    assert config is not None and config.admin is not None
    assert [str(n) for n in config.admin.status_from] == ["10.0.0.0/8", "::1/128"]


def test_missing_admin_listen_is_named(folder: Path) -> None:
    _, findings = parse_text(folder, "[admin]\n" + EGRESS)
    assert errors(findings) == {"admin.listen": "missing (required)"}


def test_missing_ingress_client_ca_is_named(folder: Path) -> None:
    text = "\n".join(ln for ln in INGRESS.splitlines() if not ln.startswith("client_ca"))
    _, findings = parse_text(folder, text)
    assert errors(findings) == {"ingress[0] (d1-callbacks).client_ca": "missing (required)"}


# --------------------------------------------------------------------------- files
def test_missing_file_names_key_and_resolved_path(folder: Path) -> None:
    path = write(folder, egress_with(trust='"nowhere/roots.pem"'))
    _, findings = parse(path, {})
    f = only_error(findings)
    assert f.file == str(path)
    assert f.key == "egress[0] (d1-ppr).trust"
    assert str(folder / "nowhere" / "roots.pem") in f.message
    assert "No such file" in f.message


def test_unreadable_file_is_an_error(folder: Path) -> None:
    (folder / "keys").mkdir()  # a folder cannot be read as a file, whoever runs the test
    _, findings = parse_text(folder, egress_with(client_key='"keys"'))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).client_key"
    assert f.message.startswith(f"cannot read {folder / 'keys'}")


def test_relative_paths_resolve_against_the_config_folder(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    (folder / "ppr").mkdir()
    (folder / "ppr" / "client.key").write_text("placeholder\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load(write(folder, egress_with(client_key='"ppr/client.key"')), {})
    assert config.egress[0].client_key == folder / "ppr" / "client.key"
    assert config.egress[0].client_key.is_absolute()


def test_relative_config_path_is_made_absolute(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(folder, EGRESS)
    monkeypatch.chdir(folder)
    config = load("sidecar.toml", {})
    assert config.path == folder / "sidecar.toml"
    assert config.egress[0].client_cert == folder / "client.pem"


def test_absolute_path_is_kept(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("pki") / "roots.pem"
    other.write_text("placeholder\n")
    config = load(write(folder, egress_with(trust=f'"{other}"')), {})
    assert config.egress[0].trust == other


def test_file_prefix_is_understood(folder: Path) -> None:
    config = load(write(folder, egress_with(client_key='"file:client.key"')), {})
    assert config.egress[0].client_key == folder / "client.key"


@pytest.mark.parametrize("form", ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"])
def test_credentials_directory_is_expanded(
    folder: Path, tmp_path_factory: pytest.TempPathFactory, form: str
) -> None:
    creds = tmp_path_factory.mktemp("credentials")
    (creds / "client.key").write_text("placeholder\n")
    text = egress_with(client_key=f'"{form}/client.key"')
    config = load(write(folder, text), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.egress[0].client_key == creds / "client.key"


def test_credentials_directory_with_file_prefix(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    creds = tmp_path_factory.mktemp("credentials")
    (creds / "client.key").write_text("placeholder\n")
    text = egress_with(client_key='"file:${CREDENTIALS_DIRECTORY}/client.key"')
    config = load(write(folder, text), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.egress[0].client_key == creds / "client.key"


def test_credentials_directory_unset_is_an_error_naming_the_variable(folder: Path) -> None:
    text = egress_with(client_key='"${CREDENTIALS_DIRECTORY}/client.key"')
    _, findings = parse_text(folder, text, environ={})
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).client_key"
    assert "CREDENTIALS_DIRECTORY" in f.message and "not set" in f.message


def test_credentials_directory_comes_from_the_given_environment(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(folder))
    text = egress_with(client_key='"${CREDENTIALS_DIRECTORY}/client.key"')
    _, findings = parse_text(folder, text, environ={"UNRELATED": "1"})
    assert "egress[0] (d1-ppr).client_key" in errors(findings)
    # without an explicit mapping, the process environment is used
    config = load(write(folder, text))
    assert config.egress[0].client_key == folder / "client.key"


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512", 512),
        ('"512"', 512),
        ('"1MiB"', 1048576),
        ('"10MB"', 10_000_000),
        ('"64KiB"', 65536),
        ('"64k"', 64000),
        ('"2 GiB"', 2 * 1024**3),
        ('"1.5KiB"', 1536),
        ('"100B"', 100),
    ],
)
def test_size_units(folder: Path, value: str, expected: int) -> None:
    config = load(write(folder, egress_with(max_body_bytes=value)), {})
    assert config.egress[0].limits.max_body_bytes == expected


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("egress", '"127.0.0.1:8080"', Listen("tcp", host="127.0.0.1", port=8080)),
        ("egress", '"[::1]:8080"', Listen("tcp", host="::1", port=8080)),
        ("egress", "8443", Listen("tcp", host="127.0.0.1", port=8443)),
        ("egress", '"8443"', Listen("tcp", host="127.0.0.1", port=8443)),
        ("ingress", "8443", Listen("tcp", host="0.0.0.0", port=8443)),
        (
            "egress",
            '"unix:/run/mtls-sidecar/d1.sock"',
            Listen("unix", path="/run/mtls-sidecar/d1.sock"),
        ),
        ("ingress", '"systemd:https"', Listen("systemd", name="https")),
    ],
)
def test_listen_forms(folder: Path, section: str, value: str, expected: Listen) -> None:
    base = EGRESS if section == "egress" else INGRESS
    text = "\n".join(ln for ln in base.splitlines() if not ln.startswith("listen ="))
    config = load(write(folder, text + f"\nlisten = {value}\n"), {})
    (route,) = config.routes()
    assert route.listen == expected


def test_listen_str_round_trips_ipv6_brackets() -> None:
    assert str(Listen("tcp", host="::1", port=8080)) == "[::1]:8080"
    assert str(Listen("unix", path="/x")) == "unix:/x"
    assert str(Listen("systemd", name="https")) == "systemd:https"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('"localhost"', "host:port"),
        ('"127.0.0.1:99999"', "out of range"),
        ('"::1:8080"', "[::1]:port"),
        ('""', "host:port"),
        ("true", "host:port"),
        ('"systemd:"', "FileDescriptorName"),
    ],
)
def test_bad_listen_address_is_named(folder: Path, value: str, words: str) -> None:
    _, findings = parse_text(folder, egress_with(listen=value))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).listen"
    assert words in f.message


def test_unix_listen_without_a_path_is_refused(folder: Path) -> None:
    _, findings = parse_text(folder, egress_with(listen='"unix:"'))
    assert "egress[0] (d1-ppr).listen" in errors(findings)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ('"http://api.d1-stg.example"', "scheme must be https"),
        ('"api.d1-stg.example"', "scheme must be https"),
        ('"https://"', "no host"),
        ('"https://api.example/x?y=1"', "no query"),
        ('"https://user:pw@api.example"', "credentials"),
        ('"https://api.example:99999"', "out of range"),
        ("443", "expected a URL"),
    ],
)
def test_bad_egress_upstream_is_named(folder: Path, value: str, words: str) -> None:
    _, findings = parse_text(folder, egress_with(upstream=value))
    f = only_error(findings)
    assert f.key == "egress[0] (d1-ppr).upstream"
    assert words in f.message


def test_ingress_upstream_may_be_plain_http_but_not_ftp(folder: Path) -> None:
    text = INGRESS.replace("http://127.0.0.1:9000", "ftp://127.0.0.1")
    _, findings = parse_text(folder, text)
    f = only_error(findings)
    assert f.key == "ingress[0] (d1-callbacks).upstream"
    assert "http or https" in f.message


def test_oauth_token_url_must_be_https(folder: Path) -> None:
    text = EGRESS + OAUTH.replace("https://api.d1-stg", "http://api.d1-stg")
    _, findings = parse_text(folder, text)
    assert errors(findings) == {"egress[0] (d1-ppr).oauth.token_url": "must be an https:// URL"}


def test_zero_body_limit_is_not_silently_replaced(folder: Path) -> None:
    config, findings = parse_text(folder, egress_with(max_body_bytes="0"))
    refused = "egress[0] (d1-ppr).max_body_bytes" in errors(findings)
    honoured = config is not None and config.egress[0].limits.max_body_bytes == 0
    assert refused or honoured


# --------------------------------------------------------------------------- across routes
def test_no_route_at_all_is_an_error(folder: Path) -> None:
    path = write(folder, '[admin]\nlisten = "127.0.0.1:9901"\n')
    _, findings = parse(path, {})
    f = only_error(findings)
    assert f.file == str(path)
    assert "no [[egress]] or [[ingress]] route" in f.message


def test_empty_file_is_an_error(folder: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(folder, ""), {})
    assert "no [[egress]] or [[ingress]] route" in str(e.value)


def _two_routes(first: str, second: str) -> str:
    other = EGRESS.replace('"127.0.0.1:8080"', '"127.0.0.1:8081"')
    return egress_with(name=first) + other.replace('"d1-ppr"', second)


def test_duplicate_route_names_are_reported(folder: Path) -> None:
    path = write(folder, _two_routes('"d1"', '"d1"'))
    _, findings = parse(path, {})
    f = only_error(findings)
    assert f.file == str(path)
    assert f.key.endswith(".name") and "d1" in f.key
    assert f.message == "duplicate route name (also egress[0] (d1))"


def test_duplicate_names_across_directions_are_reported(folder: Path) -> None:
    text = EGRESS + INGRESS.replace('"d1-callbacks"', '"d1-ppr"')
    _, findings = parse_text(folder, text)
    f = only_error(findings)
    assert f.key == "ingress[0] (d1-ppr).name"
    assert f.message == "duplicate route name (also egress[0] (d1-ppr))"


def test_duplicate_route_name_finding_names_the_second_table(folder: Path) -> None:
    _, findings = parse_text(folder, _two_routes('"d1"', '"d1"'))
    assert only_error(findings).key == "egress[1] (d1).name"


def test_two_routes_on_the_same_listen_address_are_reported(folder: Path) -> None:
    text = egress_with(name='"a"') + egress_with(name='"b"')
    _, findings = parse_text(folder, text)
    f = only_error(findings)
    assert f.key.endswith(".listen") and "b" in f.key
    assert "127.0.0.1:8080" in f.message and "a" in f.message


def test_admin_on_a_route_address_is_reported(folder: Path) -> None:
    _, findings = parse_text(folder, '[admin]\nlisten = "127.0.0.1:8080"\n' + EGRESS)
    f = only_error(findings)
    assert f.key == "admin.listen"
    assert "d1-ppr" in f.message


def test_same_listen_finding_uses_the_route_key_format(folder: Path) -> None:
    text = egress_with(name='"a"') + egress_with(name='"b"')
    _, findings = parse_text(folder, text)
    assert only_error(findings).key == "egress[1] (b).listen"


def test_two_routes_on_the_same_unix_socket_are_reported(folder: Path) -> None:
    text = egress_with(name='"a"', listen='"unix:/run/x.sock"')
    text += egress_with(name='"b"', listen='"unix:/run/x.sock"')
    _, findings = parse_text(folder, text)
    assert any(k.endswith(".listen") for k in errors(findings))


def test_port_zero_may_repeat(folder: Path) -> None:
    text = egress_with(name='"a"', listen='"127.0.0.1:0"')
    text += egress_with(name='"b"', listen='"127.0.0.1:0"')
    config = load(write(folder, text), {})
    assert [r.listen.port for r in config.egress] == [0, 0]


# --------------------------------------------------------------------------- syntax, all at once
def test_invalid_toml_names_the_file(folder: Path) -> None:
    path = write(folder, EGRESS + "listen = \n")
    config, findings = parse(path, {})
    assert config is None
    f = only_error(findings)
    assert f.file == str(path)
    assert f.key == ""
    assert f.message.startswith("not valid TOML")
    assert str(f).startswith(f"error: {path}: not valid TOML")


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    config, findings = parse(tmp_path / "absent.toml", {})
    assert config is None
    f = only_error(findings)
    assert f.file == str(tmp_path / "absent.toml")
    assert "cannot read" in f.message


def test_all_mistakes_of_one_file_are_reported_at_once(folder: Path) -> None:
    text = (
        "colour = 1\n"
        + egress_with(
            upstream='"http://api.example"',
            client_key='["client.key"]',
            trust='"missing.pem"',
            response_timeout='"30"',
            max_body_bytes="true",
            extra="1",
        )
        + OAUTH
        + "  wat = 2\n"
        + '[[egress]]\nlisten = "localhost"\n'
    )
    _, findings = parse_text(folder, text)
    route = "egress[0] (d1-ppr)"
    assert set(errors(findings)) == {
        "colour",
        f"{route}.upstream",
        f"{route}.client_key",
        f"{route}.trust",
        f"{route}.response_timeout",
        f"{route}.max_body_bytes",
        f"{route}.extra",
        f"{route}.oauth.wat",
        "egress[1].name",
        "egress[1].listen",
        "egress[1].upstream",
        "egress[1].client_cert",
        "egress[1].client_key",
    }
    assert {f.file for f in findings} == {str(folder / "sidecar.toml")}


def test_load_raises_config_error_carrying_every_finding(folder: Path) -> None:
    path = write(folder, egress_with(extra="1", idle_timeout='"x"'))
    with pytest.raises(ConfigError) as e:
        load(path, {})
    keys = {f.key for f in e.value.findings}
    assert keys == {"egress[0] (d1-ppr).extra", "egress[0] (d1-ppr).idle_timeout"}
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- frozen
def test_parsed_objects_are_frozen(folder: Path) -> None:
    config = load(write(folder, EGRESS + OAUTH + INGRESS), {})
    eg: EgressRoute = config.egress[0]
    ing: IngressRoute = config.ingress[0]
    assert eg.oauth is not None
    for obj, field, value in [
        (config, "egress", ()),
        (config.service, "drain_timeout", 0.0),
        (eg, "upstream", None),
        (eg.listen, "port", 1),
        (eg.upstream, "host", "evil.example"),
        (eg.limits, "max_body_bytes", 1),
        (eg.timeouts, "response", 1.0),
        (eg.oauth, "issuer", "x"),
        (ing, "allow_subjects", ()),
    ]:
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(obj, field, value)
    assert isinstance(config.egress, tuple) and isinstance(ing.identity_headers, tuple)


def test_relative_unix_socket_path_resolves_against_the_config_folder(folder: Path) -> None:
    config, _ = parse_text(folder, egress_with(listen='"unix:run/d1.sock"'))
    assert config is not None
    (route,) = config.routes()
    assert route.listen == Listen("unix", path=str(folder / "run" / "d1.sock"))


def test_worker_limits_are_off_by_default_and_either_one_starts_a_supervisor(
    folder: Path,
) -> None:
    config, _ = parse_text(folder, EGRESS)
    assert config is not None
    assert (config.service.max_worker_rss, config.service.max_worker_age) == (0, 0.0)
    assert not config.service.supervised()
    for line, rss, age in (('max_worker_rss = "300MiB"', 300 << 20, 0.0),
                           ("max_worker_age = 86400", 0, 86400.0)):  # fmt: skip
        config, findings = parse_text(folder, f"[service]\n{line}\n" + EGRESS)
        assert findings == [] and config is not None
        assert (config.service.max_worker_rss, config.service.max_worker_age) == (rss, age)
        assert config.service.workers == 1 and config.service.supervised()


def test_bad_worker_limit_is_named(folder: Path) -> None:
    _, findings = parse_text(folder, '[service]\nmax_worker_rss = "lots"\n' + EGRESS)
    assert only_error(findings).key == "service.max_worker_rss"


def test_malloc_trim_is_on_every_10_s_by_default_and_0_turns_it_off(folder: Path) -> None:
    config, _ = parse_text(folder, EGRESS)
    assert config is not None and config.service.malloc_trim_interval == 10.0
    config, _ = parse_text(folder, "[service]\nmalloc_trim_interval = 0\n" + EGRESS)
    assert config is not None and config.service.malloc_trim_interval == 0.0
