"""A reload re-reads the whole config (workers = 1: in process). Under a steady stream of
new-connection requests through both directions, a SIGHUP that changes `allow_subjects`, adds an
egress route and rotates the ingress server certificate fails no request, and new connections
get the new rules. A removed route stops listening while its requests in flight finish; an
invalid config is refused, counted, and the old one keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from tests.harness import (
    CLIENT_SUBJECT,
    PEERS,
    Nginx,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_server,
)
from tests.pkifactory import Issued, make_ca, write_ca

pytestmark = pytest.mark.integration

PARTNER = "C=FR,O=Partner,CN=callbacks.partner.example"
LATE = "C=FR,O=Partner,CN=late.partner.example"  # refused at first, allowed by the reload


@attrs.frozen
class Env:
    dir: Path
    server_ca: Issued
    client_serial: str  # the egress client certificate's serial as nginx prints it (whole bytes)
    origin_port: int
    upstream: Peer
    record: Path


def nginx_serial(serial: int) -> str:
    """A serial as nginx's $ssl_client_serial prints it: upper-case hex, whole bytes."""
    digits = f"{serial:X}"
    return "0" * (len(digits) % 2) + digits


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("reload")
    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    server_ca.issue("CN=localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(
        d, "origin"
    )
    client = client_ca.issue(CLIENT_SUBJECT, client=True)
    client.write(d, "client")  # the egress routes' certificate toward the origin
    client_ca.issue(PARTNER, client=True).write(d, "partner")
    client_ca.issue(LATE, client=True).write(d, "late")
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
            'location / { return 200 "client=$ssl_client_serial"; }',
        ),
    ).start([("127.0.0.1", port)])
    try:
        yield Env(d, server_ca, nginx_serial(client.cert.serial_number), port, upstream, record)
    finally:
        nginx.stop()
        upstream.stop()


# ---------------------------------------------------------------------------- the config
@attrs.define
class Setup:
    """One sidecar's folder: its config (rewritten for a reload) and a `live` certificate
    folder for the ingress route, swapped as a whole like a Kubernetes Secret volume."""

    env: Env
    dir: Path
    ports: dict[str, int]
    sidecar: Sidecar | None = None

    @classmethod
    def make(cls, env: Env, name: str, *routes: str) -> Setup:
        d = env.dir / name
        d.mkdir()
        ports = {r: free_port() for r in ("admin", "out", "in", *routes)}
        return cls(env, d, ports)

    @property
    def config(self) -> Path:
        return self.dir / "sidecar.toml"

    def certificate(self, version: str) -> int:
        """Issue an ingress server certificate into folder VERSION, point `live` at it;
        return its serial."""
        issued = self.env.server_ca.issue("CN=localhost", dns=("localhost",), server=True)
        issued.write(self.dir / version, "server")
        tmp = self.dir / "live.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version)
        os.replace(tmp, self.dir / "live")
        serial: int = issued.cert.serial_number
        return serial

    def write(self, *, allow: tuple[str, ...], routes: str = "", service: str = "") -> None:
        e, p = self.env, self.ports
        text = f"""
[log]
format = "json"
[service]
drain_timeout = 10
{service or "reload_interval = 0"}
[admin]
listen = "127.0.0.1:{p["admin"]}"
[[egress]]
name = "out"
listen = "127.0.0.1:{p["out"]}"
upstream = "https://127.0.0.1:{e.origin_port}"
client_cert = "{e.dir}/client.pem"
client_key = "{e.dir}/client.key"
trust = "{e.dir}/server-ca.pem"
[[ingress]]
name = "in"
listen = "127.0.0.1:{p["in"]}"
server_cert = "live/server.pem"
server_key = "live/server.key"
client_ca = "{e.dir}/client-ca.pem"
allow_subjects = {json.dumps(list(allow))}
upstream = "http://127.0.0.1:{e.upstream.port}"
{routes}
"""
        tmp = self.dir / "sidecar.toml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.config)  # whole, as an editor or a config map update writes it

    def egress(self, name: str, upstream: int | None = None) -> str:
        e = self.env
        return f"""
[[egress]]
name = "{name}"
listen = "127.0.0.1:{self.ports[name]}"
upstream = "https://127.0.0.1:{upstream or e.origin_port}"
client_cert = "{e.dir}/client.pem"
client_key = "{e.dir}/client.key"
trust = "{e.dir}/server-ca.pem"
response_timeout = 10
"""

    def start(self) -> Sidecar:
        self.sidecar = Sidecar(self.config).start([("127.0.0.1", self.ports[r])
                                                   for r in ("admin", "out", "in")])  # fmt: skip
        return self.sidecar

    def reload(self, *, signal_it: bool = True, success: bool = True) -> None:
        """SIGHUP (or wait for the file watch), then wait for the reload's log line."""
        assert self.sidecar is not None and self.sidecar.proc is not None
        needle = "key material reloaded" if success else "reload failed"
        before = self.sidecar.log().count(needle)
        if signal_it:
            self.sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.sidecar.log().count(needle) == before:
            assert time.monotonic() < deadline, self.sidecar.log()
            time.sleep(0.02)

    def metric(self, needle: str) -> float | None:
        text = curl(f"http://127.0.0.1:{self.ports['admin']}/metrics").body.decode()
        for line in text.splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
        return None

    def status(self) -> dict[str, object]:
        body = curl(f"http://127.0.0.1:{self.ports['admin']}/status").body
        parsed: dict[str, object] = json.loads(body)
        return parsed


