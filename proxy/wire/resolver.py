"""Name resolution on every new upstream connection; nothing is cached in the process.

The default is the reactor's resolver (getaddrinfo in a thread: the host's resolv.conf and its
cache, if any, decide). With `[resolver] nameservers`, the sidecar asks those DNS servers itself
(twisted.names, no cache layer), which also gives TTLs to `probe`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import attrs
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.names import client, dns
from zope.interface import implementer


@attrs.frozen
class Answer:
    address: str
    ttl: int | None  # None when the system resolver answered (getaddrinfo hides TTLs)


class ResolveError(Exception):
    pass


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: defer.Deferred[list[str]] = defer.Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: object) -> None:
        if isinstance(address, IPv4Address | IPv6Address) and address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


def resolve(resolver: IHostnameResolver, host: str, port: int) -> defer.Deferred[list[str]]:
    """Addresses for host, asked now. IP literals are returned as they are."""
    if isIPAddress(host) or isIPv6Address(host):
        return defer.succeed([host])
    collector = _Collector()
    resolver.resolveHostName(collector, host, port)

    def check(addresses: list[str]) -> list[str]:
        if not addresses:
            raise ResolveError(f"DNS: no address for {host}")
        return addresses

    return collector.done.addCallback(check)


@implementer(IHostResolution)
@attrs.frozen
class _Resolution:
    name: str

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class DNSResolver:
    """IHostnameResolver asking given DNS servers directly for A and AAAA, every time."""

    def __init__(self, servers: Sequence[tuple[str, int]], timeout: float = 5.0) -> None:
        self._resolver = client.Resolver(servers=list(servers))
        self._timeout = (timeout,)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolutionReceiver.resolutionBegan(_Resolution(hostName))

        def deliver(answers: list[Answer]) -> None:
            for a in answers:
                cls = IPv6Address if ":" in a.address else IPv4Address
                resolutionReceiver.addressResolved(cls("TCP", a.address, portNumber))
            resolutionReceiver.resolutionComplete()

        def failed(_: object) -> None:
            resolutionReceiver.resolutionComplete()

        self.answers(hostName).addCallbacks(deliver, failed)
        return _Resolution(hostName)

    def answers(self, host: str) -> defer.Deferred[list[Answer]]:
        """A and AAAA records with their TTLs (used by `probe` too)."""
        a = self._resolver.lookupAddress(host, self._timeout)
        aaaa = self._resolver.lookupIPV6Address(host, self._timeout)

        def collect(results: list[tuple[bool, object]]) -> list[Answer]:
            out: list[Answer] = []
            for ok, value in results:
                if not ok or not isinstance(value, tuple):
                    continue
                for rr in value[0]:
                    if rr.type in (dns.A, dns.AAAA):
                        out.append(
                            Answer(
                                rr.payload.dottedQuad()
                                if rr.type == dns.A
                                else socket.inet_ntop(socket.AF_INET6, rr.payload.address),
                                rr.ttl,
                            )
                        )
            return out

        return defer.DeferredList([a, aaaa], consumeErrors=True).addCallback(collect)
