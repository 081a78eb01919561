"""OAuth 2.0 toward the partner: D1's bearer token for egress routes.

D1 wants an RFC 7523 JWT-bearer grant (an ES256 assertion signed with a P-256 key whose
public half Thales registered) and then ``Authorization: Bearer <token>`` on every call. A
``TokenSource`` per route caches the token, shares one fetch among concurrent callers and
refreshes ahead of expiry, so a request only waits when there is no usable token at all. When
the token endpoint fails, its own error fields (RFC 6749 ``error``/``error_description`` or
D1's ``errorCode``/``errorMessage``) reach the log and the app's 502, and the source retries
soon: 1 s doubling to 30 s, and at once when a request needs a token and the last try is 1 s old.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from random import Random
from typing import Any, Literal, Protocol, TypedDict, cast

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer  # type: ignore[import-untyped]

from proxy.oauth.hsm import TokenKey, encode_jwt
from proxy.telemetry.metrics import Metrics
from proxy.tls.contexts import PeerRejected

__all__ = [
    "CORRELATION_ID",
    "JWT_BEARER_GRANT",
    "AgentFetcher",
    "Fetch",
    "OAuthSettings",
    "Token",
    "TokenError",
    "TokenSource",
    "TokenState",
    "authorization_value",
    "build_token_request",
    "endpoint_error",
    "load_signing_key",
    "make_assertion",
    "new_correlation_id",
    "new_jti",
    "parse_token_response",
]

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CORRELATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ASSERTION_LIFETIME = 900.0  # D1: exp at most 15 minutes ahead
# RFC 6749 makes expires_in optional; without it, assume a short life and let a 401 correct us.
DEFAULT_EXPIRES_IN = 300.0
MAX_EXPIRES_IN = 86_400.0
MAX_TOKEN_RESPONSE = 64 * 1024

# RFC 6750 b64token: the only characters that may follow "Bearer " in a header.
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# Long base64-like runs in an endpoint's error text could be an echoed token or assertion;
# a single-case run without digits is a long identifier (ERR_ASSERTION_...), kept readable.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9._~+/=-]{32,}")
_IDENTIFIER = re.compile(r"[A-Z_.-]+|[a-z_.-]+")
# How much of the endpoint's error fields reaches a log line or a 502 detail.
MAX_ERROR_CODE = 64
MAX_ERROR_TEXT = 200

Fetch = Callable[[bytes, dict[str, str]], "Deferred[tuple[int, bytes]]"]


# zope interfaces are opaque to mypy without its plugin: these spell out what is called.
class _Timer(Protocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...
    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> _Timer: ...


class _Writable(Protocol):
    def write(self, data: bytes) -> None: ...


# --------------------------------------------------------------------------- egress settings


def _is_p256(_: object, attribute: attrs.Attribute[Any], key: object) -> None:
    if isinstance(key, TokenKey):  # checked P-256 when it was opened
        return
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"{attribute.name}: ES256 needs an EC P-256 private key, got {type(key).__name__}"
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{attribute.name}: ES256 needs curve P-256, got {key.curve.name}")


def _non_empty(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{attribute.name}: must be non-empty, without spaces or controls")


def _https_url(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"{attribute.name}: {value!r} is not an https:// URL")


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name}: must be a positive number of seconds, got {value}")


def _lifetime(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (1 <= value <= MAX_ASSERTION_LIFETIME):
        raise ValueError(
            f"{attribute.name}: {value} s; D1 accepts an assertion exp at most "
            f"{MAX_ASSERTION_LIFETIME:.0f} s after iat"
        )


@attrs.frozen
class OAuthSettings:
    """How one egress route obtains its bearer token."""

    token_url: str = attrs.field(validator=_https_url)
    issuer: str = attrs.field(validator=_non_empty)  # JWT iss (and sub) = merchantGatewayId
    signing_key: ec.EllipticCurvePrivateKey | TokenKey = attrs.field(validator=_is_p256, repr=False)
    key_id: str = attrs.field(validator=_non_empty)  # JWT header kid
    audience: str | None = None  # aud is not published for D1 eCom: sent only when configured
    # RFC 7523 form encoding by default (as the config file); D1 eCom documents JSON.
    body: Literal["form", "json"] = attrs.field(
        default="form", validator=attrs.validators.in_(("form", "json"))
    )
    assertion_lifetime: float = attrs.field(default=300.0, validator=_lifetime)
    # Refresh when refresh_fraction (+- refresh_jitter) of expires_in has elapsed, and never
    # later than refresh_min_margin seconds before expiry.
    refresh_fraction: float = 0.8
    refresh_jitter: float = 0.05
    refresh_min_margin: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    # A token is handed out until this many seconds (at most a quarter of its life) before
    # expiry: it is put on the wire only after DNS and the upstream connect (5 s each by
    # default), and must still be valid when it arrives.
    expiry_skew: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    # After a failed fetch the next one follows retry_initial later, doubling up to retry_max,
    # each delay shortened by up to backoff_jitter so that many sidecars do not call in step.
    retry_initial: float = attrs.field(default=1.0, validator=_positive)
    retry_max: float = attrs.field(default=30.0, validator=_positive)
    backoff_jitter: float = attrs.field(
        default=0.2, validator=[attrs.validators.ge(0), attrs.validators.lt(1)]
    )
    # A request that finds no usable token fetches at once when the last fetch ended at least
    # this long ago, so a fixed endpoint heals the route at the next request, not the next retry.
    on_demand_interval: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    request_timeout: float = attrs.field(default=10.0, validator=_positive)
    # A 401 from the upstream discards the token only when it is at least this old, so a
    # partner that refuses every token cannot drive one token fetch per request.
    invalidate_min_age: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    # "replace": the sidecar's token wins; "keep": an app's own Authorization header is kept.
    authorization_mode: Literal["replace", "keep"] = attrs.field(
        default="replace", validator=attrs.validators.in_(("replace", "keep"))
    )

    def __attrs_post_init__(self) -> None:
        low = self.refresh_fraction - self.refresh_jitter
        high = self.refresh_fraction + self.refresh_jitter
        if not (self.refresh_jitter >= 0 and low > 0 and high < 1):
            raise ValueError(
                "refresh_fraction +- refresh_jitter must stay inside (0, 1), "
                f"got {self.refresh_fraction} +- {self.refresh_jitter}"
            )
        if self.retry_max < self.retry_initial:
            raise ValueError(
                f"retry_max ({self.retry_max}) is below retry_initial ({self.retry_initial})"
            )


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM private key for ES256; errors name the file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the signing key: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise ValueError(f"{path}: {kind}; D1 requires an ES256 (P-256) key")
    return key


# --------------------------------------------------------------------------- wire pieces


def new_jti() -> str:
    """128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def new_correlation_id() -> str:
    """Random, so it never carries data about anyone (D1 logs it in clear)."""
    return secrets.token_urlsafe(16)


