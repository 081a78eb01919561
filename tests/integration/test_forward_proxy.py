"""Egress through a forward proxy: curl (the app) -> the sidecar -> tinyproxy (CONNECT) ->
nginx (mTLS origin) and the D1 token stand-in.

The upstream is named `d1.test`, which only the proxy can resolve: tinyproxy runs in a user and
mount namespace (`unshare -rm`) whose /etc/hosts maps d1.test to 127.0.0.1, so a request that
succeeds proves the sidecar sent the name and never looked it up itself. Where unprivileged
namespaces are off, the upstream is `localhost` and the proxy's log still shows the name form.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.harness import (
    PEERS,
    SIDECAR,
    Nginx,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_server,
    need,
    origin_pki,
    running,
    stop,
    wait_port,
    write_config,
    write_oauth_key,
)

pytestmark = pytest.mark.integration

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
NAME = "d1.test"


def _namespaces_work() -> bool:
    """Whether a user+mount namespace can give the proxy its own /etc/hosts."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-r", "-m", "true"], capture_output=True, timeout=10, check=False
    )
    return probe.returncode == 0


@attrs.define
class Tinyproxy:
    """tinyproxy in the foreground with a generated config, resolving `hosts` when it can."""

    directory: Path
    connect_ports: tuple[int, ...]
    auth: tuple[str, str] | None = None
    hosts: bool = True  # run in a namespace with d1.test -> 127.0.0.1
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Tinyproxy:
        need(TINYPROXY)
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{d}/tinyproxy.log"',
            "LogLevel Info",
            "MaxClients 50",
            "Allow 127.0.0.1",
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        if self.auth:
            lines.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
        (d / "tinyproxy.conf").write_text("\n".join(lines) + "\n")
        cmd = [TINYPROXY, "-d", "-c", str(d / "tinyproxy.conf")]
        if self.hosts:
            (d / "hosts").write_text(f"127.0.0.1 {NAME} localhost\n")
            cmd = ["unshare", "-r", "-m", "sh", "-c",
                   f'mount --bind "{d}/hosts" /etc/hosts && exec "$@"', "sh", *cmd]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def log(self) -> str:
        path = self.directory / "tinyproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def connects(self) -> list[str]:
        """The CONNECT request lines the proxy received, in order."""
        return re.findall(r"Request \(file descriptor \d+\): (CONNECT \S+ HTTP/1\.1)", self.log())


@attrs.frozen
class Env:
    dir: Path
    name: str  # the upstream's name: d1.test, or localhost without namespaces
    origin_port: int
    nginx: Nginx

    def tinyproxy(self, tag: str, *ports: int, auth: tuple[str, str] | None = None) -> Tinyproxy:
        return Tinyproxy(
            self.dir / tag, ports or (self.origin_port,), auth, self.name == NAME
        ).start()

    def sidecar(
        self, tag: str, proxy: str, extra: str = "", oauth: str = "", admin: int = 0
    ) -> tuple[Sidecar, int]:
        port = free_port()
        conf = write_config(
            self.dir / f"{tag}.toml",
            f"""
            [service]
            reload_interval = 0.2
            {f'[admin]{chr(10)}listen = "127.0.0.1:{admin}"' if admin else ""}
            [[egress]]
            name = "{tag}"
            listen = "127.0.0.1:{port}"
            upstream = "https://{self.name}:{self.origin_port}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
            connect_timeout = 3
            response_timeout = 3
            proxy = "{proxy}"
            {extra}
            {oauth}
            """,
        )
        return Sidecar(conf), port

    def token_server(self, stats: Path) -> Peer:
        d = self.dir
        return Peer(
            [str(PEERS / "token_server.py"), "--port", "0", "--cert", str(d / "origin.pem"),
             "--key", str(d / "origin.key"), "--client-ca", str(d / "client-ca.pem"),
             "--public-key", str(d / "oauth.pub"), "--stats", str(stats)]
        ).start()  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("fwdproxy")
    name = NAME if _namespaces_work() else "localhost"
    origin_pki(d, dns=("localhost", NAME))
    write_oauth_key(d)
    port = free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(
            f"127.0.0.1:{port}",
            d / "origin.pem",
            d / "origin.key",
            d / "client-ca.pem",
            'location / { return 200 "host=$host subject=$ssl_client_s_dn '
            'auth=$http_authorization proxyauth=$http_proxy_authorization"; }',
        ),
    ).start([("127.0.0.1", port)])
    try:
        yield Env(d, name, port, nginx)
    finally:
        nginx.stop()


