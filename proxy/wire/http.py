"""HTTP/1.1 framing shared by both directions: heads, hop-by-hop rules, JSON errors.

Parsing itself is httptools (llhttp), which already refuses obs-fold, NUL/CR in values, bad
header names, duplicate Content-Length and Content-Length with Transfer-Encoding. This module adds
what a proxy needs on top and re-frames every message it forwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus

import attrs

# name (lower-case) -> original-case name and value, in arrival order
Header = tuple[bytes, bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",  # re-framed by us, never passed through
    }
)

# Methods whose request has no body unless framed; CONNECT is refused (never a tunnel).
REFUSED_METHODS = frozenset({b"CONNECT"})


@attrs.define(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: list[Header]
    content_length: int | None  # None: no Content-Length
    chunked: bool
    keep_alive: bool
    listed: frozenset[bytes] = frozenset()  # header names listed in Connection: hop-by-hop
    te: bytes | None = None  # the Transfer-Encoding value, when present
    expect: bool = False  # an Expect header was sent

    def get(self, lname: bytes) -> bytes | None:
        for name, _orig, value in self.headers:
            if name == lname:
                return value
        return None


@attrs.frozen
class ProxyError(Exception):
    """An error the sidecar answers itself, as JSON."""

    status: int
    code: str
    detail: str
    fields: tuple[tuple[str, str], ...] = ()  # more members of the JSON body (e.g. not_after)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"


def error_body(err: ProxyError, route: str) -> bytes:
    return json.dumps(
        {"error": err.code, "detail": err.detail, "route": route, **dict(err.fields)},
        ensure_ascii=True,
    ).encode()


def response(
    status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, *, keep_alive: bool
) -> bytes:
    """A whole response the sidecar answers itself, framed by Content-Length."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"Content-Length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)


def error_response(
    err: ProxyError, route: str, *, keep_alive: bool, extra: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    headers = [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"), *extra]
    return response(err.status, headers, error_body(err, route), keep_alive=keep_alive)


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


_TOKENS: dict[bytes, frozenset[bytes]] = {}  # a few Connection values, seen on every message


def tokens_of(value: bytes) -> frozenset[bytes]:
    """The names a Connection header lists."""
    tokens = _TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
        if len(value) <= 64 and len(_TOKENS) < 64:  # bounded, whatever peers send
            _TOKENS[value] = tokens
    return tokens


def connection_tokens(headers: list[Header]) -> frozenset[bytes]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    tokens: frozenset[bytes] = frozenset()
    for name, _orig, value in headers:
        if name == b"connection":
            tokens |= tokens_of(value)
    return tokens


def check_request_framing(head: RequestHead) -> None:
    """What llhttp lets through but a proxy must refuse (request smuggling, tunnels)."""
    te = head.te
    if te is not None:
        if head.version != b"1.1":
            raise ProxyError(400, "bad_request", "Transfer-Encoding is not allowed in HTTP/1.0")
        if te.strip().lower() != b"chunked":
            raise ProxyError(400, "bad_request", "only 'Transfer-Encoding: chunked' is accepted")
    if head.method in REFUSED_METHODS:
        raise ProxyError(405, "method_not_allowed", "CONNECT is not supported: not a tunnel")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
