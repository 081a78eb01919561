"""A bounded soak of the sidecar, both directions, error cases included; RSS and fds per minute.

    .venv/bin/python bench/soak.py [--minutes 20] [--threads 6] [--tracemalloc DIR]
        [--class mixed|normal|403|413|502|abort] [--sample SECONDS] [--trace N]
        [--trim SECONDS] [--no-release-buffers] [--env NAME=VALUE ...] [--json FILE]

Starts nginx (the mTLS origin for egress and the plain internal app for ingress) and the
sidecar through its CLI on 127.0.0.1, then runs a mix of requests from client threads:
keep-alive egress and ingress calls, 403s (a foreign host on egress, a subject not allowed on
ingress), 413s, 502s (a route whose upstream is down) and clients that abort mid-request.
Prints one line a minute and a JSON summary with the RSS slope over the last half of the run
(target: at most 0.1 MB/min) and the fd range there (target: flat).

With --tracemalloc DIR the sidecar runs under tracemalloc and writes a snapshot to DIR each
minute; the summary then lists the allocation sites that grew most over the last half.

Each sample also asks the sidecar (SIGUSR1, handled by the probe it runs under) for glibc's
mallinfo2() (arena, in use, free, mmapped), tracemalloc's total (with --trace) and the live
connections, exchanges and TLS objects, printed as a table: fragmentation shows as free bytes
growing with in-use flat; a C-level leak as in-use growing with the traced total flat.
--class runs one traffic class in both directions; --env, --trim and --no-release-buffers run
the allocator variants.
"""

from __future__ import annotations

import argparse
import contextlib
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

