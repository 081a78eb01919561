"""Log lines outside the request path: the level names written, the lines `run` writes itself
(before logging starts, from a signal handler) and the last line of a drain."""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.logger import LogLevel, capturedLogs, formatEvent

from proxy.telemetry.logs import LineObserver, log_line, startup_error
from tests.unit.test_service_reload import egress, ingress, material, running

__all__ = ["material"]  # the fixture, shared with the reload tests


def observed(fmt: str, level: LogLevel) -> str:
    out = io.StringIO()
    LineObserver(out, fmt)(
        {"log_format": "boom", "log_level": level, "log_namespace": "t", "log_time": 0.0}
    )
    return out.getvalue()


def test_critical_is_written_as_error_the_readme_level() -> None:
    assert json.loads(observed("json", LogLevel.critical))["level"] == "error"
    assert " ERROR boom" in observed("text", LogLevel.critical)
    assert json.loads(observed("json", LogLevel.warn))["level"] == "warn"


def test_a_startup_error_is_a_json_line_when_the_config_logs_json() -> None:
    out = io.StringIO()
    startup_error("json", "c.toml: service.x: unknown key", out, file="c.toml", key="service.x")
    record = json.loads(out.getvalue())
    assert record["level"] == "error" and record["logger"] == "proxy.cli"
    assert record["msg"] == "c.toml: service.x: unknown key"
    assert (record["file"], record["key"]) == ("c.toml", "service.x")
    assert record["time"].endswith("Z")


def test_a_startup_error_keeps_the_cli_prefix_in_text_or_unknown_format() -> None:
    for fmt in ("text", None):
        out = io.StringIO()
        startup_error(fmt, "c.toml: cannot read", out)
        assert out.getvalue() == "mtls-sidecar: error: c.toml: cannot read\n"


def test_log_line_text_has_the_observer_shape() -> None:
    line = log_line("text", "second SIGTERM", level="warn")
    assert line.endswith(" WARN  second SIGTERM\n") and line[:4].isdigit()


def test_a_drain_ends_with_a_final_line(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002))
    with capturedLogs() as events:
        done = sidecar.stop()
        reactor.advance(0.1)
    assert done.called
    last = formatEvent(events[-1])
    assert last.startswith("stopped after a 0.0s drain"), last
    assert last.endswith("connections cut at the drain timeout: 0"), last


def test_a_drain_past_its_timeout_says_how_many_were_cut(material: Path) -> None:
    sidecar, reactor, _ = running(material, egress("out", 18001), ingress("in", 18002))
    down = reactor.opened[18001].accept()
    down.dataReceived(b"GET / HTTP/1.1\r\nHo")  # a request that never completes
    with capturedLogs() as events:
        done = sidecar.stop()
        reactor.pump([0.25] * 25)
    assert done.called
    last = formatEvent(events[-1])
    assert last.startswith("stopped after a 5.") and last.endswith("timeout: 1"), last