# ---------------------------------------------------------------------------- a client
@attrs.frozen
class Answer:
    status: int
    body: bytes
    serial: int | None  # the server certificate's (TLS)


class Client:
    """HTTP/1.1 on a new connection per request, to 127.0.0.1; mutual TLS as `who`."""

    def __init__(self, env: Env, who: str | None = None) -> None:
        self.ctx: ssl.SSLContext | None = None
        if who is not None:
            self.ctx = ssl.create_default_context(cafile=str(env.dir / "server-ca.pem"))
            self.ctx.load_cert_chain(str(env.dir / f"{who}.pem"), str(env.dir / f"{who}.key"))

    def get(self, port: int, path: str = "/", keep: list[socket.socket] | None = None) -> Answer:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock: socket.socket = raw
        serial = None
        try:
            if self.ctx is not None:
                sock = self.ctx.wrap_socket(raw, server_hostname="localhost")
                der = sock.getpeercert(binary_form=True)
                assert der is not None
                serial = x509.load_der_x509_certificate(der).serial_number
            connection = "keep-alive" if keep is not None else "close"
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n"
                .encode()
            )  # fmt: skip
            status, body = read_response(sock)
        except BaseException:
            sock.close()
            raise
        if keep is not None:
            keep.append(sock)
        else:
            sock.close()
        return Answer(status, body, serial)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head ({data!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:])
                  if k.strip().lower() == "content-length")  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed mid-body ({len(body)} of {length} bytes)")
        body += chunk
    return status, body


@attrs.define
class Stream:
    """One client thread making requests in a loop; every outcome is kept, in order."""

    name: str
    call: Callable[[], Answer]
    expected: frozenset[int]
    outcomes: list[tuple[float, Answer]] = attrs.Factory(list)
    failures: list[str] = attrs.Factory(list)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = self.call()
            except Exception as e:
                self.failures.append(f"{self.name}: {type(e).__name__}: {e}")
                continue
            if answer.status not in self.expected:
                self.failures.append(f"{self.name}: {answer.status} {answer.body[:200]!r}")
            self.outcomes.append((started, answer))


class Traffic:
    def __init__(self, *streams: Stream) -> None:
        self.streams = streams
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=s.run, args=(self.stop,)) for s in streams]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    @property
    def failures(self) -> list[str]:
        return [f for s in self.streams for f in s.failures]


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def recorded_subjects(env: Env) -> list[str]:
    subjects = []
    for line in env.record.read_text().splitlines():
        headers = {k.lower(): v for k, v in json.loads(line)["headers"]}
        subjects.append(headers.get("x-client-subject", ""))
    return subjects


