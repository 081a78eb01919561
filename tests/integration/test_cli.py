"""The command line itself, run as an operator runs it: version, help texts, the one error
prefix, usage errors that show the right usage line, and plain words for a bad output path."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import proxy
from tests.harness import SIDECAR, write_config

pytestmark = pytest.mark.integration

PREFIX = "mtls-sidecar: error: "
CSR_SUBJECT = ["--env", "PPR", "--gateway-id", "MGW_000001", "--country", "FR", "--state", "IDF",
               "--locality", "Paris", "--org", "Merchant", "--org-unit", "Payments"]  # fmt: skip


def sidecar(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SIDECAR, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def commands() -> list[str]:
    """The subcommands `mtls-sidecar --help` lists (one per line under COMMAND)."""
    listed = sidecar("--help").stdout
    return re.findall(r"^    ([a-z][a-z-]*)(?: |$)", listed, re.M)


def test_version_prints_the_package_version() -> None:
    done = sidecar("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mtls-sidecar {proxy.__version__}\n"


def test_help_lists_every_command_of_the_contract() -> None:
    assert {"run", "check", "probe", "demo", "csr", "oauth-key"} <= set(commands())


@pytest.mark.parametrize("command", commands())
def test_every_subcommand_has_a_description(command: str) -> None:
    done = sidecar(command, "--help")
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.split("\n\n")
    assert blocks[0].startswith(f"usage: mtls-sidecar {command} ")
    description = blocks[1]
    assert not description.startswith(("options:", "positional arguments:")), done.stdout
    assert len(description.split()) >= 8, description  # a sentence, not a label


def test_check_help_states_the_exit_codes() -> None:
    text = sidecar("check", "--help").stdout
    assert re.search(r"^exit status:$", text, re.M), text
    assert re.search(r"^  0  fine, or warnings only$", text, re.M), text
    assert re.search(r"^  1  at least one error$", text, re.M), text
    assert re.search(r"^  2  usage error", text, re.M), text


def test_check_exit_status_2_for_a_usage_error() -> None:
    assert sidecar("check").returncode == 2


@pytest.mark.parametrize("command", ["run", "probe"])
def test_missing_config_file_is_one_line_with_the_error_prefix(
    command: str, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.toml"
    done = sidecar(command, "-c", str(missing))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{PREFIX}{missing}: cannot read: No such file or directory"
    ]
    assert done.stdout == ""


@pytest.mark.parametrize("command", ["run", "probe"])
def test_bad_config_is_reported_with_the_error_prefix(command: str, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "bad.toml", '[log]\nformat = "text"\n[service]\nworkerz = 2\n')
    done = sidecar(command, "-c", str(conf))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines and all(line.startswith(PREFIX) for line in lines), done.stderr
    assert f"{conf}: service.workerz: unknown key" in done.stderr


def test_probe_unknown_route_uses_the_error_prefix(tmp_path: Path) -> None:
    conf = write_config(
        tmp_path / "one.toml",
        """
        [[egress]]
        name = "d1-ppr"
        listen = "127.0.0.1:18080"
        upstream = "https://localhost:8443"
        client_cert = "client.pem"
        client_key = "client.key"
        """,
    )
    for name in ("client.pem", "client.key"):
        (tmp_path / name).write_text("")  # the config loader only needs them to exist
    done = sidecar("probe", "-c", str(conf), "d1-prd")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"{PREFIX}no route named 'd1-prd' in {conf}; routes: d1-ppr"
    ], done.stderr


@pytest.mark.parametrize(
    ("args", "usage", "message"),
    [
        (["check", "-c", "x.toml", "--bogus"], "check [-h] -c CONFIG",
         "unrecognized arguments: --bogus"),
        (["run"], "run [-h] ", "the following arguments are required: -c/--config"),
        (["probe", "-c", "x.toml", "a", "b"], "probe [-h] ", "unrecognized arguments: b"),
        (["csr", *CSR_SUBJECT, "--key-out", "k", "--csr-out", "c", "--key-size", "4096"],
         "csr [-h] ", "unrecognized arguments: --key-size 4096"),
        (["oauth-key"], "oauth-key [-h] ", "one of the arguments --key-out --pkcs11 is required"),
        (["demo", "--fast"], "demo [-h]", "unrecognized arguments: --fast"),
        (["nope"], "[-h] [--version] COMMAND", "argument COMMAND: invalid choice: 'nope'"),
    ],
)  # fmt: skip
def test_usage_error_prints_that_commands_usage_and_the_error_prefix(
    args: list[str], usage: str, message: str, tmp_path: Path
) -> None:
    done = sidecar(*args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"usage: mtls-sidecar {usage}"), done.stderr
    assert lines[-1].startswith(f"{PREFIX}{message}"), done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--key-out", "--csr-out"])
def test_csr_output_under_a_file_says_the_file_is_in_the_way(flag: str, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("not a folder\n")
    outputs = {"--key-out": "client.key", "--csr-out": "client.csr"}
    outputs[flag] = "keys/sub/out.pem"
    done = sidecar("csr", *CSR_SUBJECT, *[x for kv in outputs.items() for x in kv], cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{PREFIX}keys/sub/out.pem: keys is a file, not a folder"
    ], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]  # nothing written


def test_oauth_key_output_under_a_file_says_the_file_is_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("not a folder\n")
    done = sidecar("oauth-key", "--key-out", "keys/oauth.key", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"{PREFIX}keys/oauth.key: keys is a file, not a folder"]
