"""A fault of time stays in its route: a client certificate that lapses while running takes its
egress route down at that moment (503, its pooled connections closed), announced beforehand;
the other routes, readiness of the pod, reloads and restarts go on."""

from __future__ import annotations

import calendar
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from cryptography import x509

from tests.harness import (
    CLIENT_SUBJECT,
    PEERS,
    SIDECAR,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_origin,
    origin_pki,
    running,
    write_config,
)
from tests.pkifactory import Issued, short_lived

pytestmark = pytest.mark.integration

LIFETIME = 30.0  # the short client certificate's remaining life at the start of the test


@attrs.frozen
class Env:
    dir: Path
    origin: int
    upstream: Peer
    client_ca: Issued


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("degrade")
    _, client_ca = origin_pki(d)
    nginx, origin = mtls_origin(d, 'location / { return 200 "ok"; }')
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen")]).start()
    try:
        yield Env(d, origin, upstream, client_ca)
    finally:
        upstream.stop()
        nginx.stop()


def egress(name: str, port: int, origin: int, cert: str = "client") -> str:
    return f"""
        [[egress]]
        name = "{name}"
        listen = "127.0.0.1:{port}"
        upstream = "https://localhost:{origin}"
        client_cert = "{cert}.pem"
        client_key = "{cert}.key"
        trust = "server-ca.pem"
        """


def config(env: Env, name: str, ports: dict[str, int], *extra: str) -> Path:
    return write_config(
        env.dir / f"{name}.toml",
        f"""
        [admin]
        listen = "127.0.0.1:{ports["admin"]}"
        [[ingress]]
        name = "callbacks"
        listen = "127.0.0.1:{ports["ingress"]}"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{env.upstream.port}"
        """
        + egress("lapsing", ports["lapsing"], env.origin, "short")
        + egress("steady", ports["steady"], env.origin)
        + "".join(extra),
    )


def lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    out = []
    for line in sidecar.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def logged(sidecar: Sidecar, level: str, route: str) -> list[dict[str, Any]]:
    """The log lines of that level about that route, waiting a little for the first."""
    deadline = time.monotonic() + 5
    while True:
        found = [x for x in lines(sidecar) if x["level"] == level and x.get("route") == route]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def get(port: int, path: str = "/x") -> tuple[int, bytes]:
    r = curl(f"http://127.0.0.1:{port}{path}")
    return r.status, r.body


def ingress_get(env: Env, port: int) -> int:
    d = env.dir
    return curl("--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"), "--key",
                str(d / "client.key"), f"https://localhost:{port}/cb").status  # fmt: skip


