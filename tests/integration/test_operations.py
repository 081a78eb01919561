"""Running for years: reload under traffic, a broken reload, drain on SIGTERM, metrics."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from tests.harness import PEERS, Nginx, Peer, Sidecar, curl, free_port, mtls_server, write_config
from tests.pkifactory import Issued, make_ca, write_ca

pytestmark = pytest.mark.integration


@attrs.frozen
class Env:
    dir: Path
    server_ca: Issued
    client_ca: Issued
    origin_port: int
    upstream: Peer

    def config(
        self, name: str, extra: str = "", origin: int | None = None
    ) -> tuple[Path, dict[str, int]]:
        ports = {"egress": free_port(), "ingress": free_port(), "admin": free_port()}
        conf = write_config(
            self.dir / f"{name}.toml",
            f"""
            [log]
            format = "json"
            [service]
            drain_timeout = 10
            {extra}
            [admin]
            listen = "127.0.0.1:{ports["admin"]}"
            [[egress]]
            name = "out"
            listen = "127.0.0.1:{ports["egress"]}"
            upstream = "https://localhost:{origin or self.origin_port}"
            client_cert = "live/client.pem"
            client_key = "live/client.key"
            trust = "server-ca.pem"
            response_timeout = 10
            [[ingress]]
            name = "in"
            listen = "127.0.0.1:{ports["ingress"]}"
            server_cert = "live/server.pem"
            server_key = "live/server.key"
            client_ca = "client-ca.pem"
            upstream = "http://127.0.0.1:{self.upstream.port}"
            """,
        )
        return conf, ports

    def material(self, version: str) -> tuple[int, int]:
        """Write a new server and client certificate set as folder VERSION; return serials."""
        folder = self.dir / version
        server = self.server_ca.issue("CN=localhost", dns=("localhost",), server=True)
        client = self.client_ca.issue(
            "C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR", client=True
        )
        server.write(folder, "server")
        client.write(folder, "client")
        return server.cert.serial_number, client.cert.serial_number

    def point_live_to(self, version: str) -> None:
        """Swap the 'live' symlink atomically, as the kubelet does for a Secret volume."""
        tmp = self.dir / "live.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version)
        os.replace(tmp, self.dir / "live")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("ops")
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    server_ca.issue("CN=localhost", dns=("localhost",), server=True).write(d, "origin")
    client_ca.issue("CN=test-client", client=True).write(d, "d1")
    record = d / "upstream.jsonl"
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(record)]).start()
    port = free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(
            f"127.0.0.1:{port}",
            d / "origin.pem",
            d / "origin.key",
            d / "client-ca.pem",
            'location / { return 200 "$ssl_client_serial"; }',
        ),
    ).start([("127.0.0.1", port)])
    env = Env(d, server_ca, client_ca, port, upstream)
    try:
        yield env
    finally:
        nginx.stop()
        upstream.stop()


def server_serial(env: Env, port: int) -> int:
    ctx = ssl.create_default_context(cafile=str(env.dir / "server-ca.pem"))
    ctx.load_cert_chain(str(env.dir / "d1.pem"), str(env.dir / "d1.key"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def ingress_get(env: Env, port: int) -> int:
    r = curl("--cacert", str(env.dir / "server-ca.pem"), "--cert", str(env.dir / "d1.pem"),
             "--key", str(env.dir / "d1.key"), f"https://localhost:{port}/cb")  # fmt: skip
    return r.status


class Traffic:
    """A steady stream of requests through both directions, counting failures."""

    def __init__(self, env: Env, ports: dict[str, int]) -> None:
        self.env, self.ports = env, ports
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(d,)) for d in ("egress", "ingress")
        ]

    def _run(self, direction: str) -> None:
        while not self.stop.is_set():
            if direction == "egress":
                r = curl(f"http://127.0.0.1:{self.ports['egress']}/")
                status = r.status
            else:
                status = ingress_get(self.env, self.ports["ingress"])
            if status == 200:
                self.ok += 1
            else:
                self.failed.append(f"{direction} {status}")

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def metric(ports: dict[str, int], needle: str) -> float:
    text = curl(f"http://127.0.0.1:{ports['admin']}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(needle):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sighup_reload_under_traffic_loses_no_request_and_new_connections_get_new_certs(
    env: Env,
) -> None:
    old_server, old_client = env.material("v1")
    env.point_live_to("v1")
    conf, ports = env.config("hup", "reload_interval = 0")
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    try:
        assert server_serial(env, ports["ingress"]) == old_server
        assert int(curl(f"http://127.0.0.1:{ports['egress']}/").body, 16) == old_client
        with Traffic(env, ports) as traffic:
            time.sleep(1.0)
            new_server, new_client = env.material("v2")
            env.point_live_to("v2")
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGHUP)
            time.sleep(1.5)
        assert traffic.failed == [] and traffic.ok > 20
        assert server_serial(env, ports["ingress"]) == new_server
        assert int(curl(f"http://127.0.0.1:{ports['egress']}/").body, 16) == new_client
        assert metric(ports, 'mtls_sidecar_reloads_total{result="success"}') == 1.0
    finally:
        assert sidecar.stop() == 0


def test_symlink_swap_is_picked_up_by_the_periodic_check(env: Env) -> None:
    old_server, _ = env.material("v3")
    env.point_live_to("v3")
    conf, ports = env.config("periodic", "reload_interval = 0.3")
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    try:
        assert server_serial(env, ports["ingress"]) == old_server
        new_server, _ = env.material("v4")
        env.point_live_to("v4")
        deadline = time.monotonic() + 5
        while server_serial(env, ports["ingress"]) != new_server:
            assert time.monotonic() < deadline, "new certificate not served after the swap"
            time.sleep(0.1)
    finally:
        sidecar.stop()


def test_corrupt_replacement_key_keeps_the_old_material_and_is_counted(env: Env) -> None:
    old_server, old_client = env.material("v5")
    env.point_live_to("v5")
    conf, ports = env.config("corrupt", "reload_interval = 0")
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    try:
        env.material("v6")
        (env.dir / "v6" / "server.key").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
        env.point_live_to("v6")
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        time.sleep(0.8)
        assert sidecar.proc.poll() is None
        assert server_serial(env, ports["ingress"]) == old_server
        assert ingress_get(env, ports["ingress"]) == 200
        assert int(curl(f"http://127.0.0.1:{ports['egress']}/").body, 16) == old_client
        assert metric(ports, 'mtls_sidecar_reloads_total{result="failure"}') == 1.0
    finally:
        sidecar.stop()
    assert "reload failed, keeping the current key material" in sidecar.log()
    assert "server_key" in sidecar.log()


def test_sigterm_finishes_requests_in_flight_then_exits_0(env: Env, tmp_path: Path) -> None:
    env.material("v7")
    env.point_live_to("v7")
    slow = Peer(
        [str(PEERS / "tls_origin.py"), "--mode", "slow", "--delay", "1.5",
         "--cert", str(env.dir / "origin.pem"), "--key", str(env.dir / "origin.key"),
         "--client-ca", str(env.dir / "client-ca.pem"), "--record", str(tmp_path / "rec")]
    ).start()  # fmt: skip
    conf, ports = env.config("drain", origin=slow.port)
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    try:
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            futures = [
                pool.submit(curl, f"http://127.0.0.1:{ports['egress']}/pay/{i}") for i in range(5)
            ]
            time.sleep(0.5)
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            ready = curl(f"http://127.0.0.1:{ports['admin']}/readyz")
            refused = curl(f"http://127.0.0.1:{ports['egress']}/late", timeout=3)
            results = [f.result() for f in futures]
        assert [r.status for r in results] == [200] * 5
        assert all(r.body == b"slow" for r in results)
        assert ready.status == 503
        assert json.loads(ready.body) == {"ready": False, "reasons": ["draining"]}
        assert refused.status == 0  # no longer listening
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()
        slow.stop()
    last = sidecar.log().splitlines()[-1]
    assert "stopped after a " in last and "cut at the drain timeout: 0" in last, last


def test_metrics_move_with_traffic(env: Env) -> None:
    env.material("v8")
    env.point_live_to("v8")
    conf, ports = env.config("metrics")
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    try:
        before = metric(
            ports, 'mtls_sidecar_requests_total{code="200",direction="egress",route="out"}'
        )
        for _ in range(3):
            curl(f"http://127.0.0.1:{ports['egress']}/")
        ingress_get(env, ports["ingress"])
        after = metric(
            ports, 'mtls_sidecar_requests_total{code="200",direction="egress",route="out"}'
        )
        assert after - before == 3
        assert (
            metric(ports, 'mtls_sidecar_requests_total{code="200",direction="ingress",route="in"}')
            == 1
        )
        assert (
            metric(
                ports, 'mtls_sidecar_request_duration_seconds_count{direction="egress",route="out"}'
            )
            == 3
        )
        expiry = metric(
            ports, 'mtls_sidecar_certificate_expiry_timestamp_seconds{role="client",route="out"}'
        )
        assert expiry > time.time() + 300 * 86400
        assert curl(f"http://127.0.0.1:{ports['admin']}/healthz").status == 200
        assert curl(f"http://127.0.0.1:{ports['admin']}/readyz").status == 200
    finally:
        sidecar.stop()
    lines = [json.loads(x) for x in sidecar.log().splitlines() if '"status"' in x]
    assert {(x["route"], x["status"]) for x in lines} == {("out", 200), ("in", 200)}
    ingress_line = next(x for x in lines if x["route"] == "in")
    assert ingress_line["peer_subject"] == "CN=test-client"


def test_a_second_sigterm_exits_at_once(env: Env, tmp_path: Path) -> None:
    env.material("v9")
    env.point_live_to("v9")
    slow = Peer(
        [str(PEERS / "tls_origin.py"), "--mode", "slow", "--delay", "8",
         "--cert", str(env.dir / "origin.pem"), "--key", str(env.dir / "origin.key"),
         "--client-ca", str(env.dir / "client-ca.pem"), "--record", str(tmp_path / "rec")]
    ).start()  # fmt: skip
    conf, ports = env.config("twice", origin=slow.port)
    sidecar = Sidecar(conf).start([("127.0.0.1", p) for p in ports.values()])
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(curl, f"http://127.0.0.1:{ports['egress']}/slow")
            time.sleep(0.5)
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert sidecar.proc.poll() is None  # draining: the request is still in flight
            started = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            code = sidecar.proc.wait(5)
            assert time.monotonic() - started < 2
            assert code == 128 + signal.SIGTERM  # what a shell reports for a SIGTERM'd process
            assert pending.result().status != 200
    finally:
        sidecar.stop()
        slow.stop()
    last = sidecar.log().splitlines()[-1]
    assert "second SIGTERM while draining: exiting at once with status 143" in last, last


def test_systemd_notifications_ready_reloading_stopping(env: Env, tmp_path: Path) -> None:
    env.material("v10")
    env.point_live_to("v10")
    conf, ports = env.config("notify", "reload_interval = 0")
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(10)
    sidecar = Sidecar(conf).start(
        [("127.0.0.1", p) for p in ports.values()], env={"NOTIFY_SOCKET": str(path)}
    )
    try:
        assert b"READY=1" in listener.recv(4096)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        reloading = listener.recv(4096)
        assert b"RELOADING=1" in reloading and b"MONOTONIC_USEC=" in reloading
        assert b"READY=1" in listener.recv(4096)
        sidecar.proc.send_signal(signal.SIGTERM)
        assert b"STOPPING=1" in listener.recv(4096)
        assert sidecar.proc.wait(10) == 0
    finally:
        sidecar.stop()
        listener.close()
