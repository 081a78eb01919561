"""A worker's side of running under the supervisor: the listening sockets it was handed, its
channel to the supervisor, and bearer tokens asked of the supervisor (one D1 token per host,
whatever the number of workers)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from proxy.oauth import client as oauth
from proxy.ops.channel import Channel, ChannelError, ChannelFactory, Handler
from proxy.wire.http import ProxyError

CHANNEL_FD_ENV = "MTLS_SIDECAR_CHANNEL_FD"
LISTEN_FDS_ENV = "MTLS_SIDECAR_LISTEN_FDS"
WORKER_ENV = "MTLS_SIDECAR_WORKER"


def is_worker(environ: Mapping[str, str]) -> bool:
    return CHANNEL_FD_ENV in environ


def index(environ: Mapping[str, str]) -> int | None:
    """This worker's index under its supervisor; None when not a worker."""
    if not is_worker(environ):
        return None
    try:
        return int(environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def passed_listeners(environ: Mapping[str, str]) -> dict[str, list[int]]:
    """The sockets the supervisor passed: listen key -> [fd] (``key=fd;key=fd``)."""
    out: dict[str, list[int]] = {}
    for item in filter(None, environ.get(LISTEN_FDS_ENV, "").split(";")):
        key, _, fd = item.rpartition("=")
        out.setdefault(key, []).append(int(fd))
    return out


def connect(reactor: Any, environ: Mapping[str, str], channel: Channel) -> None:
    fd = int(environ[CHANNEL_FD_ENV])
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, ChannelFactory(channel))
    os.close(fd)  # the reactor holds its own duplicate


class RemoteToken:
    """An egress route's bearer token, held by the supervisor and asked for over the channel;
    cached here until the supervisor's own use-by time. Stands where glue.EgressToken does."""

    remote = True  # readiness and status read the supervisor's token state, not this copy

    def __init__(self, channel: Channel, route: str, clock: Any) -> None:
        self.channel, self.route, self.clock = channel, route, clock
        self.source = self  # the service starts, resets and reads the state of `source`
        self.value: str | None = None
        self.valid_until = 0.0
        self.last_error: str | None = None
        self.inflight: defer.Deferred[None] | None = None
        self.waiting: list[defer.Deferred[list[tuple[bytes, bytes]]]] = []

    def headers(self) -> defer.Deferred[list[tuple[bytes, bytes]]]:
        if self.value is not None and self.clock.seconds() < self.valid_until:
            return defer.succeed(self._bearer(self.value))
        d: defer.Deferred[list[tuple[bytes, bytes]]] = defer.Deferred()
        self.waiting.append(d)
        if self.inflight is None:  # one question at a time, however many requests wait
            asked = self.channel.call("token", route=self.route)
            self.inflight = asked.addCallbacks(self._got, self._failed)
        return d

    @staticmethod
    def _bearer(value: str) -> list[tuple[bytes, bytes]]:
        return [(b"Authorization", oauth.authorization_value(value))]

    def _got(self, answer: dict[str, Any]) -> None:
        self.inflight = None
        self.value, self.valid_until = answer["token"], float(answer["valid_until"])
        self.last_error = None
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(self._bearer(self.value))

    def _failed(self, failure: Failure) -> None:
        self.inflight = None
        detail = failure.getErrorMessage() if failure.check(ChannelError) else str(failure.value)
        self.last_error = detail
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.errback(ProxyError(502, "oauth_token_unavailable", detail))

    def rejected(self, sent: list[tuple[bytes, bytes]]) -> None:
        """The upstream answered 401: drop it here and tell the holder (which drops it once)."""
        for name, value in sent:
            if name == b"Authorization" and value.startswith(b"Bearer "):
                token = value[7:].decode("ascii")
                if token == self.value:
                    self.value = None
                self.channel.notify("rejected", route=self.route, token=token)

    def forget(self, token: str) -> None:
        if token == self.value:
            self.value = None

    # what the service calls on a token source
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def reset_backoff(self) -> None:
        pass

    def state(self) -> dict[str, Any]:
        live = self.value is not None and self.clock.seconds() < self.valid_until
        return {
            "valid_until": self.valid_until if live else None,
            "last_fetch": None,
            "last_error": self.last_error,
        }


def token_sources(channel: Channel, clock: Any) -> Any:
    """route name -> its RemoteToken (what the service builds instead of a token source).
    The supervisor's "drop" (a token refused with 401 in any worker) reaches every copy."""
    made: dict[str, list[RemoteToken]] = {}

    def drop(msg: dict[str, Any]) -> dict[str, Any]:
        for token in made.get(msg.get("route", ""), []):
            token.forget(str(msg.get("token", "")))
        return {}

    def source(route: str) -> RemoteToken:
        token = RemoteToken(channel, route, clock)
        made.setdefault(route, []).append(token)
        return token

    channel.handlers["drop"] = drop
    return source


def serve(channel: Channel, sidecar: Any, orphaned: Any) -> None:
    """Answer the supervisor's questions, then say this worker listens."""
    from prometheus_client import generate_latest

    handlers: dict[str, Handler] = {
        "ping": lambda msg: {},
        "metrics": lambda msg: {"text": generate_latest(sidecar.metrics.registry).decode()},
        "readiness": lambda msg: {"reasons": sidecar.readiness()},
        "checks": lambda msg: _checks(sidecar, msg.get("route")),
        "stats": lambda msg: {
            "requests": sum(sum(r.codes.values()) for r in sidecar.metrics.routes)
        },
        "status": lambda msg: sidecar.status(),
    }
    channel.handlers.update(handlers)
    channel.on_lost = orphaned
    channel.notify("ready", pid=os.getpid())


def _checks(sidecar: Any, route: str | None) -> dict[str, Any]:
    checks = sidecar.readiness_checks(route)
    if checks is None:
        return {"unknown": True, "checks": []}
    return {"checks": [[c.name, c.failure] for c in checks]}


__all__ = ["Handler", "RemoteToken", "connect", "index", "is_worker", "passed_listeners",
           "serve", "token_sources"]  # fmt: skip