# ---------------------------------------------------------------------------- the tests
def test_reload_under_traffic_changes_rules_adds_a_route_rotates_a_certificate_fails_nothing(
    env: Env,
) -> None:
    setup = Setup.make(env, "main", "out2")
    old_serial = setup.certificate("v1")
    setup.write(allow=(f"CN={PARTNER.rsplit('CN=', 1)[1]}",))
    sidecar = setup.start()
    egress_body = f"client={env.client_serial}".encode()
    try:
        partner, late, plain = Client(env, "partner"), Client(env, "late"), Client(env)
        # before: the late subject is refused, the new route does not exist yet
        assert late.get(setup.ports["in"], "/late").status == 403
        assert partner.get(setup.ports["in"], "/cb").serial == old_serial
        assert refused(setup.ports["out2"])

        streams = [
            Stream(f"egress-{i}", lambda: plain.get(setup.ports["out"], "/pay"), frozenset({200}))
            for i in range(2)
        ] + [
            Stream(f"ingress-{i}", lambda: partner.get(setup.ports["in"], "/cb"), frozenset({200}))
            for i in range(2)
        ]
        late_stream = Stream(
            "ingress-late", lambda: late.get(setup.ports["in"], "/late"), frozenset({200, 403})
        )
        with Traffic(*streams, late_stream) as traffic:
            time.sleep(1.5)
            new_serial = setup.certificate("v2")
            setup.write(allow=("CN=*.partner.example",), routes=setup.egress("out2"))
            signalled = time.monotonic()
            setup.reload()
            reloaded = time.monotonic()
            time.sleep(1.5)
        made = {s.name: len(s.outcomes) + len(s.failures) for s in (*streams, late_stream)}
        print(f"requests made: {made}; total {sum(made.values())}; failed "
              f"{len(traffic.failures)}; reload took {reloaded - signalled:.3f}s")  # fmt: skip
        assert traffic.failures == []
        for s in (*streams, late_stream):
            assert sum(1 for t, _ in s.outcomes if t < signalled) >= 3, s.name
            assert sum(1 for t, _ in s.outcomes if t > reloaded) >= 3, s.name
        # egress: the same answer all along (same client certificate, same origin)
        for s in streams[:2]:
            assert {a.body for _, a in s.outcomes} == {egress_body}
        # ingress: each new connection sees the old serial, then the new one, never back
        for s in streams[2:]:
            serials = [a.serial for _, a in s.outcomes]
            switch = serials.index(new_serial)
            assert set(serials[:switch]) == {old_serial} and set(serials[switch:]) == {new_serial}
            assert all(t <= reloaded for t, a in s.outcomes if a.serial == old_serial)
        # the late subject: refused, then allowed, never refused again
        statuses = [a.status for _, a in late_stream.outcomes]
        first_ok = statuses.index(200)
        assert set(statuses[:first_ok]) == {403} and set(statuses[first_ok:]) == {200}
        assert all(a.status == 403 for t, a in late_stream.outcomes if t < signalled)
        assert all(a.status == 200 for t, a in late_stream.outcomes if t > reloaded)

        # after: the new rules, the new route, the new certificate; the rest as it was
        answer = late.get(setup.ports["in"], "/late")
        assert (answer.status, answer.serial) == (200, new_serial)
        assert plain.get(setup.ports["out2"], "/new").body == egress_body
        assert plain.get(setup.ports["out"], "/pay").body == egress_body
        assert "CN=late.partner.example" in recorded_subjects(env)[-1]  # identity headers
        assert setup.metric('mtls_sidecar_reloads_total{result="success"}') == 1.0
        assert setup.metric('mtls_sidecar_reloads_total{result="failure"}') in (None, 0.0)
        # the request counters of the rebuilt route went on (one series per route)
        ok_in = sum(1 for s in (*streams[2:], late_stream) for _, a in s.outcomes
                    if a.status == 200)  # fmt: skip
        assert (
            setup.metric('mtls_sidecar_requests_total{code="200",direction="ingress",route="in"}')
            == ok_in + 2
        )  # + the checks before the traffic and after it
        status = setup.status()
        routes = status["routes"]
        assert isinstance(routes, list)
        assert [(r["name"], r["listening"]) for r in routes] == [
            ("out", True), ("out2", True), ("in", True)
        ]  # fmt: skip
        server = next(c for r in routes if r["name"] == "in" for c in r["certificates"]
                      if c["role"] == "server")  # fmt: skip
        assert server["serial"] == f"{new_serial:x}"
        assert status["ready"] is True
    finally:
        assert sidecar.stop() == 0
    log = sidecar.log()
    assert "1 unchanged, 1 rebuilt, added: out2, removed: none" in log
    assert "reload failed" not in log


