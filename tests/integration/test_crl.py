"""Revocation on ingress end to end: CRLs made here, the sidecar via its CLI, curl, openssl
s_client and Python's ssl as the partner, a recording internal app behind."""

from __future__ import annotations

import datetime
import http.client
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.harness import (
    PEERS,
    SIDECAR,
    Peer,
    Sidecar,
    curl,
    free_port,
    need,
    write_config,
)
from tests.pkifactory import DAY, Issued, make_ca, make_crl, write_ca, write_crl

pytestmark = pytest.mark.integration

HOUR = datetime.timedelta(hours=1)


@attrs.frozen
class Pki:
    dir: Path
    root: Issued
    ca: Issued  # the intermediate that issues the partner's leaves (D1's case)
    ca2: Issued  # a second intermediate under the same root
    good: Issued
    revoked: Issued
    under_ca2: Issued
    upstream: Peer

    def leaf_only(self) -> Path:
        """client_ca as D1 gives it: the issuing intermediate only."""
        return write_ca(self.ca, self.dir / "client-ca.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    d = tmp_path_factory.mktemp("crl")
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Merchant Root")
    write_ca(server_ca, d / "server-ca.pem")
    server_ca.issue("CN=localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(
        d, "server"
    )
    root = make_ca("C=FR,O=Thales-like,CN=Thales Root")
    ca = root.issue("C=FR,O=Thales-like,CN=Thales Client CA 01", ca=True)
    ca2 = root.issue("C=FR,O=Thales-like,CN=Thales Client CA 02", ca=True)
    (d / "chain-ca.pem").write_bytes(root.cert_pem() + ca.cert_pem() + ca2.cert_pem())
    good = ca.issue("C=FR,O=Thales D1,CN=good.d1.example", client=True)
    revoked = ca.issue("C=FR,O=Thales D1,CN=revoked.d1.example", client=True)
    under_ca2 = ca2.issue("C=FR,O=Thales D1,CN=ca2-leaf.d1.example", client=True)
    good.write(d, "good")
    revoked.write(d, "revoked")
    under_ca2.write(d, "under-ca2")
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen.jsonl")])
    upstream.start()
    try:
        yield Pki(d, root, ca, ca2, good, revoked, under_ca2, upstream)
    finally:
        upstream.stop()


@attrs.define
class Running:
    sidecar: Sidecar
    port: int
    admin: int

    def metric(self, reason: str) -> float:
        text = curl(f"http://127.0.0.1:{self.admin}/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith("mtls_sidecar_tls_handshake_errors_total{") and (
                f'reason="{reason}"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def config(pki: Pki, name: str, crl: Path, extra: str = "", client_ca: str = "client-ca.pem",
           port: int = 0, admin: int = 0) -> Path:  # fmt: skip
    return write_config(
        pki.dir / f"{name}.toml",
        f"""
        [log]
        format = "json"
        [service]
        reload_interval = 0.2
        [admin]
        listen = "127.0.0.1:{admin}"
        [[ingress]]
        name = "{name}"
        listen = "127.0.0.1:{port}"
        server_cert = "server.pem"
        server_key = "server.key"
        client_ca = "{client_ca}"
        client_crl = "{crl.name}"
        upstream = "http://127.0.0.1:{pki.upstream.port}"
        {extra}
        """,
    )


@pytest.fixture
def start(pki: Pki) -> Iterator[Any]:
    started: list[Sidecar] = []

    def run(name: str, crl: Path, extra: str = "", client_ca: str = "client-ca.pem") -> Running:
        port, admin = free_port(), free_port()
        path = config(pki, name, crl, extra, client_ca, port, admin)
        sidecar = Sidecar(path).start([("127.0.0.1", port), ("127.0.0.1", admin)])
        started.append(sidecar)
        return Running(sidecar, port, admin)

    yield run
    for sidecar in started:
        sidecar.stop()


def call(pki: Pki, port: int, stem: str) -> tuple[int, str]:
    out = curl(
        "--cacert", str(pki.dir / "server-ca.pem"),
        "--cert", str(pki.dir / f"{stem}.pem"), "--key", str(pki.dir / f"{stem}.key"),
        f"https://localhost:{port}/callback",
    )  # fmt: skip
    return out.status, out.stderr


def s_client(pki: Pki, port: int, stem: str) -> str:
    need("openssl")
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
         "-cert", str(pki.dir / f"{stem}.pem"), "-key", str(pki.dir / f"{stem}.key"),
         "-CAfile", str(pki.dir / "server-ca.pem")],
        input=b"", capture_output=True, timeout=10,
    )  # fmt: skip
    return (out.stdout + out.stderr).decode(errors="replace")


