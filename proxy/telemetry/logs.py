"""Logging: twisted.logger events to stdout as JSON or text, and the access log (one line per
request, written directly: it is on the hot path). Never bodies, never credentials."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time
from json.encoder import encode_basestring_ascii as _quote  # the encoder's own quoting (C)
from typing import IO, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer

_second: list[Any] = [None, ""]  # the last whole second formatted: one per second, not per line
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # a line's last part, made once


def rfc3339(t: float) -> str:
    """RFC 3339 in UTC with a Z, to the millisecond (truncated, as isoformat does)."""
    whole = int(t // 1)
    micros = round((t - whole) * 1_000_000)  # datetime rounds to the microsecond first
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if _second[0] != whole:
        stamp = datetime.datetime.fromtimestamp(whole, datetime.UTC)
        _second[:] = [whole, stamp.strftime("%Y-%m-%dT%H:%M:%S")]
    return _second[1] + _MILLIS[micros // 1000]  # type: ignore[no-any-return]


def milliseconds(seconds: float) -> str:
    """repr(round(seconds * 1000, 3)), as json.dumps writes it, at a third of its cost: the
    same correctly rounded digits, with repr's trailing zeros dropped. Past 10^9 ms (where a
    3-decimal string may not be the shortest repr) it is repr(round(...)) itself."""
    ms = seconds * 1000
    if not -1e9 < ms < 1e9:
        return repr(round(ms, 3))
    text = f"{ms:.3f}".rstrip("0")
    return text + "0" if text[-1] == "." else text


# Twisted's own chatter about ports and factories: nothing an operator acts on.
_NOISE = re.compile(
    r"^(?:.* starting on \S+|\(\w+ Port \S+ Closed\)|Starting factory .*|Stopping factory .*"
    r"|Main loop terminated\.)$"
)


@implementer(ILogFilterPredicate)
class _DropNoise:
    def __call__(self, event: dict[str, Any]) -> Any:
        namespace = event.get("log_namespace", "")
        if (
            event.get("log_level", LogLevel.info) <= LogLevel.info
            and (namespace == "log_legacy" or namespace.startswith("twisted."))
            and _NOISE.match(formatEvent(event))
        ):
            return PredicateResult.no
        return PredicateResult.maybe


# event fields that become JSON members of a log line
_FIELDS = ("route", "reason", "file", "result", "key", "role", "subject", "days_left",
           "not_after")  # fmt: skip


@implementer(ILogObserver)
class LineObserver:
    """One line per event: JSON ({"time","level","msg",...fields}) or plain text."""

    def __init__(self, stream: IO[str], fmt: str, extra: dict[str, Any] | None = None) -> None:
        self.stream, self.fmt = stream, fmt
        self.extra = extra or {}  # on every line: a worker's index and pid
        self.tag = "".join(f" {k}={v}" for k, v in self.extra.items())

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if level == LogLevel.critical:
            level = LogLevel.error  # the four documented levels only; an alert on error sees it
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        if self.fmt == "json":
            record: dict[str, Any] = {
                "time": rfc3339(event.get("log_time", 0.0)),
                "level": level.name,
                "logger": event.get("log_namespace", ""),
                "msg": text,
            }
            for key in _FIELDS:
                if key in event and isinstance(event[key], str | int | float):
                    record[key] = event[key]
            record.update(self.extra)
            line = json.dumps(record, ensure_ascii=True)
        else:
            line = f"{rfc3339(event.get('log_time', 0.0))} {level.name.upper():5}{self.tag} {text}"
        self.stream.write(line + "\n")
        self.stream.flush()


# Twisted's listening ports log 2-3 lines per connection they cannot accept (out of fds).
_ACCEPT_STORY = (
    "EMFILE encountered",
    "Re-reserving EMFILE",
    "Could not reserve EMFILE",
    "Could not re-reserve EMFILE",
)


@implementer(ILogObserver)
class AcceptErrors:
    """Turns Twisted's per-connection accept-error lines into a count per reason (for
    accept_errors_total) and one summary line per interval: a flood of connections at the fd
    limit must not become a flood of log lines."""

    def __init__(self, observer: ILogObserver, interval: float = 10.0) -> None:
        self.observer = observer
        self.interval = interval
        self.on_error: Any = None  # reason -> None, e.g. a metrics counter's inc
        self.pending: dict[str, int] = {}
        self.last = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format") or ""
        if fmt.startswith("EMFILE recovery: Closed socket"):
            self._count("emfile")
        elif fmt.startswith("Could not accept new connection"):
            self._count(str(event.get("acceptError", "unknown")).lower())
        elif not fmt.startswith(_ACCEPT_STORY):
            self.observer(event)

    def _count(self, reason: str) -> None:
        self.pending[reason] = self.pending.get(reason, 0) + 1
        if self.on_error is not None:
            self.on_error(reason)

    def flush(self, now: float) -> None:
        if not self.pending or now - self.last < self.interval:
            return
        self.last = now
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.pending.items()))
        self.pending = {}
        self.observer(
            {
                "log_format": "connections refused at accept (file descriptor or memory "
                "limits): {counts}",
                "counts": counts,
                "log_level": LogLevel.warn,
                "log_namespace": "proxy.accept",
                "log_time": now,
            }
        )


def startup_error(fmt: str | None, text: str, stream: IO[str] | None = None, **fields: str) -> None:
    """A reason `run` stops before logging has started, as one line on stderr: a JSON line when
    the config logs JSON (so a log shipper parses it like any other), else the CLI's plain
    'mtls-sidecar: error: ...' (also when the config could not be read: no format is known)."""
    stream = stream or sys.stderr
    if fmt == "json":
        stream.write(log_line(fmt, text, **fields))
    else:
        stream.write(f"mtls-sidecar: error: {text}\n")
    stream.flush()


def log_line(
    fmt: str, text: str, *, level: str = "error", logger: str = "proxy.cli", **fields: str
) -> str:
    """One log line, newline included, in LineObserver's shape, for the few places that must
    write it themselves (before logging starts, or from a signal handler)."""
    now = time.time()
    if fmt == "json":
        record = {"time": rfc3339(now), "level": level, "logger": logger, "msg": text}
        return json.dumps({**record, **fields}, ensure_ascii=True) + "\n"
    return f"{rfc3339(now)} {level.upper():5} {text}\n"


def start_logging(
    fmt: str,
    stream: IO[str] | None = None,
    level: LogLevel | str = LogLevel.info,
    extra: dict[str, Any] | None = None,
) -> AcceptErrors:
    if isinstance(level, str):
        level = LogLevel.levelWithName(level)
    observer = FilteringLogObserver(
        LineObserver(stream or sys.stdout, fmt, extra),
        [LogLevelFilterPredicate(defaultLogLevel=level), _DropNoise()],
    )
    accept_errors = AcceptErrors(observer)
    globalLogBeginner.beginLoggingTo([accept_errors], redirectStandardIO=False)
    return accept_errors


def route_fields(name: str, direction: str) -> str:
    """The route's part of every access line, encoded once."""
    return f'"route":{_quote(name)},"direction":{_quote(direction)}'


