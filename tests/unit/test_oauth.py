"""OAuth: D1's JWT-bearer token for egress, and the client-credentials endpoint for ingress."""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import itertools
import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from random import Random
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from proxy.oauth.client import (
    JWT_BEARER_GRANT,
    AgentFetcher,
    OAuthSettings,
    Token,
    TokenError,
    TokenSource,
    authorization_value,
    build_token_request,
    load_signing_key,
    make_assertion,
    new_correlation_id,
    new_jti,
    parse_token_response,
)
from proxy.oauth.server import (
    TokenEndpointResource,
    TokenIssuer,
    TokenKeys,
    key_id,
    load_client_secrets,
)
from proxy.telemetry.metrics import Metrics
from tests import pkifactory

ROOT = Path(__file__).resolve().parents[2]
TOKEN_SERVER = ROOT / "tests" / "peers" / "token_server.py"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
URL = "https://127.0.0.1:4443/authz/v1/oauth2/token"
CID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def oauth_settings(**overrides: Any) -> OAuthSettings:
    values: dict[str, Any] = {
        "token_url": URL,
        "issuer": "MGW_000001",
        "signing_key": SIGNING_KEY,
        "key_id": "kid-ppr-1",
        "body": "form",
    }
    values.update(overrides)
    return OAuthSettings(**values)


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred already has; fails the test when it is still waiting."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has no result yet"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any]) -> Failure:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has no result yet"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    return box[0]


def token_answer(value: str, expires_in: float = 900) -> tuple[int, bytes]:
    doc = {"access_token": value, "token_type": "Bearer", "expires_in": expires_in}
    return 200, json.dumps(doc).encode()


