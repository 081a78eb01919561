"""A bounded soak of the sidecar, both directions, error cases included; RSS and fds per minute.

    .venv/bin/python bench/soak.py [--minutes 20] [--threads 6] [--tracemalloc DIR]

Starts nginx (the mTLS origin for egress and the plain internal app for ingress) and the
sidecar through its CLI on 127.0.0.1, then runs a mix of requests from client threads:
keep-alive egress and ingress calls, 403s (a foreign host on egress, a subject not allowed on
ingress), 413s, 502s (a route whose upstream is down) and clients that abort mid-request.
Prints one line a minute and a JSON summary with the RSS slope over the last half of the run
(target: at most 0.1 MB/min) and the fd range there (target: flat).

With --tracemalloc DIR the sidecar runs under tracemalloc and writes a snapshot to DIR each
minute; the summary then lists the allocation sites that grew most over the last half.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import (
    BIN,
    Nginx,
    Sidecar,
    free_port,
    mtls_server,
    origin_pki,
    stop,
    wait_port,
    write_config,
)

# Runs the sidecar's own CLI under tracemalloc; SIGUSR2 writes a snapshot to $SOAK_SNAPSHOTS.
TRACED = """
import os, signal, sys, tracemalloc, itertools
tracemalloc.start(16)
n = itertools.count()
def dump(*_):
    folder = os.environ["SOAK_SNAPSHOTS"]
    tracemalloc.take_snapshot().dump(os.path.join(folder, f"{next(n):03d}.snap"))
signal.signal(signal.SIGUSR2, dump)
from proxy.cli import main
sys.exit(main(sys.argv[1:]))
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minute, value)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points) or 1.0
    return sum((x - mx) * (y - my) for x, y in points) / den


