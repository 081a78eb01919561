"""OAuth end to end: the sidecar fetches D1-style tokens over mutual TLS from a token endpoint
run by the test (which checks the ES256 assertion like D1), and hosts one for D1's calls to us."""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from proxy.tls import pki
from tests.harness import (
    PEERS,
    Nginx,
    Peer,
    Sidecar,
    curl,
    free_port,
    mtls_server,
    origin_pki,
    running,
    write_config,
    write_oauth_key,
)
from tests.pkifactory import make_ca

pytestmark = pytest.mark.integration


@attrs.frozen
class Env:
    dir: Path
    origin_port: int
    nginx: Nginx

    def mtls(self) -> list[str]:
        d = self.dir
        return ["--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
                "--key", str(d / "client.key")]  # fmt: skip

    def token_server(self, stats: Path, *extra: str, stem: str = "origin") -> Peer:
        d = self.dir
        return Peer(
            [str(PEERS / "token_server.py"), "--port", "0", "--cert", str(d / f"{stem}.pem"),
             "--key", str(d / f"{stem}.key"), "--client-ca", str(d / "client-ca.pem"),
             "--public-key", str(d / "oauth.pub"), "--stats", str(stats), *extra]
        ).start()  # fmt: skip

    def egress(self, name: str, token_port: int, extra: str = "") -> tuple[Sidecar, int]:
        port = free_port()
        conf = write_config(
            self.dir / f"{name}.toml",
            f"""
            [[egress]]
            name = "{name}"
            listen = "127.0.0.1:{port}"
            upstream = "https://localhost:{self.origin_port}"
            client_cert = "client.pem"
            client_key = "client.key"
            trust = "server-ca.pem"
              [egress.oauth]
              token_url = "https://localhost:{token_port}/authz/v1/oauth2/token"
              issuer = "MGW0000001"
              signing_key = "oauth.key"
              key_id = "kid-ppr-1"
              body = "json"
              {extra}
            """,
        )
        return Sidecar(conf), port


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("oauth")
    server_ca, _ = origin_pki(d)
    # the same trusted CA, another name: a token server we must not talk to
    server_ca.issue("CN=elsewhere", dns=("elsewhere.test",), server=True).write(d, "elsewhere")
    make_ca("CN=Stranger Root").issue(
        "CN=localhost", dns=("localhost",), ips=("127.0.0.1",), server=True
    ).write(d, "stranger")
    write_oauth_key(d)
    port = free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(
            f"127.0.0.1:{port}",
            d / "origin.pem",
            d / "origin.key",
            d / "client-ca.pem",
            'location /reject { return 401 "no"; }\n'
            'location / { return 200 "$http_authorization"; }',
        ),
    ).start([("127.0.0.1", port)])
    try:
        yield Env(d, port, nginx)
    finally:
        nginx.stop()


def stats(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def active(env: Env, token_port: int, bearer: bytes) -> bool:
    token = bearer.decode().removeprefix("Bearer ")
    r = curl(*env.mtls(), f"https://localhost:{token_port}/introspect?token={token}")
    return r.status == 200


def test_one_fetch_for_many_concurrent_requests_and_the_app_token_replaced(
    env: Env, tmp_path: Path
) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record, "--expires-in", "900")
    sidecar, port = env.egress("one-fetch", tokens.port)
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        url = f"http://127.0.0.1:{port}/v1/cards"
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(
                pool.map(lambda _: curl(url, "-H", "Authorization: Bearer app-own"), range(40))
            )
        assert {r.status for r in results} == {200}
        sent = {r.body for r in results}
        assert len(sent) == 1 and next(iter(sent)).startswith(b"Bearer ")
        assert b"app-own" not in next(iter(sent))
        assert active(env, tokens.port, next(iter(sent)))
        time.sleep(0.6)
    calls = stats(record)
    assert len(calls) == 1
    assert calls[0]["ok"] is True and calls[0]["kid"] == "kid-ppr-1"
    assert calls[0]["iss"] == "MGW0000001"
    token = next(iter(sent)).decode().removeprefix("Bearer ")
    assert token not in sidecar.log()