def error_of(body: bytes) -> dict[str, str]:
    doc: dict[str, str] = json.loads(body)
    return doc


def test_requests_tunnel_by_name_and_each_new_connection_is_a_new_connect(env: Env) -> None:
    with contextlib.suppress(OSError):  # the point: only the proxy knows this name
        socket.getaddrinfo(env.name, None)
        if env.name == NAME:
            pytest.fail(f"{NAME} resolves on this host; the test needs it not to")
    proxy, admin = env.tinyproxy("plain"), free_port()
    sidecar, port = env.sidecar(
        "plain", f"http://127.0.0.1:{proxy.port}", "max_connection_age = 1", admin=admin
    )
    with running(proxy, sidecar.start([("127.0.0.1", port), ("127.0.0.1", admin)])):
        first = curl(f"http://127.0.0.1:{port}/v1/a")
        second = curl(f"http://127.0.0.1:{port}/v1/b")
        assert first.status == 200, first.body
        assert second.status == 200, second.body
        assert f"host={env.name}".encode() in first.body
        assert b"CN=TLSMA-ECDSA/MGW0000001/D1.PPR" in first.body  # our client certificate
        assert first.body.endswith(b"proxyauth=")  # no Proxy-Authorization reached the origin
        target = f"CONNECT {env.name}:{env.origin_port} HTTP/1.1"
        assert proxy.connects() == [target]  # the pooled connection carried the second request
        time.sleep(1.3)  # past max_connection_age: the next request needs a new connection
        third = curl(f"http://127.0.0.1:{port}/v1/c")
        assert third.status == 200, third.body
        assert proxy.connects() == [target, target]
        scrape = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    # the second tunnel resumed the first one's TLS session, as without a proxy
    for kind in ("full", "resumed"):
        line = f'mtls_sidecar_upstream_tls_handshakes_total{{kind="{kind}",route="plain"}} 1.0'
        assert line in scrape
    access = [json.loads(x) for x in sidecar.log().splitlines() if '"access"' in x]
    assert access[0]["upstream"].startswith(f"{env.name}:{env.origin_port} via 127.0.0.1:")
    assert "127.0.0.1:" + str(env.origin_port) not in "".join(proxy.connects())


def test_the_name_is_checked_through_the_tunnel(env: Env) -> None:
    proxy = env.tinyproxy("names")
    # the tunnel goes to the origin, whose certificate does not name "other.test"
    sidecar, port = env.sidecar(
        "names", f"http://127.0.0.1:{proxy.port}", 'server_name = "other.test"'
    )
    with running(proxy, sidecar.start([("127.0.0.1", port)])):
        r = curl(f"http://127.0.0.1:{port}/v1/x")
    assert r.status == 502, r.body
    err = error_of(r.body)
    assert err["error"] == "upstream_tls_failed"
    assert err["detail"].startswith("hostname mismatch: certificate is for ")
    assert "not other.test through proxy http://127.0.0.1:" in err["detail"]
    assert proxy.connects() == [f"CONNECT {env.name}:{env.origin_port} HTTP/1.1"]


