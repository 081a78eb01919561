"""The relay's own CPU per keep-alive request, without sockets or TLS: a Downstream and an
UpstreamConnection on in-memory transports, driven with the bytes wrk and nginx exchange in the
harness (egress: wrk -> sidecar -> nginx; ingress: nginx adapter -> sidecar -> nginx), access
log on (to /dev/null, through its file descriptor) and metrics recorded, as users run it.

What it prints is the part of `pxus/op` that is ours (parsing, headers, routing, metrics, the
access line); the rest is the reactor, the sockets and TLS. With PROFILE=1 it prints the top
functions by own time per request instead.

    .venv/bin/python bench/relay_cost.py            # N=20000 requests, best of ROUNDS=7
    PROFILE=1 .venv/bin/python bench/relay_cost.py
    HEADS=app .venv/bin/python bench/relay_cost.py  # 9-field request heads instead of wrk's 1
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from proxy.config import EgressRoute, IngressRoute, Listen, Upstream
from proxy.routes.egress import Egress
from proxy.routes.ingress import Ingress, Peer
from proxy.telemetry.logs import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.wire.pool import Pool, UpstreamConnection
from proxy.wire.relay import Downstream

N = int(os.environ.get("N", "20000"))
ROUNDS = int(os.environ.get("ROUNDS", "7"))
BODY = b"x" * 200
REQUEST = {  # as wrk sends it, and as the harness's nginx adapter forwards it
    "egress": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",
    "ingress": b"GET / HTTP/1.1\r\nHost: proxy8443\r\n\r\n",
}
if os.environ.get("HEADS") == "app":  # heads as an app's HTTP client and a partner send them
    REQUEST = {
        "egress": b"POST /v1/cards HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"User-Agent: python-requests/2.31.0\r\nAccept-Encoding: gzip, deflate\r\n"
        b"Accept: */*\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n"
        b"X-Request-Id: 1234567890abcdef\r\nContent-Length: 0\r\n\r\n",
        "ingress": b"POST /v1/cards HTTP/1.1\r\nHost: proxy8443\r\nUser-Agent: partner/1.0\r\n"
        b"Accept: application/json\r\nContent-Type: application/json\r\n"
        b"X-Correlation-Id: abcdef0123456789\r\n"
        b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n"
        b"Traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
        b"Content-Length: 0\r\n\r\n",
    }
RESPONSE = (  # nginx's `return 200` with a 200-byte body
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 13:07:55 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 200\r\nConnection: keep-alive\r\n\r\n" + BODY
)
# what the default identity header families give for a typical partner certificate
IDENTITY = (
    (b"client-cert", b":" + b"A" * 600 + b":"),
    (b"x-forwarded-client-cert", b"Hash=" + b"0" * 64 + b';Subject="CN=partner,O=Example"'),
    (b"x-client-verify", b"SUCCESS"),
    (b"x-client-subject", b"CN=partner,O=Example"),
    (b"x-client-issuer", b"CN=Example CA,O=Example"),
    (b"x-client-serial", b"4F2A"),
    (b"x-client-fingerprint-sha256", b"0" * 64),
)


class Clock:
    seconds = staticmethod(time.time)


class Sink(StringTransport):
    """A transport that keeps nothing: a long run holds no growing buffer."""

    def write(self, data: bytes) -> None:
        pass


def rig(direction: str) -> tuple[Downstream, UpstreamConnection]:
    clock: Any = Clock()
    pool = Pool(
        reactor=clock,
        clock=clock,
        resolver=None,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=9443,
        tls=None,
        connect_timeout=5.0,
        idle_timeout=60.0,
        max_age=1e9,
        max_idle=64,
    )
    up = UpstreamConnection(pool, "127.0.0.1", None, clock.seconds())
    up.makeConnection(Sink(lenient=True))
    pool.idle.append(up)
    log = AccessLog(open(os.devnull, "w"), True)  # noqa: SIM115 (for the run)
    kw: Any = dict(clock=clock, pool=pool, metrics=Metrics.create(), access_log=log)
    listen = Listen("tcp", host="127.0.0.1", port=8080)
    route: Any
    if direction == "egress":
        config: Any = EgressRoute(
            name="bench-egress",
            listen=listen,
            upstream=Upstream("https", "localhost", 9443, ""),
            client_cert=Path("/unused"),
            client_key=Path("/unused"),
            trust=None,
            profile="generic",
        )
        route = Egress(config, **kw)
    else:
        config = IngressRoute(
            name="bench-ingress",
            listen=listen,
            server_cert=Path("/unused"),
            server_key=Path("/unused"),
            client_ca=Path("/unused"),
            upstream=Upstream("http", "127.0.0.1", 9080, ""),
        )
        route = Ingress(config, **kw)
    down = Downstream(route)
    down.makeConnection(Sink(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000), lenient=True))
    if direction == "ingress":
        down.peer = Peer("CN=partner,O=Example", True, IDENTITY, "4f2a")
    return down, up


def run(direction: str, n: int) -> float:
    """Seconds per request for n keep-alive requests on one connection."""
    down, up = rig(direction)
    request = REQUEST[direction]
    feed_down, feed_up = down.dataReceived, up.dataReceived
    t0 = time.process_time()
    for _ in range(n):
        feed_down(request)
        feed_up(RESPONSE)
    return (time.process_time() - t0) / n


def main() -> None:
    for direction in ("egress", "ingress"):
        run(direction, 2000)  # warm up
        if os.environ.get("PROFILE"):
            prof = cProfile.Profile()
            prof.runcall(run, direction, N)
            stats = pstats.Stats(prof)
            rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
            print(f"== {direction}: top 15 by own time, us per request")
            for (file, line, name), (_cc, calls, tt, _ct, _callers) in rows[:15]:
                where = file.split("site-packages/")[-1].split(os.sep + "proxy" + os.sep)[-1]
                print(f"  {tt / N * 1e6:7.2f} {calls / N:6.2f}x  {where}:{line}({name})")
            continue
        best = min(run(direction, N) for _ in range(ROUNDS))
        print(f"{direction}: {best * 1e6:.1f} us per request (best of {ROUNDS} x {N})")


if __name__ == "__main__":
    main()