def test_keep_mode_leaves_the_apps_own_authorization(env: Env, tmp_path: Path) -> None:
    tokens = env.token_server(tmp_path / "stats.jsonl")
    sidecar, port = env.egress("keep", tokens.port, 'authorization = "keep"')
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        own = curl(f"http://127.0.0.1:{port}/", "-H", "Authorization: Bearer app-own")
        injected = curl(f"http://127.0.0.1:{port}/")
    assert own.body == b"Bearer app-own"
    assert injected.body.startswith(b"Bearer ") and injected.body != b"Bearer app-own"


def test_token_is_refreshed_before_expiry_with_no_failed_request(env: Env, tmp_path: Path) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record, "--expires-in", "4")
    sidecar, port = env.egress("refresh", tokens.port)
    seen: list[bytes] = []
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        deadline = time.monotonic() + 6.5
        while time.monotonic() < deadline:
            r = curl(f"http://127.0.0.1:{port}/")
            assert r.status == 200, r.body
            seen.append(r.body)
            time.sleep(0.1)
    assert len(stats(record)) >= 2
    assert len(set(seen)) >= 2  # a new token was in use before the old one expired


def test_token_endpoint_answering_400_gives_a_clear_502(env: Env, tmp_path: Path) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record, "--fail-status", "400")
    sidecar, port = env.egress("refused", tokens.port)
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        time.sleep(0.5)
        r = curl(f"http://127.0.0.1:{port}/")
    assert r.status == 502
    body = json.loads(r.body)
    assert body["error"] == "oauth_token_unavailable" and body["route"] == "refused"
    assert "400" in body["detail"] and "invalid_grant" in body["detail"]
    assert body["detail"].count("/authz/v1/oauth2/token") == 1


def test_token_server_named_elsewhere_gets_no_request_and_the_app_gets_a_plain_502(
    env: Env, tmp_path: Path
) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record, stem="elsewhere")
    sidecar, port = env.egress("elsewhere", tokens.port)
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        time.sleep(0.5)
        r = curl(f"http://127.0.0.1:{port}/")
        again = curl(f"http://127.0.0.1:{port}/")
    assert not record.exists() or record.read_text() == ""  # not one call reached it
    for answer in (r, again):
        assert answer.status == 502
        body = json.loads(answer.body)
        assert body["error"] == "oauth_token_unavailable" and body["route"] == "elsewhere"
        assert body["detail"] == (
            f"token endpoint https://localhost:{tokens.port}/authz/v1/oauth2/token: TLS check "
            "failed, no request sent: hostname mismatch: certificate is for elsewhere.test, "
            "not localhost"
        )
    assert "Bearer" not in r.body.decode()


def test_untrusted_token_server_error_names_the_check_and_the_trust_file(
    env: Env, tmp_path: Path
) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record, stem="stranger")
    sidecar, port = env.egress("stranger", tokens.port)
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        time.sleep(0.5)
        r = curl(f"http://127.0.0.1:{port}/")
    assert not record.exists() or record.read_text() == ""
    assert r.status == 502
    detail = json.loads(r.body)["detail"]
    assert "TLS check failed, no request sent: certificate not trusted: unable to get local " \
        "issuer certificate (not signed by a CA in the trust store) (depth 0: CN=localhost)" \
        in detail  # fmt: skip
    assert detail.endswith(f"checked against trust {env.dir / 'server-ca.pem'}")
    assert "SSL routines" not in detail


def test_route_heals_within_2_s_once_a_failing_token_endpoint_recovers(
    env: Env, tmp_path: Path
) -> None:
    record = tmp_path / "stats.jsonl"
    reason = "key kid-ppr-1 is not registered for MGW0000001"
    tokens = env.token_server(
        record, "--fail-status", "400", "--fail-for", "5", "--error-style", "d1",
        "--error-message", reason,
    )  # fmt: skip
    recovered_at = time.monotonic() + 5  # the failing window counts from the LISTENING line
    sidecar, port = env.egress("heals", tokens.port)
    refused: list[dict[str, str]] = []
    healed_at: float | None = None
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        while time.monotonic() < recovered_at + 10:
            r = curl(f"http://127.0.0.1:{port}/v1/cards")
            if r.status == 200:
                healed_at = time.monotonic()
                break
            assert r.status == 502, r.body
            refused.append(json.loads(r.body))
            time.sleep(0.1)
    assert healed_at is not None, sidecar.log()
    heal = healed_at - recovered_at
    print(f"requests succeed again {heal:.2f} s after the token endpoint recovered")
    assert heal <= 2.0
    assert len(refused) >= 10
    expected = f"answered HTTP 400: invalid_grant ({reason})"
    for body in refused:
        assert body["error"] == "oauth_token_unavailable" and body["route"] == "heals"
        assert expected in body["detail"]
        assert body["detail"].count("/authz/v1/oauth2/token") == 1
    assert expected in sidecar.log()
    calls = stats(record)
    assert calls[-1]["ok"] is True
    times = [float(str(c["time"])) for c in calls]
    # Retries 1 s apart less jitter at most 20%: the endpoint is never hammered.
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.75