def test_the_token_request_goes_through_the_same_proxy(env: Env, tmp_path: Path) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record)
    proxy = env.tinyproxy("token", env.origin_port, tokens.port)
    oauth = f"""
            [egress.oauth]
            token_url = "https://{env.name}:{tokens.port}/authz/v1/oauth2/token"
            issuer = "MGW0000001"
            signing_key = "oauth.key"
            key_id = "kid-ppr-1"
            body = "json"
    """
    sidecar, port = env.sidecar("token", f"http://127.0.0.1:{proxy.port}", oauth=oauth)
    with running(tokens, proxy, sidecar.start([("127.0.0.1", port)])):
        r = curl(f"http://127.0.0.1:{port}/v1/cards")
        assert r.status == 200, r.body
        assert b"auth=Bearer " in r.body
    calls = [json.loads(x) for x in record.read_text().splitlines()]
    assert calls and calls[0]["ok"] is True
    assert f"CONNECT {env.name}:{tokens.port} HTTP/1.1" in proxy.connects()
    assert f"CONNECT {env.name}:{env.origin_port} HTTP/1.1" in proxy.connects()


def test_proxy_authentication_407_without_credentials_and_200_with_them(env: Env) -> None:
    proxy = env.tinyproxy("auth", auth=("merchant", "s3cret-Pa55"))
    url = f"http://127.0.0.1:{proxy.port}"
    bare, bare_port = env.sidecar("noauth", url)
    creds = env.dir / "proxy-auth"
    creds.write_text("merchant:wrong-password\n")
    creds.chmod(0o600)
    authed, authed_port = env.sidecar("withauth", url, 'proxy_auth_file = "proxy-auth"')
    with running(proxy, bare.start([("127.0.0.1", bare_port)]),
                 authed.start([("127.0.0.1", authed_port)])):  # fmt: skip
        r = curl(f"http://127.0.0.1:{bare_port}/v1/x")
        assert r.status == 502, r.body
        err = error_of(r.body)
        assert err["error"] == "proxy_refused"
        assert f"proxy {url} refused CONNECT {env.name}:{env.origin_port}: HTTP/1." in err["detail"]
        assert "407" in err["detail"]
        wrong = curl(f"http://127.0.0.1:{authed_port}/v1/x")
        assert wrong.status == 502, wrong.body
        refused = error_of(wrong.body)  # tinyproxy: 401 to wrong credentials, 407 to none
        assert refused["error"] == "proxy_refused"
        assert re.search(r"refused CONNECT \S+: HTTP/1\.[01] 40[17] ", refused["detail"])
        # the file is key material: a change is picked up without a restart
        creds.write_text("merchant:s3cret-Pa55\n")
        deadline = time.monotonic() + 10
        ok = wrong
        while time.monotonic() < deadline:
            ok = curl(f"http://127.0.0.1:{authed_port}/v1/x")
            if ok.status == 200:
                break
            time.sleep(0.2)
        assert ok.status == 200, ok.body
        assert ok.body.endswith(b"proxyauth=")  # the credentials stop at the proxy
    for log in (authed.log(), bare.log()):
        assert "s3cret-Pa55" not in log and "wrong-password" not in log
        assert "bWVyY2hhbnQ6" not in log  # base64 of "merchant:"


def test_a_port_the_proxy_does_not_allow_is_refused_with_its_status_line(env: Env) -> None:
    proxy = env.tinyproxy("ports", 1)  # CONNECT allowed to port 1 only
    admin = free_port()
    sidecar, port = env.sidecar("ports", f"http://127.0.0.1:{proxy.port}", admin=admin)
    with running(proxy, sidecar.start([("127.0.0.1", port), ("127.0.0.1", admin)])):
        r = curl(f"http://127.0.0.1:{port}/v1/x")
        scrape = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    assert 'mtls_sidecar_upstream_connects_total{result="proxy_refused",route="ports"} 1.0' in (
        scrape
    )
    assert r.status == 502, r.body
    err = error_of(r.body)
    assert err["error"] == "proxy_refused" and err["route"] == "ports"
    assert re.search(r"refused CONNECT \S+: HTTP/1\.[01] 403 Access violation$", err["detail"])


