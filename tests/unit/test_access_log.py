"""The access log's writes: whole lines, at most PIPE_BUF bytes each, so lines from several
workers sharing one stdout never cut into each other."""

from __future__ import annotations

import json
import os

import pytest

from proxy.telemetry import logs


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
            log.write({"n": i, "path": "/" + "p" * (i % 97)})
            if i % 50 == 49:
                log.flush()
                got += reader.read() or b""
        log.flush()
        got += reader.read() or b""
    assert writes and all(len(w) <= logs.PIPE_BUF and w.endswith(b"\n") for w in writes)
    assert [json.loads(x)["n"] for x in got.splitlines()] == list(range(300))


def test_nothing_is_written_before_a_flush_and_disabled_writes_nothing() -> None:
    import io

    stream = io.StringIO()
    log = logs.AccessLog(stream, True)
    log.write({"a": 1})
    assert stream.getvalue() == ""
    log.flush()
    assert json.loads(stream.getvalue()) == {"a": 1}
    off = logs.AccessLog(stream, False)
    off.write({"b": 2})
    off.flush()
    assert stream.getvalue().count("\n") == 1
