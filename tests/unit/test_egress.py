"""proxy.routes.egress.Egress.prepare: what the partner sees of an app's request head."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from proxy.config import EgressOAuth, EgressRoute, Listen, Upstream
from proxy.routes.egress import Egress
from proxy.telemetry.logs import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.wire.http import ProxyError, RequestHead, connection_tokens

CORRELATION_PATTERN = re.compile(rb"^[A-Za-z0-9_-]{1,64}$")
D1 = Upstream("https", "api.d1-stg.example", 443, "")


def egress(
    upstream: Upstream = D1,
    oauth: EgressOAuth | None = None,
) -> Egress:
    config = EgressRoute(
        name="d1-ppr",
        listen=Listen("tcp", host="127.0.0.1", port=8080),
        upstream=upstream,
        client_cert=Path("/unused/client.pem"),
        client_key=Path("/unused/client.key"),
        trust=None,
        oauth=oauth,
    )
    pool: Any = object()  # prepare never reaches the pool
    return Egress(
        config,
        clock=Clock(),
        pool=pool,
        metrics=Metrics.create(),
        access_log=AccessLog(io.StringIO(), True),
    )


def oauth(authorization: str) -> EgressOAuth:
    return EgressOAuth(
        token_url="https://api.d1-stg.example/token",
        issuer="MGW_000001",
        signing_key=Path("/unused/oauth.key"),
        key_id="kid",
        authorization=authorization,
    )


def head(target: bytes = b"/v1/cards", *headers: tuple[bytes, bytes]) -> RequestHead:
    """A head as the downstream parser builds it (Connection tokens collected once)."""
    fields = [(name.lower(), name, value) for name, value in headers]
    return RequestHead(
        method=b"POST",
        target=target,
        version=b"1.1",
        headers=fields,
        content_length=None,
        chunked=False,
        keep_alive=True,
        listed=connection_tokens(fields),
    )


def prepare(route: Egress, h: RequestHead) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    down: Any = None  # Egress.prepare does not look at the connection
    return route.prepare(h, down)


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


def values(headers: list[tuple[bytes, bytes]], lname: bytes) -> list[bytes]:
    return [value for name, value in headers if name.lower() == lname]


def refused(route: Egress, target: bytes) -> ProxyError:
    with pytest.raises(ProxyError) as e:
        prepare(route, head(target, (b"Host", b"whatever")))
    return e.value


# --------------------------------------------------------------------------- Host and path
def test_host_is_rewritten_to_the_upstream_host() -> None:
    _, out = prepare(egress(), head(b"/v1/cards", (b"Host", b"127.0.0.1:8080")))
    assert values(out, b"host") == [b"api.d1-stg.example"]


def test_host_carries_a_non_default_upstream_port() -> None:
    route = egress(Upstream("https", "api.d1-stg.example", 8443, ""))
    _, out = prepare(route, head(b"/", (b"Host", b"localhost")))
    assert values(out, b"host") == [b"api.d1-stg.example:8443"]


def test_host_is_sent_even_when_the_app_sent_none() -> None:
    _, out = prepare(egress(), head(b"/"))
    assert values(out, b"host") == [b"api.d1-stg.example"]


def test_origin_form_target_is_forwarded_with_query() -> None:
    target, _ = prepare(egress(), head(b"/v1/cards?x=1&y=%20"))
    assert target == b"/v1/cards?x=1&y=%20"


def test_base_path_is_prefixed() -> None:
    route = egress(Upstream("https", "api.d1-stg.example", 443, "/d1/v2"))
    target, _ = prepare(route, head(b"/cards?id=7"))
    assert target == b"/d1/v2/cards?id=7"


# --------------------------------------------------------------------------- headers dropped
@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"TE",
        b"Trailer",
        b"Upgrade",
        b"Proxy-Authorization",
        b"Proxy-Connection",
        b"Transfer-Encoding",
        b"Content-Length",
    ],
)
def test_hop_by_hop_header_is_dropped(name: bytes) -> None:
    _, out = prepare(egress(), head(b"/", (name, b"x"), (b"Accept", b"application/json")))
    assert name.lower() not in names(out)
    assert values(out, b"accept") == [b"application/json"]


def test_headers_named_in_connection_are_dropped() -> None:
    h = head(
        b"/",
        (b"Connection", b"keep-alive, X-Session-Hint ,x-trace"),
        (b"X-Session-Hint", b"secret"),
        (b"X-TRACE", b"1"),
        (b"X-Kept", b"yes"),
    )
    _, out = prepare(egress(), h)
    assert b"x-session-hint" not in names(out)
    assert b"x-trace" not in names(out)
    assert b"connection" not in names(out)
    assert values(out, b"x-kept") == [b"yes"]


@pytest.mark.parametrize(
    "name",
    [
        b"X-Forwarded-For",
        b"X-Forwarded-Host",
        b"X-Forwarded-Proto",
        b"X-Forwarded-Port",
        b"Forwarded",
        b"X-Real-IP",
        b"Via",
        b"Expect",
    ],
)
def test_internal_header_is_never_sent_to_the_partner(name: bytes) -> None:
    _, out = prepare(egress(), head(b"/", (name, b"10.1.2.3")))
    assert name.lower() not in names(out)
    assert all(b"10.1.2.3" not in value for _, value in out)


def test_end_to_end_headers_keep_order_case_and_repeats() -> None:
    h = head(
        b"/",
        (b"Accept", b"a"),
        (b"X-Api-Key", b"k"),
        (b"Set-Thing", b"1"),
        (b"Set-Thing", b"2"),
        (b"x-correlation-id", b"abc"),
    )
    _, out = prepare(egress(), h)
    assert out == [
        (b"Host", b"api.d1-stg.example"),
        (b"Accept", b"a"),
        (b"X-Api-Key", b"k"),
        (b"Set-Thing", b"1"),
        (b"Set-Thing", b"2"),
        (b"x-correlation-id", b"abc"),
    ]


# --------------------------------------------------------------------------- correlation id
def test_correlation_id_is_added_when_missing_and_differs_each_time() -> None:
    route = egress()
    ids = []
    for _ in range(3):
        _, out = prepare(route, head(b"/"))
        (value,) = values(out, b"x-correlation-id")
        assert CORRELATION_PATTERN.match(value)
        ids.append(value)
    assert len(set(ids)) == 3


def test_correlation_id_from_the_app_is_kept() -> None:
    _, out = prepare(egress(), head(b"/", (b"X-Correlation-ID", b"app-chosen_42")))
    assert values(out, b"x-correlation-id") == [b"app-chosen_42"]


# --------------------------------------------------------------------------- absolute-form
@pytest.mark.parametrize(
    "target",
    [
        b"http://api.d1-stg.example/v1/cards?x=1",
        b"http://API.D1-STG.example/v1/cards?x=1",
        b"https://api.d1-stg.example/v1/cards?x=1",
        b"http://api.d1-stg.example:80/v1/cards?x=1",
        b"https://api.d1-stg.example:443/v1/cards?x=1",
        b"http://api.d1-stg.example:443/v1/cards?x=1",
    ],
)
def test_absolute_form_for_the_upstream_host_is_accepted(target: bytes) -> None:
    path, out = prepare(egress(), head(target, (b"Host", b"api.d1-stg.example")))
    assert path == b"/v1/cards?x=1"
    assert values(out, b"host") == [b"api.d1-stg.example"]


def test_absolute_form_on_the_upstream_port_is_accepted_and_base_prefixed() -> None:
    route = egress(Upstream("https", "api.d1-stg.example", 8443, "/base"))
    path, _ = prepare(route, head(b"http://api.d1-stg.example:8443/x"))
    assert path == b"/base/x"


def test_absolute_form_without_a_path_means_root() -> None:
    path, _ = prepare(egress(), head(b"http://api.d1-stg.example"))
    assert path == b"/"


@pytest.mark.parametrize(
    "target",
    [
        b"http://evil.example/v1/cards",
        b"http://api.d1-stg.example.evil.example/",
        b"http://api.d1-stg.example:8443/",
        b"https://api.d1-stg.example:80/",
        b"http://api.d1-stg.example@evil.example/",
        b"http://127.0.0.1/",
        b"http://d1-stg.example/",
    ],
)
def test_absolute_form_for_any_other_host_or_port_is_forbidden(target: bytes) -> None:
    err = refused(egress(), target)
    assert err.status == 403
    assert err.code == "forbidden_host"
    assert "not an open proxy" in err.detail


def test_asterisk_form_is_a_bad_request() -> None:
    err = refused(egress(), b"*")
    assert (err.status, err.code) == (400, "bad_request")


@pytest.mark.parametrize(
    "target", [b"ftp://api.d1-stg.example/", b"api.d1-stg.example:443", b"http:///x"]
)
def test_other_request_targets_are_bad_requests(target: bytes) -> None:
    err = refused(egress(), target)
    assert (err.status, err.code) == (400, "bad_request")


# --------------------------------------------------------------------------- Authorization
def test_authorization_is_dropped_when_oauth_replaces_it() -> None:
    route = egress(oauth=oauth("replace"))
    _, out = prepare(route, head(b"/", (b"Authorization", b"Bearer app"), (b"Accept", b"*/*")))
    assert b"authorization" not in names(out)
    assert values(out, b"accept") == [b"*/*"]


def test_authorization_is_kept_when_oauth_keeps_it() -> None:
    route = egress(oauth=oauth("keep"))
    _, out = prepare(route, head(b"/", (b"Authorization", b"Bearer app")))
    assert values(out, b"authorization") == [b"Bearer app"]


def test_authorization_is_kept_without_oauth() -> None:
    _, out = prepare(egress(), head(b"/", (b"Authorization", b"Basic dXNlcjpwdw==")))
    assert values(out, b"authorization") == [b"Basic dXNlcjpwdw=="]