class FakeFetch:
    """The token endpoint at the network edge: each call waits until the test answers it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[tuple[float, bytes, dict[str, str], Deferred[tuple[int, bytes]]]] = []
        self.auto: tuple[int, bytes] | None = None  # answer every call at once with this

    def __call__(self, body: bytes, headers: dict[str, str]) -> Deferred[tuple[int, bytes]]:
        d: Deferred[tuple[int, bytes]] = Deferred()
        self.calls.append((self.clock.seconds(), body, headers, d))
        if self.auto is not None:
            d.callback(self.auto)
        return d

    def answer(self, answer: tuple[int, bytes], index: int = -1) -> None:
        self.calls[index][3].callback(answer)

    def assertion(self, index: int = -1) -> str:
        form = dict(urllib.parse.parse_qsl(self.calls[index][1].decode()))
        return form["assertion"]

    @property
    def times(self) -> list[float]:
        return [c[0] for c in self.calls]


class FixedRandom(Random):
    """uniform(a, b) always answers the point at ``position`` of the way from a to b."""

    def __init__(self, position: float) -> None:
        super().__init__(0)
        self.position = position

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.position


def make_source(
    *,
    position: float = 0.5,
    metrics: Metrics | None = None,
    **overrides: Any,
) -> tuple[Clock, FakeFetch, TokenSource]:
    clock = Clock()
    fetch = FakeFetch(clock)
    source = TokenSource(
        clock,
        oauth_settings(**overrides),
        fetch,
        metrics=metrics,
        route="d1-ppr",
        random=FixedRandom(position),
    )
    return clock, fetch, source


def advance_to_next_call(clock: Clock) -> None:
    calls = clock.getDelayedCalls()
    assert calls, "nothing is scheduled"
    clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))


# --------------------------------------------------------------------------- settings


def test_settings_refuse_a_signing_key_that_is_not_p256() -> None:
    with pytest.raises(ValueError, match="P-256"):
        oauth_settings(signing_key=ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError, match="P-256"):
        oauth_settings(signing_key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


def test_settings_refuse_an_assertion_lifetime_beyond_d1s_15_minutes() -> None:
    assert oauth_settings(assertion_lifetime=900).assertion_lifetime == 900
    with pytest.raises(ValueError, match="900"):
        oauth_settings(assertion_lifetime=901)


def test_settings_refuse_a_token_url_that_is_not_https() -> None:
    with pytest.raises(ValueError, match="https"):
        oauth_settings(token_url="http://127.0.0.1/authz/v1/oauth2/token")


def test_settings_repr_does_not_show_the_key() -> None:
    assert "signing_key" not in repr(oauth_settings())


def test_load_signing_key_names_the_file_when_the_key_is_rsa(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "oauth.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match=r"oauth\.key.*P-256"):
        load_signing_key(path)


# --------------------------------------------------------------------------- assertion & body


def test_assertion_is_es256_with_kid_and_verifies_with_the_public_key() -> None:
    now = 1_700_000_000.7
    assertion = make_assertion(oauth_settings(), now, "jti-1")
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": "ES256", "kid": "kid-ppr-1", "typ": "JWT"}
    claims = jwt.decode(
        assertion,
        SIGNING_KEY.public_key(),
        algorithms=["ES256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "iss": "MGW_000001",
        "sub": "MGW_000001",
        "iat": 1_700_000_000,
        "exp": 1_700_000_300,
        "jti": "jti-1",
    }
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(assertion, other, algorithms=["ES256"], options={"verify_exp": False})


def test_assertion_exp_is_never_more_than_900_s_after_iat() -> None:
    settings = oauth_settings(assertion_lifetime=900)
    for now in (0.0, 0.999, 1_700_000_000.5):
        claims = jwt.decode(
            make_assertion(settings, now, "j"),
            SIGNING_KEY.public_key(),
            algorithms=["ES256"],
            options={"verify_exp": False, "verify_iat": False},
        )
        assert 0 < claims["exp"] - claims["iat"] <= 900


def test_assertion_carries_aud_only_when_configured() -> None:
    plain = jwt.decode(
        make_assertion(oauth_settings(), 0, "j"),
        options={"verify_signature": False},
    )
    assert "aud" not in plain
    with_aud = jwt.decode(
        make_assertion(oauth_settings(audience="https://d1.example/"), 0, "j"),
        options={"verify_signature": False},
    )
    assert with_aud["aud"] == "https://d1.example/"


def test_jti_is_128_random_bits_and_unique_across_fetches() -> None:
    assert len(base64.urlsafe_b64decode(new_jti() + "==")) == 16
    clock, fetch, source = make_source()
    fetch.auto = (503, b"{}")
    source.start()
    for _ in range(5):
        advance_to_next_call(clock)
    jtis = [
        jwt.decode(fetch.assertion(i), options={"verify_signature": False})["jti"]
        for i in range(len(fetch.calls))
    ]
    assert len(jtis) == 6
    assert len(set(jtis)) == len(jtis)


def test_form_body_is_exactly_the_rfc_7523_grant() -> None:
    body, headers = build_token_request(oauth_settings(body="form"), "h.p.s", "cid-1")
    assert body == (
        b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=h.p.s"
    )
    assert headers == {
        "content-type": "application/x-www-form-urlencoded",
        "accept": "application/json",
        "x-correlation-id": "cid-1",
    }


def test_json_body_is_exactly_the_rfc_7523_grant() -> None:
    body, headers = build_token_request(oauth_settings(body="json"), "h.p.s", "cid-1")
    assert body == (
        b'{"grant_type":"urn:ietf:params:oauth:grant-type:jwt-bearer","assertion":"h.p.s"}'
    )
    assert json.loads(body) == {"grant_type": JWT_BEARER_GRANT, "assertion": "h.p.s"}
    assert headers["content-type"] == "application/json"
    assert headers["accept"] == "application/json"


def test_correlation_ids_are_random_and_match_d1s_pattern() -> None:
    ids = {new_correlation_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(CID.fullmatch(i) for i in ids)
    with pytest.raises(ValueError):
        build_token_request(oauth_settings(), "h.p.s", "has space")
    with pytest.raises(ValueError):
        build_token_request(oauth_settings(), "h.p.s", "x" * 65)


def test_every_token_call_carries_a_fresh_correlation_id() -> None:
    clock, fetch, source = make_source()
    fetch.auto = (503, b"{}")
    source.start()
    advance_to_next_call(clock)
    ids = [c[2]["x-correlation-id"] for c in fetch.calls]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(CID.fullmatch(i) for i in ids)


# --------------------------------------------------------------------------- token response


def test_token_response_gives_the_token_and_its_expiry() -> None:
    assert parse_token_response(*token_answer("tok-1", 900), 100.0) == Token("tok-1", 1000.0)
    assert "tok-1" not in repr(Token("tok-1", 1.0))
    assert authorization_value("tok-1") == b"Bearer tok-1"


def test_400_names_status_and_error_but_never_the_assertion() -> None:
    assertion = make_assertion(oauth_settings(), 0, new_jti())
    answer = json.dumps(
        {"error": "invalid_grant", "error_description": f"bad assertion {assertion}"}
    ).encode()
    with pytest.raises(TokenError) as info:
        parse_token_response(400, answer, 0.0)
    text = str(info.value)
    assert "400" in text and "invalid_grant" in text
    assert assertion not in text
    assert assertion.split(".")[1] not in text
    assert info.value.status == 400
    assert info.value.retryable is False


def test_server_errors_are_retryable_and_non_json_bodies_are_not_echoed() -> None:
    with pytest.raises(TokenError) as info:
        parse_token_response(503, b"<html>secret-ish page</html>", 0.0)
    assert "503" in str(info.value) and "html" not in str(info.value)
    assert info.value.retryable is True


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"token_type": "Bearer", "expires_in": 900}',
        b'{"access_token": "a\\r\\nX-Injected: 1", "expires_in": 900}',
        b'{"access_token": "tok-secret", "token_type": "mac", "expires_in": 900}',
        b'{"access_token": "tok-secret", "expires_in": -1}',
        b'{"access_token": "tok-secret", "expires_in": true}',
    ],
)
def test_malformed_200_answers_are_token_errors_that_do_not_leak_the_token(body: bytes) -> None:
    with pytest.raises(TokenError) as info:
        parse_token_response(200, body, 0.0)
    assert "tok-secret" not in str(info.value)


def test_expires_in_may_be_missing_or_a_numeric_string() -> None:
    assert parse_token_response(200, b'{"access_token":"t"}', 0.0).expires_at == 300.0
    as_text = parse_token_response(200, b'{"access_token":"t","expires_in":"60"}', 0.0)
    assert as_text.expires_at == 60


@given(st.integers(min_value=100, max_value=599), st.binary(max_size=300))
def test_token_response_parsing_fails_only_with_token_error(status: int, body: bytes) -> None:
    with contextlib.suppress(TokenError):
        parse_token_response(status, body, 0.0)


# --------------------------------------------------------------------------- token source


def test_fifty_concurrent_callers_share_one_fetch() -> None:
    _, fetch, source = make_source()
    waiting = [source.token() for _ in range(50)]
    assert len(fetch.calls) == 1
    assert not any(d.called for d in waiting)
    fetch.answer(token_answer("tok-1"))
    assert [result_of(d) for d in waiting] == ["tok-1"] * 50
    assert result_of(source.token()) == "tok-1"
    assert len(fetch.calls) == 1


def test_start_fetches_eagerly_so_the_first_request_does_not_wait() -> None:
    _, fetch, source = make_source()
    source.start()
    assert len(fetch.calls) == 1
    fetch.answer(token_answer("tok-1"))
    assert result_of(source.token()) == "tok-1"


def test_start_failure_is_not_fatal() -> None:
    clock, fetch, source = make_source()
    fetch.auto = (503, b"{}")
    source.start()  # must not raise
    fetch.auto = token_answer("tok-1")
    advance_to_next_call(clock)
    assert result_of(source.token()) == "tok-1"


def test_refresh_happens_ahead_of_expiry_and_no_caller_waits_for_it() -> None:
    clock, fetch, source = make_source(position=0.5)
    source.start()
    fetch.answer(token_answer("tok-1", 900))
    clock.advance(719.9)
    assert len(fetch.calls) == 1
    clock.advance(0.1)  # 80% of 900 s
    assert len(fetch.calls) == 2
    during = source.token()
    assert result_of(during) == "tok-1"
    fetch.answer(token_answer("tok-2", 900))
    assert result_of(source.token()) == "tok-2"
    clock.advance(719.9)
    assert len(fetch.calls) == 2
    clock.advance(0.1)
    assert len(fetch.calls) == 3


def test_refresh_jitter_stays_within_five_percent() -> None:
    for position, expected in ((0.0, 675.0), (1.0, 765.0)):
        clock, fetch, source = make_source(position=position)
        source.start()
        fetch.answer(token_answer("tok-1", 900))
        clock.advance(expected - 0.01)
        assert len(fetch.calls) == 1
        clock.advance(0.02)
        assert len(fetch.calls) == 2


def test_refresh_is_never_later_than_30_s_before_expiry() -> None:
    clock, fetch, source = make_source(position=1.0)
    source.start()
    fetch.answer(token_answer("tok-1", 100))  # 85 s would be the plain 80% + 5%
    clock.advance(69.9)
    assert len(fetch.calls) == 1
    clock.advance(0.1)
    assert len(fetch.calls) == 2


def test_failed_refresh_keeps_serving_the_old_token_until_30_s_before_expiry() -> None:
    clock, fetch, source = make_source(position=0.5)
    source.start()
    fetch.answer(token_answer("tok-1", 900))
    fetch.auto = (503, b'{"error":"temporarily_unavailable"}')
    clock.advance(720)  # refresh starts and fails
    assert len(fetch.calls) == 2
    assert result_of(source.token()) == "tok-1"
    clock.pump([1] * 149 + [0.9])  # background retries keep failing; t = 869.9
    assert len(fetch.calls) > 3
    assert result_of(source.token()) == "tok-1"
    clock.advance(0.1)  # t = 870: too close to expiry to reach the upstream in time
    error = failure_of(source.token()).value
    assert isinstance(error, TokenError)
    assert "503" in str(error) and "temporarily_unavailable" in str(error)


def test_transient_failures_back_off_exponentially_up_to_30_s() -> None:
    clock, fetch, source = make_source(position=1.0)  # jitter factor 1.0: the full base
    fetch.auto = (503, b"{}")
    source.start()
    for _ in range(7):
        advance_to_next_call(clock)
    assert fetch.times == [0, 1, 3, 7, 15, 31, 61, 91]


def test_backoff_jitter_shortens_the_delay_by_at_most_20_percent() -> None:
    clock, fetch, source = make_source(position=0.0)
    fetch.auto = (503, b"{}")
    source.start()
    for _ in range(3):
        advance_to_next_call(clock)
    assert fetch.times == pytest.approx([0, 0.8, 2.4, 5.6])


def test_callers_during_backoff_fail_at_once_without_a_new_fetch() -> None:
    _, fetch, source = make_source()
    fetch.auto = (502, b'{"error":"server_error"}')
    source.start()
    error = failure_of(source.token()).value
    assert isinstance(error, TokenError) and "502" in str(error)
    assert len(fetch.calls) == 1


def test_a_400_is_retried_1_s_later_like_any_failure() -> None:
    clock, fetch, source = make_source(position=1.0)
    fetch.auto = (400, b'{"error":"invalid_grant","error_description":"kid unknown"}')
    source.start()
    failed = failure_of(source.token()).value
    assert isinstance(failed, TokenError)
    assert "400" in str(failed) and "invalid_grant" in str(failed)
    assert len(fetch.calls) == 1
    fetch.auto = token_answer("tok-1")  # the operator fixed the cause
    clock.advance(1)
    assert fetch.times == [0, 1]
    assert result_of(source.token()) == "tok-1"


def test_a_token_endpoint_that_never_answers_times_out() -> None:
    clock, fetch, source = make_source()
    waiting = source.token()
    clock.advance(10)
    error = failure_of(waiting).value
    assert isinstance(error, TokenError)
    assert "no answer within 10 s" in str(error)
    assert fetch.calls[0][3].called  # the fetch itself was cancelled


def test_a_fetch_that_raises_is_a_token_error() -> None:
    def broken(body: bytes, headers: dict[str, str]) -> Deferred[tuple[int, bytes]]:
        raise ConnectionRefusedError("refused")

    source = TokenSource(Clock(), oauth_settings(), broken, route="d1-ppr")
    error = failure_of(source.token()).value
    assert isinstance(error, TokenError)
    assert "unreachable" in str(error) and URL in str(error)


def test_invalidate_on_401_fetches_once_for_the_same_token() -> None:
    clock, fetch, source = make_source()
    source.start()
    fetch.answer(token_answer("tok-1"))
    clock.advance(10)
    source.invalidate("tok-1")
    source.invalidate("tok-1")
    assert len(fetch.calls) == 2
    waiting = source.token()
    assert not waiting.called
    fetch.answer(token_answer("tok-2"))
    assert result_of(waiting) == "tok-2"
    source.invalidate("tok-1")  # a late 401 for the old token changes nothing
    assert len(fetch.calls) == 2
    assert result_of(source.token()) == "tok-2"


def test_invalidate_ignores_a_token_obtained_moments_ago() -> None:
    clock, fetch, source = make_source()
    source.start()
    fetch.answer(token_answer("tok-1"))
    clock.advance(1)
    source.invalidate("tok-1")
    assert len(fetch.calls) == 1
    assert result_of(source.token()) == "tok-1"


def test_stop_cancels_the_fetch_and_every_timer() -> None:
    clock, _, source = make_source()
    source.start()
    waiting = source.token()
    source.stop()
    assert isinstance(failure_of(waiting).value, TokenError)
    assert clock.getDelayedCalls() == []
    assert isinstance(failure_of(source.token()).value, TokenError)


def test_metrics_count_fetches_failures_and_show_seconds_to_expiry() -> None:
    metrics = Metrics.create()
    clock, fetch, source = make_source(metrics=metrics)
    labels = {"route": "d1-ppr"}

    def sample(name: str) -> float | None:
        value: float | None = metrics.registry.get_sample_value(name, labels)
        return value

    source.start()
    fetch.answer((500, b"{}"))
    advance_to_next_call(clock)
    fetch.answer(token_answer("tok-1", 900))
    assert sample("mtls_sidecar_oauth_token_fetches_total") == 2
    assert sample("mtls_sidecar_oauth_token_failures_total") == 1
    assert sample("mtls_sidecar_oauth_token_expiry_seconds") == pytest.approx(900)
    clock.advance(100)
    assert sample("mtls_sidecar_oauth_token_expiry_seconds") == pytest.approx(800)


def test_nothing_logged_contains_the_token_or_the_assertion() -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock, fetch, source = make_source()
        source.start()
        assertion = fetch.assertion()
        echoed = {"error": "invalid_grant", "error_description": f"refused {assertion}"}
        fetch.answer((400, json.dumps(echoed).encode()))
        clock.advance(1)  # the retry
        fetch.answer(token_answer("tok-very-secret"))
        assert result_of(source.token()) == "tok-very-secret"
        assert "tok-very-secret" not in repr(source.state())
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) for e in events)
    assert "OAuth token obtained" in text and "refused [redacted]" in text
    assert "tok-very-secret" not in text and assertion not in text


# --------------------------------------------------------------------------- failures that heal


def test_after_failures_the_retries_follow_1_2_4_up_to_30_s_whatever_the_status() -> None:
    for status in (400, 503):
        clock, fetch, source = make_source(position=1.0)  # jitter factor 1.0: the full delay
        fetch.auto = (status, b'{"error":"invalid_grant"}')
        source.start()
        for _ in range(8):
            advance_to_next_call(clock)
        gaps = [b - a for a, b in itertools.pairwise(fetch.times)]
        assert gaps == [1, 2, 4, 8, 16, 30, 30, 30], status


def retry_gaps(random: Random, retries: int) -> list[float]:
    """The delays between the fetches of a source whose endpoint always answers 400."""
    clock = Clock()
    fetch = FakeFetch(clock)
    fetch.auto = (400, b'{"errorCode":"invalid_grant"}')
    TokenSource(clock, oauth_settings(), fetch, route="d1-ppr", random=random).start()
    for _ in range(retries):
        advance_to_next_call(clock)
    return [b - a for a, b in itertools.pairwise(fetch.times)]


def test_retry_jitter_keeps_each_delay_between_80_and_100_percent_of_its_step() -> None:
    steps = [1, 2, 4, 8, 16, 30, 30, 30]
    assert retry_gaps(FixedRandom(1.0), len(steps)) == steps
    assert retry_gaps(FixedRandom(0.0), len(steps)) == pytest.approx([0.8 * s for s in steps])
    for seed in range(20):
        gaps = retry_gaps(Random(seed), len(steps))
        for gap, step in zip(gaps, steps, strict=True):
            assert 0.8 * step - 1e-9 <= gap <= step + 1e-9, (seed, gaps)


def test_a_request_without_a_token_fetches_at_once_when_the_last_try_is_1_s_old() -> None:
    clock, fetch, source = make_source(position=1.0)
    fetch.auto = (400, b'{"errorCode":"E1","errorMessage":"kid unknown"}')
    source.start()
    for _ in range(4):
        advance_to_next_call(clock)  # t = 15: the next background retry is 16 s away
    assert fetch.times == [0, 1, 3, 7, 15]
    clock.advance(0.9)
    early = failure_of(source.token()).value  # the last try is 0.9 s old: no new fetch
    assert isinstance(early, TokenError) and "kid unknown" in str(early)
    assert len(fetch.calls) == 5
    clock.advance(0.1)
    fetch.auto = None  # the endpoint is fixed; its answer takes a moment
    waiting = [source.token() for _ in range(20)]  # concurrent requests share one fetch
    assert fetch.times == [0, 1, 3, 7, 15, 16]
    assert not any(d.called for d in waiting)
    fetch.answer(token_answer("tok-1"))
    assert [result_of(d) for d in waiting] == ["tok-1"] * 20
    assert len(fetch.calls) == 6


def test_on_demand_fetches_come_at_most_once_a_second_under_steady_traffic() -> None:
    clock, fetch, source = make_source(position=1.0)
    fetch.auto = (400, b'{"error":"invalid_grant"}')
    source.start()
    for _ in range(50):  # a request every 0.1 s for 5 s
        clock.advance(0.1)
        failure_of(source.token())
    gaps = [b - a for a, b in itertools.pairwise(fetch.times)]
    assert all(gap >= 1 - 1e-9 for gap in gaps)
    assert 4 <= len(fetch.calls) <= 6


def test_a_token_close_to_expiry_is_never_handed_out() -> None:
    clock, fetch, source = make_source(position=0.5)
    source.start()
    fetch.answer(token_answer("tok-1", 900))
    fetch.auto = (503, b"{}")  # every refresh fails
    handed: list[tuple[float, str]] = []
    while clock.seconds() < 1000:
        d = source.token()
        box: list[Any] = []
        d.addBoth(box.append)
        if box and isinstance(box[0], str):
            handed.append((clock.seconds(), box[0]))
        clock.advance(0.5)
    assert handed and all(value == "tok-1" for _, value in handed)
    assert max(t for t, _ in handed) < 900 - 30  # 30 s left for DNS and connect


def test_a_token_that_arrives_too_late_to_be_used_is_not_sent() -> None:
    clock, fetch, source = make_source()
    waiting = source.token()
    clock.advance(9)  # a slow endpoint ...
    fetch.answer(token_answer("tok-short", 8))  # ... answers a token already expired
    error = failure_of(waiting).value
    assert isinstance(error, TokenError) and "too late" in str(error)
    assert "tok-short" not in str(error)
    fetch.auto = token_answer("tok-2", 900)
    clock.advance(1)  # the retry
    assert result_of(source.token()) == "tok-2"


def test_short_lived_tokens_keep_a_quarter_of_their_life_as_margin() -> None:
    clock, fetch, source = make_source()
    source.start()
    fetch.answer(token_answer("tok-1", 4))
    fetch.auto = (503, b"{}")
    clock.advance(2.9)
    assert result_of(source.token()) == "tok-1"
    clock.advance(0.1)
    assert isinstance(failure_of(source.token()).value, TokenError)


def test_reset_backoff_starts_over_at_1_s_and_fetches_at_once() -> None:
    clock, fetch, source = make_source(position=1.0)
    fetch.auto = (400, b'{"error":"invalid_grant"}')
    source.start()
    for _ in range(6):
        advance_to_next_call(clock)
    assert fetch.times[-2:] == [31, 61]  # the backoff is at its 30 s cap
    clock.advance(0.2)
    source.reset_backoff()  # the operator fixed the key and reloaded
    assert fetch.times[-1] == pytest.approx(61.2)
    advance_to_next_call(clock)  # that try failed too: the next is 1 s later, not 30 s
    assert fetch.times[-1] == pytest.approx(62.2)
    fetch.auto = token_answer("tok-1")
    source.reset_backoff()
    assert result_of(source.token()) == "tok-1"  # fetched at the reset, not 1 s later
    assert fetch.times[-1] == pytest.approx(62.2)


def test_reset_backoff_leaves_a_healthy_route_alone() -> None:
    _, fetch, source = make_source()
    source.start()
    fetch.answer(token_answer("tok-1"))
    source.reset_backoff()
    assert len(fetch.calls) == 1
    assert result_of(source.token()) == "tok-1"


def test_state_shows_validity_last_fetch_and_last_error_never_the_token() -> None:
    clock, fetch, source = make_source()
    clock.advance(1_700_000_000)
    assert source.state() == {"valid_until": None, "last_fetch": None, "last_error": None}
    source.start()
    fetch.answer((400, b'{"errorCode":"E_KID","errorMessage":"kid unknown"}'))
    failed = source.state()
    assert failed["valid_until"] is None and failed["last_fetch"] == 1_700_000_000
    assert failed["last_error"] is not None and "E_KID (kid unknown)" in failed["last_error"]
    advance_to_next_call(clock)  # the retry
    clock.advance(0.25)  # the endpoint takes its time to answer
    fetch.answer(token_answer("tok-secret-value", 900))
    retried = fetch.times[-1]
    ok = source.state()
    assert ok == {
        "valid_until": retried + 900 - 30,  # the expiry as counted from the request, less 30 s
        "last_fetch": retried + 0.25,
        "last_error": None,
    }
    assert "tok-secret-value" not in repr(ok)


# --------------------------------------------------------------------------- the endpoint's words


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"error": "invalid_grant", "error_description": "kid unknown"},
            "answered HTTP 400: invalid_grant (kid unknown)",
        ),
        (
            {"errorCode": "INVALID_ASSERTION", "errorMessage": "signature does not verify"},
            "answered HTTP 400: INVALID_ASSERTION (signature does not verify)",
        ),
        ({"errorCode": 40012, "errorMessage": "iss unknown"}, "HTTP 400: 40012 (iss unknown)"),
        ({"errorMessage": "clock skew"}, "answered HTTP 400 (clock skew)"),
        ({"status": "nope"}, "answered HTTP 400 with no error fields in its JSON body"),
        (
            {"errorCode": "ERR_ASSERTION_SIGNATURE_KEY_NOT_REGISTERED", "errorMessage": "x"},
            "ERR_ASSERTION_SIGNATURE_KEY_NOT_REGISTERED (x)",
        ),
    ],
)
def test_error_detail_quotes_rfc_6749_or_d1_error_fields(
    body: dict[str, Any], expected: str
) -> None:
    with pytest.raises(TokenError) as info:
        parse_token_response(400, json.dumps(body).encode(), 0.0, endpoint=f"endpoint {URL}")
    assert expected in info.value.detail
    assert info.value.detail.count(URL) == 1


def test_error_fields_are_cut_made_printable_and_echoed_secrets_redacted() -> None:
    secret = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJNR1cifQ.c2lnbmF0dXJlLWJ5dGVz"
    body = {
        "errorCode": "BAD\r\nX-Injected: 1",
        "errorMessage": f"assertion {secret} refused \u00e9\x07 " + "w" * 500,
    }
    with pytest.raises(TokenError) as info:
        parse_token_response(400, json.dumps(body).encode(), 0.0)
    detail = info.value.detail
    assert "BAD??X-Injected: 1" in detail
    assert secret not in detail and "[redacted] refused ??" in detail
    assert all(" " <= c <= "~" for c in detail)
    assert detail.endswith("...)") and len(detail) < 400


def test_the_log_line_and_the_502_detail_carry_the_endpoints_error_fields() -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    from proxy.oauth.glue import EgressToken
    from proxy.wire.http import ProxyError

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        _, fetch, source = make_source()
        fetch.auto = (400, b'{"errorCode":"E_KID","errorMessage":"key id kid-ppr-1 unknown"}')
        failure = failure_of(EgressToken(source, URL).headers())
    finally:
        globalLogPublisher.removeObserver(events.append)
    error = failure.value
    assert isinstance(error, ProxyError)
    assert error.status == 502 and error.code == "oauth_token_unavailable"
    assert error.detail == (
        f"token endpoint {URL} answered HTTP 400: E_KID (key id kid-ppr-1 unknown)"
    )
    line = "\n".join(formatEvent(e) for e in events if "fetch failed" in formatEvent(e))
    assert "answered HTTP 400: E_KID (key id kid-ppr-1 unknown)" in line
    assert "next attempt in" in line and "x-correlation-id" in line
    assert line.count(URL) == 1


# --------------------------------------------------------------------------- AgentFetcher body cap


class FakeResponse:
    def __init__(self, code: int, length: int | object, chunks: list[bytes]) -> None:
        self.code = code
        self.length = length
        self.chunks = chunks
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        from twisted.web.client import ResponseDone

        protocol.makeConnection(self.transport)
        for chunk in self.chunks:
            protocol.dataReceived(chunk)
        protocol.connectionLost(Failure(ResponseDone()))


def test_agent_fetcher_reads_a_small_answer() -> None:
    from twisted.web.iweb import UNKNOWN_LENGTH

    fetcher = AgentFetcher(Clock(), URL, BrowserLikePolicyForHTTPS())
    answer = fetcher._read(FakeResponse(200, UNKNOWN_LENGTH, [b'{"a":', b"1}"]))  # type: ignore[arg-type]
    assert result_of(answer) == (200, b'{"a":1}')


def test_agent_fetcher_aborts_an_answer_over_64_kib() -> None:
    from twisted.web.iweb import UNKNOWN_LENGTH

    fetcher = AgentFetcher(Clock(), URL, BrowserLikePolicyForHTTPS())
    streamed = FakeResponse(200, UNKNOWN_LENGTH, [b"x" * 40_000, b"x" * 40_000])
    error = failure_of(fetcher._read(streamed)).value  # type: ignore[arg-type]
    assert isinstance(error, TokenError) and "65536" in str(error)
    assert streamed.transport.disconnecting
    announced = FakeResponse(200, 1_000_000, [])
    assert isinstance(failure_of(fetcher._read(announced)).value, TokenError)  # type: ignore[arg-type]
    assert announced.transport.disconnecting


# --------------------------------------------------------------------------- ingress issuer

CLIENTS = {"d1-tenant": b"s3cr3t-value_0123456789", "other": b"another-secret"}
HOSTED_KEYS = TokenKeys.of(ec.generate_private_key(ec.SECP256R1()))


def hosted_issuer(clock: Clock, clients: dict[str, bytes] = CLIENTS, **kw: Any) -> TokenIssuer:
    return TokenIssuer(clock, clients, HOSTED_KEYS, audience="d1-callbacks", **kw)


def test_issuer_issues_a_jwt_access_token_that_check_bearer_accepts() -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    issuer = hosted_issuer(clock)
    issued = issuer.issue("d1-tenant", CLIENTS["d1-tenant"], None)
    assert issued is not None
    token, expires_in = issued
    assert expires_in == 900
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": HOSTED_KEYS.kid}
    assert HOSTED_KEYS.kid == key_id(HOSTED_KEYS.signing_key.public_key())
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == "mtls-sidecar" and claims["aud"] == "d1-callbacks"
    assert claims["sub"] == claims["client_id"] == "d1-tenant"
    assert (claims["iat"], claims["exp"]) == (1_700_000_000, 1_700_000_900)
    assert issuer.check_bearer(b"Bearer " + token.encode()) == "d1-tenant"
    assert issuer.check_bearer(b"bearer  " + token.encode()) == "d1-tenant"


def test_issuer_refuses_a_wrong_secret_and_an_unknown_client() -> None:
    issuer = hosted_issuer(Clock())
    assert issuer.issue("d1-tenant", b"wrong", None) is None
    assert issuer.issue("d1-tenant", CLIENTS["other"], None) is None
    assert issuer.issue("nobody", CLIENTS["d1-tenant"], None) is None
    assert issuer.issue("nobody", b"", None) is None


def test_issued_tokens_expire_after_the_lifetime() -> None:
    clock = Clock()
    issuer = hosted_issuer(clock, lifetime=60)
    issued = issuer.issue("d1-tenant", CLIENTS["d1-tenant"], "notify")
    assert issued is not None
    header = b"Bearer " + issued[0].encode()
    clock.advance(59.9)
    assert issuer.check_bearer(header) == "d1-tenant"
    clock.advance(0.1)
    assert issuer.check_bearer(header) is None


def test_issuer_stores_nothing_another_issuer_with_the_keys_accepts_its_tokens() -> None:
    clock = Clock()
    issued = hosted_issuer(clock).issue("other", CLIENTS["other"], None)
    assert issued is not None
    other_process = hosted_issuer(clock, {"someone-else": b"x"})
    assert other_process.check_bearer(b"Bearer " + issued[0].encode()) == "other"


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Basic x",
        b"Basic ZDEtdGVuYW50OnMzY3IzdA==",
        b"Bearer \xc3\xa9t\xc3\xa9",
        b"Bearer abc def",
        b"Token abc",
        b"Bearer unknown-token",
    ],
)
def test_check_bearer_refuses_malformed_or_unknown_headers(header: bytes | None) -> None:
    issuer = hosted_issuer(Clock())
    assert issuer.check_bearer(header) is None


@given(st.binary(max_size=200))
def test_check_bearer_never_raises(header: bytes) -> None:
    assert hosted_issuer(Clock()).check_bearer(header) is None


def test_client_secrets_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "clients"
    path.write_text("# D1 tenants\n\nd1-tenant: s3cr3t:with-colon \n  other:x\n")
    assert load_client_secrets(path) == {"d1-tenant": b"s3cr3t:with-colon", "other": b"x"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ok:secret-one\nno-colon-secret-two\n", r"clients:2: expected client_id:secret"),
        ("ok:secret-one\nok:secret-two\n", r"clients:2: .*twice"),
        (":secret-two\n", r"clients:1: expected"),
        ("# nothing\n", r"clients: no client_id:secret"),
    ],
)
def test_client_secrets_errors_name_file_and_line_but_not_the_secret(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "clients"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_client_secrets(path)
    assert "secret-two" not in str(info.value)


# --------------------------------------------------------------------------- ingress endpoint


def basic(client_id: str, secret: str) -> bytes:
    """RFC 6749 2.3.1: form-urlencode both parts, then base64."""
    pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return b"Basic " + base64.b64encode(pair.encode())


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def json(self) -> Any:
        return json.loads(self.body)


def call_endpoint(
    resource: TokenEndpointResource,
    *,
    method: bytes = b"POST",
    body: bytes = b"grant_type=client_credentials",
    headers: dict[bytes, bytes] | None = None,
) -> Answer:
    """One request through a real twisted.web Site over an in-memory transport."""
    site = Site(resource, reactor=Clock())
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    all_headers = {
        b"Host": b"merchant.example",
        b"Connection": b"close",
        b"Content-Type": b"application/x-www-form-urlencoded",
        b"Content-Length": str(len(body)).encode(),
    }
    all_headers.update(headers or {})
    head = b"".join(k + b": " + v + b"\r\n" for k, v in all_headers.items())
    protocol.dataReceived(method + b" /oauth2/token HTTP/1.1\r\n" + head + b"\r\n" + body)
    return Answer(transport.value())


@pytest.fixture
def endpoint() -> TokenEndpointResource:
    return TokenEndpointResource(hosted_issuer(Clock()), realm="merchant")


def test_endpoint_issues_a_bearer_token_with_no_store(endpoint: TokenEndpointResource) -> None:
    answer = call_endpoint(
        endpoint,
        body=b"grant_type=client_credentials&scope=notify",
        headers={b"Authorization": basic("d1-tenant", "s3cr3t-value_0123456789")},
    )
    assert answer.status == 200
    doc = answer.json()
    assert set(doc) == {"access_token", "token_type", "expires_in"}
    assert doc["token_type"] == "Bearer" and doc["expires_in"] == 900
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["cache-control"] == "no-store"
    issuer = endpoint.endpoint.issuer
    assert issuer.check_bearer(b"Bearer " + doc["access_token"].encode()) == "d1-tenant"
    claims = jwt.decode(doc["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "notify" and claims["client_id"] == "d1-tenant"


def test_endpoint_decodes_form_encoded_basic_credentials() -> None:
    secret = "p+s%w:rd é"
    resource = TokenEndpointResource(hosted_issuer(Clock(), {"id:1": secret.encode()}))
    answer = call_endpoint(resource, headers={b"Authorization": basic("id:1", secret)})
    assert answer.status == 200


def test_endpoint_refuses_a_wrong_secret_with_invalid_client(
    endpoint: TokenEndpointResource,
) -> None:
    answer = call_endpoint(endpoint, headers={b"Authorization": basic("d1-tenant", "nope")})
    assert answer.status == 401
    assert answer.json()["error"] == "invalid_client"
    assert answer.headers["www-authenticate"] == 'Basic realm="merchant"'


@pytest.mark.parametrize(
    "authorization",
    [None, b"Basic !!!", b"Bearer abc", b"Basic " + base64.b64encode(b"no-colon")],
)
def test_endpoint_refuses_missing_or_malformed_basic(
    endpoint: TokenEndpointResource, authorization: bytes | None
) -> None:
    headers = {b"Authorization": authorization} if authorization is not None else {}
    answer = call_endpoint(endpoint, headers=headers)
    assert answer.status == 401
    assert answer.json()["error"] == "invalid_client"
    assert answer.headers["www-authenticate"].startswith("Basic realm=")


def test_endpoint_refuses_other_grants(endpoint: TokenEndpointResource) -> None:
    answer = call_endpoint(
        endpoint,
        body=b"grant_type=password&username=a&password=b",
        headers={b"Authorization": basic("d1-tenant", "s3cr3t-value_0123456789")},
    )
    assert answer.status == 400
    assert answer.json()["error"] == "unsupported_grant_type"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"scope=notify", b"application/x-www-form-urlencoded"),
        (b"grant_type=client_credentials&grant_type=client_credentials", None),
        (b'{"grant_type":"client_credentials"}', b"application/json"),
    ],
)
def test_endpoint_answers_invalid_request_to_malformed_bodies(
    endpoint: TokenEndpointResource, body: bytes, content_type: bytes | None
) -> None:
    headers = {b"Authorization": basic("d1-tenant", "s3cr3t-value_0123456789")}
    if content_type is not None:
        headers[b"Content-Type"] = content_type
    answer = call_endpoint(endpoint, body=body, headers=headers)
    assert answer.status == 400
    assert answer.json()["error"] == "invalid_request"


def test_endpoint_refuses_bodies_over_16_kib(endpoint: TokenEndpointResource) -> None:
    body = b"grant_type=client_credentials&scope=" + b"a" * 16_384
    headers = {b"Authorization": basic("d1-tenant", "s3cr3t-value_0123456789")}
    assert call_endpoint(endpoint, body=body, headers=headers).status == 413


def test_endpoint_allows_only_post(endpoint: TokenEndpointResource) -> None:
    answer = call_endpoint(endpoint, method=b"GET", body=b"")
    assert answer.status == 405
    assert answer.headers["allow"] == "POST"
    assert answer.json()["error"] == "invalid_request"


# --------------------------------------------------------------------------- real peer


def _integration_client(config_json: str) -> None:
    """Run in a child process: fetch tokens over real mutual TLS, print one JSON line."""
    from twisted.internet import ssl
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react
    from twisted.web.client import Agent, readBody
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    config = json.loads(config_json)

    @implementer(IPolicyForHTTPS)
    class Policy:
        def __init__(self) -> None:
            self.trust = ssl.Certificate.loadPEM(Path(config["ca"]).read_bytes())
            self.client = ssl.PrivateCertificate.loadPEM(
                Path(config["cert"]).read_bytes() + Path(config["key"]).read_bytes()
            )

        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return ssl.optionsForClientTLS(
                hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=self.client
            )

    async def run(reactor: Any) -> None:
        url = f"https://127.0.0.1:{config['port']}/authz/v1/oauth2/token"
        policy = Policy()
        out: dict[str, Any] = {}
        for body in ("form", "json"):
            settings = OAuthSettings(
                token_url=url,
                issuer="MGW_000001",
                signing_key=load_signing_key(Path(config["signing_key"])),
                key_id="kid-ppr-1",
                body=body,
            )
            fetcher = AgentFetcher(reactor, url, policy, timeout=settings.request_timeout)
            source = TokenSource(reactor, settings, fetcher, route=f"d1-{body}")
            try:
                tokens = [await d for d in [source.token() for _ in range(5)]]
            except TokenError as e:
                out[body] = {"error": str(e)}
                source.stop()
                continue
            source.stop()
            check = f"https://127.0.0.1:{config['port']}/introspect?token={tokens[0]}"
            response = await Agent(reactor, contextFactory=policy).request(b"GET", check.encode())
            await readBody(response)
            out[body] = {"distinct": len(set(tokens)), "introspect": response.code}
        print(json.dumps(out), flush=True)

    react(lambda reactor: ensureDeferred(run(reactor)))


@pytest.fixture
def peer_files(tmp_path: Path) -> dict[str, Path]:
    ca = pkifactory.make_ca()
    server = ca.issue("C=FR,O=D1 stand-in,CN=127.0.0.1", ips=("127.0.0.1",), server=True)
    client = ca.issue("C=FR,O=Merchant,CN=TLSMA-ECDSA/MGW_000001/D1.PPR", client=True)
    files: dict[str, Path] = {"ca": pkifactory.write_ca(ca, tmp_path / "ca.pem")}
    files["server_cert"], files["server_key"] = server.write(tmp_path, "server")
    files["cert"], files["key"] = client.write(tmp_path, "client")
    signing = tmp_path / "oauth-es256.key"
    signing.write_bytes(
        SIGNING_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files["signing_key"] = signing
    files["public_key"] = tmp_path / "oauth-es256.pub"
    files["public_key"].write_bytes(
        SIGNING_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    files["stats"] = tmp_path / "stats.jsonl"
    return files


@pytest.fixture
def token_server(peer_files: dict[str, Path]) -> Iterator[Callable[..., int]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> int:
        f = peer_files
        proc = subprocess.Popen(
            [
                *(sys.executable, str(TOKEN_SERVER), "--port", "0"),
                *("--cert", str(f["server_cert"]), "--key", str(f["server_key"])),
                *("--client-ca", str(f["ca"]), "--public-key", str(f["public_key"])),
                *("--expires-in", "900", "--stats", str(f["stats"]), *extra),
            ],
            stdout=subprocess.PIPE,
        )
        started.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=15), "token server did not start"
        line = proc.stdout.readline().decode()
        assert line.startswith("LISTENING "), line
        return int(line.split()[1])

    try:
        yield start
    finally:
        for proc in started:
            proc.terminate()
            assert proc.wait(timeout=10) == 0


def run_client(peer_files: dict[str, Path], port: int) -> dict[str, Any]:
    config = {k: str(v) for k, v in peer_files.items()} | {"port": port}
    code = "import sys; from tests.unit.test_oauth import _integration_client as c; c(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    return result


def stats(peer_files: dict[str, Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in peer_files["stats"].read_text().splitlines()]


def load_peer_module() -> Any:
    spec = importlib.util.spec_from_file_location("token_server", TOKEN_SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stand_in_token_endpoint_checks_what_d1_checks(peer_files: dict[str, Path]) -> None:
    peer = load_peer_module()
    server = peer.TokenServer(
        argparse.Namespace(
            public_key=str(peer_files["public_key"]),
            audience=None,
            expires_in=900,
            fail_status=None,
            stats=None,
        )
    )

    def call(assertion: str, correlation_id: str = "cid-1") -> tuple[int, dict[str, Any]]:
        request = DummyRequest([b""])
        request.method = b"POST"
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.requestHeaders.setRawHeaders(b"x-correlation-id", [correlation_id.encode()])
        grant = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
        request.content = BytesIO(json.dumps(grant).encode())
        answer: tuple[int, dict[str, Any]] = server.token_call(request)
        return answer

    now = time.time()
    good = make_assertion(oauth_settings(), now, new_jti())
    assert call(good)[0] == 200
    assert call(good)[1]["error_description"] == "jti replayed"
    assert call(make_assertion(oauth_settings(), now, new_jti()), "bad id!")[0] == 400
    other_key = oauth_settings(signing_key=ec.generate_private_key(ec.SECP256R1()))
    assert (
        "InvalidSignature"
        in call(make_assertion(other_key, now, new_jti()))[1]["error_description"]
    )
    future = make_assertion(oauth_settings(), now + 120, new_jti())
    assert call(future)[1]["error"] == "invalid_grant"


@pytest.mark.integration
def test_token_source_gets_a_token_from_a_real_mutual_tls_peer(
    peer_files: dict[str, Path], token_server: Callable[..., int]
) -> None:
    result = run_client(peer_files, token_server())
    assert result == {
        "form": {"distinct": 1, "introspect": 200},
        "json": {"distinct": 1, "introspect": 200},
    }
    calls = stats(peer_files)
    assert len(calls) == 2  # five callers each time, one fetch each time
    for call in calls:
        assert call["ok"] is True and call["token_issued"] is True
        assert call["kid"] == "kid-ppr-1" and call["iss"] == "MGW_000001"
        assert CID.fullmatch(call["correlation_id"])


@pytest.mark.integration
def test_a_400_from_a_real_peer_reaches_the_caller_as_a_token_error(
    peer_files: dict[str, Path], token_server: Callable[..., int]
) -> None:
    result = run_client(peer_files, token_server("--fail-status", "400"))
    for body in ("form", "json"):
        assert "HTTP 400: invalid_grant" in result[body]["error"]
    assert [c["error"] for c in stats(peer_files)] == ["invalid_grant", "invalid_grant"]
