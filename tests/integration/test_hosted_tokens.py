"""Stateless hosted tokens end to end: sidecar processes started through the CLI, each with its
own hosted token endpoint, accept each other's tokens when they hold the same key files; a
replica rolled to a new signing key keeps accepting the old key's tokens through verify_keys."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from proxy.tls import pki
from tests.harness import PEERS, Peer, Sidecar, curl, free_port, origin_pki, write_config

pytestmark = pytest.mark.integration

SECRET = "s3cret-value"


@attrs.frozen
class Replica:
    name: str
    port: int
    sidecar: Sidecar


@attrs.frozen
class Fleet:
    dir: Path
    replicas: dict[str, Replica]

    def mtls(self) -> list[str]:
        d = self.dir
        return ["--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
                "--key", str(d / "client.key")]  # fmt: skip

    def token_from(self, name: str) -> str:
        basic = base64.b64encode(f"d1-tenant:{SECRET}".encode()).decode()
        port = self.replicas[name].port
        r = curl(*self.mtls(), "-H", f"Authorization: Basic {basic}",
                 "--data", "grant_type=client_credentials",
                 f"https://localhost:{port}/oauth2/token")  # fmt: skip
        assert r.status == 200, r.body
        token: str = json.loads(r.body)["access_token"]
        return token

    def call(self, name: str, token: str) -> int:
        port = self.replicas[name].port
        url = f"https://localhost:{port}/merchant-gateways/x/notify"
        return curl(*self.mtls(), "-H", f"Authorization: Bearer {token}", url).status


def thumbprint(path: Path) -> str:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return pki.jwk_thumbprint(pki.public_jwk(key.public_key(), None))


# The replicas: a and b share key-1; rotated signs with key-2 and still accepts key-1's tokens;
# fresh knows key-2 only, as every replica will once the rotation is over.
KEYS = {
    "a": 'signing_key = "key-1.key"',
    "b": 'signing_key = "key-1.key"',
    "rotated": 'signing_key = "key-2.key"\n          verify_keys = ["key-1.pub"]',
    "fresh": 'signing_key = "key-2.key"',
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("hosted")
    origin_pki(d)
    (d / "clients").write_text(f"d1-tenant:{SECRET}\n")
    for n in (1, 2):
        key = pki.make_oauth_key()
        (d / f"key-{n}.key").write_bytes(pki.private_key_pem(key))
        (d / f"key-{n}.key").chmod(0o600)
        (d / f"key-{n}.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(d / "seen.jsonl")])
    upstream.start()
    replicas: dict[str, Replica] = {}
    try:
        for name, keys in KEYS.items():
            port = free_port()
            conf = write_config(
                d / f"{name}.toml",
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
                  {keys}
                """,
            )
            replicas[name] = Replica(name, port, Sidecar(conf))
        for r in replicas.values():
            r.sidecar.start([("127.0.0.1", r.port)])
        yield Fleet(d, replicas)
    finally:
        for r in replicas.values():
            if r.sidecar.proc is not None:
                r.sidecar.stop()
        upstream.stop()


def test_two_sidecars_with_the_same_keys_accept_each_others_tokens(fleet: Fleet) -> None:
    from_a, from_b = fleet.token_from("a"), fleet.token_from("b")
    assert fleet.call("b", from_a) == 200
    assert fleet.call("a", from_b) == 200
    assert fleet.call("a", from_a) == 200
    kid = thumbprint(fleet.dir / "key-1.key")
    assert {jwt.get_unverified_header(t)["kid"] for t in (from_a, from_b)} == {kid}


def test_a_call_without_a_valid_token_is_refused_by_every_replica(fleet: Fleet) -> None:
    token = fleet.token_from("a")
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for name in fleet.replicas:
        assert fleet.call(name, tampered) == 401
        assert fleet.call(name, "not-a-token") == 401


def test_a_rotated_replica_signs_with_the_new_key_and_accepts_the_old_keys_tokens(
    fleet: Fleet,
) -> None:
    old, new = fleet.token_from("a"), fleet.token_from("rotated")
    assert jwt.get_unverified_header(new)["kid"] == thumbprint(fleet.dir / "key-2.key")
    assert fleet.call("rotated", old) == 200
    assert fleet.call("rotated", new) == 200
    assert fleet.call("fresh", new) == 200
    # the old key removed: its tokens are refused; replicas still on the old key alone
    # refuse the new key's tokens, which is why verify_keys rolls out before signing_key
    assert fleet.call("fresh", old) == 401
    assert fleet.call("a", new) == 401


def test_no_token_or_secret_reaches_the_logs(fleet: Fleet) -> None:
    token = fleet.token_from("b")
    assert fleet.call("a", token) == 200
    time.sleep(0.6)  # access lines are flushed every 0.25 s
    for replica in fleet.replicas.values():
        log = replica.sidecar.log()
        assert token not in log and SECRET not in log
