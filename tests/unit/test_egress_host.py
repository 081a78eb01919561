"""The Host an egress route sends when `upstream` is an address and `server_name` names the
partner: the name, as the partner's virtual host (and its certificate) expect."""

from __future__ import annotations

import io
from typing import Any

import attrs
import pytest
from twisted.internet.task import Clock

from proxy.config import Upstream
from proxy.routes.egress import Egress
from proxy.telemetry.logs import AccessLog
from proxy.telemetry.metrics import Metrics
from tests.unit.test_egress import egress, head, prepare, values


def route(host: str, port: int, server_name: str | None) -> Egress:
    base = egress(Upstream("https", host, port, "")).config
    config = attrs.evolve(base, server_name=server_name)
    pool: Any = object()
    return Egress(config, clock=Clock(), pool=pool, metrics=Metrics.create(),
                  access_log=AccessLog(io.StringIO(), True))  # fmt: skip


@pytest.mark.parametrize(
    ("host", "port", "server_name", "sent"),
    [
        ("203.0.113.7", 443, "api.d1-stg.example", b"api.d1-stg.example"),
        ("203.0.113.7", 8443, "api.d1-stg.example", b"api.d1-stg.example:8443"),
        ("2001:db8::7", 443, "api.d1-stg.example", b"api.d1-stg.example"),
        ("203.0.113.7", 443, None, b"203.0.113.7"),  # no name to send
        ("api.internal", 443, "api.d1-stg.example", b"api.internal"),  # a name upstream: kept
    ],
)
def test_host_is_server_name_when_upstream_is_an_address(
    host: str, port: int, server_name: str | None, sent: bytes
) -> None:
    _, out = prepare(route(host, port, server_name), head(b"/v1/cards", (b"Host", b"app")))
    assert values(out, b"host") == [sent]
