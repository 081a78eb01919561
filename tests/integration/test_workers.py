"""`[service] workers = N`: a supervisor and N worker processes on shared sockets, through the
CLI: every worker serves, one D1 token for all of them, one /metrics, a reload as a new
generation, a dead worker replaced, SIGTERM draining all."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import (
    PEERS,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_origin,
    origin_pki,
    write_config,
    write_oauth_key,
)
from tests.pkifactory import Issued

pytestmark = pytest.mark.integration


@attrs.frozen
class Env:
    dir: Path
    origin: int
    upstream: Peer
    client_ca: Issued

    def token_server(self, stats: Path) -> Peer:
        d = self.dir
        return Peer(
            [str(PEERS / "token_server.py"), "--port", "0", "--cert", str(d / "origin.pem"),
             "--key", str(d / "origin.key"), "--client-ca", str(d / "client-ca.pem"),
             "--public-key", str(d / "oauth.pub"), "--stats", str(stats), "--expires-in", "900"]
        ).start()  # fmt: skip

    def config(self, name: str, workers: int, extra: str = "", more: str = "") -> Setup:
        ports = {k: free_port() for k in ("egress", "ingress", "admin")}
        conf = write_config(
            self.dir / f"{name}.toml",
            f"""
            [service]
            workers = {workers}
            drain_timeout = 10
            [admin]
            listen = "127.0.0.1:{ports["admin"]}"
            [[egress]]
            name = "out"
            listen = "127.0.0.1:{ports["egress"]}"
            upstream = "https://localhost:{self.origin}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
            {extra}
            [[ingress]]
            name = "in"
            listen = "127.0.0.1:{ports["ingress"]}"
            server_cert = "origin.pem"
            server_key = "origin.key"
            client_ca = "client-ca.pem"
            upstream = "http://127.0.0.1:{self.upstream.port}"
            {more}
            """,
        )
        return Setup(self, conf, ports, Sidecar(conf))


@attrs.define
class Setup:
    env: Env
    conf: Path
    ports: dict[str, int]
    sidecar: Sidecar

    def start(self) -> Setup:
        self.sidecar.start([("127.0.0.1", p) for p in self.ports.values()])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the supervisor listens before its workers do
            r = curl(f"http://127.0.0.1:{self.ports['admin']}/readyz")
            if r.status == 200:
                return self
            time.sleep(0.2)
        raise AssertionError(f"workers never ready:\n{self.sidecar.log()}")

    def status(self) -> dict[str, object]:
        return json.loads(curl(f"http://127.0.0.1:{self.ports['admin']}/status").body)  # type: ignore[no-any-return]

    def pids(self) -> list[int]:
        return [w["pid"] for w in self.status()["workers"]]  # type: ignore[index, union-attr]

    def egress(self, path: str = "/x") -> int:
        return curl(f"http://127.0.0.1:{self.ports['egress']}{path}").status

    def ingress(self) -> int:
        d = self.env.dir
        return curl("--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
                    "--key", str(d / "client.key"),
                    f"https://localhost:{self.ports['ingress']}/notify").status  # fmt: skip

    def metric(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        import re

        text = curl(f"http://127.0.0.1:{self.ports['admin']}/metrics").body.decode()
        out = []
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
                if all(found.get(k) == v for k, v in labels.items()):
                    out.append((found, float(line.rsplit(" ", 1)[1])))
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("workers")
    _, client_ca = origin_pki(d)
    write_oauth_key(d)
    (d / "oauth.key").chmod(0o600)
    nginx, origin = mtls_origin(
        d, 'location /reject { return 401 "no"; }\nlocation / { return 200 "$http_authorization"; }'
    )
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen")]).start()
    try:
        yield Env(d, origin, upstream, client_ca)
    finally:
        upstream.stop()
        nginx.stop()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_every_worker_serves_and_metrics_sum_them(env: Env) -> None:
    setup = env.config("two", 2).start()
    try:
        pids = setup.pids()
        assert len(set(pids)) == 2 and setup.sidecar.proc is not None
        assert setup.sidecar.proc.pid not in pids  # the supervisor serves no requests
        before = {pid: cpu_ticks(pid) for pid in pids}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: setup.egress(f"/{i}"), range(300)))
            statuses += list(pool.map(lambda i: setup.ingress(), range(100)))
        assert statuses == [200] * 400
        assert all(cpu_ticks(pid) > before[pid] for pid in pids)  # both took a share
        served = setup.metric("mtls_sidecar_requests_total", code="200")
        assert sum(v for _, v in served) == 400
        opened = setup.metric("mtls_sidecar_connections_open")
        assert {labels["worker"] for labels, _ in opened} == {"0", "1"}
        rss = setup.metric("mtls_sidecar_worker_resident_bytes")
        assert len(rss) == 2 and all(v > 10e6 for _, v in rss)
    finally:
        setup.sidecar.stop()
    lines = [x for x in setup.sidecar.log().splitlines() if '"kind":"access"' in x]
    assert len(lines) == 400 and all(json.loads(x)["status"] == 200 for x in lines)


def test_one_token_fetch_for_200_concurrent_requests_over_4_workers(
    env: Env, tmp_path: Path
) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record)
    oauth = f"""
            [egress.oauth]
            token_url = "https://localhost:{tokens.port}/authz/v1/oauth2/token"
            issuer = "MGW0000001"
            signing_key = "oauth.key"
            key_id = "kid-1"
    """
    setup = env.config("tokens", 4, oauth)
    try:
        setup.start()
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(
                lambda i: curl(f"http://127.0.0.1:{setup.ports['egress']}/{i}"), range(200)
            ))  # fmt: skip
    finally:
        setup.sidecar.stop()
        tokens.stop()
    assert [r.status for r in results] == [200] * 200
    bearers = {r.body for r in results}
    assert len(bearers) == 1 and next(iter(bearers)).startswith(b"Bearer ")
    calls = [json.loads(x) for x in record.read_text().splitlines()]
    assert len(calls) == 1


def test_a_401_in_one_worker_drops_the_token_for_all(env: Env, tmp_path: Path) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record)
    oauth = f"""
            [egress.oauth]
            token_url = "https://localhost:{tokens.port}/authz/v1/oauth2/token"
            issuer = "MGW0000001"
            signing_key = "oauth.key"
            key_id = "kid-1"
    """
    setup = env.config("reject", 2, oauth)
    try:
        setup.start()
        url = f"http://127.0.0.1:{setup.ports['egress']}"
        first = {curl(f"{url}/a{i}").body for i in range(6)}
        time.sleep(5.2)  # a token is dropped on a 401 only once it is 5 s old
        assert curl(f"{url}/reject").status == 401
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(record.read_text().splitlines()) < 2:
            time.sleep(0.1)
        after = {curl(f"{url}/b{i}").body for i in range(6)}
    finally:
        setup.sidecar.stop()
        tokens.stop()
    assert len(first) == 1 and len(after) == 1 and first != after  # every worker moved on
    assert len(record.read_text().splitlines()) == 2


def test_supervisor_tells_systemd_ready_reloading_stopping(env: Env, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(15)
    setup = env.config("notify", 2)
    setup.sidecar.start([("127.0.0.1", setup.ports["admin"])], env={"NOTIFY_SOCKET": str(path)})
    try:
        ready = listener.recv(4096)
        assert setup.sidecar.proc is not None
        assert b"READY=1" in ready and b"2 workers" in ready
        assert setup.egress() == 200  # READY came once the workers listen
        setup.sidecar.proc.send_signal(signal.SIGHUP)
        assert b"RELOADING=1" in listener.recv(4096)
        assert b"READY=1" in listener.recv(4096)
        setup.sidecar.proc.send_signal(signal.SIGTERM)
        assert b"STOPPING=1" in listener.recv(4096)
        assert setup.sidecar.proc.wait(15) == 0
    finally:
        setup.sidecar.stop()
        listener.close()


def test_reload_is_a_new_generation_with_no_failed_request(env: Env) -> None:
    setup = env.config("gen", 2).start()
    stop = threading.Event()
    outcomes: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            outcomes.append(setup.egress())
            outcomes.append(setup.ingress())

    try:
        old = setup.pids()
        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        added = free_port()
        text = setup.conf.read_text()
        setup.conf.write_text(text + f"""
