"""Adversarial peers against the sidecar through its CLI, both directions: every connection is
bounded in time and memory whatever the peer does. Each test asserts the figure (seconds, bytes
of RSS, file descriptors, log lines), not only that the service survived. Loopback only."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import (
    PEERS,
    Peer,
    Sidecar,
    curl,
    free_port,
    origin_pki,
    running,
    write_config,
)

pytestmark = pytest.mark.integration

HANDSHAKE, HEADER, IDLE, GRACE = 1.0, 2.0, 2.0, 1.0
SLACK = 0.6  # the sweep runs every 0.25 s; a loaded 2-core machine adds a little


@attrs.frozen
class Env:
    dir: Path
    upstream: Peer

    def ingress(self, name: str, extra: str = "", upstream: int | None = None) -> Ingress:
        port, admin = free_port(), free_port()
        conf = write_config(
            self.dir / f"{name}.toml",
            f"""
            [admin]
            listen = "127.0.0.1:{admin}"
            [log]
            format = "json"
            [[ingress]]
            name = "{name}"
            listen = "127.0.0.1:{port}"
            server_cert = "origin.pem"
            server_key = "origin.key"
            client_ca = "client-ca.pem"
            upstream = "http://127.0.0.1:{upstream or self.upstream.port}"
            handshake_timeout = {HANDSHAKE}
            header_timeout = {HEADER}
            idle_timeout = {IDLE}
            {extra}
            """,
        )
        return Ingress(self, Sidecar(conf), port, admin)

    def egress(self, name: str, origin: int, extra: str = "") -> Ingress:
        port, admin = free_port(), free_port()
        conf = write_config(
            self.dir / f"{name}.toml",
            f"""
            [admin]
            listen = "127.0.0.1:{admin}"
            [log]
            format = "json"
            [[egress]]
            name = "{name}"
            listen = "127.0.0.1:{port}"
            upstream = "https://localhost:{origin}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
            header_timeout = {HEADER}
            idle_timeout = {IDLE}
            {extra}
            """,
        )
        return Ingress(self, Sidecar(conf), port, admin)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.dir / "server-ca.pem"))
        ctx.load_cert_chain(str(self.dir / "client.pem"), str(self.dir / "client.key"))
        return ctx

    def origin(self, mode: str, *args: str) -> Peer:
        d = self.dir
        return Peer(
            [str(PEERS / "tls_origin.py"), "--mode", mode, "--cert", str(d / "origin.pem"),
             "--key", str(d / "origin.key"), "--client-ca", str(d / "client-ca.pem"),
             "--record", str(d / f"{mode}.record"), *args]
        ).start()  # fmt: skip


@attrs.define
class Ingress:
    """A started sidecar (either direction) and how to reach it."""

    env: Env
    sidecar: Sidecar
    port: int
    admin: int

    def start(self) -> Ingress:
        self.sidecar.start([("127.0.0.1", self.port), ("127.0.0.1", self.admin)])
        return self

    @property
    def pid(self) -> int:
        assert self.sidecar.proc is not None
        return self.sidecar.proc.pid

    def tls(self) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return self.env.client_context().wrap_socket(raw, server_hostname="localhost")

    def curl(self, path: str = "/notify", *args: str) -> tuple[int, float]:
        d = self.env.dir
        t0 = time.monotonic()
        r = curl("--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
                 "--key", str(d / "client.key"), *args,
                 f"https://localhost:{self.port}{path}")  # fmt: skip
        return r.status, time.monotonic() - t0

    def metric(self, name: str, **labels: str) -> float:
        r = curl(f"http://127.0.0.1:{self.admin}/metrics")
        assert r.status == 200, r
        text = r.body.decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.sidecar.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("hardening")
    origin_pki(d)
    upstream = Peer(
        [str(PEERS / "recording_upstream.py"), "--record", str(d / "seen.jsonl")]
    ).start()
    try:
        yield Env(d, upstream)
    finally:
        upstream.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def seconds_until_closed(sock: socket.socket, limit: float = 15.0) -> tuple[float, bytes]:
    """Read until the peer closes; (seconds it took, everything read)."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    got = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        pass
    return time.monotonic() - t0, got