def test_upstream_401_invalidates_the_token_once(env: Env, tmp_path: Path) -> None:
    record = tmp_path / "stats.jsonl"
    tokens = env.token_server(record)
    sidecar, port = env.egress("invalidate", tokens.port)
    with running(tokens, sidecar.start([("127.0.0.1", port)])):
        first = curl(f"http://127.0.0.1:{port}/").body
        time.sleep(5.2)  # a token younger than 5 s is not dropped on a 401 (no fetch storms)
        assert curl(f"http://127.0.0.1:{port}/reject").status == 401
        assert curl(f"http://127.0.0.1:{port}/reject").status == 401
        time.sleep(0.5)
        second = curl(f"http://127.0.0.1:{port}/").body
    assert first != second
    assert len(stats(record)) == 2


# ---------------------------------------------------------------------------- ingress side
@pytest.fixture(scope="module")
def hosted(env: Env) -> Iterator[tuple[int, Sidecar]]:
    record = env.dir / "upstream.jsonl"
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(record)]).start()
    (env.dir / "clients").write_text("# D1 tenant credentials\nd1-tenant:s3cret-value\n")
    (env.dir / "hosted.key").write_bytes(pki.private_key_pem(pki.make_oauth_key()))
    port = free_port()
    conf = write_config(
        env.dir / "ingress.toml",
        f"""
        [[ingress]]
        name = "d1-callbacks"
        listen = "127.0.0.1:{port}"
        server_cert = "origin.pem"
        server_key = "origin.key"
        client_ca = "client-ca.pem"
        upstream = "http://127.0.0.1:{upstream.port}"
          [ingress.oauth]
          clients_file = "clients"
          signing_key = "hosted.key"
          token_path = "/oauth2/token"
          token_lifetime = 2
        """,
    )
    sidecar = Sidecar(conf).start([("127.0.0.1", port)])
    try:
        yield port, sidecar
    finally:
        sidecar.stop()
        upstream.stop()


def basic(user: str, secret: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def get_token(env: Env, port: int, secret: str) -> tuple[int, dict[str, object]]:
    r = curl(*env.mtls(), "-H", basic("d1-tenant", secret),
             "--data", "grant_type=client_credentials",
             f"https://localhost:{port}/oauth2/token")  # fmt: skip
    return r.status, json.loads(r.body)


def test_hosted_token_endpoint_refuses_a_wrong_secret(
    env: Env, hosted: tuple[int, Sidecar]
) -> None:
    status, body = get_token(env, hosted[0], "wrong")
    assert status == 401 and body["error"] == "invalid_client"


def test_hosted_token_admits_the_call_and_expires(env: Env, hosted: tuple[int, Sidecar]) -> None:
    port, sidecar = hosted
    status, body = get_token(env, port, "s3cret-value")
    assert status == 200 and body["token_type"] == "Bearer" and body["expires_in"] == 2
    token = str(body["access_token"])
    url = f"https://localhost:{port}/merchant-gateways/x/notify"
    refused = curl(*env.mtls(), url)
    assert refused.status == 401 and json.loads(refused.body)["error"] == "unauthorized"
    admitted = curl(*env.mtls(), "-H", f"Authorization: Bearer {token}", url)
    assert admitted.status == 200
    assert json.loads(admitted.body)["path"] == "/merchant-gateways/x/notify"
    time.sleep(3.2)  # exp is a whole second rounded up: the token lives 2 to 3 s
    expired = curl(*env.mtls(), "-H", f"Authorization: Bearer {token}", url)
    assert expired.status == 401
    time.sleep(0.6)
    log = sidecar.log()
    assert token not in log and "s3cret-value" not in log