class Load:
    def __init__(self, d: Path, egress: int, dead: int, ingress: int, forbidden: int) -> None:
        self.d, self.egress, self.dead = d, egress, dead
        self.ingress, self.forbidden = ingress, forbidden
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ctx = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
        self.ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        eg: http.client.HTTPConnection | None = None
        ing: http.client.HTTPSConnection | None = None
        while not self.stop.is_set():
            r = rnd.random()
            try:
                if r < 0.60:
                    eg = eg or http.client.HTTPConnection("127.0.0.1", self.egress, timeout=10)
                    eg.request("GET", "/v1/ok", headers={"X-Soak": "1"})
                    resp = eg.getresponse()
                    resp.read()
                    self.count(f"egress {resp.status}")
                elif r < 0.85:
                    ing = ing or http.client.HTTPSConnection(
                        "localhost", self.ingress, timeout=10, context=self.ctx
                    )
                    ing.request("POST", "/notify", body=b"x" * 512)
                    resp = ing.getresponse()
                    resp.read()
                    self.count(f"ingress {resp.status}")
                elif r < 0.89:
                    self.once(
                        self.egress, b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: e\r\n\r\n"
                    )
                elif r < 0.92:
                    body = b"y" * (64 * 1024 + 1)
                    self.once(self.egress, b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
                elif r < 0.95:
                    self.once(self.dead, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                elif r < 0.97:
                    s = self.ctx.wrap_socket(
                        socket.create_connection(("127.0.0.1", self.forbidden), timeout=10),
                        server_hostname="localhost",
                    )
                    s.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                    self.count("ingress " + s.recv(12)[9:12].decode())
                    s.close()
                else:  # a client that gives up mid-request
                    s = socket.create_connection(("127.0.0.1", self.egress), timeout=10)
                    s.sendall(b"POST /v1/ok HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nab")
                    s.close()
                    self.count("abort")
            except (OSError, http.client.HTTPException):
                self.count("client error")
                eg = ing = None

    def once(self, port: int, data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            self.count("egress " + s.recv(12)[9:12].decode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 20)))
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--tracemalloc", type=Path)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="soak-"))
    origin_pki(d)
    origin, app = free_port(), free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(f"127.0.0.1:{origin}", d / "origin.pem", d / "origin.key",
                    d / "client-ca.pem", 'location / { return 200 "ok"; }')
        + f'\nserver {{ listen 127.0.0.1:{app}; location / {{ return 200 "app"; }} }}',
    ).start([("127.0.0.1", origin), ("127.0.0.1", app)])  # fmt: skip
    egress, dead, ingress, forbidden, admin = (free_port() for _ in range(5))
    common = 'client_cert = "client.pem"\nclient_key = "client.key"\ntrust = "server-ca.pem"'
    server = 'server_cert = "origin.pem"\nserver_key = "origin.key"\nclient_ca = "client-ca.pem"'
    conf = write_config(
        d / "soak.toml",
        f"""
[admin]
listen = "127.0.0.1:{admin}"
[log]
access = false
[[egress]]
name = "ok"
listen = "127.0.0.1:{egress}"
upstream = "https://localhost:{origin}"
max_body_bytes = "64KiB"
{common}
[[egress]]
name = "dead"
listen = "127.0.0.1:{dead}"
upstream = "https://localhost:{free_port()}"
{common}
[[ingress]]
name = "in"
listen = "127.0.0.1:{ingress}"
upstream = "http://127.0.0.1:{app}"
{server}
[[ingress]]
name = "forbidden"
listen = "127.0.0.1:{forbidden}"
upstream = "http://127.0.0.1:{app}"
allow_subjects = ["CN=nobody"]
{server}
""",
    )
    sidecar = Sidecar(conf)
    env = {}
    if args.tracemalloc:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
        env["SOAK_SNAPSHOTS"] = str(args.tracemalloc)
        sidecar.proc = subprocess.Popen(
            [str(BIN / "python"), "-c", TRACED, "run", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
        for port in (egress, ingress, admin):
            wait_port("127.0.0.1", port, sidecar.proc, timeout=180)  # traced: slow start
    else:
        sidecar.start([("127.0.0.1", p) for p in (egress, ingress, admin)])
    assert sidecar.proc is not None
    pid = sidecar.proc.pid
    load = Load(d, egress, dead, ingress, forbidden)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True)
               for i in range(args.threads)]  # fmt: skip
    for t in threads:
        t.start()
    samples: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    try:
        minute = 0
        while minute < args.minutes:
            minute += 1
            time.sleep(max(0.0, t0 + 60 * minute - time.monotonic()))
            rss, fds = rss_mb(pid), len(os.listdir(f"/proc/{pid}/fd"))
            samples.append((minute, rss, fds))
            if args.tracemalloc:
                os.kill(pid, signal.SIGUSR2)
            with load.lock:
                done = sum(load.counts.values())
            print(f"minute {minute:3d}  rss {rss:7.1f} MB  fds {fds:5d}  requests {done}",
                  flush=True)  # fmt: skip
    finally:
        load.stop.set()
        for t in threads:
            t.join(15)
        stop(sidecar.proc)
        nginx.stop()
    half = [s for s in samples if s[0] > args.minutes / 2] or samples
    summary = {
        "minutes": args.minutes,
        "requests": dict(sorted(load.counts.items())),
        "rss_first_mb": samples[0][1],
        "rss_last_mb": samples[-1][1],
        "rss_slope_last_half_mb_per_min": round(slope([(m, r) for m, r, _ in half]), 3),
        "fds_last_half": [min(f for *_, f in half), max(f for *_, f in half)],
    }
    if args.tracemalloc:
        summary["grew_most"] = grew_most(args.tracemalloc, len(samples))
    print(json.dumps(summary, indent=2))


def grew_most(folder: Path, n: int) -> list[str]:
    import tracemalloc

    snaps = sorted(folder.glob("*.snap"))
    if len(snaps) < 2:
        return []
    first = tracemalloc.Snapshot.load(str(snaps[len(snaps) // 2]))
    last = tracemalloc.Snapshot.load(str(snaps[-1]))
    diffs = last.compare_to(first, "traceback")
    total = sum(d.size_diff for d in diffs)
    grown = sorted(diffs, key=lambda d: d.size_diff, reverse=True)[:8]
    # frames run oldest first: the allocation site is the last one
    return [f"{total / 1024:+.1f} KiB traced in all over the last half"] + [
        f"{d.size_diff / 1024:+.1f} KiB {d.count_diff:+d} blocks at "
        + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in d.traceback[::-1][:4])
        for d in grown
    ]


if __name__ == "__main__":
    main()