[[egress]]
name = "added"
listen = "127.0.0.1:{added}"
upstream = "https://localhost:{env.origin}"
client_cert = "client.pem"
client_key = "client.key"
trust = "server-ca.pem"
""")  # fmt: skip
        assert setup.sidecar.proc is not None
        setup.sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and set(setup.pids()) & set(old):
            time.sleep(0.2)
        new = setup.pids()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        answered = curl(f"http://127.0.0.1:{added}/y").status
        reloads = setup.metric("mtls_sidecar_reloads_total", result="success")
        for pid in old:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.1)
        old_gone = not any(os.path.exists(f"/proc/{pid}") for pid in old)
    finally:
        stop.set()
        setup.sidecar.stop()
    assert not set(new) & set(old) and len(new) == 2
    assert answered == 200
    assert [v for _, v in reloads] == [1.0]
    assert len(outcomes) > 20 and set(outcomes) == {200}, [o for o in outcomes if o != 200]
    assert old_gone


def test_a_changed_config_file_is_picked_up_without_a_signal(env: Env) -> None:
    setup = env.config("watch", 2)
    setup.conf.write_text(
        setup.conf.read_text().replace(
            "drain_timeout = 10", "drain_timeout = 10\nreload_interval = 1"
        )
    )
    setup.start()
    try:
        old = setup.pids()
        setup.conf.write_text(setup.conf.read_text().replace('name = "in"', 'name = "in2"'))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and set(setup.pids()) & set(old):
            time.sleep(0.2)
        new = setup.pids()
        names = [r["name"] for r in setup.status()["routes"]]  # type: ignore[index, union-attr]
    finally:
        setup.sidecar.stop()
    assert not set(new) & set(old)
    assert "in2" in names


def test_an_invalid_reload_keeps_the_generation(env: Env) -> None:
    setup = env.config("bad", 2).start()
    try:
        old = setup.pids()
        setup.conf.write_text(setup.conf.read_text() + "\n[service2]\nx = 1\n")
        assert setup.sidecar.proc is not None
        setup.sidecar.proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert setup.pids() == old
        failed = setup.metric("mtls_sidecar_reloads_total", result="failure")
        assert setup.egress() == 200
    finally:
        setup.sidecar.stop()
    assert [v for _, v in failed] == [1.0]
    assert "reload failed, the current generation keeps serving" in setup.sidecar.log()


def test_a_dead_worker_is_replaced_and_sigterm_drains_all(env: Env) -> None:
    setup = env.config("dies", 2).start()
    try:
        first = setup.pids()
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = setup.pids()
            if first[0] not in now and len(now) == 2 and setup.egress() == 200:
                break
            time.sleep(0.2)
        replaced = setup.pids()
        restarts = setup.metric("mtls_sidecar_worker_restarts_total")
        assert setup.sidecar.proc is not None
        t0 = time.monotonic()
        setup.sidecar.proc.send_signal(signal.SIGTERM)
        code = setup.sidecar.proc.wait(15)
        took = time.monotonic() - t0
    finally:
        setup.sidecar.stop()
    assert first[0] not in replaced and first[1] in replaced and len(replaced) == 2
    assert [v for _, v in restarts] == [1.0]
    assert f"worker 0 (pid {first[0]}) exited with -9" in setup.sidecar.log()
    assert code == 0 and took < 5
    assert not any(os.path.exists(f"/proc/{pid}") for pid in replaced)


def test_readiness_and_status_per_route_and_per_worker(env: Env) -> None:
    oauth = f"""
        [egress.oauth]
        token_url = "https://localhost:{free_port()}/authz/v1/oauth2/token"
        issuer = "MGW0000001"
        signing_key = "oauth.key"
        key_id = "kid-1"
    """
    setup = env.config("perroute", 2, oauth).start()
    admin = f"http://127.0.0.1:{setup.ports['admin']}"
    try:
        assert setup.egress("/warm") in (502, 503)  # no token: the route cannot serve
        assert setup.ingress() == 200
        pod = curl(f"{admin}/readyz")
        out = curl(f"{admin}/readyz/out")
        inbound = curl(f"{admin}/readyz/in?verbose")
        unknown = curl(f"{admin}/readyz/nosuch")
        from tests.harness import SIDECAR

        shown = subprocess.run([SIDECAR, "status", "--admin", f"127.0.0.1:{setup.ports['admin']}",
                                "--json"], capture_output=True, text=True, timeout=20)  # fmt: skip
    finally:
        setup.sidecar.stop()
    assert pod.status == 200  # a D1 token outage keeps the pod in its Service
    assert out.status == 503 and "no valid OAuth token" in out.body.decode()
    assert inbound.status == 200 and inbound.body.decode().endswith("readyz in check passed\n")
    assert unknown.status == 404
    report = json.loads(shown.stdout)
    workers = report["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    for w in workers:
        assert w["pid"] > 0 and w["generation"] == 1 and w["uptime_seconds"] > 0
        assert w["resident_bytes"] > 0 and isinstance(w["requests"], int)
        assert w["started"].endswith("Z")
    assert sum(w["requests"] for w in workers) == 2
    routes = {r["name"]: r for r in report["routes"]}
    assert routes["out"]["state"] == "down" and routes["in"]["state"] == "up"
    assert routes["out"]["oauth"]["valid_until"] is None
    assert report["last_reload"] is None and report["started"].endswith("Z")
    assert "service.workers" not in report["restart_keys"]
    lines = [json.loads(x) for x in setup.sidecar.log().splitlines() if x.startswith("{")]
    from_workers = [x for x in lines if "worker" in x]
    assert {x["worker"] for x in from_workers} == {0, 1}
    assert {x["pid"] for x in from_workers} == {w["pid"] for w in workers}
    access = [x for x in lines if x.get("kind") == "access"]
    assert len(access) == 2 and all(x["pid"] in {w["pid"] for w in workers} for x in access)


def test_workers_start_with_a_lapsed_client_certificate_and_serve_the_rest(env: Env) -> None:
    from tests.harness import CLIENT_SUBJECT
    from tests.pkifactory import DAY, NOW

    ca = env.client_ca
    ca.issue(CLIENT_SUBJECT, client=True, not_before=NOW - 9 * DAY, not_after=NOW - DAY).write(
        env.dir, "lapsed"
    )
    setup = env.config("lapsed", 2)
    text = setup.conf.read_text().replace('"client.pem"', '"lapsed.pem"')
    setup.conf.write_text(text.replace('"client.key"', '"lapsed.key"'))
    setup.start()
    try:
        out = curl(f"http://127.0.0.1:{setup.ports['egress']}/x")
        inbound = setup.ingress()
        route = curl(f"http://127.0.0.1:{setup.ports['admin']}/readyz/out")
    finally:
        setup.sidecar.stop()
    assert out.status == 503 and json.loads(out.body)["error"] == "client_certificate_expired"
    assert inbound == 200 and route.status == 503


def test_check_refuses_a_bad_worker_count(env: Env) -> None:
    conf = write_config(env.dir / "count.toml", """
        [service]
        workers = 0
        [[egress]]
        name = "out"
        listen = "127.0.0.1:1"
        upstream = "https://localhost:1"
        client_cert = "client.pem"
        client_key = "client.key"
    """)  # fmt: skip
    from tests.harness import SIDECAR

    out = subprocess.run([SIDECAR, "check", "-c", str(conf)], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 1
    assert 'service.workers: expected a number of workers from 1 to 256 or "auto", got 0' in (
        out.stdout
    )


def test_worker_over_max_worker_rss_is_recycled_with_no_failed_request(env: Env) -> None:
    # one worker, a limit every worker is over (~50 MB resident): a supervisor is started for it
    setup = env.config("rss", 1)
    setup.conf.write_text(
        setup.conf.read_text().replace(
            "drain_timeout = 10", 'drain_timeout = 10\nmax_worker_rss = "20MiB"'
        )
    )
    setup.start()
    stop = threading.Event()
    outcomes: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            outcomes.append(setup.egress())
            outcomes.append(setup.ingress())

    try:
        assert setup.sidecar.proc is not None
        (old,) = setup.pids()
        assert old != setup.sidecar.proc.pid
        zero = setup.metric("mtls_sidecar_worker_recycles_total", reason="age")
        threads = [threading.Thread(target=traffic) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and setup.pids() == [old]:
            time.sleep(0.2)
        (new,) = setup.pids()
        served_by_new = setup.egress()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        recycled = setup.metric("mtls_sidecar_worker_recycles_total", reason="rss")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and os.path.exists(f"/proc/{old}"):
            time.sleep(0.1)
        old_gone = not os.path.exists(f"/proc/{old}")
    finally:
        stop.set()
        setup.sidecar.stop()
    assert new != old and served_by_new == 200
    assert [v for _, v in zero] == [0.0]  # every reason exported from the start
    assert recycled and recycled[0][1] >= 1.0
    assert len(outcomes) > 20 and set(outcomes) == {200}, [o for o in outcomes if o != 200]
    assert old_gone
    log = setup.sidecar.log()
    assert f"(pid {old}) recycled: resident" in log and "over max_worker_rss 20 MiB" in log
