"""CRLs on ingress in memory: the keys, reading CRL files, the refusal labels, the stale line."""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from proxy import config as cfg
from proxy.ops.service import STALE_CRL_REPEAT, Sidecar
from proxy.routes.ingress import handshake_reason
from proxy.telemetry.logs import AccessLog
from proxy.tls import contexts as tls
from proxy.tls.revocation import CRLError, read_crls
from tests.pkifactory import DAY, make_ca, make_crl, write_ca, write_crl

HOUR = datetime.timedelta(hours=1)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Root")
    server_ca.issue("CN=localhost", dns=("localhost",), server=True).write(tmp_path, "server")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(client_ca, tmp_path / "client-ca.pem")
    now = datetime.datetime.now(datetime.UTC)
    write_crl(tmp_path / "fresh.crl", make_crl(client_ca))
    stale = make_crl(client_ca, last_update=now - 8 * DAY, next_update=now - HOUR)
    write_crl(tmp_path / "stale.crl", stale)
    return tmp_path


def write(folder: Path, extra: str) -> Path:
    path = folder / "sidecar.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [[ingress]]
            name = "in"
            listen = "127.0.0.1:0"
            server_cert = "server.pem"
            server_key = "server.key"
            client_ca = "client-ca.pem"
            upstream = "http://127.0.0.1:9000"
            {extra}
            """
        )
    )
    return path


def test_crl_keys_default_to_leaf_and_warn(folder: Path) -> None:
    config = cfg.load(write(folder, 'client_crl = "fresh.crl"'))
    route = config.ingress[0]
    assert route.client_crl == folder / "fresh.crl"
    assert (route.crl_check, route.crl_stale) == ("leaf", "warn")
    assert cfg.load(write(folder, "")).ingress[0].client_crl is None


def test_crl_check_and_crl_stale_take_only_their_words_and_need_client_crl(folder: Path) -> None:
    _, findings = cfg.parse(write(folder, 'client_crl = "fresh.crl"\ncrl_check = "all"'))
    errors = {f.key: f.message for f in findings if f.level == "error"}
    assert "expected one of 'leaf', 'chain', got 'all'" in errors["ingress[0] (in).crl_check"]
    _, findings = cfg.parse(write(folder, 'crl_stale = "refuse"'))
    errors = {f.key: f.message for f in findings if f.level == "error"}
    assert errors == {"ingress[0] (in).crl_stale": "has no effect without client_crl"}
    _, findings = cfg.parse(write(folder, 'client_crl = "missing.crl"'))
    assert any(f.key == "ingress[0] (in).client_crl" and "cannot read" in f.message
               for f in findings)  # fmt: skip


def test_a_crl_file_may_hold_several_pem_crls_or_one_der_crl(tmp_path: Path) -> None:
    a, b = make_ca("CN=A"), make_ca("CN=B")
    both = write_crl(tmp_path / "both.crl", make_crl(a), make_crl(b))
    assert [c.issuer.rfc4514_string() for c in read_crls(both)] == ["CN=A", "CN=B"]
    der = write_crl(tmp_path / "one.der", make_crl(a), der=True)
    assert read_crls(der)[0].issuer.rfc4514_string() == "CN=A"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not a crl at all", "neither PEM CRLs"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "no PEM CRL in it"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "CRL number 1"),
    ],
)
def test_an_unusable_crl_file_is_an_error_naming_key_and_file(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "bad.crl"
    path.write_bytes(content)
    with pytest.raises(CRLError) as e:
        read_crls(path)
    assert str(e.value).startswith(f"client_crl {path}: ")
    assert says in str(e.value)


def test_a_cert_pem_given_as_crl_names_the_key_when_the_route_is_built(folder: Path) -> None:
    config = cfg.load(write(folder, 'client_crl = "client-ca.pem"'))
    with pytest.raises(tls.MaterialError, match=r"^client_crl .*client-ca.pem: no PEM CRL"):
        tls.build_server_material(config.ingress[0])


class _Down:
    def __init__(self, verify_error: str | None) -> None:
        self.verify_error = verify_error


@pytest.mark.parametrize(
    ("errno", "label"),
    [(23, "certificate_revoked"), (12, "crl_stale"), (3, "crl_missing"), (8, "crl_unusable"),
     (10, "certificate_expired")],
)  # fmt: skip
def test_a_refused_handshake_is_labelled_by_its_revocation_error(errno: int, label: str) -> None:
    verify = f"{tls.VERIFY_REASONS[errno]} (depth 0: CN=x)"
    assert handshake_reason(_Down(verify), Failure(Exception("ssl"))) == label  # type: ignore[arg-type]


def test_a_stale_crl_gives_one_error_line_then_one_an_hour(folder: Path) -> None:
    reactor = MemoryReactorClock()
    reactor.advance(datetime.datetime.now(datetime.UTC).timestamp())
    config = cfg.load(write(folder, 'client_crl = "stale.crl"\ncrl_stale = "refuse"'))
    sidecar = Sidecar(config, reactor, access_log=AccessLog(None, False))
    sidecar.build()
    with capturedLogs() as events:
        sidecar.start()
        reactor.advance(0.25)
        reactor.advance(600)
        stale = [e for e in events if "past nextUpdate" in e.get("log_format", "")]
        assert len(stale) == 1
        assert stale[0]["log_level"].name == "error"
        assert "every caller is refused (crl_stale = refuse)" in stale[0]["effect"]
        assert "CRL of CN=Client CA,O=Thales-like,C=FR" in stale[0]["crls"]
        reactor.advance(STALE_CRL_REPEAT)
        stale = [e for e in events if "past nextUpdate" in e.get("log_format", "")]
        assert len(stale) == 2


def test_a_fresh_crl_gives_no_error_line_until_its_next_update(folder: Path) -> None:
    reactor = MemoryReactorClock()
    now = datetime.datetime.now(datetime.UTC)
    reactor.advance(now.timestamp())
    config = cfg.load(write(folder, 'client_crl = "fresh.crl"'))
    sidecar = Sidecar(config, reactor, access_log=AccessLog(None, False))
    sidecar.build()
    with capturedLogs() as events:
        sidecar.start()
        reactor.advance(6 * 86400)
        assert not [e for e in events if "past nextUpdate" in e.get("log_format", "")]
        reactor.advance(86400 + 1)  # the CRL's nextUpdate is 7 days after it was made
        stale = [e for e in events if "past nextUpdate" in e.get("log_format", "")]
        assert len(stale) == 1
        assert "callers are admitted (crl_stale = warn)" in stale[0]["effect"]


def test_check_warns_in_a_crls_last_quarter_and_run_leaves_a_stale_one_to_crl_stale(
    folder: Path,
) -> None:
    from proxy.ops import audit

    config = cfg.load(write(folder, 'client_crl = "fresh.crl"'))
    now = datetime.datetime.now(datetime.UTC)
    levels = lambda at: [  # noqa: E731
        f.level for f in audit.audit(config, at) if f.key.endswith("client_crl")
    ]
    assert levels(now) == ["info"]
    assert levels(now + 4 * DAY) == ["info"]  # valid 8 days (from a day ago): 3 days left
    assert levels(now + 5 * DAY + HOUR) == ["warning"]  # under a quarter (2 days) left
    assert levels(now + 8 * DAY) == ["error"]
    stale = cfg.load(write(folder, 'client_crl = "stale.crl"'))
    assert any("past its nextUpdate" in f.message for f in audit.audit(stale))
    assert audit.errors(stale) == []  # `run` and reload start; the handshake policy decides
