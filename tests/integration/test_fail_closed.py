"""`run` and every reload refuse the mistakes `check` calls errors: the sidecar never starts on,
or swaps in, key material the partner would refuse later with a confusing error. A fault of time
(a certificate expired or not yet valid) is not a mistake: its route is down, the rest runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import SIDECAR, Sidecar, curl, free_port, write_config
from tests.pkifactory import DAY, NOW, Issued, make_ca, write_ca

pytestmark = pytest.mark.integration

PPR_CN = "C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR"


@attrs.frozen
class Pki:
    server_ca: Issued
    client_ca: Issued
    intermediate: Issued
    other_intermediate: Issued


@pytest.fixture(scope="module")
def pki() -> Pki:
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Merchant Root")
    thales = make_ca("C=FR,O=Thales-like,CN=Thales Root")
    intermediate = thales.issue("C=FR,O=Thales-like,CN=Thales Issuing 01", ca=True)
    other = thales.issue("C=FR,O=Thales-like,CN=Thales Issuing 02", ca=True)
    return Pki(server_ca, thales, intermediate, other)


def good(d: Path, pki: Pki) -> None:
    """Material `check` accepts: a D1 PPR client certificate and a localhost server one."""
    pki.intermediate.issue(PPR_CN, client=True).write(d, "client")
    pki.server_ca.issue("CN=localhost", dns=("localhost",), server=True).write(d, "server")
    write_ca(pki.server_ca, d / "server-ca.pem")
    write_ca(pki.client_ca, d / "client-ca.pem")


def _client(subject: str, **kw: object) -> Callable[[Path, Pki], None]:
    def write(d: Path, pki: Pki) -> None:
        pki.intermediate.issue(subject, client=True, **kw).write(d, "client")  # type: ignore[arg-type]

    return write


def _wrong_intermediate(d: Path, pki: Pki) -> None:
    leaf = pki.intermediate.issue(PPR_CN, client=True)
    pem = leaf.cert_pem() + pki.other_intermediate.cert_pem()
    (d / "client.pem").write_bytes(pem)
    (d / "client.key").write_bytes(leaf.key_pem())


def _server(**kw: object) -> Callable[[Path, Pki], None]:
    def write(d: Path, pki: Pki) -> None:
        kw.setdefault("dns", ("localhost",))
        pki.server_ca.issue("CN=localhost", server=True, **kw).write(d, "server")  # type: ignore[arg-type]

    return write


# faults of time: (how to break, the route that goes down, its reason code)
TIME_CASES: dict[str, tuple[Callable[[Path, Pki], None], str, str]] = {
    "client_expired": (
        _client(PPR_CN, not_before=NOW - 30 * DAY, not_after=NOW - DAY),
        "d1",
        "client certificate .* expired at ",
    ),
    "client_not_yet_valid": (
        _client(PPR_CN, not_before=NOW + DAY, not_after=NOW + 30 * DAY),
        "d1",
        "client certificate .* is valid from ",
    ),
    "server_expired": (
        _server(not_before=NOW - 30 * DAY, not_after=NOW - DAY),
        "callbacks",
        "server certificate .* expired at ",
    ),
}

CASES: dict[str, tuple[Callable[[Path, Pki], None], str]] = {
    "client_cn_not_d1": (
        _client("C=FR,O=Merchant,CN=merchant-gateway"),
        r"CN 'merchant-gateway' does not match D1's pattern",
    ),
    "prd_route_with_ppr_cert": (
        _client("C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PRD"),
        r"is for D1\.PRD but the route expects PPR",
    ),
    "wrong_intermediate": (_wrong_intermediate, r"chain order"),
    "server_san_misses_server_name": (
        _server(dns=("elsewhere.example",)),
        r"subjectAltName does not cover server_name 'localhost'",
    ),
}


def config(d: Path) -> tuple[Path, int, int]:
    ingress, admin = free_port(), free_port()
    conf = write_config(
        d / "c.toml",
        f"""
        [log]
        format = "json"
        [service]
        reload_interval = 0
        [admin]
        listen = "127.0.0.1:{admin}"
        [[egress]]
        name = "d1"
        env = "PPR"
        listen = "127.0.0.1:{free_port()}"
        upstream = "https://localhost:{free_port()}"
        client_cert = "client.pem"
        client_key = "client.key"
        trust = "server-ca.pem"
        [[ingress]]
        name = "callbacks"
        listen = "127.0.0.1:{ingress}"
        server_name = "localhost"
        server_cert = "server.pem"
        server_key = "server.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{free_port()}"
        """,
    )
    return conf, ingress, admin


@pytest.fixture
def folder(tmp_path: Path, pki: Pki) -> Iterator[Path]:
    good(tmp_path, pki)
    yield tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_refuses_to_start_on_what_check_calls_an_error(
    case: str, folder: Path, pki: Pki
) -> None:
    breaks, reason = CASES[case]
    breaks(folder, pki)
    conf, _, _ = config(folder)
    t0 = time.monotonic()
    out = subprocess.run([SIDECAR, "run", "-c", str(conf)], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 2
    assert time.monotonic() - t0 < 10
    lines = [json.loads(line) for line in out.stderr.splitlines()]  # [log] format = "json"
    assert lines and all(line["level"] == "error" for line in lines), lines
    assert any(re.search(reason, line["msg"]) for line in lines), lines
    check = subprocess.run([SIDECAR, "check", "-c", str(conf)], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
    assert check.returncode == 1 and re.search(reason, check.stdout)


def _metric(admin: int, name: str, **labels: str) -> float | None:
    text = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("case", sorted(CASES))
def test_reload_keeps_the_old_material_on_what_check_calls_an_error(
    case: str, folder: Path, pki: Pki
) -> None:
    conf, ingress, admin = config(folder)
    sidecar = Sidecar(conf).start([("127.0.0.1", ingress), ("127.0.0.1", admin)])
    try:
        expiry = _metric(admin, "mtls_sidecar_certificate_expiry_timestamp_seconds",
                         route="callbacks", role="server")  # fmt: skip
        breaks, reason = CASES[case]
        breaks(folder, pki)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "reload failed" not in sidecar.log():
            time.sleep(0.1)
        failed = _metric(admin, "mtls_sidecar_reloads_total", result="failure")
        succeeded = _metric(admin, "mtls_sidecar_reloads_total", result="success")
        after = _metric(admin, "mtls_sidecar_certificate_expiry_timestamp_seconds",
                        route="callbacks", role="server")  # fmt: skip
        assert sidecar.proc.poll() is None  # still serving
    finally:
        sidecar.stop()
    failures = [line for line in sidecar.log().splitlines() if "reload failed" in line]
    assert len(failures) == 1 and re.search(reason, failures[0]), failures
    assert (failed, succeeded) == (1.0, 0.0)
    assert after == expiry  # the old certificates stay in use


def _route(admin: int, name: str) -> dict[str, object]:
    status = json.loads(curl(f"http://127.0.0.1:{admin}/status").body)
    routes: dict[str, dict[str, object]] = {r["name"]: r for r in status["routes"]}
    return routes[name]


@pytest.mark.parametrize("case", sorted(TIME_CASES))
def test_run_starts_with_a_lapsed_certificate_and_only_its_route_is_down(
    case: str, folder: Path, pki: Pki
) -> None:
    breaks, down, reason = TIME_CASES[case]
    breaks(folder, pki)
    conf, ingress, admin = config(folder)
    sidecar = Sidecar(conf).start([("127.0.0.1", ingress), ("127.0.0.1", admin)])
    try:
        route = _route(admin, down)
        other = _route(admin, "callbacks" if down == "d1" else "d1")
        pod = curl(f"http://127.0.0.1:{admin}/readyz")
        mine = curl(f"http://127.0.0.1:{admin}/readyz/{down}")
        up = _metric(admin, "mtls_sidecar_route_up", route=down)
    finally:
        sidecar.stop()
    assert route["state"] == "down" and re.search(reason, str(route["reasons"])), route
    assert other["state"] == "up", other
    assert pod.status == 200 and mine.status == 503 and up == 0.0
    errors = [line for line in sidecar.log().splitlines() if '"level": "error"' in line]
    assert errors and all(f'"route": "{down}"' in line for line in errors), errors
    # `check` still calls it an error: someone must renew it
    check = subprocess.run([SIDECAR, "check", "-c", str(conf)], capture_output=True, text=True,
                           timeout=30)  # fmt: skip
    assert check.returncode == 1


@pytest.mark.parametrize("case", sorted(TIME_CASES))
def test_a_reload_applies_while_a_certificate_has_lapsed(case: str, folder: Path, pki: Pki) -> None:
    conf, ingress, admin = config(folder)
    sidecar = Sidecar(conf).start([("127.0.0.1", ingress), ("127.0.0.1", admin)])
    try:
        breaks, down, reason = TIME_CASES[case]
        breaks(folder, pki)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "reloaded" not in sidecar.log():
            time.sleep(0.1)
        succeeded = _metric(admin, "mtls_sidecar_reloads_total", result="success")
        route = _route(admin, down)
    finally:
        sidecar.stop()
    assert succeeded == 1.0, sidecar.log()
    assert route["state"] == "down" and re.search(reason, str(route["reasons"])), route
