"""The admin listener's gate: /status only to [admin] status_from; the probes open to all."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.test.requesthelper import DummyRequest

from proxy.config import LOOPBACK
from proxy.ops.admin import admin_site, peer_allowed

ONLY_ONE = (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.mark.parametrize(
    ("address", "allowed", "expected"),
    [
        (IPv4Address("TCP", "127.0.0.1", 1), ONLY_ONE, True),
        (IPv4Address("TCP", "127.0.0.2", 1), ONLY_ONE, False),
        (IPv4Address("TCP", "127.0.0.2", 1), LOOPBACK, True),
        (IPv4Address("TCP", "10.1.2.3", 1), LOOPBACK, False),
        (IPv6Address("TCP", "::1", 1), LOOPBACK, True),
        (IPv6Address("TCP", "fe80::1%eth0", 1), LOOPBACK, False),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 1), ONLY_ONE, True),  # dual-stack listener
        (IPv6Address("TCP", "::ffff:10.0.0.1", 1), ONLY_ONE, False),
        (IPv4Address("TCP", "127.0.0.1", 1), (), False),
        (UNIXAddress(b"/run/admin.sock"), ONLY_ONE, True),
    ],
)
def test_peer_allowed(address: Any, allowed: Any, expected: bool) -> None:
    assert peer_allowed(address, allowed) is expected


class State:
    def readiness(self) -> list[str]:
        return []

    def readiness_checks(self, route: str | None = None) -> list[Any] | None:
        return [] if route is None else None

    def status(self) -> dict[str, Any]:
        return {"config": {"client_cert": "/etc/secret/path.pem"}}


def get(path: bytes, peer: str) -> tuple[int, bytes]:
    site = admin_site(State(), CollectorRegistry(), ONLY_ONE)
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.client = IPv4Address("TCP", peer, 40000)
    resource = site.getResourceFor(request)
    body = resource.render(request)
    return request.responseCode or 200, body


def test_status_is_403_to_a_stranger_and_the_probes_are_not() -> None:
    code, body = get(b"/status", "127.0.0.2")
    assert code == 403
    assert json.loads(body) == {
        "error": "forbidden",
        "detail": "this address is not in [admin] status_from",
    }
    assert get(b"/status", "127.0.0.1")[0] == 200
    assert b"/etc/secret/path.pem" in get(b"/status", "127.0.0.1")[1]
    for path in (b"/healthz", b"/readyz", b"/metrics"):
        assert get(path, "127.0.0.2")[0] == 200, path


def test_the_status_page_at_root_is_behind_the_same_gate() -> None:
    code, body = get(b"/", "127.0.0.2")
    assert code == 403 and b"/etc/secret/path.pem" not in body
    code, body = get(b"/", "127.0.0.1")
    assert code == 200 and b"<html" in body.lower()
