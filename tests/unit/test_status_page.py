"""The status page at /: the /status report as HTML a person reads, with states in words as well
as colours, real table headers, no script, and nothing secret."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest
from twisted.web.test.requesthelper import DummyRequest

from proxy.ops import page
from proxy.ops.admin import admin_site, status_page

NOW = 1_800_000_000.0
DAY = 86400


def iso(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()


def report(**extra: Any) -> dict[str, Any]:
    return {
        "ready": True,
        "reasons": [],
        "started": "2027-01-15T08:00:00.000Z",
        "uptime_seconds": 100.0,
        "routes": [
            {
                "name": "d1-ppr",
                "direction": "egress",
                "listening": True,
                "certificates": [
                    {
                        "role": "client",
                        "subject": "CN=GW_RSA_000001_PPR,O=Shop",
                        "serial": "1a2b",
                        "not_after": iso(NOW + 10 * DAY + 60),
                        "sha256": "ab",
                    }
                ],
                "oauth": {
                    "valid_until": NOW + 600,
                    "last_fetch": NOW - 300,
                    "last_error": None,
                    "access_token": "eyJ-NEVER-SHOWN",
                },
                "requests": {"total": 250, "by_code": {"200": 200, "404": 10, "502": 40}},
            },
            {
                "name": "d1-callbacks",
                "direction": "ingress",
                "listening": True,
                "certificates": [
                    {
                        "role": "server",
                        "subject": "CN=callbacks.example",
                        "serial": "3c",
                        "not_after": iso(NOW + 2 * DAY + 60),
                        "sha256": "cd",
                    },
                    {
                        "role": "client_ca",
                        "subject": "CN=Thales CA",
                        "serial": "4d",
                        "not_after": iso(NOW + 400 * DAY),
                        "sha256": "ef",
                    },
                ],
                "oauth": None,
                "requests": {"total": 0, "by_code": {}},
            },
        ],
        **extra,
    }


def text_of(body: bytes) -> str:
    """What a reader sees: the text with tags removed and whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body.decode())).strip()


def test_the_page_shows_routes_certificates_days_left_and_counts() -> None:
    out = page.render(report(), NOW)
    text = text_of(out)
    assert "d1-ppr" in text and "d1-callbacks" in text
    assert "10 days (warning)" in text
    assert "2 days (critical)" in text
    assert "400 days (ok)" in text
    assert "CN=GW_RSA_000001_PPR,O=Shop" in text
    # 250 requests, 10 4xx, 40 5xx, 2.50 requests/s over the 100 s since start
    assert re.search(r"d1-ppr egress up 250 10 40 2\.50", text), text
    assert "all routes 250 50 4xx and 5xx 2.50" in text
    assert "valid, 600 s left" in text


def test_colours_come_with_words_at_30_14_and_3_days() -> None:
    cases = {
        31: ("ok", "ok"),
        30: ("ok", "ok"),
        29: ("renew soon", "soon"),
        14: ("renew soon", "soon"),
        13: ("warning", "warn"),
        3: ("warning", "warn"),
        2: ("critical", "crit"),
        -1: ("expired", "crit"),
    }
    for days, (word, css) in cases.items():
        r = report()
        r["routes"][0]["certificates"][0]["not_after"] = iso(NOW + days * DAY + 60)
        out = page.render(r, NOW).decode()
        assert f'<td class="{css}">{days} day{"" if abs(days) == 1 else "s"} ({word})</td>' in out


def test_tables_have_captions_and_scoped_headers_and_no_script() -> None:
    out = page.render(report(), NOW).decode()
    assert out.count("<caption>") == 3  # routes, certificates, tokens
    assert '<th scope="col">Days left</th>' in out
    assert '<th scope="row">d1-ppr</th>' in out
    assert "<script" not in out.lower()
    assert not re.search(r"(src|href)=\"https?:", out)  # no external asset
    assert "default-src 'none'" in out
    assert 'http-equiv="refresh"' not in out


def test_refresh_adds_a_meta_refresh() -> None:
    out = page.render(report(), NOW, refresh=15).decode()
    assert '<meta http-equiv="refresh" content="15">' in out


@pytest.mark.parametrize("bad", [b"0", b"3601", b"abc", b"-5", b"1.5", b""])
def test_a_bad_refresh_is_a_400_naming_the_bound(bad: bytes) -> None:
    code, kind, body = status_page({b"refresh": [bad]}, report(), NOW)
    assert code == 400 and kind.startswith(b"text/plain")
    assert b"refresh must be whole seconds from 1 to 3600" in body


def test_the_token_is_never_on_the_page() -> None:
    out = page.render(report(), NOW).decode()
    assert "eyJ-NEVER-SHOWN" not in out


def test_values_are_escaped() -> None:
    r = report()
    r["routes"][0]["certificates"][0]["subject"] = 'CN=<script>alert(1)</script>,O="x"'
    out = page.render(r, NOW).decode()
    assert "<script>" not in out
    assert "CN=&lt;script&gt;alert(1)&lt;/script&gt;,O=&quot;x&quot;" in out


def test_a_report_with_missing_keys_still_renders() -> None:
    text = text_of(page.render({}, NOW))
    assert "NOT READY" in text and "No routes." in text and "Last reload Unknown" in text
    assert "No reload since start." in text_of(page.render(report(last_reload=None), NOW))
    sparse = {
        "ready": False,
        "reasons": ["d1-ppr: no valid OAuth token yet"],
        "routes": [{"name": "d1-ppr"}],
        "error": "no worker ready",
    }
    text = text_of(page.render(sparse, NOW))
    assert "d1-ppr down no valid OAuth token yet" in text
    assert "Status incomplete: no worker ready" in text


def test_route_states_and_last_reload_from_the_report_when_it_has_them() -> None:
    r = report(
        last_reload={
            "time": NOW - 60,
            "result": "failure",
            "error": "ingress[0].server_key: does not match",
        }
    )
    r["routes"][0].update(state="down", reasons=["client certificate expired"])
    text = text_of(page.render(r, NOW))
    assert "d1-ppr egress down client certificate expired" in text
    assert "failure (ingress[0].server_key: does not match)" in text


def test_workers_are_listed_when_there_are_workers() -> None:
    workers = [
        {"index": 0, "pid": 41, "generation": 2, "ready": True, "resident_bytes": 52428800},
        {"index": 1, "pid": 42, "generation": 2, "ready": False, "resident_bytes": 0},
    ]
    text = text_of(page.render(report(workers=workers), NOW))
    assert "0 41 2 ready 50.0" in text and "1 42 2 not ready" in text
    assert "One process serves every route" in text_of(page.render(report(), NOW))


class FakeState:
    def readiness(self) -> list[str]:
        return []

    def status(self) -> dict[str, Any]:
        return report()


def test_the_admin_root_serves_the_page_from_the_status_report() -> None:
    everyone = [ipaddress.ip_network("0.0.0.0/0")]  # the gate is tested in test_admin
    site = admin_site(FakeState(), None, everyone, clock=lambda: NOW)  # type: ignore[arg-type]
    request = DummyRequest([b""])
    request.args = {b"refresh": [b"5"]}
    resource = site.getResourceFor(request)
    body = resource.render(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert b"10 days (warning)" in body and b'content="5"' in body
    other = DummyRequest([b"nothing-here"])
    assert site.getResourceFor(other) is not resource