# The sidecar's own CLI with probes for the soak, all off unless asked by the environment:
# SIGUSR1 appends one JSON line of memory figures to $SOAK_STATS; SIGUSR2 writes a tracemalloc
# snapshot to $SOAK_SNAPSHOTS; $SOAK_TRACE frames traced; $SOAK_TRIM seconds between
# malloc_trim(0); $SOAK_NO_RELEASE_BUFFERS=1 leaves OpenSSL's record buffers allocated.
PROBED = """
import ctypes, gc, itertools, json, os, signal, sys, threading, time, tracemalloc
frames = int(os.environ.get("SOAK_TRACE", "0"))
if frames:
    tracemalloc.start(frames)
libc = ctypes.CDLL("libc.so.6")
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
COUNTED = {"Downstream", "Exchange", "UpstreamConnection", "TLSProtocol",
           "TLSMemoryBIOProtocol", "Connection", "Deferred", "Server", "Client"}
def stats(*_):
    m = libc.mallinfo2()
    kinds = {}
    for o in gc.get_objects():
        name = type(o).__name__
        if name in COUNTED:
            key = name if name != "Connection" or type(o).__module__ != "OpenSSL.SSL" else "SSL"
            kinds[key] = kinds.get(key, 0) + 1
    rss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    row = {"t": time.time(), "rss": rss, "arena": m.arena, "uordblks": m.uordblks,
           "fordblks": m.fordblks, "hblkhd": m.hblkhd,
           "traced": tracemalloc.get_traced_memory()[0] if frames else None, **kinds}
    with open(os.environ["SOAK_STATS"], "a") as f:
        f.write(json.dumps(row) + "\\n")
n = itertools.count()
def dump(*_):
    folder = os.environ["SOAK_SNAPSHOTS"]
    tracemalloc.take_snapshot().dump(os.path.join(folder, f"{next(n):03d}.snap"))
if os.environ.get("SOAK_STATS"):
    signal.signal(signal.SIGUSR1, stats)
if os.environ.get("SOAK_SNAPSHOTS"):
    signal.signal(signal.SIGUSR2, dump)
trim = float(os.environ.get("SOAK_TRIM", "0"))
if trim:
    def trimmer():
        while True:
            time.sleep(trim)
            libc.malloc_trim(0)
    threading.Thread(target=trimmer, daemon=True).start()
if os.environ.get("SOAK_NO_RELEASE_BUFFERS"):
    from OpenSSL import SSL
    set_mode = SSL.Context.set_mode
    SSL.Context.set_mode = lambda self, mode: set_mode(self, mode & ~SSL.MODE_RELEASE_BUFFERS)
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


CLASSES = ("mixed", "normal", "403", "413", "502", "abort")
BIG = 64 * 1024 + 1  # one byte over the routes' max_body_bytes


class Load:
    def __init__(
        self, d: Path, egress: int, dead: int, ingress: int, forbidden: int, kind: str = "mixed"
    ) -> None:
        self.d, self.egress, self.dead = d, egress, dead
        self.ingress, self.forbidden = ingress, forbidden
        self.kind = kind
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ctx = ssl.create_default_context(cafile=str(d / "server-ca.pem"))
        self.ctx.load_cert_chain(str(d / "client.pem"), str(d / "client.key"))

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def pick(self, r: float) -> str:
        """The request to make: the mixed soak's shares, or one class in both directions."""
        if self.kind == "mixed":
            for share, what in ((0.60, "egress"), (0.85, "ingress"), (0.89, "403 egress"),
                                (0.92, "413 egress length"), (0.95, "502"),
                                (0.97, "403 ingress")):  # fmt: skip
                if r < share:
                    return what
            return "abort"
        if self.kind == "normal":
            return "egress" if r < 0.5 else "ingress"
        if self.kind == "413":
            return ("413 egress length", "413 egress chunked", "413 ingress length",
                    "413 ingress chunked")[int(r * 4)]  # fmt: skip
        if self.kind == "403":
            return "403 egress" if r < 0.5 else "403 ingress"
        return self.kind

    def run(self, seed: int) -> None:
        rnd = random.Random(seed)
        eg: http.client.HTTPConnection | None = None
        ing: http.client.HTTPSConnection | None = None
        while not self.stop.is_set():
            what = self.pick(rnd.random())
            try:
                if what == "egress":
                    eg = eg or http.client.HTTPConnection("127.0.0.1", self.egress, timeout=10)
                    eg.request("GET", "/v1/ok", headers={"X-Soak": "1"})
                    resp = eg.getresponse()
                    resp.read()
                    self.count(f"egress {resp.status}")
                elif what == "ingress":
                    ing = ing or http.client.HTTPSConnection(
                        "localhost", self.ingress, timeout=10, context=self.ctx
                    )
                    ing.request("POST", "/notify", body=b"x" * 512)
                    resp = ing.getresponse()
                    resp.read()
                    self.count(f"ingress {resp.status}")
                elif what == "403 egress":
                    self.once(
                        self.egress, b"GET http://elsewhere.example/ HTTP/1.1\r\nHost: e\r\n\r\n"
                    )
                elif what.startswith("413"):
                    self.too_large(what)
                elif what == "502":
                    self.once(self.dead, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                elif what == "403 ingress":
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

    def too_large(self, what: str) -> None:
        """A body one byte over the limit, announced by Content-Length or streamed in chunks;
        the client sends all of it, as a real one does, then reads the answer."""
        body = b"y" * BIG
        if what.endswith("length"):
            data = b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (BIG, body)
        else:
            head = b"POST /big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            pieces = (body[i : i + 8192] for i in range(0, BIG, 8192))
            data = head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in pieces)
            data += b"0\r\n\r\n"
        raw = socket.create_connection(
            ("127.0.0.1", self.egress if " egress " in what else self.ingress), timeout=10
        )
        s = raw if " egress " in what else self.ctx.wrap_socket(raw, server_hostname="localhost")
        with s:
            # the sidecar may answer and close before the body is all sent
            with contextlib.suppress(OSError):
                s.sendall(data)
            self.count(what.split()[1] + " " + s.recv(12)[9:12].decode())

    def once(self, port: int, data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            self.count("egress " + s.recv(12)[9:12].decode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 20)))
    ap.add_argument("--threads", type=int, default=6)
    ap.add_argument("--tracemalloc", type=Path)
    ap.add_argument(
        "--class",
        dest="kind",
        choices=CLASSES,
        default="mixed",
        help="one traffic class, in both directions (default: the mixed soak)",
    )
    ap.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    ap.add_argument(
        "--trace",
        type=int,
        default=0,
        help="trace Python memory with N frames and report its total",
    )
    ap.add_argument("--trim", type=float, default=0.0, help="malloc_trim(0) every N seconds")
    ap.add_argument(
        "--no-release-buffers", action="store_true", help="leave OpenSSL's MODE_RELEASE_BUFFERS off"
    )
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="for the sidecar, e.g. MALLOC_ARENA_MAX=2 or LD_PRELOAD=...",
    )
    ap.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="'KEY = VALUE'",
        help="a [service] line, e.g. 'malloc_trim_interval = 0'",
    )
    ap.add_argument("--json", type=Path, help="also write the summary and samples here")
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
        "[service]\n"
        + "\n".join(args.service)
        + f"""
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
max_body_bytes = "64KiB"
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
    stats = d / "stats.jsonl"
    env = dict(e.split("=", 1) for e in args.env)
    env["SOAK_STATS"] = str(stats)
    if args.tracemalloc:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
        env["SOAK_SNAPSHOTS"] = str(args.tracemalloc)
        env["SOAK_TRACE"] = str(args.trace or 16)
    elif args.trace:
        env["SOAK_TRACE"] = str(args.trace)
    if args.trim:
        env["SOAK_TRIM"] = str(args.trim)
    if args.no_release_buffers:
        env["SOAK_NO_RELEASE_BUFFERS"] = "1"
    sidecar.proc = subprocess.Popen(
        [str(BIN / "python"), "-c", PROBED, "run", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    for port in (egress, ingress, admin):
        wait_port("127.0.0.1", port, sidecar.proc, timeout=180)  # traced: slow start
    pid = sidecar.proc.pid
    load = Load(d, egress, dead, ingress, forbidden, args.kind)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True)
               for i in range(args.threads)]  # fmt: skip
    for t in threads:
        t.start()
    samples: list[tuple[float, float, int]] = []
    rows: list[dict[str, float]] = []
    print(TABLE_HEAD, flush=True)
    t0 = time.monotonic()
    try:
        n = 0
        while n * args.sample < args.minutes * 60:
            n += 1
            time.sleep(max(0.0, t0 + args.sample * n - time.monotonic()))
            minute = n * args.sample / 60
            rss, fds = rss_mb(pid), len(os.listdir(f"/proc/{pid}/fd"))
            samples.append((minute, rss, fds))
            os.kill(pid, signal.SIGUSR1)
            if args.tracemalloc:
                os.kill(pid, signal.SIGUSR2)
            with load.lock:
                done = sum(load.counts.values())
            row = probe_row(stats, len(rows))
            row.update(minute=minute, fds=fds, requests=done)
            rows.append(row)
            print(table_line(row), flush=True)
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
    summary["class"] = args.kind
    summary["variant"] = variant_name(args)
    half_rows = [r for r in rows if r["minute"] > args.minutes / 2] or rows
    for key in ("uordblks", "fordblks", "arena", "hblkhd", "traced"):
        points = [(r["minute"], r[key] / 2**20) for r in half_rows if r.get(key) is not None]
        if points:
            summary[f"{key}_slope_last_half_mb_per_min"] = round(slope(points), 3)
    summary["rss_growth_last_half_mb"] = round(half[-1][1] - half[0][1], 1)
    if args.tracemalloc:
        summary["grew_most"] = grew_most(args.tracemalloc, len(samples))
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "samples": rows}, indent=1))


TABLE_HEAD = (
    "   min     rss   arena  in-use    free  mmapd  traced  conns  exch   tls   ssl  defer"
    "   fds  requests\n   (MB)"
)


def probe_row(stats: Path, seen: int) -> dict[str, float]:
    """The sidecar's answer to the SIGUSR1 just sent (the line after the `seen` before it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = stats.read_text().splitlines() if stats.exists() else []
        if len(lines) > seen:
            row: dict[str, float] = json.loads(lines[seen])
            return row
        time.sleep(0.05)
    return {}


def table_line(r: dict[str, float]) -> str:
    def mb(key: str) -> str:
        v = r.get(key)
        return f"{v / 2**20:7.1f}" if v is not None else "      -"

    return (
        f"{r['minute']:6.2f} {mb('rss')} {mb('arena')} {mb('uordblks')} {mb('fordblks')}"
        f"{mb('hblkhd')} {mb('traced')} {r.get('Downstream', 0):6d} {r.get('Exchange', 0):5d}"
        f" {r.get('TLSProtocol', 0):5d} {r.get('SSL', 0):5d} {r.get('Deferred', 0):6d}"
        f" {r['fds']:5d} {r['requests']:9d}"
    )


def variant_name(args: argparse.Namespace) -> str:
    parts = list(args.env) + list(args.service)
    if args.trim:
        parts.append(f"malloc_trim every {args.trim:g}s")
    if args.no_release_buffers:
        parts.append("MODE_RELEASE_BUFFERS off")
    return ", ".join(parts) or "default"


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