def check(path: Path) -> tuple[int, list[dict[str, str]]]:
    out = subprocess.run(
        [SIDECAR, "check", "-c", str(path), "--json"], capture_output=True, timeout=30
    )
    return out.returncode, json.loads(out.stdout)["findings"]


def log_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    out = []
    for line in sidecar.log().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_a_revoked_certificate_is_refused_with_the_revoked_alert_others_admitted(
    pki: Pki, start: Any
) -> None:
    pki.leaf_only()
    crl = write_crl(pki.dir / "revoked.crl", make_crl(pki.ca, [pki.revoked.cert]))
    run = start("revocation", crl)
    assert call(pki, run.port, "good")[0] == 200
    status, stderr = call(pki, run.port, "revoked")  # TLS 1.3: the alert follows Finished
    assert status == 0 and "certificate revoked" in stderr
    text = s_client(pki, run.port, "revoked")  # TLS 1.2: the alert ends the handshake
    assert "alert certificate revoked" in text
    assert "Verify return code: 0" in text  # we trusted the server: the refusal is ours
    assert call(pki, run.port, "good")[0] == 200
    assert run.metric("certificate_revoked") == 2.0
    refused = next(x for x in log_lines(run.sidecar) if x.get("reason") == "certificate_revoked")
    text = json.dumps(refused)
    assert "CN=revoked.d1.example" in text
    assert f"serial {pki.revoked.cert.serial_number:x}" in text


def test_a_crl_from_another_ca_is_refused_by_check_and_by_run(pki: Pki) -> None:
    pki.leaf_only()
    impostor = make_ca("C=FR,O=Thales-like,CN=Thales Client CA 01")  # same name, other key
    crl = write_crl(pki.dir / "forged.crl", make_crl(impostor, [pki.good.cert]))
    path = config(pki, "forged", crl)
    code, findings = check(path)
    assert code == 1
    errors = [f for f in findings if f["level"] == "error"]
    assert any(
        f["key"] == "ingress[0] (forged).client_crl"
        and "not signed by any CA in client_ca" in f["message"]
        for f in errors
    ), errors
    # signed by the wrong key and named for the right CA: what OpenSSL would see is also refused
    signed_elsewhere = make_crl(pki.ca, [], signer=impostor)
    write_crl(crl, signed_elsewhere)
    assert check(path)[0] == 1
    out = subprocess.run([SIDECAR, "run", "-c", str(path)], capture_output=True, timeout=30)
    assert out.returncode == 2
    assert b"not signed by any CA in client_ca" in out.stderr
    assert b"Traceback" not in out.stderr


def test_a_new_crl_is_applied_without_restart_and_open_connections_stay(
    pki: Pki, start: Any
) -> None:
    pki.leaf_only()
    crl = write_crl(pki.dir / "rotating.crl", make_crl(pki.ca, []), der=True)  # DER accepted
    run = start("rotating", crl)
    pid = run.sidecar.proc.pid if run.sidecar.proc else 0
    ctx = ssl.create_default_context(cafile=str(pki.dir / "server-ca.pem"))
    ctx.load_cert_chain(str(pki.dir / "revoked.pem"), str(pki.dir / "revoked.key"))
    kept = http.client.HTTPSConnection("localhost", run.port, context=ctx, timeout=10)
    kept.request("GET", "/before")
    first = kept.getresponse()
    first.read()
    assert first.status == 200
    write_crl(crl, make_crl(pki.ca, [pki.revoked.cert]))  # PEM this time
    wait_for(lambda: "key material reloaded" in run.sidecar.log())
    status, stderr = call(pki, run.port, "revoked")
    assert status == 0 and "certificate revoked" in stderr
    assert call(pki, run.port, "good")[0] == 200
    # the connection made before the new CRL keeps its verified session: nothing is dropped
    kept.request("GET", "/after")
    again = kept.getresponse()
    again.read()
    assert again.status == 200
    kept.close()
    assert run.sidecar.proc is not None and run.sidecar.proc.poll() is None
    assert run.sidecar.proc.pid == pid


