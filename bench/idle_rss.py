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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import PEERS, SIDECAR, Peer, free_port, stop, wait_port
from tests.pkifactory import make_ca, write_ca

N = 1000


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
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
    conns: list[ssl.SSLSocket] = []
    try:
        wait_port("127.0.0.1", port, proc)
        base = rss_mb(proc.pid)
        ctx = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
        ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))
        for _ in range(N):
            s = ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
            )
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
                data += s.recv(65536)
            conns.append(s)
        time.sleep(1)
        held = rss_mb(proc.pid)
        anon, files = rss_mb(proc.pid, "RssAnon"), rss_mb(proc.pid, "RssFile")
        print(
            f"\nidle keep-alive mTLS connections: {N}; sidecar RSS {base:.1f} MB before, "
            f"{held:.1f} MB holding them ({(held - base) * 1024 / N:.1f} KiB each; "
            f"anonymous {anon:.1f} MB, shared-library pages {files:.1f} MB); target <= 60 MB"
        )
    finally:
        for s in conns:
            s.close()
        stop(proc)
        upstream.stop()


if __name__ == "__main__":
    main()
