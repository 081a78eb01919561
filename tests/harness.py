"""Real processes on 127.0.0.1 for integration tests: nginx, the sidecar via its CLI, curl.

Every process started here is stopped by the fixture or context manager that started it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import serialization

from proxy.tls import pki
from proxy.tls.throwaway import Issued, make_ca, write_ca

BIN = Path(sys.executable).parent
SIDECAR = str(BIN / "mtls-sidecar")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def need(binary: str) -> None:
    if not (shutil.which(binary) or Path(binary).exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is required (installed by .ci/run)")
        pytest.skip(f"{binary} not installed")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@attrs.define
class Nginx:
    """nginx in the foreground with a config of the test's making."""

    directory: Path
    servers: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: Sequence[tuple[str, int]]) -> Nginx:
        need(NGINX)
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(
            textwrap.dedent(
                f"""
                {"user root;" if os.geteuid() == 0 else ""}
                worker_processes 1;
                daemon off;
                pid {d}/nginx.pid;
                error_log {d}/error.log info;
                events {{ worker_connections 1024; }}
                http {{
                  access_log {d}/access.log;
                  client_body_temp_path {d}/body;
                  proxy_temp_path {d}/proxy;
                  fastcgi_temp_path {d}/fcgi;
                  uwsgi_temp_path {d}/uwsgi;
                  scgi_temp_path {d}/scgi;
                  default_type text/plain;
                """
            )
            + self.servers
            + "\n}\n"
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for host, port in wait:
            wait_port(host, port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGQUIT)

    def error_log(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")


@attrs.define
class Sidecar:
    """The product, started through its CLI like an operator would."""

    config: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    preexec: Callable[[], None] | None = None  # e.g. a lower RLIMIT_NOFILE

    def start(
        self, wait: Sequence[tuple[str, int]] = (), env: dict[str, str] | None = None
    ) -> Sidecar:
        self.log_path = self.config.with_suffix(".log")
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [SIDECAR, "run", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=self.preexec,
        )
        log.close()
        try:
            for host, port in wait:
                wait_port(host, port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"sidecar did not start:\n{self.log()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        return stop(self.proc, sig, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


@attrs.frozen
class CurlResult:
    status: int
    body: bytes
    headers: str
    returncode: int
    stderr: str


def curl(*args: str, timeout: float = 20) -> CurlResult:
    need("curl")
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-D", "/dev/stderr", "-w", "\n%{http_code}", "--max-time",
         str(timeout), *args],
        capture_output=True,
        timeout=timeout + 5,
    )  # fmt: skip
    body, _, code = out.stdout.rpartition(b"\n")
    return CurlResult(int(code or 0), body, out.stderr.decode(errors="replace"), out.returncode,
                      out.stderr.decode(errors="replace"))  # fmt: skip


@contextlib.contextmanager
def running(*things: Nginx | Sidecar) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):
            thing.stop()


@attrs.define
class Peer:
    """A helper server script from tests/peers that prints 'LISTENING <port>'."""

    args: Sequence[str]
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self) -> Peer:
        with tempfile.TemporaryFile() as errors:  # what the peer says if it fails to start
            self.proc = subprocess.Popen(
                [sys.executable, *self.args], stdout=subprocess.PIPE, stderr=errors
            )  # (the peer keeps its own descriptor of it)
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().decode()
            if not line.startswith("LISTENING"):
                self.stop()
                errors.seek(0)
                said = errors.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"peer {self.args[0]} did not start: {line!r}\n{said}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            if self.proc.stdout:
                self.proc.stdout.close()


PEERS = Path(__file__).parent / "peers"


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def mtls_server(listen: str, cert: Path, key: Path, client_ca: Path, locations: str) -> str:
    """An nginx server block that requires a client certificate from client_ca."""
    return f"""
        server {{
          listen {listen} ssl;
          ssl_certificate {cert};
          ssl_certificate_key {key};
          ssl_client_certificate {client_ca};
          ssl_verify_client on;
          {locations}
        }}"""


CLIENT_SUBJECT = "C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW0000001/D1.PPR"


def mtls_origin(d: Path, locations: str) -> tuple[Nginx, int]:
    """nginx as the partner: mutual TLS on a free port, with the origin PKI origin_pki(d) wrote
    (origin.pem/.key, client-ca.pem); started, with its port."""
    port = free_port()
    server = mtls_server(
        f"127.0.0.1:{port}", d / "origin.pem", d / "origin.key", d / "client-ca.pem", locations
    )
    return Nginx(d / "nginx", server).start([("127.0.0.1", port)]), port


def origin_pki(d: Path, dns: tuple[str, ...] = ("localhost",)) -> tuple[Issued, Issued]:
    """The usual egress test PKI in d: server-ca.pem, client-ca.pem, origin.{pem,key} for
    localhost/127.0.0.1, client.{pem,key} under D1's CN policy. Returns (server CA, client CA)."""
    server_ca = make_ca("C=FR,O=Origin PKI,CN=Origin Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    server_ca.issue("CN=localhost", dns=dns, ips=("127.0.0.1",), server=True).write(d, "origin")
    client_ca.issue(CLIENT_SUBJECT, client=True).write(d, "client")
    return server_ca, client_ca


def write_oauth_key(d: Path) -> None:
    """oauth.key (ES256 signing key) and oauth.pub (its public half, for the token server)."""
    key = pki.make_oauth_key()
    (d / "oauth.key").write_bytes(pki.private_key_pem(key))
    (d / "oauth.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
