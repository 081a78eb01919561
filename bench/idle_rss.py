"""Memory of the sidecar holding 1,000 idle keep-alive mutual-TLS connections (ingress).

Starts the sidecar through its CLI on 127.0.0.1 with a throwaway PKI, opens the connections
(each one full handshake plus one request, then left idle), and reads VmRSS from /proc.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import PEERS, SIDECAR, Nginx, Peer, free_port, mtls_server, stop, wait_port
from tests.pkifactory import make_ca, write_ca

N = 1000


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def hold(port: int, d: Path, n: int) -> list[ssl.SSLSocket]:
    """n keep-alive mTLS connections, each one full handshake and one request, left idle."""
    ctx = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
    ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
    conns = []
    for _ in range(n):
        s = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        )
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
            data += s.recv(65536)
        conns.append(s)
    time.sleep(1)
    return conns


def measure(pid: int, port: int, d: Path) -> tuple[float, float]:
    base = rss_mb(pid)
    conns = hold(port, d, N)
    held = rss_mb(pid)
    for s in conns:
        s.close()
    return base, held


def nginx_figures(d: Path) -> tuple[float, float]:
    port = free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(f"127.0.0.1:{port}", d / "server.pem", d / "server.key", d / "client-ca.pem",
                    'keepalive_timeout 600s; location / { return 200 "ok"; }'),
    ).start([("127.0.0.1", port)])  # fmt: skip
    try:
        assert nginx.proc is not None
        out = subprocess.run(["pgrep", "-P", str(nginx.proc.pid)], capture_output=True, text=True)
        worker = int(out.stdout.split()[0])  # worker_processes 1
        return measure(worker, port, d)
    finally:
        nginx.stop()


def pyopenssl_wrap(d: Path) -> Callable[[socket.socket], Any]:
    """The floor under the sidecar: pyOpenSSL on the OpenSSL the sidecar links (cryptography's),
    with the sidecar's ingress settings."""
    from OpenSSL import SSL

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(d / "server.pem"))
    ctx.use_privatekey_file(str(d / "server.key"))
    ctx.load_verify_locations(str(d / "client-ca.pem"))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)

    def wrap(s: socket.socket) -> Any:
        conn = SSL.Connection(ctx, s)
        conn.set_accept_state()
        conn.do_handshake()
        return conn

    return wrap


def stdlib_wrap(d: Path) -> Callable[[socket.socket], Any]:
    """The same on Python's ssl module, which links the system's OpenSSL (nginx's): what the two
    OpenSSL builds keep per connection, everything else equal."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(d / "server.pem"), str(d / "server.key"))
    ctx.load_verify_locations(str(d / "client-ca.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    return lambda s: ctx.wrap_socket(s, server_side=True)


FLOORS = {"pyopenssl": pyopenssl_wrap, "stdlib": stdlib_wrap}


def floor_server(d: Path, port: int, kind: str) -> None:
    """A bare blocking TLS server: it answers one request per connection and holds it, with no
    Python above the TLS connection and socket."""
    wrap = FLOORS[kind](d)
    listener = socket.create_server(("127.0.0.1", port), backlog=2048)
    print("LISTENING", flush=True)
    held = []
    while True:
        s, _ = listener.accept()
        try:
            conn = wrap(s)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except Exception:  # a failed handshake (either library's error) or a reset client
            s.close()
            continue
        held.append(conn)


def floor_figures(d: Path, kind: str) -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--floor-server", kind, str(d), str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return measure(proc.pid, port, d)
    finally:
        stop(proc)


def main() -> None:
    if sys.argv[1:2] == ["--floor-server"]:
        floor_server(Path(sys.argv[3]), int(sys.argv[4]), sys.argv[2])
        return
    d = Path(tempfile.mkdtemp(prefix="idle-rss-"))
    server_ca, client_ca = make_ca(), make_ca("C=FR,O=Client,CN=Client CA")
    write_ca(server_ca, d / "server-ca.pem")
    write_ca(client_ca, d / "client-ca.pem")
    server_ca.issue("CN=localhost", dns=("localhost",), server=True).write(d, "server")
    client_ca.issue("CN=client", client=True).write(d, "client")
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "rec")]).start()
    port = free_port()
    (d / "c.toml").write_text(
        f"""
[log]
access = false
[[ingress]]
name = "idle"
listen = "127.0.0.1:{port}"
server_cert = "server.pem"
server_key = "server.key"
client_ca = "client-ca.pem"
upstream = "http://127.0.0.1:{upstream.port}"
idle_timeout = 600
max_connections = 2000
"""
    )
    proc = subprocess.Popen([SIDECAR, "run", "-c", str(d / "c.toml")], stdout=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port, proc)
        base, held = measure(proc.pid, port, d)
    finally:
        stop(proc)
        upstream.stop()
    nbase, nheld = nginx_figures(d)
    fbase, fheld = floor_figures(d, "pyopenssl")
    ours, theirs = (held - base) * 1024 / N, (nheld - nbase) * 1024 / N
    floor = (fheld - fbase) * 1024 / N
    sbase, sheld = floor_figures(d, "stdlib")
    system_floor = (sheld - sbase) * 1024 / N
    print(
        f"\nidle keep-alive mTLS connections: {N}, ECDSA P-256, TLS 1.3, same client\n"
        f"  sidecar (1 worker): RSS {base:.1f} MB before, {held:.1f} MB holding them: "
        f"{ours:.1f} KiB each\n"
        f"  nginx (1 worker):   RSS {nbase:.1f} MB before, {nheld:.1f} MB holding them: "
        f"{theirs:.1f} KiB each\n"
        f"  floor (bare pyOpenSSL server, the sidecar's OpenSSL): {floor:.1f} KiB each\n"
        f"  the same on Python's ssl (the system's OpenSSL, nginx's): {system_floor:.1f} KiB each\n"
        f"  per connection: sidecar/nginx = {ours / theirs:.2f} (target <= 1.2), "
        f"sidecar/floor = {ours / floor:.2f}"
    )


if __name__ == "__main__":
    main()
