"""New upstream connections through the sidecar: resumed against full TLS handshakes.

nginx on 127.0.0.1 is the mutual-TLS origin (ECDSA P-256 certificates, D1's profile), once per
TLS version allowing resumption (session cache and tickets) and once refusing it. The sidecar's
egress routes keep no idle upstream connection (pool_max_idle = 0), so every request opens a
new upstream connection: TCP connect, TLS handshake (resumed or full), request, close. A
keep-alive route (the pool kept) is the floor without any new connection.

One keep-alive client connection per route to the sidecar sends blocks of N sequential
requests, ROUNDS blocks per route, the routes taking turns block by block (in a rotating order)
so that they all see the same background load on a shared machine. Reported per route: median
and p90 latency of a request as the app sees it, and the CPU per request of the sidecar and of
the nginx worker (utime + stime from /proc/PID/stat, summed over the route's blocks); then the
resumed/full ratios. The admin metric mtls_sidecar_upstream_tls_handshakes_total confirms what
kind of handshakes were made.

    .venv/bin/python bench/resumption.py            # N=20 ROUNDS=40: 800 requests per route
    N=20 ROUNDS=100 .venv/bin/python bench/resumption.py
"""

from __future__ import annotations

import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import SIDECAR, Nginx, free_port, origin_pki, stop, wait_port

N = int(os.environ.get("N", "20"))
ROUNDS = int(os.environ.get("ROUNDS", "40"))
WARMUP = 20
TICK = os.sysconf("SC_CLK_TCK")
# route -> (nginx protocol, origin allows resumption, sidecar keeps idle connections)
ROUTES = {
    "tls13-full": ("TLSv1.3", False, False),
    "tls13-resumed": ("TLSv1.3", True, False),
    "tls12-full": ("TLSv1.2", False, False),
    "tls12-resumed": ("TLSv1.2", True, False),
    "keepalive": ("TLSv1.3", True, True),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def nginx_worker(master: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("no nginx worker")


def handshakes(admin: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for labels, value in re.findall(
        r"^mtls_sidecar_upstream_tls_handshakes_total\{(.*)\} (\S+)$", text, re.M
    ):
        f = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(f["route"], f["kind"])] = float(value)
    return out


def requests(conn: http.client.HTTPConnection, n: int) -> list[float]:
    took = []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", "/")
        r = conn.getresponse()
        body = r.read()
        took.append(time.perf_counter() - t)
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {body!r}")
    return took


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="resumption-"))
    origin_pki(d)
    origin_ports = {name: free_port() for name in ROUTES}
    servers = "".join(
        f"""
        server {{
          listen 127.0.0.1:{origin_ports[name]} ssl;
          ssl_certificate {d}/origin.pem;
          ssl_certificate_key {d}/origin.key;
          ssl_client_certificate {d}/client-ca.pem;
          ssl_verify_client on;
          ssl_protocols {proto};
          ssl_session_cache {"shared:S:1m" if resumable else "off"};
          ssl_session_tickets {"on" if resumable else "off"};
          access_log off;
          location / {{ return 200 "reused=$ssl_session_reused\\n"; }}
        }}"""
        for name, (proto, resumable, _keep) in ROUTES.items()
    )
    nginx = Nginx(d / "nginx", servers).start([("127.0.0.1", p) for p in origin_ports.values()])
    ports = {name: free_port() for name in ROUTES}
    admin = free_port()
    routes = "".join(
        f"""
[[egress]]
name = "{name}"
listen = "127.0.0.1:{ports[name]}"
upstream = "https://127.0.0.1:{origin_ports[name]}"
server_name = "localhost"
client_cert = "client.pem"
client_key = "client.key"
trust = "server-ca.pem"
pool_max_idle = {64 if keep else 0}
"""
        for name, (_proto, _resumable, keep) in ROUTES.items()
    )
    (d / "c.toml").write_text(
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n[log]\naccess = false\n' + routes
    )
    proc = subprocess.Popen([SIDECAR, "run", "-c", str(d / "c.toml")], stdout=subprocess.DEVNULL)
    try:
        for port in (*ports.values(), admin):
            wait_port("127.0.0.1", port, proc)
        assert nginx.proc is not None
        worker = nginx_worker(nginx.proc.pid)
        clients = {
            n: http.client.HTTPConnection("127.0.0.1", p, timeout=10) for n, p in ports.items()
        }
        latencies: dict[str, list[float]] = {name: [] for name in ROUTES}
        cpu = {name: [0.0, 0.0] for name in ROUTES}  # sidecar, nginx worker
        for name in ROUTES:
            requests(clients[name], WARMUP)
        names = list(ROUTES)
        for i in range(ROUNDS):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                s0, n0 = cpu_seconds(proc.pid), cpu_seconds(worker)
                latencies[name] += requests(clients[name], N)
                cpu[name][0] += cpu_seconds(proc.pid) - s0
                cpu[name][1] += cpu_seconds(worker) - n0
        kinds = handshakes(admin)
        for c in clients.values():
            c.close()
    finally:
        stop(proc)
        nginx.stop()

    total = N * ROUNDS
    print(
        f"\nnew upstream connections through the sidecar, {total} sequential requests per route "
        f"({ROUNDS} interleaved blocks of {N}), nginx origin on 127.0.0.1, ECDSA P-256 mTLS\n"
    )
    print(
        f"{'route':<15}{'median ms':>10}{'p90 ms':>9}{'sidecar CPU ms/req':>20}"
        f"{'nginx CPU ms/req':>18}{'full':>8}{'resumed':>9}"
    )
    for name in ROUTES:
        lat = sorted(latencies[name])
        p90 = lat[int(len(lat) * 0.9)]
        print(
            f"{name:<15}{statistics.median(lat) * 1e3:>10.3f}{p90 * 1e3:>9.3f}"
            f"{cpu[name][0] / total * 1e3:>20.3f}{cpu[name][1] / total * 1e3:>18.3f}"
            f"{kinds.get((name, 'full'), 0):>8.0f}{kinds.get((name, 'resumed'), 0):>9.0f}"
        )
    print(
        f"\n(CPU from /proc/PID/stat in {1000 / TICK:.0f} ms ticks, summed over each route's "
        "requests; full/resumed: handshakes counted by the sidecar, warm-up included)\n"
    )
    for version in ("tls13", "tls12"):
        full, resumed = f"{version}-full", f"{version}-resumed"
        lat = statistics.median(latencies[resumed]) / statistics.median(latencies[full])
        side = cpu[resumed][0] / cpu[full][0] if cpu[full][0] else float("nan")
        ngx = cpu[resumed][1] / cpu[full][1] if cpu[full][1] else float("nan")
        print(
            f"{version} resumed/full: median latency {lat:.2f}, sidecar CPU {side:.2f}, "
            f"nginx CPU {ngx:.2f}"
        )


if __name__ == "__main__":
    main()