def fields(values: dict[str, Any]) -> str:
    """Extra members for an access line, each preceded by a comma ("" for none)."""
    return "".join(f",{_quote(k)}:{json.dumps(v, ensure_ascii=True)}" for k, v in values.items())


PIPE_BUF = 4096  # a write() of at most this many bytes to a pipe is never interleaved


class AccessLog:
    """JSON lines, written when PIPE_BUF bytes are collected, by the route sweep (four times a
    second) and at exit: a burst of requests never piles up lines in memory.

    Several workers share one stdout: lines go out in writes of whole lines, each at most
    PIPE_BUF bytes, so no line is ever cut by another process's."""

    def __init__(self, stream: IO[str] | None, enabled: bool) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tag = ""  # members on every line, pre-encoded (a worker's index and pid)
        self._lines: list[str] = []
        self._size = 0
        try:
            self._fd: int | None = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None  # an in-memory stream (tests)

    def _add(self, line: str) -> None:
        if not self.enabled:  # callers skip the formatting too (Route.finished)
            return
        size = self._size + len(line)  # lines are ASCII: characters are bytes
        if size >= PIPE_BUF and self._lines:  # a full write's worth: out now, in one write
            self.flush()
            size = len(line)
        self._lines.append(line)
        self._size = size
        if size >= PIPE_BUF:  # a line as long as a write on its own
            self.flush()

    def request(
        self,
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
        extra: str,
    ) -> None:
        """One request's line. The same JSON object json.dumps would give, written by hand:
        this runs for every request, and a dict through the encoder costs several times more.
        ROUTE and EXTRA come pre-encoded (see route_fields, fields); the rest is quoted here."""
        q = _quote
        qm, qp = q(method), q(path)
        # msg is "METHOD PATH STATUS" quoted: the quoting is per character, so it is made of
        # the quoted method and path
        self._add(
            f'{{"time":"{rfc3339(now)}","level":"info","logger":"access",'
            f'"msg":{qm[:-1]} {qp[1:-1]} {status}","kind":"access",{route},"method":{qm},'
            f'"path":{qp},"status":{status},"bytes":{size},'
            f'"duration_ms":{milliseconds(duration)},"upstream":{q(upstream)},'
            f'"client":{q(client)},"correlation_id":{q(correlation_id)}{extra}{self.tag}}}\n'
        )

    def flush(self) -> None:
        lines, size, self._lines, self._size = self._lines, self._size, [], 0
        if not lines:
            return
        if self._fd is None:
            self.stream.write("".join(lines))
            return
        self.stream.flush()  # what went through the stream object goes first
        if size <= PIPE_BUF:  # what _add collects: one write
            _write_all(self._fd, "".join(lines).encode("ascii"))
            return
        batch: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode("ascii")
            if batch and size + len(data) > PIPE_BUF:
                _write_all(self._fd, b"".join(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        _write_all(self._fd, b"".join(batch))


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            continue  # a non-blocking stdout that is full: the log waits, lines stay whole
        except OSError:
            return  # stdout gone (closed pipe): drop, never crash the data path
        data = data[written:]


class RateLimitedLog:
    """Log lines a peer can cause once per connection: at most `burst` lines per key in each
    `interval`, and one line summing up what was held back. Exact counts go to metrics."""

    def __init__(self, logger: Logger, clock: IReactorTime, interval: float = 10.0,
                 burst: int = 5) -> None:  # fmt: skip
        self.logger, self.clock = logger, clock
        self.interval, self.burst = interval, burst
        self._windows: dict[str, list[float]] = {}  # key -> [start, emitted, held back]

    def warn(self, key: str, fmt: str, **kw: Any) -> None:
        self.emit(LogLevel.warn, key, fmt, **kw)

    def info(self, key: str, fmt: str, **kw: Any) -> None:
        self.emit(LogLevel.info, key, fmt, **kw)

    def emit(self, level: LogLevel, key: str, fmt: str, **kw: Any) -> None:
        now = self.clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            if window is not None:
                self._summary(key, window)
            window = self._windows[key] = [now, 0, 0]
        if window[1] < self.burst:
            window[1] += 1
            self.logger.emit(level, fmt, **kw)
        else:
            window[2] += 1

    def flush(self, now: float) -> None:
        """Close the windows that ended (called by the periodic sweep)."""
        for key, window in list(self._windows.items()):
            if now - window[0] >= self.interval:
                del self._windows[key]
                self._summary(key, window)

    def _summary(self, key: str, window: list[float]) -> None:
        if window[2]:
            self.logger.warn(
                "{count} more '{key}' lines held back in the last {interval:g}s "
                "(exact counts are in /metrics)",
                count=int(window[2]),
                key=key,
                interval=self.interval,
            )
