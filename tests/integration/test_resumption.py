"""TLS session resumption: egress resumes toward the partner (nginx with a session cache and
tickets, TLS 1.2 and TLS 1.3); a reload with a new client certificate starts over with a full
handshake; ingress never resumes (openssl s_client -sess_out / -sess_in)."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import (
    Nginx,
    Sidecar,
    curl,
    free_port,
    need,
    origin_pki,
    write_config,
)
from tests.pkifactory import Issued

pytestmark = pytest.mark.integration

AGE = 0.1  # max_connection_age: every request after a pause gets a new upstream connection
ECHO = 'return 200 "reused=$ssl_session_reused proto=$ssl_protocol serial=$ssl_client_serial\\n";'
PROTOCOLS = {"tls12": "TLSv1.2", "tls13": "TLSv1.3"}


@attrs.frozen
class Env:
    dir: Path
    client_ca: Issued
    ports: dict[str, int]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("resumption")
    _server_ca, client_ca = origin_pki(d)
    ports = {name: free_port() for name in (*PROTOCOLS, "plain")}
    servers = f"""
        server {{
          listen 127.0.0.1:{ports["plain"]};
          location / {{ return 200 "internal app\n"; }}
        }}""" + "".join(
        f"""
        server {{
          listen 127.0.0.1:{ports[name]} ssl;
          ssl_certificate {d}/origin.pem;
          ssl_certificate_key {d}/origin.key;
          ssl_client_certificate {d}/client-ca.pem;
          ssl_verify_client on;
          ssl_protocols {proto};
          ssl_session_cache shared:S:1m;
          ssl_session_tickets on;
          location / {{ {ECHO} }}
        }}"""
        for name, proto in PROTOCOLS.items()
    )
    nginx = Nginx(d / "nginx", servers).start([("127.0.0.1", p) for p in ports.values()])
    try:
        yield Env(d, client_ca, ports)
    finally:
        nginx.stop()


def egress_sidecar(env: Env, name: str) -> tuple[Sidecar, int, int]:
    port, admin = free_port(), free_port()
    conf = write_config(
        env.dir / f"{name}.toml",
        f"""
        [admin]
        listen = "127.0.0.1:{admin}"
        [log]
        format = "json"
        [service]
        reload_interval = 0
        [[egress]]
        name = "{name}"
        listen = "127.0.0.1:{port}"
        upstream = "https://localhost:{env.ports[name]}"
        client_cert = "{name}-client.pem"
        client_key = "{name}-client.key"
        trust = "server-ca.pem"
        max_connection_age = {AGE}
        connect_timeout = 2
        response_timeout = 2
        """,
    )
    env.client_ca.issue("C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR", client=True).write(
        env.dir, f"{name}-client"
    )
    sidecar = Sidecar(conf).start([("127.0.0.1", port), ("127.0.0.1", admin)])
    return sidecar, port, admin


def fresh_get(port: int) -> dict[str, str]:
    """One request on a new upstream connection (the previous one is past max_connection_age)."""
    time.sleep(AGE * 1.5)
    r = curl(f"http://127.0.0.1:{port}/")
    assert r.status == 200, r.body
    return dict(kv.split("=", 1) for kv in r.body.decode().split())


def handshakes(admin: int, route: str) -> dict[str, float]:
    """mtls_sidecar_upstream_tls_handshakes_total of route, by kind, from /metrics."""
    text = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    found = {"full": 0.0, "resumed": 0.0}
    for labels, value in re.findall(
        r"^mtls_sidecar_upstream_tls_handshakes_total\{(.*)\} (\S+)$", text, re.M
    ):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields["route"] == route:
            found[fields["kind"]] = float(value)
    return found


def reload(sidecar: Sidecar) -> None:
    assert sidecar.proc is not None
    done = sidecar.log().count("key material reloaded")
    sidecar.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while sidecar.log().count("key material reloaded") == done:
        assert time.monotonic() < deadline, sidecar.log()
        time.sleep(0.05)


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_new_upstream_connections_resume_the_routes_last_session(env: Env, name: str) -> None:
    sidecar, port, admin = egress_sidecar(env, name)
    try:
        seen = [fresh_get(port) for _ in range(4)]
        assert {s["proto"] for s in seen} == {PROTOCOLS[name]}
        assert [s["reused"] for s in seen] == [".", "r", "r", "r"]
        assert handshakes(admin, name) == {"full": 1.0, "resumed": 3.0}
    finally:
        assert sidecar.stop() == 0


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_reload_drops_the_session(env: Env, name: str) -> None:
    sidecar, port, admin = egress_sidecar(env, name)
    try:
        first = fresh_get(port)
        assert fresh_get(port)["reused"] == "r"

        # the same files again: a new context all the same, and a session belongs to its context
        reload(sidecar)
        same = fresh_get(port)
        assert same["reused"] == "." and same["serial"] == first["serial"]
        assert fresh_get(port)["reused"] == "r"

        # a new client certificate: the next connection presents it in a full handshake
        env.client_ca.issue("C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR", client=True).write(
            env.dir, f"{name}-client"
        )
        reload(sidecar)
        rotated = fresh_get(port)
        assert rotated["reused"] == "." and rotated["serial"] != first["serial"]
        again = fresh_get(port)
        assert again["reused"] == "r" and again["serial"] == rotated["serial"]
        assert handshakes(admin, name) == {"full": 3.0, "resumed": 3.0}
    finally:
        assert sidecar.stop() == 0


def s_client_twice(env: Env, port: int, proto: str, tmp: Path) -> list[str]:
    """Connect with -sess_out, then reconnect offering that session with -sess_in; the
    'New,' / 'Reused,' line of each. The first one sends a request so that TLS 1.3 tickets (which
    come after the handshake) are read before it closes."""
    need("openssl")
    session = tmp / f"session-{port}-{proto}.pem"
    base = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", str(env.dir / "server-ca.pem"),
        "-cert", str(env.dir / "client.pem"), "-key", str(env.dir / "client.key"),
        f"-{proto}", "-ign_eof",
    ]  # fmt: skip
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    lines = []
    for extra in (["-sess_out", str(session)], ["-sess_in", str(session)]):
        if extra[0] == "-sess_in" and not session.exists():
            lines.append("New, (no session was handed out)")
            break
        out = subprocess.run(
            [*base, *extra], input=request, capture_output=True, timeout=20
        ).stdout.decode(errors="replace")
        assert "HTTP/1.1 " in out, out
        lines += [x for x in out.splitlines() if x.startswith(("New,", "Reused,"))][:1]
    return lines


@pytest.mark.parametrize("proto", ["tls1_2", "tls1_3"])
def test_ingress_never_resumes(env: Env, proto: str, tmp_path: Path) -> None:
    # the method finds resumption where there is some: nginx, with its cache and tickets
    origin = s_client_twice(env, env.ports["tls12" if proto == "tls1_2" else "tls13"], proto,
                            tmp_path)  # fmt: skip
    assert origin[0].startswith("New,") and origin[1].startswith("Reused,"), origin

    port = free_port()
    conf = write_config(
        env.dir / f"ingress-{proto}.toml",
        f"""
        [log]
        format = "json"
        [[ingress]]
        name = "in"
        listen = "127.0.0.1:{port}"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{env.ports["plain"]}"
        """,
    )
    sidecar = Sidecar(conf).start([("127.0.0.1", port)])
    try:
        lines = s_client_twice(env, port, proto, tmp_path)
        assert len(lines) == 2 and all(x.startswith("New,") for x in lines), lines
    finally:
        assert sidecar.stop() == 0
