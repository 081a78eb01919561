"""`run` stopping before it serves speaks the config's log format: a JSON line when it logs
JSON, so a log shipper reads the reason like any other line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import SIDECAR, write_config

pytestmark = pytest.mark.integration


def run(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SIDECAR, "run", "-c", str(conf)], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


@pytest.mark.parametrize("log", ['[log]\nformat = "json"\n', ""], ids=["json", "default"])
def test_a_config_error_at_start_is_a_json_line(tmp_path: Path, log: str) -> None:
    conf = write_config(tmp_path / "c.toml", log + "[service]\nworkerz = 2\n")
    done = run(conf)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and record["key"] == "service.workerz"
    assert record["msg"] == f"{conf}: service.workerz: unknown key; did you mean 'workers'?"


def test_a_key_material_error_at_start_is_a_json_line(tmp_path: Path) -> None:
    (tmp_path / "client.pem").write_text("not a certificate\n")
    (tmp_path / "client.key").write_text("not a key\n")
    conf = write_config(
        tmp_path / "c.toml",
        """
        [log]
        format = "json"
        [[egress]]
        name = "out"
        listen = "127.0.0.1:0"
        upstream = "https://localhost:8443"
        client_cert = "client.pem"
        client_key = "client.key"
        """,
    )
    done = run(conf)
    assert done.returncode == 2
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all(r["level"] == "error" for r in records), records
    assert any("client_cert" in r["msg"] and "no PEM certificate" in r["msg"] for r in records)


def test_an_unreadable_config_keeps_the_plain_prefix(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[log\n")  # no format can be read from it
    done = run(conf)
    assert done.returncode == 2
    assert done.stderr.startswith("mtls-sidecar: error: ")
