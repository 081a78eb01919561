"""What [tracing] costs: the sidecar's CPU per request with tracing off, at sample_ratio 0 and at
sample_ratio 1.0, egress through to an nginx mutual-TLS origin on 127.0.0.1.

Three sidecars (one per variant, access log on as users run it) take turns under wrk (keep-alive,
C connections, DUR seconds a turn, ROUNDS turns each in a rotating order, so they share the
machine's background load). The traced ones export to an OTLP/HTTP sink in this process that
reads and discards every batch. CPU is utime + stime of the sidecar's process from
/proc/PID/stat (its export thread included); requests are the sidecar's own
mtls_sidecar_requests_total. Reported: the median of the turns, in microseconds per request, and
each against off.

    .venv/bin/python bench/tracing.py                  # DUR=5 ROUNDS=3 C=10
    DUR=10 ROUNDS=5 .venv/bin/python bench/tracing.py
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import SIDECAR, Nginx, free_port, mtls_server, origin_pki, stop, wait_port

DUR = int(os.environ.get("DUR", "5").removesuffix("s"))  # make bench passes wrk's form: 10s
ROUNDS = int(os.environ.get("ROUNDS", "3"))
C = int(os.environ.get("C", "10"))
TICK = os.sysconf("SC_CLK_TCK")
VARIANTS = {"off": None, "ratio 0": 0.0, "ratio 1.0": 1.0}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14 and 15)


def requests_total(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mtls_sidecar_requests_total{")
    )


def sink() -> tuple[ThreadingHTTPServer, list[int]]:
    spans = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            spans[0] += 1
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, spans


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="tracing-bench-"))
    origin_pki(d)
    origin = free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(f"127.0.0.1:{origin}", d / "origin.pem", d / "origin.key",
                    d / "client-ca.pem", 'access_log off; location / { return 200 "ok"; }'),
    ).start([("127.0.0.1", origin)])  # fmt: skip
    collector, batches = sink()
    procs: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    try:
        for name, ratio in VARIANTS.items():
            port, admin = free_port(), free_port()
            tracing = (
                ""
                if ratio is None
                else f"[tracing]\notlp_endpoint = "
                f'"http://127.0.0.1:{collector.server_address[1]}"\nsample_ratio = {ratio}\n'
            )
            conf = d / f"{name.replace(' ', '-')}.toml"
            conf.write_text(
                f'[admin]\nlisten = "127.0.0.1:{admin}"\n{tracing}[[egress]]\nname = "bench"\n'
                f'listen = "127.0.0.1:{port}"\nupstream = "https://localhost:{origin}"\n'
                'client_cert = "client.pem"\nclient_key = "client.key"\n'
                'trust = "server-ca.pem"\n'
            )
            proc = subprocess.Popen(
                [SIDECAR, "run", "-c", str(conf)], stdout=subprocess.DEVNULL, cwd=d
            )
            procs[name] = (proc, port, admin)
        for proc, port, admin in procs.values():
            wait_port("127.0.0.1", port, proc)
            wait_port("127.0.0.1", admin, proc)
        per_request: dict[str, list[float]] = {name: [] for name in VARIANTS}
        rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for turn in range(ROUNDS):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                proc, port, admin = procs[name]
                cpu0, n0 = cpu_seconds(proc.pid), requests_total(admin)
                out = subprocess.run(
                    ["wrk", "-t1", f"-c{C}", f"-d{DUR}s", f"http://127.0.0.1:{port}/"],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                cpu1, n1 = cpu_seconds(proc.pid), requests_total(admin)
                m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
                rates[name].append(float(m.group(1)) if m else 0.0)
                per_request[name].append((cpu1 - cpu0) / max(1.0, n1 - n0) * 1e6)
    finally:
        for proc, _, _ in procs.values():
            stop(proc)
        collector.shutdown()
        nginx.stop()
    base = statistics.median(per_request["off"])
    print(f"\n[tracing] cost, egress, wrk c{C}, {ROUNDS} turns of {DUR}s each (medians)")
    print(f"{'variant':<10} {'req/s':>8} {'CPU us/req':>11} {'vs off':>7}")
    for name in VARIANTS:
        us = statistics.median(per_request[name])
        print(f"{name:<10} {statistics.median(rates[name]):>8.0f} {us:>11.1f} {us / base:>6.2f}x")
    print(f"(OTLP batches received by the sink: {batches[0]})")


if __name__ == "__main__":
    main()