def read_response(sock: socket.socket) -> bytes:
    """One Content-Length framed response, however the TLS records split it."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def in_parallel(fn: Callable[[], object], n: int) -> list[object]:
    results: list[object] = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = fn()
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def established_to(port: int) -> int:
    """Our side's ESTABLISHED TCP connections toward a local port (the sidecar's upstream ones)."""
    import subprocess

    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"dport = :{port}"], capture_output=True, text=True
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


# --------------------------------------------------------------------------- ingress: time


def test_slowloris_gets_408_and_is_closed_within_header_timeout_plus_grace(env: Env) -> None:
    ing = env.ingress("slowloris").start()
    with running(ing.sidecar):
        socks = [ing.tls() for _ in range(50)]
        for s in socks:
            s.sendall(b"GET /notify HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        t0 = time.monotonic()
        results = [seconds_until_closed(s) for s in socks]
        took = time.monotonic() - t0
        for s in socks:
            s.close()
    assert all(b" 408 " in got.split(b"\r\n", 1)[0] for _, got in results)
    assert all(b'"request_timeout"' in got for _, got in results)
    assert took <= HEADER + GRACE + SLACK, took


def test_idle_keepalive_connection_is_closed_at_idle_timeout(env: Env) -> None:
    ing = env.ingress("idle").start()
    with running(ing.sidecar):
        s = ing.tls()
        s.sendall(b"GET /notify HTTP/1.1\r\nHost: localhost\r\n\r\n")
        first = read_response(s)
        took, rest = seconds_until_closed(s)
        s.close()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest == b""
    assert IDLE - 0.1 <= took <= IDLE + SLACK, took


def test_http10_response_reaches_the_client_and_the_connection_closes(env: Env) -> None:
    ing = env.ingress("http10").start()
    with running(ing.sidecar):
        s = ing.tls()
        s.sendall(b"GET /notify HTTP/1.0\r\n\r\n")
        took, got = seconds_until_closed(s)
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body)["path"] == "/notify"
    assert took <= 1.0, took


def test_sigterm_closes_idle_connections_at_once_and_exits_0(env: Env) -> None:
    ing = env.ingress("term", "[service]\ndrain_timeout = 20").start()
    socks = []
    try:
        for _ in range(10):
            s = ing.tls()
            s.sendall(b"GET /notify HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200 ")
            socks.append(s)
        assert ing.sidecar.proc is not None
        t0 = time.monotonic()
        ing.sidecar.proc.send_signal(signal.SIGTERM)
        closed = [seconds_until_closed(s, 10)[0] for s in socks]
        code = ing.sidecar.proc.wait(10)
        exited = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
        ing.stop()
    assert max(closed) <= 1.0, closed
    assert code == 0
    assert exited <= 2.0, exited


# --------------------------------------------------------------------------- ingress: slots


def test_max_connections_full_of_silent_tcp_a_real_caller_is_still_served(env: Env) -> None:
    """No certificate needed to open TCP: silent connections are cut at handshake_timeout and
    the listener, paused at max_connections, takes the waiting caller then."""
    ing = env.ingress("silent", "max_connections = 20").start()
    with running(ing.sidecar):
        time.sleep(0.3)  # the start-up probe's connection is gone
        silent = [socket.create_connection(("127.0.0.1", ing.port)) for _ in range(20)]
        time.sleep(0.3)
        status, took = ing.curl()
        open_before = ing.metric("mtls_sidecar_connections_open", route="silent")
        timed_out = ing.metric(
            "mtls_sidecar_tls_handshake_errors_total", route="silent", reason="handshake_timeout"
        )
        for s in silent:
            s.close()
    assert status == 200
    assert HANDSHAKE - 0.5 <= took <= HEADER + GRACE, took  # it waited for a slot, not more
    assert timed_out == 20
    assert open_before == 0


def test_max_connections_full_of_idle_tls_a_real_caller_is_served(env: Env) -> None:
    ing = env.ingress("idletls", "max_connections = 20").start()
    with running(ing.sidecar):
        time.sleep(0.3)  # the start-up probe's connection is gone
        held = [ing.tls() for _ in range(20)]
        status, took = ing.curl()
        for s in held:
            s.close()
    assert status == 200
    assert HEADER - 0.5 <= took <= HEADER + GRACE + SLACK, took


def test_truncated_first_tls_record_is_cut_at_handshake_timeout_and_counted(env: Env) -> None:
    ing = env.ingress("truncated").start()
    with running(ing.sidecar):
        s = socket.create_connection(("127.0.0.1", ing.port))
        s.sendall(b"\x16\x03\x01\x40\x00" + b"\x01" * 4000)  # announces 16 KiB, sends 4000
        took, _ = seconds_until_closed(s)
        s.close()
        time.sleep(0.1)
        counted = ing.metric(
            "mtls_sidecar_tls_handshake_errors_total",
            route="truncated",
            reason="handshake_timeout",
        )
    assert HANDSHAKE - 0.1 <= took <= HANDSHAKE + SLACK, took
    assert counted == 1


# --------------------------------------------------------------------------- memory


def _flood_without_reading(sock: socket.socket, request: bytes, limit: int) -> int:
    """Send requests one write each and never read; the bytes the sidecar took before the
    connection stopped taking more (blocked) or was closed."""
    sock.settimeout(2.0)
    sent = 0
    try:
        while sent < limit:
            sock.sendall(request)
            sent += len(request)
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    return sent


def test_ingress_answers_it_writes_itself_respect_backpressure(env: Env) -> None:
    ing = env.ingress("nosubject", 'allow_subjects = ["CN=nobody"]').start()
    with running(ing.sidecar):
        request = b"GET /notify HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"p" * 150 + b"\r\n\r\n"
        warm = ing.tls()  # what any first flood allocates once (buffers, log windows)
        _flood_without_reading(warm, request, 40 * 1024 * 1024)
        warm.close()
        time.sleep(0.5)
        s = ing.tls()
        before = rss_mb(ing.pid)
        sent = _flood_without_reading(s, request, 40 * 1024 * 1024)
        grown = rss_mb(ing.pid) - before
        s.close()
    assert sent < 40 * 1024 * 1024, "the sidecar kept reading from a client that never reads"
    assert grown < 2.0, f"RSS grew {grown:.1f} MB for {sent} bytes of pipelined requests"


def test_egress_answers_it_writes_itself_respect_backpressure(env: Env) -> None:
    ing = env.egress("foreign", 9).start()
    with running(ing.sidecar):
        request = b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
        warm = socket.create_connection(("127.0.0.1", ing.port))
        _flood_without_reading(warm, request, 40 * 1024 * 1024)  # one-time allocations
        warm.close()
        time.sleep(0.5)
        s = socket.create_connection(("127.0.0.1", ing.port))
        before = rss_mb(ing.pid)
        sent = _flood_without_reading(s, request, 40 * 1024 * 1024)
        grown = rss_mb(ing.pid) - before
        s.close()
    assert sent < 40 * 1024 * 1024, "the sidecar kept reading from a client that never reads"
    assert grown < 2.0, f"RSS grew {grown:.1f} MB for {sent} bytes of pipelined requests"


def test_burst_of_pipelined_requests_over_the_limit_gets_503_then_close(env: Env) -> None:
    ing = env.ingress("burst", "max_pipelined = 4").start()
    with running(ing.sidecar):
        s = ing.tls()
        s.sendall(b"GET /notify HTTP/1.1\r\nHost: localhost\r\n\r\n" * 50)
        took, got = seconds_until_closed(s)
        s.close()
    statuses = re.findall(rb"HTTP/1.1 (\d{3}) ", got)
    # the one in flight and 4 queued are answered, the 6th is refused, the rest never parsed
    assert statuses == [b"200"] * 5 + [b"503"]
    assert b'"too_many_pipelined"' in got
    assert took <= 2.0, took


def _plain_get(ing: Ingress, path: str) -> Callable[[], tuple[int, str]]:
    def one() -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", ing.port, timeout=20)
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, json.loads(body)["error"]

    return one


def _tls_get(ing: Ingress, path: str) -> Callable[[], tuple[int, str]]:
    def one() -> tuple[int, str]:
        s = ing.tls()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        _, got = seconds_until_closed(s, 20)
        s.close()
        head, _, body = got.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)["error"]

    return one


def _four_at_once(ing: Ingress, fn: Callable[[], object]) -> tuple[list[object], float]:
    fn()  # warm
    before = rss_mb(ing.pid)
    results = in_parallel(fn, 4)
    return results, rss_mb(ing.pid) - before


def test_ingress_upstream_response_head_is_bounded(env: Env) -> None:
    evil = env.origin("huge-head", "--plain", "--head-mb", "10")
    ing = env.ingress("hugehead-in", "[service]\ndrain_timeout = 1", upstream=evil.port).start()
    with running(ing.sidecar):
        try:
            results, grown = _four_at_once(ing, _tls_get(ing, "/notify"))
        finally:
            evil.stop()
    assert results == [(502, "upstream_header_too_large")] * 4
    assert grown < 5.0, f"RSS grew {grown:.1f} MB"


def test_egress_upstream_response_head_is_bounded(env: Env) -> None:
    evil = env.origin("huge-head", "--head-mb", "10")
    ing = env.egress("hugehead-out", evil.port, "[service]\ndrain_timeout = 1").start()
    with running(ing.sidecar):
        try:
            results, grown = _four_at_once(ing, _plain_get(ing, "/"))
        finally:
            evil.stop()
    assert results == [(502, "upstream_header_too_large")] * 4
    assert grown < 5.0, f"RSS grew {grown:.1f} MB"


# --------------------------------------------------------------------------- egress: upstreams


def test_clients_aborting_during_upstream_connect_leak_no_connection(env: Env) -> None:
    origin = env.origin("late-handshake", "--delay", "1")
    ing = env.egress("aborts", origin.port, "pool_max_idle = 8\nconnect_timeout = 10").start()
    try:
        with running(ing.sidecar):
            time.sleep(0.3)
            base_fds = fds(ing.pid)
            for _ in range(1000):
                s = socket.create_connection(("127.0.0.1", ing.port))
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                s.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                states = {
                    k: ing.metric("mtls_sidecar_upstream_connections", route="aborts", state=k)
                    for k in ("connecting", "active", "idle")
                }
                # a connection we closed is half-closed (FIN sent) until the origin answers or
                # close_grace ends: no longer established, still a descriptor
                settled = established_to(origin.port) <= 8 and fds(ing.pid) - base_fds <= 8
                if states["connecting"] == 0 and settled:
                    break
                time.sleep(0.5)
            left = established_to(origin.port)
            grown_fds = fds(ing.pid) - base_fds
            failed = sum(
                ing.metric("mtls_sidecar_requests_total", route="aborts", code=str(code))
                for code in (502, 503, 504)
            )
    finally:
        origin.stop()
    assert states == {"connecting": 0, "active": 0, "idle": left}, states
    assert left <= 8
    assert grown_fds <= 8, grown_fds
    assert failed == 0  # a client that leaves is not an upstream failure (nor logged as one)


def test_idle_pooled_upstream_connections_close_at_pool_idle_timeout(env: Env) -> None:
    origin = env.origin("late-handshake", "--delay", "0")  # answers, then never closes
    ing = env.egress("poolidle", origin.port, "pool_idle_timeout = 2").start()
    try:
        with running(ing.sidecar):

            def one() -> int:
                conn = http.client.HTTPConnection("127.0.0.1", ing.port, timeout=10)
                conn.request("GET", "/")
                status = conn.getresponse().status
                conn.close()
                return status

            assert in_parallel(one, 20) == [200] * 20
            t0 = time.monotonic()
            assert established_to(origin.port) == 20
            while established_to(origin.port) and time.monotonic() - t0 < 10:
                time.sleep(0.1)
            took = time.monotonic() - t0
    finally:
        origin.stop()
    assert established_to(origin.port) == 0
    assert took <= 2 + GRACE + SLACK, took


# --------------------------------------------------------------------------- logs


def test_refusals_at_the_fd_limit_are_counted_not_logged_one_by_one(env: Env) -> None:
    import resource

    ing = env.egress("fdlimit", 9)
    ing.sidecar.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    ing.start()
    with running(ing.sidecar):
        held = []
        for _ in range(200):
            held.append(socket.create_connection(("127.0.0.1", ing.port)))
        time.sleep(1.0)
        for s in held[:60]:  # room for the admin listener's answer
            s.close()
        time.sleep(0.5)
        refused = ing.metric("mtls_sidecar_accept_errors_total", reason="emfile")
        for s in held[60:]:
            s.close()
    log = ing.sidecar.log()
    assert refused >= 100
    assert "EMFILE" not in log
    summaries = [x for x in log.splitlines() if "connections refused at accept" in x]
    assert 1 <= len(summaries) <= 2, summaries
