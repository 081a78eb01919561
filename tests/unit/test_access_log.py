"""The access log's writes: whole lines, at most PIPE_BUF bytes each, so lines from several
workers sharing one stdout never cut into each other."""

from __future__ import annotations

import datetime
import io
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.telemetry import logs

ROUTE = logs.route_fields("r", "egress")


def test_lines_go_out_in_whole_line_writes_of_at_most_pipe_buf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", spy)
    with os.fdopen(write_end, "w") as stream, os.fdopen(read_end, "rb") as reader:
        log = logs.AccessLog(stream, True)
        os.set_blocking(read_end, False)
        got = b""
        for i in range(300):
            log.request(1e9, ROUTE, "GET", f"/{i}/" + "p" * (i % 97), 200, 2, 0.001, "a", "b",
                        "c", "")  # fmt: skip
            if i % 50 == 49:
                log.flush()
                got += reader.read() or b""
        log.flush()
        got += reader.read() or b""
    assert writes and all(len(w) <= logs.PIPE_BUF and w.endswith(b"\n") for w in writes)
    assert [int(json.loads(x)["path"].split("/")[1]) for x in got.splitlines()] == list(range(300))


def test_nothing_is_written_before_a_flush_and_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    log = logs.AccessLog(stream, True)
    log.request(1e9, ROUTE, "GET", "/a", 200, 2, 0.001, "a", "b", "c", "")
    assert stream.getvalue() == ""
    log.flush()
    assert json.loads(stream.getvalue())["path"] == "/a"
    off = logs.AccessLog(stream, False)
    off.request(1e9, ROUTE, "GET", "/b", 200, 2, 0.001, "a", "b", "c", "")
    off.flush()
    assert stream.getvalue().count("\n") == 1


MEMBERS = ("time", "level", "logger", "msg", "kind", "route", "direction", "method", "path",
           "status", "bytes", "duration_ms", "upstream", "client", "correlation_id")  # fmt: skip
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.text(
    alphabet=st.characters(max_codepoint=255), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    route=text,
    method=text,
    path=text,
    status=st.integers(0, 999),
    size=st.integers(0, 2**40),
    duration=st.floats(min_value=0, max_value=1e5, allow_nan=False),
    upstream=text,
    client=text,
    correlation_id=text,
    extra=st.dictionaries(
        text.filter(lambda k: k not in MEMBERS), text | st.integers(), max_size=3
    ),
)
def test_a_request_line_is_the_json_object_the_encoder_would_write(
    now: float,
    route: str,
    method: str,
    path: str,
    status: int,
    size: int,
    duration: float,
    upstream: str,
    client: str,
    correlation_id: str,
    extra: dict[str, object],
) -> None:
    """The hand-written line: valid JSON, one line, ASCII, and the same members in the same
    order as json.dumps of the record (quotes, backslashes, controls, U+2028, non-Latin all
    escaped)."""
    stream = io.StringIO()
    log = logs.AccessLog(stream, True)
    log.request(now, logs.route_fields(route, "egress"), method, path, status, size, duration,
                upstream, client, correlation_id, logs.fields(extra) if extra else "")  # fmt: skip
    log.flush()
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    expected = {
        "time": logs.rfc3339(now),
        "level": "info",
        "logger": "access",
        "msg": f"{method} {path} {status}",
        "kind": "access",
        "route": route,
        "direction": "egress",
        "method": method,
        "path": path,
        "status": status,
        "bytes": size,
        "duration_ms": round(duration * 1000, 3),
        "upstream": upstream,
        "client": client,
        "correlation_id": correlation_id,
    }
    assert list(expected) == list(MEMBERS)
    assert line == json.dumps({**expected, **extra}, separators=(",", ":")) + "\n"


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_rfc3339_is_datetimes_isoformat_to_the_millisecond(t: float) -> None:
    stamp = datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")
    assert logs.rfc3339(t) == stamp.removesuffix("+00:00") + "Z"


def test_lines_go_out_once_a_pipe_buf_is_collected_not_only_at_the_sweep() -> None:
    """A burst of requests between two sweeps holds at most PIPE_BUF bytes of lines."""
    stream = io.StringIO()
    log = logs.AccessLog(stream, True)
    route = logs.route_fields("r", "egress")
    for i in range(1000):
        log.request(1e9, route, "GET", f"/{i:04d}", 200, 2, 0.001, "a", "b", "c", "")
        held = sum(len(x) for x in log._lines)
        assert held < logs.PIPE_BUF
    written = stream.getvalue().splitlines()
    assert len(written) > 1000 - logs.PIPE_BUF // 150
    assert [json.loads(x)["path"] for x in written] == [f"/{i:04d}" for i in range(len(written))]


@settings(max_examples=3000, deadline=None)
@given(
    st.floats(min_value=-1e7, max_value=1e7, allow_nan=False)
    | st.floats(min_value=0, max_value=1.0, allow_nan=False)
    | st.integers(0, 10**8).map(lambda n: n / 10**6)
)
def test_milliseconds_is_the_encoders_rounded_duration(seconds: float) -> None:
    """duration_ms is written as json.dumps would write round(seconds * 1000, 3), the
    fast way below 10^9 ms and that way itself past it."""
    assert logs.milliseconds(seconds) == json.dumps(round(seconds * 1000, 3))


def test_milliseconds_of_exact_halves_and_zeros() -> None:
    for seconds in (0.0, -0.0, 0.0000005, 0.0015, 0.002675, 1.0, 123.4565, 2e6, -3e-7):
        assert logs.milliseconds(seconds) == repr(round(seconds * 1000, 3))
