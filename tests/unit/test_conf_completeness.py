"""Every key the config parser reads appears, set or commented with its default, in both
example configs in conf/: their headers promise it, and an operator reads them as the list."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy import config as cfg

CONF = Path(__file__).resolve().parents[2] / "conf"
EXAMPLES = sorted(CONF.glob("*.toml"))
# every table the parser knows, each present (even empty) so that its reader asks for its keys
EVERY_TABLE = """
[admin]
[log]
[service]
[resolver]
[[egress]]
  [egress.oauth]
[[ingress]]
  [ingress.oauth]
"""
_HEADER = re.compile(r"^\s*#?\s*\[{1,2}([a-z_.]+)\]{1,2}\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*#?\s*([a-z_]+)\s*=")


def parser_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Table -> the keys proxy/config.py reads in it, taken from the parser itself: each table
    reader remembers the names it was asked for."""
    seen: dict[str, set[str]] = {}
    finish = cfg._Reader.finish

    def recording(reader: cfg._Reader) -> None:
        table = re.sub(r"\[\d+\](?: \([^)]*\))?", "", reader.prefix)
        seen.setdefault(table, set()).update(reader.used)
        finish(reader)

    monkeypatch.setattr(cfg._Reader, "finish", recording)
    path = tmp_path / "every-table.toml"
    path.write_text(EVERY_TABLE)
    cfg.parse(path, {})
    return seen


def example_keys(path: Path) -> dict[str, set[str]]:
    """Table -> the keys an example names, set or commented out (`# key = default`)."""
    found: dict[str, set[str]] = {"": set()}
    table = ""
    for line in path.read_text().splitlines():
        header = _HEADER.match(line)
        if header:
            table = header.group(1)
            parent, _, name = table.rpartition(".")
            found.setdefault(parent, set()).add(name)
            found.setdefault(table, set())
            continue
        key = _KEY.match(line)
        if key:
            found.setdefault(table, set()).add(key.group(1))
    return found


def test_the_parser_reads_the_tables_and_keys_this_test_expects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = parser_keys(tmp_path, monkeypatch)
    assert set(keys) == {"", "admin", "log", "service", "resolver", "egress", "egress.oauth",
                         "ingress", "ingress.oauth"}  # fmt: skip
    assert {"workers", "drain_timeout"} <= keys["service"]
    assert {"format", "level", "access"} <= keys["log"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_config_key_appears_in_the_example(
    example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(EXAMPLES) == 2
    named = example_keys(example)
    missing = [
        f"[{table}] {key}" if table else f"[{key}]"
        for table, keys in sorted(parser_keys(tmp_path, monkeypatch).items())
        for key in sorted(keys - named.get(table, set()))
    ]
    assert missing == [], f"{example.name} does not list: {', '.join(missing)}"


def test_handshake_timeout_is_an_ingress_key_only(tmp_path: Path) -> None:
    """Egress clients speak plain HTTP: a handshake_timeout there would do nothing."""
    path = tmp_path / "egress.toml"
    path.write_text('[[egress]]\nname = "a"\nhandshake_timeout = 3\n')
    _, findings = cfg.parse(path, {})
    assert any(
        f.key == "egress[0] (a).handshake_timeout" and f.message.startswith("unknown key")
        for f in findings
    ), findings
