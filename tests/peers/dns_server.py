"""A DNS server on 127.0.0.1 whose answers the test controls: it re-reads a JSON file
({"name": {"a": ["127.0.0.2"], "ttl": 1}}) on every query. Prints 'LISTENING <port>'."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.names import dns, error, server


class FileAuthority:
    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred[Any]:
        name = query.name.name.decode().lower().rstrip(".")
        zone = json.loads(self.path.read_text())
        entry = zone.get(name)
        if entry is None:
            return defer.fail(error.DomainError(name))
        answers = []
        if query.type in (dns.A, dns.ALL_RECORDS):
            for ip in entry.get("a", []):
                answers.append(
                    dns.RRHeader(name, dns.A, dns.IN, entry.get("ttl", 1), dns.Record_A(ip, 1))
                )
        with Path(str(self.path) + ".log").open("a") as log:
            log.write(f"{name} {dns.QUERY_TYPES.get(query.type, query.type)}\n")
        return defer.succeed((answers, [], []))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zone", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    factory = server.DNSServerFactory(authorities=[FileAuthority(args.zone)])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(factory)
    # UDP picks a free port; TCP must get the same number, which another process may hold:
    # then try another
    for _ in range(20):
        udp = reactor.listenUDP(args.port, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
            break
        except CannotListenError:
            if args.port:
                raise
            udp.stopListening()
    else:
        raise SystemExit("no port free for both UDP and TCP")
    print(f"LISTENING {port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
