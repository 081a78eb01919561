"""`mtls-sidecar demo` runs both directions and stops by itself."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import SIDECAR

pytestmark = pytest.mark.integration


def test_demo_runs_both_directions_and_stops_by_itself() -> None:
    out = subprocess.run([SIDECAR, "demo"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "ES256 signature valid; kid=demo-es256-1 iss=MGW_000001" in text
    assert text.count("bearer valid (token #1)") == 3
    assert "token endpoint calls: 1 (fetched once, reused)" in text
    assert "HTTP/1.1 403 Forbidden" in text and "forbidden_host" in text
    assert "X-Client-Subject: CN=d1-notifications.demo,O=Thales D1,C=FR" in text
    assert "CN=spoofed" not in text
    assert "refused during the TLS handshake" in text
    assert "BearerINVALID" not in text and "INVALID" not in text