def test_a_stale_crl_warns_admits_callers_and_keeps_its_revocations(pki: Pki, start: Any) -> None:
    pki.leaf_only()
    now = datetime.datetime.now(datetime.UTC)
    stale = make_crl(
        pki.ca, [pki.revoked.cert], last_update=now - 8 * DAY, next_update=now - 2 * HOUR
    )
    crl = write_crl(pki.dir / "stale-warn.crl", stale)
    code, findings = check(config(pki, "stale-warn", crl))
    assert code == 1
    assert any(f["level"] == "error" and "past its nextUpdate" in f["message"] for f in findings)
    run = start("stale-warn", crl)  # crl_stale defaults to "warn": run starts
    wait_for(lambda: "past nextUpdate" in run.sidecar.log())
    line = next(x for x in log_lines(run.sidecar) if "past nextUpdate" in json.dumps(x))
    assert line.get("level") == "error", line
    assert "callers are admitted" in json.dumps(line)
    assert call(pki, run.port, "good")[0] == 200
    status, stderr = call(pki, run.port, "revoked")
    assert status == 0 and "certificate revoked" in stderr


def test_a_stale_crl_with_crl_stale_refuse_refuses_every_caller(pki: Pki, start: Any) -> None:
    pki.leaf_only()
    now = datetime.datetime.now(datetime.UTC)
    stale = make_crl(pki.ca, [], last_update=now - 8 * DAY, next_update=now - 2 * HOUR)
    crl = write_crl(pki.dir / "stale-refuse.crl", stale)
    run = start("stale-refuse", crl, 'crl_stale = "refuse"')
    wait_for(lambda: "every caller is refused" in run.sidecar.log())
    status, stderr = call(pki, run.port, "good")
    assert status == 0 and "alert" in stderr
    assert run.metric("crl_stale") == 1.0
    # a fresh CRL put in place lets callers in again, without a restart
    write_crl(crl, make_crl(pki.ca, []))
    wait_for(lambda: "key material reloaded" in run.sidecar.log())
    assert call(pki, run.port, "good")[0] == 200


def test_chain_mode_refuses_a_leaf_under_a_revoked_intermediate(pki: Pki, start: Any) -> None:
    crl = write_crl(
        pki.dir / "chain.crl",
        make_crl(pki.root, [pki.ca2.cert]),
        make_crl(pki.ca, []),
        make_crl(pki.ca2, []),
    )
    leaf_mode = start("chain-off", crl, client_ca="chain-ca.pem")
    assert call(pki, leaf_mode.port, "under-ca2")[0] == 200  # only the leaf is checked
    chain = start("chain-on", crl, 'crl_check = "chain"', client_ca="chain-ca.pem")
    status, stderr = call(pki, chain.port, "under-ca2")
    assert status == 0 and "certificate revoked" in stderr
    assert call(pki, chain.port, "good")[0] == 200
    assert chain.metric("certificate_revoked") == 1.0


def test_chain_mode_without_the_roots_crl_is_an_error_in_check(pki: Pki) -> None:
    crl = write_crl(pki.dir / "chain-partial.crl", make_crl(pki.ca, []), make_crl(pki.ca2, []))
    path = config(pki, "chain-partial", crl, 'crl_check = "chain"', "chain-ca.pem")
    code, findings = check(path)
    assert code == 1
    assert any(
        f["level"] == "error" and "no CRL from CN=Thales Root,O=Thales-like,C=FR" in f["message"]
        for f in findings
    ), findings
    # leaf mode needs only the issuing CAs' CRLs: the same file is fine there
    code, findings = check(config(pki, "leaf-partial", crl, "", "chain-ca.pem"))
    assert code == 0, [f for f in findings if f["level"] == "error"]
