"""Logging: twisted.logger events to stdout as JSON or text, and the access log (one line per
request, written directly: it is on the hot path). Never bodies, never credentials."""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


@implementer(ILogObserver)
class LineObserver:
    """One line per event: JSON ({"time","level","msg",...fields}) or plain text."""

    def __init__(self, stream: IO[str], fmt: str) -> None:
        self.stream, self.fmt = stream, fmt

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        if self.fmt == "json":
            record: dict[str, Any] = {
                "time": _iso(event.get("log_time", 0.0)),
                "level": level.name,
                "logger": event.get("log_namespace", ""),
                "msg": text,
            }
            for key in ("route", "reason", "file", "result"):
                if key in event and isinstance(event[key], str | int | float):
                    record[key] = event[key]
            line = json.dumps(record, ensure_ascii=True)
        else:
            line = f"{_iso(event.get('log_time', 0.0))} {level.name.upper():5} {text}"
        self.stream.write(line + "\n")
        self.stream.flush()


def start_logging(fmt: str, stream: IO[str] | None = None, level: LogLevel = LogLevel.info) -> None:
    observer = FilteringLogObserver(
        LineObserver(stream or sys.stdout, fmt), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


class AccessLog:
    """JSON lines to a stream; flushed by the route sweep (twice a second) and at exit."""

    def __init__(self, stream: IO[str] | None, enabled: bool) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self._dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.stream.write(self._dumps(record) + "\n")

    def flush(self) -> None:
        if self.enabled:
            self.stream.flush()