def make_assertion(settings: OAuthSettings, now: float, jti: str) -> str:
    """The RFC 7523 client assertion, ES256-signed.

    ``sub`` = ``iss``: RFC 7523 section 3 requires a subject, D1 publishes only ``iss``; the
    gateway asks for a token on its own behalf.
    """
    if not jti:
        raise ValueError("jti must not be empty")
    iat = int(now)
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "sub": settings.issuer,
        "iat": iat,
        "exp": iat + int(settings.assertion_lifetime),
        "jti": jti,
    }
    if settings.audience is not None:
        claims["aud"] = settings.audience
    return encode_jwt(claims, settings.signing_key, {"kid": settings.key_id, "typ": "JWT"})


def build_token_request(
    settings: OAuthSettings, assertion: str, correlation_id: str
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of the token POST, encoded as ``settings.body`` says."""
    if not CORRELATION_ID.fullmatch(correlation_id):
        raise ValueError("correlation id must match ^[A-Za-z0-9_-]{1,64}$")
    if settings.body == "form":
        body = urllib.parse.urlencode(
            [("grant_type", JWT_BEARER_GRANT), ("assertion", assertion)]
        ).encode("ascii")
        content_type = "application/x-www-form-urlencoded"
    else:
        body = json.dumps(
            {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}, separators=(",", ":")
        ).encode("ascii")
        content_type = "application/json"
    headers = {
        "content-type": content_type,
        "accept": "application/json",
        "x-correlation-id": correlation_id,
    }
    return body, headers


def authorization_value(token: str) -> bytes:
    """The Authorization header value for a token from ``TokenSource.token``."""
    return b"Bearer " + token.encode("ascii")


@attrs.frozen
class Token:
    value: str = attrs.field(repr=False)
    expires_at: float


class TokenError(Exception):
    """No token: ``detail`` says what the endpoint answered, never a token or an assertion."""

    code = "oauth_token_unavailable"

    def __init__(self, detail: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.retryable = retryable

    def __str__(self) -> str:
        return self.detail


def _redact(match: re.Match[str]) -> str:
    run = match.group()
    return run if _IDENTIFIER.fullmatch(run) else "[redacted]"


def printable(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` fit for a log line: secret-looking runs redacted, printable ASCII, cut."""
    text = _SECRET_LIKE.sub(_redact, text)
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _first_field(doc: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = doc.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            value = str(value)  # some APIs send a numeric error code
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def endpoint_error(doc: Mapping[str, Any]) -> str:
    """The endpoint's own account of a refusal, as ``": code (text)"``; empty when it gave none.

    RFC 6749 section 5.2 names the fields ``error``/``error_description``; D1's APIs answer
    ``errorCode``/``errorMessage``. They are meant for the client's operator, but are cut and
    passed through ``printable`` all the same.
    """
    code = _first_field(doc, "error", "errorCode")
    text = _first_field(doc, "error_description", "errorMessage")
    out = f": {printable(code, MAX_ERROR_CODE)}" if code is not None else ""
    if text is not None:
        out += f" ({printable(text, MAX_ERROR_TEXT)})"
    return out


def _retryable(status: int) -> bool:
    # 4xx means our request is wrong (D1: 400 is not retryable); 408 and 429 are about timing.
    return not (400 <= status < 500) or status in (408, 429)


def parse_token_response(
    status: int, body: bytes, now: float, *, endpoint: str = "token endpoint"
) -> Token:
    """The token in a token endpoint's answer; ``now`` is when the request was sent."""
    doc = _json_object(body)
    if status != 200:
        detail = f"{endpoint} answered HTTP {status}"
        if doc is None:
            detail += f" with a non-JSON body ({len(body)} bytes)"
        else:
            detail += endpoint_error(doc) or " with no error fields in its JSON body"
        raise TokenError(detail, status=status, retryable=_retryable(status))
    if doc is None:
        raise TokenError(f"{endpoint} answered HTTP 200 with a body that is not a JSON object")
    value = doc.get("access_token")
    if not isinstance(value, str) or not _B64TOKEN.fullmatch(value):
        raise TokenError(f"{endpoint} answered HTTP 200 without a usable access_token")
    token_type = doc.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(
            f"{endpoint} answered token_type {printable(str(token_type), 32)!r}; "
            "only Bearer is used",
            retryable=False,
        )
    expires_in = doc.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)  # a common deviation: a number sent as a string
    if (
        isinstance(expires_in, bool)
        or not isinstance(expires_in, int | float)
        or not math.isfinite(expires_in)
        or expires_in <= 0
    ):
        raise TokenError(f"{endpoint} answered HTTP 200 with an unusable expires_in")
    return Token(value, now + min(float(expires_in), MAX_EXPIRES_IN))


# --------------------------------------------------------------------------- token source


class TokenState(TypedDict):
    """A route's token as a status page shows it: never the token itself."""

    valid_until: float | None  # unix time until which the token is sent; None: no usable token
    last_fetch: float | None  # unix time the last fetch ended, well or not; None: none yet
    last_error: str | None  # why the last fetch failed; None when it succeeded


class TokenSource:
    """The bearer token of one egress route: cached, fetched once at a time, refreshed ahead.

    ``token()`` answers at once while a usable token is cached (the steady state); otherwise all
    callers share one fetch. After a failed fetch, whatever the failure, the next one follows in
    the background ``retry_initial`` later, doubling up to ``retry_max``, with jitter. A caller
    finding no usable token starts a fetch at once if the last one ended at least
    ``on_demand_interval`` ago, and otherwise gets the last ``TokenError`` at once. A failed
    refresh keeps serving the old token until it is too close to expiry to be sent.
    ``reset_backoff()`` forgets the failures (a reload calls it).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        settings: OAuthSettings,
        fetch: Fetch,
        metrics: Metrics | None = None,
        route: str = "",
        random: Random | None = None,
    ) -> None:
        self._reactor_time = clock
        self._clock = cast(Clock, clock)
        self._settings = settings
        self._fetch = fetch
        self._metrics = metrics
        self._route = route
        self._random = random if random is not None else Random()
        self._endpoint = f"token endpoint {settings.token_url}"
        self._current: Token | None = None
        self._obtained_at = 0.0
        self._usable_until = -math.inf
        self._refresh_at = math.inf
        self._inflight: Deferred[Any] | None = None
        self._waiters: list[Deferred[str]] = []
        self._timer: _Timer | None = None
        self._failures = 0
        self._last_error: TokenError | None = None
        self._last_fetch: float | None = None
        self._not_before = -math.inf  # the next background attempt after a failure
        self._on_demand_from = -math.inf  # a caller without a token may fetch from then on
        self._stopped = False

    # public face

    def start(self) -> None:
        """Fetch a token now so the first request need not wait; a failure is only logged."""
        self._stopped = False
        if self._metrics is not None:
            self._metrics.oauth_token_expiry.labels(self._route).set_function(self._seconds_left)
            self._metrics.oauth_token_fetches.labels(self._route)  # exported at 0 from start
            self._metrics.oauth_token_failures.labels(self._route)
        if self._inflight is None and not self._usable(self._clock.seconds()):
            self._start_fetch()

    def stop(self) -> None:
        """Cancel the timer and any fetch in progress; later ``token()`` calls fail."""
        self._stopped = True
        self._cancel_timer()
        if self._inflight is not None:
            self._inflight.cancel()

    def token(self) -> Deferred[str]:
        if self._stopped:
            return fail(TokenError(f"{self._endpoint}: the route is stopping"))
        now = self._clock.seconds()
        current = self._current
        if current is not None and self._usable(now):
            if now >= self._refresh_at and self._inflight is None and now >= self._not_before:
                self._start_fetch()  # refresh ahead; this caller keeps the current token
            return succeed(current.value)
        if self._inflight is None:
            if self._last_error is not None and now < self._on_demand_from:
                return fail(self._last_error)
            self._start_fetch()
            if self._inflight is None:  # the fetch answered synchronously
                if self._current is not None and self._usable(self._clock.seconds()):
                    return succeed(self._current.value)
                return fail(self._last_error or TokenError(f"{self._endpoint}: no usable token"))
        waiter: Deferred[str] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def invalidate(self, value: str) -> None:
        """The upstream refused ``value`` (401): stop using it, once, and fetch another."""
        current = self._current
        if current is None or current.value != value:
            return  # an older token, or already invalidated
        now = self._clock.seconds()
        if now - self._obtained_at < self._settings.invalidate_min_age:
            return
        self.log.info(
            "route {route}: the upstream refused the OAuth token; fetching another",
            route=self._route,
        )
        self._current = None
        self._usable_until = -math.inf
        self._refresh_at = math.inf
        self._cancel_timer()
        if not self._stopped and self._inflight is None and now >= self._not_before:
            self._start_fetch()

    def reset_backoff(self) -> None:
        """Forget past failures, as after a reload that may have fixed their cause.

        The backoff starts again from ``retry_initial``, the next caller may fetch at once, and
        a route whose last fetch failed fetches now rather than at its next retry.
        """
        self._failures = 0
        self._not_before = -math.inf
        self._on_demand_from = -math.inf
        if self._stopped or self._inflight is not None or self._last_error is None:
            return
        self.log.info("route {route}: OAuth backoff reset; fetching a token now", route=self._route)
        self._start_fetch()

    def state(self) -> TokenState:
        """Validity and the last fetch's outcome, for a status page; never the token."""
        now = self._clock.seconds()
        return {
            "valid_until": self._usable_until if self._usable(now) else None,
            "last_fetch": self._last_fetch,
            "last_error": self._last_error.detail if self._last_error is not None else None,
        }

    # internals

    def _usable(self, now: float) -> bool:
        return self._current is not None and now < self._usable_until

    def _seconds_left(self) -> float:
        if self._current is None:
            return 0.0
        return max(0.0, self._current.expires_at - self._clock.seconds())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = self._clock.callLater(max(0.0, delay), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._stopped and self._inflight is None:
            self._start_fetch()

    def _start_fetch(self) -> None:
        self._cancel_timer()
        started = self._clock.seconds()
        correlation_id = new_correlation_id()
        try:
            assertion = make_assertion(self._settings, started, new_jti())
        except Exception as e:  # a key PyJWT cannot use: report it like any failed fetch
            self._give_up(
                TokenError(f"{self._endpoint}: cannot sign the assertion: {type(e).__name__}")
            )
            return
        body, headers = build_token_request(self._settings, assertion, correlation_id)
        if self._metrics is not None:
            self._metrics.oauth_token_fetches.labels(self._route).inc()
        d = maybeDeferred(self._fetch, body, headers)
        self._inflight = d  # set before callbacks: the fetch may already have an answer
        d.addTimeout(self._settings.request_timeout, self._reactor_time)
        d.addCallback(self._parse, started)
        d.addCallbacks(
            self._fetched,
            self._failed,
            callbackArgs=(started, correlation_id),
            errbackArgs=(assertion, correlation_id),
        )

    def _parse(self, answer: tuple[int, bytes], started: float) -> Token:
        status, body = answer
        return parse_token_response(status, body, started, endpoint=self._endpoint)

    def _fetched(self, token: Token, started: float, correlation_id: str) -> None:
        self._inflight = None
        now = self._clock.seconds()
        expires_in = token.expires_at - started
        s = self._settings
        usable_until = token.expires_at - min(s.expiry_skew, expires_in / 4)
        if now >= usable_until:  # a slow answer with a short life: it could arrive expired
            self._give_up(
                TokenError(
                    f"{self._endpoint} answered a token valid for {expires_in:g} s "
                    f"after {now - started:.1f} s, too late to be used"
                ),
                correlation_id,
            )
            return
        self._current = token
        self._obtained_at = started
        self._usable_until = usable_until
        spread = self._random.uniform(-s.refresh_jitter, s.refresh_jitter)
        target = started + expires_in * (s.refresh_fraction + spread)
        latest = token.expires_at - s.refresh_min_margin
        self._refresh_at = max(started + expires_in / 2, min(target, latest))
        self._failures = 0
        self._last_error = None
        self._last_fetch = now
        self._not_before = -math.inf
        self._on_demand_from = now + s.on_demand_interval
        self.log.info(
            "route {route}: OAuth token obtained, expires in {expires_in:.0f} s, "
            "refresh in {refresh_in:.0f} s (x-correlation-id {correlation_id})",
            route=self._route,
            expires_in=expires_in,
            refresh_in=self._refresh_at - started,
            correlation_id=correlation_id,
        )
        if not self._stopped:
            self._schedule(self._refresh_at - now)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a caller may have given up (cancelled)
                waiter.callback(token.value)

    def _failed(self, failure: Failure, assertion: str, correlation_id: str) -> None:
        self._inflight = None
        error = self._as_token_error(failure.value)
        if assertion and assertion in error.detail:
            error = TokenError(
                error.detail.replace(assertion, "[redacted]"),
                status=error.status,
                retryable=error.retryable,
            )
        self._give_up(error, correlation_id)

    def _give_up(self, error: TokenError, correlation_id: str | None = None) -> None:
        if self._endpoint not in error.detail:  # name the endpoint once, in every message
            error = TokenError(
                f"{self._endpoint}: {error.detail}", status=error.status, retryable=error.retryable
            )
        now = self._clock.seconds()
        self._failures += 1
        if self._metrics is not None:
            self._metrics.oauth_token_failures.labels(self._route).inc()
        s = self._settings
        # Every failure backs off alike: a 4xx (D1: not retryable as such) is often fixed by
        # the operator within seconds, and at 30 s the endpoint sees two calls a minute.
        base = min(s.retry_max, s.retry_initial * 2.0 ** min(self._failures - 1, 30))
        delay = base * self._random.uniform(1.0 - s.backoff_jitter, 1.0)
        self._not_before = now + delay
        self._on_demand_from = now + s.on_demand_interval
        self._last_error = error
        self._last_fetch = now
        if self._stopped:
            next_attempt = "the route is stopping"
        else:
            self._schedule(delay)
            next_attempt = f"next attempt in {delay:.1f} s"
            if self._usable(now):
                next_attempt += "; the current token stays in use until it nears expiry"
            elif delay > s.on_demand_interval:
                next_attempt += f", or at a request after {s.on_demand_interval:g} s"
        self.log.warn(
            "route {route}: OAuth token fetch failed: {detail}; failure {failures} in a row, "
            "{next_attempt}{correlation}",
            route=self._route,
            detail=error.detail,
            failures=self._failures,
            next_attempt=next_attempt,
            correlation=f" (x-correlation-id {correlation_id})" if correlation_id else "",
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(error)

    def _as_token_error(self, e: BaseException | None) -> TokenError:
        if isinstance(e, TokenError):
            return e
        rejected = _rejection(e)
        if rejected is not None:  # our TLS check refused the server: the request never left
            return TokenError(
                # our own words (names and a file path), not the endpoint's: nothing to redact
                f"{self._endpoint}: TLS check failed, no request sent: {rejected.detail}"
            )
        if isinstance(e, TimeoutError):
            reason = f"no answer within {self._settings.request_timeout:g} s"
        elif isinstance(e, CancelledError):
            reason = "cancelled" if not self._stopped else "the route is stopping"
        else:
            reason = _describe(e)
        return TokenError(f"{self._endpoint} unreachable: {printable(reason, 300)}")


def _rejection(e: BaseException | None) -> PeerRejected | None:
    """The TLS check that refused the token server, wherever Agent wrapped it."""
    if isinstance(e, PeerRejected):
        return e
    for reason in getattr(e, "reasons", None) or ():  # Agent's ResponseFailed and kin
        if isinstance(reason, Failure) and isinstance(reason.value, BaseException):
            found = _rejection(reason.value)
            if found is not None:
                return found
    return None


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "unknown failure"
    if isinstance(e, ResponseFailed) and e.reasons:
        return "; ".join(_describe(f.value) for f in e.reasons)
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- fetch over Agent


@implementer(IBodyProducer)
class _BytesProducer:
    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: _Writable) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _CappedBody(TwistedProtocol):
    """readBody with a ceiling: past ``cap`` bytes the connection is aborted."""

    def __init__(self, cap: int, expected: int | None) -> None:
        self.cap = cap
        self.expected = expected
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def _too_large(self) -> None:
        if not self.done.called:
            self.done.errback(TokenError(f"answer exceeds {self.cap} bytes; connection aborted"))
        self._abort()

    def connectionMade(self) -> None:
        if self.expected is not None and self.expected > self.cap:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.cap:
            self._too_large()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


class AgentFetcher:
    """The ``fetch`` of a ``TokenSource`` over ``twisted.web.client.Agent``.

    ``policy`` is the route's mutual-TLS client policy. Connections are not kept: token calls
    are rare and each one asks DNS again.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        policy: IPolicyForHTTPS,
        *,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        max_body: int = MAX_TOKEN_RESPONSE,
        endpoints: IAgentEndpointFactory | None = None,
    ) -> None:
        self._reactor_time: IReactorTime = reactor
        self._url = url.encode("ascii")
        self._timeout = timeout
        self._max_body = max_body
        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        if endpoints is not None:  # e.g. through a forward proxy
            using = Agent.usingEndpointFactory
            self._agent = using(reactor, endpoints, pool=pool)  # type: ignore[no-untyped-call]
            return
        self._agent = Agent(  # type: ignore[no-untyped-call]
            reactor,
            contextFactory=policy,
            connectTimeout=connect_timeout if connect_timeout is not None else timeout,
            pool=pool,
        )

    def __call__(self, body: bytes, headers: Mapping[str, str]) -> Deferred[tuple[int, bytes]]:
        raw = Headers({k.encode("ascii"): [v.encode("ascii")] for k, v in headers.items()})
        producer = cast(IBodyProducer, _BytesProducer(body))
        d: Deferred[IResponse] = self._agent.request(b"POST", self._url, raw, producer)
        answer = d.addCallback(self._read)
        answer.addTimeout(self._timeout, self._reactor_time)
        return answer

    def _read(self, response: IResponse) -> Deferred[tuple[int, bytes]]:
        length = response.length
        reader = _CappedBody(self._max_body, None if length is UNKNOWN_LENGTH else int(length))
        cast(Any, response).deliverBody(reader)
        code: int = response.code
        return reader.done.addCallback(lambda body: (code, body))
