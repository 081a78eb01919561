"""`mtls-sidecar check` (and `run` refusing a bad config) through the real command line."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.harness import SIDECAR, free_port, write_config
from tests.pkifactory import DAY, NOW, make_ca, write_ca

pytestmark = pytest.mark.integration

PPR_ECDSA = "C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR"


@attrs.frozen
class Result:
    returncode: int
    stdout: str
    stderr: str

    def lines(self, level: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(f"{level}: ")]


def check(config: Path, *args: str) -> Result:
    out = subprocess.run(
        [SIDECAR, "check", "-c", str(config), *args], capture_output=True, text=True, timeout=30
    )
    return Result(out.returncode, out.stdout, out.stderr)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("check")
    root = make_ca("C=FR,O=Thales-like,CN=Client Root")
    write_ca(root, d / "client-root.pem")
    root.issue(PPR_ECDSA, client=True).write(d, "good")
    root.issue("C=FR,O=Merchant,CN=TLSMA-RSA/MGW0000001/D1.PPR", client=True,
               key_type="rsa2048").write(d, "rsa2048")  # fmt: skip
    root.issue(PPR_ECDSA, client=True, not_before=NOW - 40 * DAY, not_after=NOW - 2 * DAY).write(
        d, "expired"
    )
    root.issue(PPR_ECDSA, client=True, not_after=NOW + 10 * DAY).write(d, "soon")
    root.issue("C=FR,O=Merchant,CN=merchant.example", client=True).write(d, "badcn")
    inter = root.issue("C=FR,O=Thales-like,CN=Client Issuing CA", ca=True)
    leaf = inter.issue(PPR_ECDSA, client=True)
    # leaf, then the root, then the intermediate: the root does not issue the leaf
    (d / "misordered.pem").write_bytes(leaf.cert_pem() + root.cert_pem() + inter.cert_pem())
    (d / "misordered.key").write_bytes(leaf.key_pem())
    (d / "leafonly.pem").write_bytes(leaf.cert_pem())  # its issuer, the intermediate, is not
    (d / "leafonly.key").write_bytes(leaf.key_pem())
    (d / "leafonly.key").chmod(0o600)
    (d / "chained.pem").write_bytes(leaf.cert_pem() + inter.cert_pem())
    (d / "chained.key").write_bytes(leaf.key_pem())
    (d / "chained.key").chmod(0o600)
    (d / "oauth-rsa.key").write_bytes(root.issue("CN=x", key_type="rsa2048").key_pem())
    (d / "oauth-es256.key").write_bytes(root.issue("CN=y").key_pem())
    yield d


# a port nothing else binds (a fixed one collides with other tests' sidecars in a parallel run,
# and check then warns it is in use)
PORT = free_port()


def egress(name: str, cert: str, key: str, extra: str = "", port: int = PORT) -> str:
    return f"""
    [[egress]]
    name = "{name}"
    listen = "127.0.0.1:{port}"
    upstream = "https://localhost:8443"
    client_cert = "{cert}.pem"
    client_key = "{key}.key"
    trust = "client-root.pem"
    {extra}
    """


def conf(d: Path, name: str, *sections: str) -> Path:
    return write_config(d / f"{name}.toml", "\n".join(sections))


def test_good_config_passes_with_days_left(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "good", egress("d1-ppr", "good", "good", 'env = "PPR"')))
    assert r.returncode == 0, r.stdout
    (info,) = r.lines("info")
    assert f"{pki_dir}/good.toml" in info and "egress[0] (d1-ppr).client_cert" in info
    assert re.search(r"\b36[45] days left\b", info), info
    assert not r.lines("error") and r.stdout.rstrip().endswith("OK: 0 error(s)")


def test_missing_config_file_is_an_error_naming_it(pki_dir: Path) -> None:
    r = check(pki_dir / "absent.toml")
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert f"{pki_dir}/absent.toml" in error and "cannot read" in error


def test_missing_key_file_names_the_key(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "missing", egress("a", "good", "nowhere")))
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert "egress[0] (a).client_key" in error and "nowhere.key" in error
    assert "No such file" in error


def test_unknown_key_is_named(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "unknown", egress("a", "good", "good", "max_conection_age = 5")))
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert f"{pki_dir}/unknown.toml: egress[0] (a).max_conection_age: unknown key" in error


def test_rsa_2048_client_key_is_refused_under_d1_and_accepted_under_generic(
    pki_dir: Path,
) -> None:
    d1 = check(conf(pki_dir, "rsa-d1", egress("a", "rsa2048", "rsa2048")))
    assert d1.returncode == 1
    (error,) = d1.lines("error")
    assert "client_key" in error and "RSA 2048 bits; D1 requires RSA 4096 or ECDSA P-256" in error
    generic = check(
        conf(pki_dir, "rsa-generic", egress("a", "rsa2048", "rsa2048", 'profile = "generic"'))
    )
    assert generic.returncode == 0, generic.stdout
    assert not generic.lines("error")


def test_key_not_matching_the_certificate(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "mismatch", egress("a", "good", "soon")))
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert "egress[0] (a)" in error and "client_key" in error and "soon.key" in error
    assert "does not match the certificate" in error and "good.pem" in error


def test_expired_client_certificate_is_an_error(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "expired", egress("a", "expired", "expired")))
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert "egress[0] (a).client_cert" in error and "expired.pem" in error
    assert re.search(r"expired [12] days? ago", error), error


def test_certificate_expiring_within_the_warning_window_is_a_warning(pki_dir: Path) -> None:
    path = conf(
        pki_dir,
        "soon",
        "[service]\nexpiry_warning_days = 30",
        egress("a", "soon", "soon"),
    )
    r = check(path)
    assert r.returncode == 0, r.stdout
    (warning,) = [w for w in r.lines("warning") if "holds the leaf only" not in w]
    assert "egress[0] (a).client_cert" in warning and re.search(r"expires in (9|10) days", warning)
    narrow = conf(
        pki_dir, "soon-narrow", "[service]\nexpiry_warning_days = 5", egress("a", "soon", "soon")
    )
    assert not [w for w in check(narrow).lines("warning") if "expires" in w]


def test_client_certificate_cn_outside_d1_policy(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "badcn", egress("a", "badcn", "badcn")))
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert "egress[0] (a).client_cert" in error
    assert "CN 'merchant.example' does not match D1's pattern TLSMA-" in error


def test_cn_environment_must_match_the_route_env(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "env", egress("a", "good", "good", 'env = "PRD"')))
    assert r.returncode == 1
    (error,) = r.lines("error")
    assert "egress[0] (a).client_cert" in error
    assert "is for D1.PPR but the route expects PRD" in error


def test_chain_in_the_wrong_order(pki_dir: Path) -> None:
    r = check(conf(pki_dir, "order", egress("a", "misordered", "misordered")))
    assert r.returncode == 1
    errors = r.lines("error")
    assert errors and all("egress[0] (a).client_cert" in e and "chain order" in e for e in errors)
    assert "certificate 1 (CN=TLSMA-ECDSA/MGW0000001/D1.PPR" in errors[0]
    assert "is issued by CN=Client Issuing CA" in errors[0]
    assert "order the file leaf first, then each issuer" in errors[0]


def test_a_client_chain_without_its_intermediate_is_a_warning_naming_the_issuer(
    pki_dir: Path,
) -> None:
    r = check(conf(pki_dir, "leafonly", egress("a", "leafonly", "leafonly")))
    (warning,) = r.lines("warning")
    assert "egress[0] (a).client_cert" in warning
    assert "holds the leaf only; its issuer CN=Client Issuing CA,O=Thales-like,C=FR is missing" in (
        warning
    )
    assert r.returncode == 0, r.stdout
    whole = check(conf(pki_dir, "whole", egress("a", "chained", "chained")))
    assert not whole.lines("warning"), whole.stdout


def test_oauth_signing_key_must_be_es256(pki_dir: Path) -> None:
    oauth = """
      [egress.oauth]
      token_url = "https://localhost:8443/authz/v1/oauth2/token"
      issuer = "MGW0000001"
      signing_key = "{key}"
      key_id = "kid-1"
    """
    bad = check(
        conf(pki_dir, "oauth-rsa", egress("a", "good", "good", oauth.format(key="oauth-rsa.key")))
    )
    assert bad.returncode == 1
    (error,) = bad.lines("error")
    assert "egress[0] (a).oauth.signing_key" in error and "ES256 (P-256)" in error
    good = check(
        conf(pki_dir, "oauth-ec", egress("a", "good", "good", oauth.format(key="oauth-es256.key")))
    )
    assert good.returncode == 0, good.stdout


def _many_mistakes(pki_dir: Path) -> Path:
    return conf(
        pki_dir,
        "many",
        egress("a", "good", "good", 'env = "PRD"\nbogus = 1', port=18081),
        egress("b", "rsa2048", "rsa2048", port=18082),
        egress("c", "expired", "expired", port=18083),
        egress("d", "good", "absent", port=18084),
    )


def test_every_finding_of_a_file_is_reported_in_one_run(pki_dir: Path) -> None:
    r = check(_many_mistakes(pki_dir))
    assert r.returncode == 1
    errors = "\n".join(r.lines("error"))
    assert len(r.lines("error")) == 5, r.stdout
    for needle in (
        "egress[0] (a).bogus: unknown key",
        "expects PRD",
        "RSA 2048 bits",
        "expired",
        "egress[3] (d).client_key",
    ):
        assert needle in errors
    assert r.stdout.rstrip().endswith("FAILED: 5 error(s)")


def test_json_lists_every_finding_with_level_file_key_message(pki_dir: Path) -> None:
    path = _many_mistakes(pki_dir)
    r = check(path, "--json")
    assert r.returncode == 1
    doc: dict[str, Any] = json.loads(r.stdout)
    assert doc["ok"] is False and doc["errors"] == 5
    for finding in doc["findings"]:
        assert set(finding) == {"level", "file", "key", "message"}
        assert finding["file"] == str(path)
        assert finding["level"] in ("error", "warning", "info")
    keys = {f["key"] for f in doc["findings"] if f["level"] == "error"}
    assert "egress[0] (a).bogus" in keys and "egress[3] (d).client_key" in keys
    good = json.loads(
        check(conf(pki_dir, "good-json", egress("a", "good", "good")), "--json").stdout
    )
    assert good["ok"] is True and good["errors"] == 0
    # the leaf only (its issuer a root the server may trust itself): a warning, not an error
    assert [f["level"] for f in good["findings"]] == ["info", "warning"]


@pytest.mark.parametrize(
    ("extra", "cert", "needle"),
    [
        ("typo_key = 1", "good", "egress[0] (a).typo_key: unknown key"),
        ("", "rsa2048", "client_key"),
        ('server_name = "d1.example:443"', "good", "the port belongs in `upstream`"),
    ],
)
def test_run_refuses_a_bad_config_with_one_line_naming_the_key(
    pki_dir: Path, extra: str, cert: str, needle: str
) -> None:
    path = conf(pki_dir, f"run-{cert}", egress("a", cert, cert, extra, port=18090))
    started = time.monotonic()
    out = subprocess.run(
        [SIDECAR, "run", "-c", str(path)], capture_output=True, text=True, timeout=10
    )
    assert time.monotonic() - started < 5
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0] and str(path) in lines[0]
    assert out.stdout == ""


def test_server_cert_sans_must_cover_the_ingress_server_name(pki_dir: Path) -> None:
    root = make_ca("C=FR,O=Merchant PKI,CN=Merchant Root")
    root.issue(
        "CN=callbacks.merchant.example", dns=("callbacks.merchant.example",), server=True
    ).write(pki_dir, "callbacks")

    def ingress(name: str, server_name: str) -> str:
        return f"""
        [[ingress]]
        name = "{name}"
        listen = "127.0.0.1:18443"
        server_cert = "callbacks.pem"
        server_key = "callbacks.key"
        client_ca = "client-root.pem"
        upstream = "http://127.0.0.1:9000"
        server_name = "{server_name}"
        """

    ok = check(conf(pki_dir, "san-ok", ingress("cb", "callbacks.merchant.example")))
    assert ok.returncode == 0, ok.stdout
    bad = check(conf(pki_dir, "san-bad", ingress("cb", "d1.merchant.example")))
    assert bad.returncode == 1
    (line,) = [x for x in bad.lines("error") if "subjectAltName" in x]
    assert "ingress[0] (cb).server_cert" in line and "'d1.merchant.example'" in line


@pytest.mark.parametrize("server_name", ["d1.example:443", "https://d1.example"])
def test_an_ingress_server_name_with_a_port_or_scheme_is_one_line_not_a_traceback(
    pki_dir: Path, server_name: str
) -> None:
    section = f"""
    [[ingress]]
    name = "cb"
    listen = "127.0.0.1:18444"
    server_cert = "good.pem"
    server_key = "good.key"
    client_ca = "client-root.pem"
    upstream = "http://127.0.0.1:9000"
    server_name = "{server_name}"
    profile = "generic"
    """
    path = conf(pki_dir, "ingress-sni", section)
    r = check(path)
    expected = (
        f"error: {path}: ingress[0] (cb).server_name: {server_name!r} is not a host name or IP "
        "address: a host name only; the port belongs in `upstream`"
    )
    assert r.returncode == 1 and expected in r.stdout.splitlines(), r.stdout
    out = subprocess.run(
        [SIDECAR, "run", "-c", str(path)], capture_output=True, text=True, timeout=10
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()  # one JSON line: the config logs JSON
    assert len(lines) == 1 and json.loads(lines[0])["msg"] == expected.removeprefix("error: ")