def test_a_proxy_that_is_down_is_proxy_unreachable(env: Env) -> None:
    dead, admin = free_port(), free_port()
    sidecar, port = env.sidecar("down", f"http://127.0.0.1:{dead}", admin=admin)
    with running(sidecar.start([("127.0.0.1", port), ("127.0.0.1", admin)])):
        r = curl(f"http://127.0.0.1:{port}/v1/x")
        scrape = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    assert 'mtls_sidecar_upstream_connects_total{result="proxy_unreachable",route="down"} 1.0' in (
        scrape
    )
    assert r.status == 502, r.body
    err = error_of(r.body)
    assert err["error"] == "proxy_unreachable"
    assert f"cannot connect to proxy http://127.0.0.1:{dead}: connection refused" in err["detail"]


class _CuttingProxy:
    """Answers CONNECT with 200, relays to the origin, and closes the tunnel once `cut` bytes
    of the origin's handshake have gone back: the tunnel ends mid-handshake."""

    def __init__(self, origin_port: int, cut: int) -> None:
        self.origin_port, self.cut = origin_port, cut
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with client, socket.create_connection(("127.0.0.1", self.origin_port)) as origin:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = client.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                self.requests.append(head)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                origin.sendall(client.recv(65536))  # the ClientHello
                sent = 0
                while sent < self.cut:
                    data = origin.recv(self.cut - sent)
                    if not data:
                        break
                    client.sendall(data)
                    sent += len(data)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_a_tunnel_closed_mid_handshake_says_so_and_names_the_proxy(env: Env) -> None:
    fake = _CuttingProxy(env.origin_port, cut=100)
    try:
        admin = free_port()
        sidecar, port = env.sidecar("cut", f"http://127.0.0.1:{fake.port}", admin=admin)
        with running(sidecar.start([("127.0.0.1", port), ("127.0.0.1", admin)])):
            r = curl(f"http://127.0.0.1:{port}/v1/x")
            scrape = curl(f"http://127.0.0.1:{admin}/metrics").body.decode()
    finally:
        fake.close()
    assert r.status == 502, r.body
    err = error_of(r.body)
    assert err["error"] == "upstream_tls_failed"
    assert err["detail"].startswith("connection closed during the TLS handshake"), err["detail"]
    assert f"through proxy http://127.0.0.1:{fake.port}" in err["detail"]
    assert re.search(
        r'mtls_sidecar_tls_handshake_errors_total\{reason="[a-z_]+",route="cut"\} 1\.0', scrape
    )
    assert fake.requests and fake.requests[0].startswith(
        f"CONNECT {env.name}:{env.origin_port} HTTP/1.1\r\nHost: {env.name}:".encode()
    )


def probe(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIDECAR, "probe", "-c", str(conf), *args], capture_output=True, text=True, timeout=60
    )


def test_probe_shows_the_proxy_hop_and_its_answer(env: Env) -> None:
    proxy = env.tinyproxy("probe")
    refusing = env.tinyproxy("probe-refusing", 1)
    good, _ = env.sidecar("probe-ok", f"http://127.0.0.1:{proxy.port}")
    bad, _ = env.sidecar("probe-403", f"http://127.0.0.1:{refusing.port}")
    with running(proxy, refusing):
        ok = probe(good.config)
        refused = probe(bad.config, "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"proxy:               http://127.0.0.1:{proxy.port}: CONNECT by name" in ok.stdout
    assert f"127.0.0.1:{proxy.port} (proxy)" in ok.stdout
    assert re.search(r"CONNECT:\s+HTTP/1\.[01] 200 Connection established", ok.stdout), ok.stdout
    assert "client certificate accepted: GET / answered HTTP 200" in ok.stdout
    assert f"CONNECT {env.name}:{env.origin_port} HTTP/1.1" in proxy.connects()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    route = json.loads(refused.stdout)["routes"][0]
    assert route["proxy"] == f"http://127.0.0.1:{refusing.port}"
    (address,) = route["addresses"]
    assert address["tcp_ok"] is True and address["ok"] is False
    assert re.search(r"refused CONNECT \S+: HTTP/1\.[01] 403 ", address["proxy_answer"])