def test_a_removed_route_stops_listening_and_its_requests_in_flight_finish(
    env: Env, tmp_path: Path
) -> None:
    slow = Peer(
        [str(PEERS / "tls_origin.py"), "--mode", "slow", "--delay", "2",
         "--cert", str(env.dir / "origin.pem"), "--key", str(env.dir / "origin.key"),
         "--client-ca", str(env.dir / "client-ca.pem"), "--record", str(tmp_path / "rec")]
    ).start()  # fmt: skip
    setup = Setup.make(env, "remove", "slow", "idle")
    setup.certificate("v1")
    allow = ("CN=*.partner.example",)
    setup.write(allow=allow, routes=setup.egress("slow", slow.port) + setup.egress("idle"))
    sidecar = setup.start()
    plain = Client(env)
    try:
        # an idle keep-alive connection on one route, a request in flight on the other
        kept: list[socket.socket] = []
        assert plain.get(setup.ports["idle"], "/first", keep=kept).status == 200
        results: list[Answer | BaseException] = []

        def in_flight() -> None:
            try:
                results.append(plain.get(setup.ports["slow"], "/pay"))
            except BaseException as e:
                results.append(e)

        thread = threading.Thread(target=in_flight)
        thread.start()
        time.sleep(0.5)
        setup.write(allow=allow)  # both routes gone
        setup.reload()
        assert refused(setup.ports["slow"]) and refused(setup.ports["idle"])
        kept[0].settimeout(3)
        assert kept[0].recv(100) == b""  # the idle connection was closed
        kept[0].close()
        assert thread.is_alive()  # still waiting on the slow origin
        thread.join(10)
        answer = results[0]
        assert isinstance(answer, Answer) and (answer.status, answer.body) == (200, b"slow")
        assert plain.get(setup.ports["out"]).status == 200
        assert Client(env, "partner").get(setup.ports["in"]).status == 200
        routes = setup.status()["routes"]
        assert isinstance(routes, list) and [r["name"] for r in routes] == ["out", "in"]
        assert curl(f"http://127.0.0.1:{setup.ports['admin']}/readyz").status == 200
    finally:
        assert sidecar.stop() == 0
        slow.stop()
    log = sidecar.log()
    assert "slow: no longer in the config: stopped listening" in log
    assert "removed: idle, slow" in log


def test_an_invalid_config_is_refused_counted_once_and_the_old_one_keeps_serving(
    env: Env,
) -> None:
    setup = Setup.make(env, "invalid")
    setup.certificate("v1")
    watch = "reload_interval = 0.2"
    setup.write(allow=(f"CN={PARTNER.rsplit('CN=', 1)[1]}",), service=watch)
    sidecar = setup.start()
    partner, late, plain = Client(env, "partner"), Client(env, "late"), Client(env)
    try:
        good = setup.config.read_text()
        typo = good.replace("allow_subjects =", "allow_subject =")  # an unknown key
        typo = typo.replace(f'["CN={PARTNER.rsplit("CN=", 1)[1]}"]', '["CN=*.partner.example"]')
        tmp = setup.dir / "typo.tmp"
        tmp.write_text(typo)
        os.replace(tmp, setup.config)
        setup.reload(signal_it=False, success=False)  # the file watch saw it
        time.sleep(1.0)  # five more checks: the same file is not retried, nor counted again
        assert setup.metric('mtls_sidecar_reloads_total{result="failure"}') == 1.0
        assert setup.metric('mtls_sidecar_reloads_total{result="success"}') == 0.0
        # the old config serves on: the late subject is still refused
        assert late.get(setup.ports["in"]).status == 403
        assert partner.get(setup.ports["in"]).status == 200
        assert plain.get(setup.ports["out"]).status == 200
        config = setup.status()["config"]
        assert isinstance(config, dict)
        assert config["ingress"][0]["allow_subjects"] == ["CN=callbacks.partner.example"]
        # fixed: the watch reloads it
        setup.write(allow=("CN=*.partner.example",), service=watch)
        setup.reload(signal_it=False)
        assert late.get(setup.ports["in"]).status == 200
        assert setup.metric('mtls_sidecar_reloads_total{result="success"}') == 1.0
    finally:
        assert sidecar.stop() == 0
    failures = [json.loads(x) for x in sidecar.log().splitlines() if "reload failed" in x]
    assert len(failures) == 1
    assert failures[0]["level"] == "error"
    assert f"{setup.config}: ingress[0] (in).allow_subject: unknown key" in failures[0]["msg"]