def metric(port: int, line_start: str) -> float | None:
    text = curl(f"http://127.0.0.1:{port}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_lapsing_client_certificate_takes_down_its_route_only(env: Env) -> None:
    d = env.dir
    short_lived(env.client_ca, CLIENT_SUBJECT, LIFETIME, client=True).write(d, "short")
    not_after = x509.load_pem_x509_certificate(
        (d / "short.pem").read_bytes()
    ).not_valid_after_utc.timestamp()
    ports = {k: free_port() for k in ("admin", "ingress", "lapsing", "steady", "added")}
    conf = config(env, "lapse", ports)
    sidecar = Sidecar(conf).start([("127.0.0.1", ports[k]) for k in ("admin", "lapsing")])
    with running(sidecar):
        # before: announced, and served
        warned = logged(sidecar, "warn", "lapsing")
        assert warned and warned[0]["role"] == "client" and warned[0]["subject"]
        assert 0 < warned[0]["days_left"] < 1
        # in seconds, at most the lifetime (rounded: a quick start says the whole of it)
        left = re.search(r" expires in (\d+) s ", warned[0]["msg"])
        assert left is not None and 0 < int(left[1]) <= LIFETIME, warned[0]["msg"]
        # and what `check` warns about, as JSON lines naming the file and key
        keys = {x.get("key") for x in lines(sidecar) if x["level"] == "warn"}
        assert "ingress[0] (callbacks).server_cert" in keys, sidecar.log()
        assert get(ports["lapsing"]) == (200, b"ok")
        assert get(ports["steady"]) == (200, b"ok")
        assert ingress_get(env, ports["ingress"]) == 200
        assert (
            metric(
                ports["admin"], 'mtls_sidecar_upstream_connections{route="lapsing",state="idle"}'
            )
            == 1.0
        )
        assert (
            metric(ports["admin"], 'mtls_sidecar_route_up{direction="egress",route="lapsing"}')
            == 1.0
        )
        # at expiry: 503 at once, the pooled connection closed, the others serve
        while time.time() < not_after - 0.5:
            time.sleep(0.2)
        first_503 = None
        while time.time() < not_after + 5:
            status, body = get(ports["lapsing"])
            if status == 503:
                first_503 = time.time()
                break
            time.sleep(0.05)
        assert first_503 is not None, sidecar.log()
        assert first_503 - not_after <= 1.0
        answer = json.loads(body)
        assert answer["error"] == "client_certificate_expired"
        assert answer["route"] == "lapsing"
        assert answer["not_after"].startswith(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(not_after))
        )
        assert get(ports["steady"]) == (200, b"ok")
        assert ingress_get(env, ports["ingress"]) == 200
        errors = [
            x for x in lines(sidecar) if x["level"] == "error" and x.get("route") == "lapsing"
        ]
        assert errors and errors[0]["reason"] == "client_certificate_expired"
        at = calendar.timegm(time.strptime(errors[0]["time"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert not_after - 1 <= at <= not_after + 1
        assert (
            metric(
                ports["admin"], 'mtls_sidecar_upstream_connections{route="lapsing",state="idle"}'
            )
            == 0.0
        )
        assert (
            metric(ports["admin"], 'mtls_sidecar_route_up{direction="egress",route="lapsing"}')
            == 0.0
        )
        # readiness: the pod stays in, the route is out
        admin = f"http://127.0.0.1:{ports['admin']}"
        assert curl(f"{admin}/readyz").status == 200
        lapsed = curl(f"{admin}/readyz/lapsing")
        assert lapsed.status == 503
        assert "client certificate" in json.loads(lapsed.body)["reasons"][0]
        assert curl(f"{admin}/readyz/steady").status == 200
        verbose = curl(f"{admin}/readyz/lapsing?verbose").body.decode()
        assert "[+]listener ok" in verbose and "[-]certificates failed: " in verbose
        # a reload that adds a route is applied
        config(env, "lapse", ports, egress("added", ports["added"], env.origin))
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while get(ports["added"])[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert get(ports["added"]) == (200, b"ok")
        assert get(ports["lapsing"])[0] == 503
        # status with no config file at all
        out = subprocess.run([SIDECAR, "status", "--admin", f"127.0.0.1:{ports['admin']}",
                              "--json"], capture_output=True, text=True, timeout=20)  # fmt: skip
        report = json.loads(out.stdout)
        routes = {r["name"]: r for r in report["routes"]}
        assert routes["lapsing"]["state"] == "down"
        assert "expired" in routes["lapsing"]["reasons"][0]
        assert routes["steady"]["state"] == "up" and routes["added"]["state"] == "up"
        assert report["last_reload"]["result"] == "success"
        text = subprocess.run([SIDECAR, "status", "--admin", f"127.0.0.1:{ports['admin']}"],
                              capture_output=True, text=True, timeout=20).stdout  # fmt: skip
        assert "egress lapsing: DOWN (" in text
    # a restart with the lapsed certificate starts and serves the others
    again = Sidecar(conf).start([("127.0.0.1", ports[k]) for k in ("admin", "steady", "added")])
    with running(again):
        assert get(ports["steady"]) == (200, b"ok")
        assert get(ports["added"]) == (200, b"ok")
        assert ingress_get(env, ports["ingress"]) == 200
        status, body = get(ports["lapsing"])
        assert status == 503 and json.loads(body)["error"] == "client_certificate_expired"
        assert curl(f"http://127.0.0.1:{ports['admin']}/readyz").status == 200
