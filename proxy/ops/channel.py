"""The local channel between the supervisor and a worker: length-prefixed JSON messages over a
socketpair, requests and answers in both directions.

A request is ``{"id": N, "op": NAME, ...}``; its answer ``{"re": N, "ok": {...}}`` or
``{"re": N, "error": TEXT}``. Frames are capped (16 MiB: a metrics page fits).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

Handler = Callable[[dict[str, Any]], Any]  # -> a dict, or a Deferred of one


class ChannelError(Exception):
    """The other side answered with an error, or the channel closed before it answered."""


class Channel(Int32StringReceiver):
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def __init__(self, handlers: dict[str, Handler], on_lost: Callable[[], None] = lambda: None):
        self.handlers = handlers
        self.on_lost = on_lost
        self.pending: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self.next_id = 0
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def call(self, op: str, **args: Any) -> defer.Deferred[dict[str, Any]]:
        if not self.open:
            return defer.fail(ChannelError("channel closed"))
        self.next_id += 1
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.pending[self.next_id] = d
        self.sendString(  # type: ignore[no-untyped-call]
            json.dumps({"id": self.next_id, "op": op, **args}).encode()
        )
        return d

    def notify(self, op: str, **args: Any) -> None:
        """A message that wants no answer."""
        if self.open:
            self.sendString(  # type: ignore[no-untyped-call]
                json.dumps({"op": op, **args}).encode()
            )

    def stringReceived(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self.log.error("channel: unreadable message dropped")
            return
        if "re" in msg:
            d = self.pending.pop(msg["re"], None)
            if d is not None:
                if "error" in msg:
                    d.errback(ChannelError(str(msg["error"])))
                else:
                    d.callback(msg.get("ok") or {})
            return
        handler = self.handlers.get(msg.get("op", ""))
        ident = msg.get("id")
        if handler is None:
            if ident is not None:
                self._answer(ident, error=f"unknown op {msg.get('op')!r}")
            return
        result = defer.maybeDeferred(handler, msg)
        if ident is not None:
            result.addCallbacks(
                lambda ok: self._answer(ident, ok=ok),
                lambda f: self._answer(ident, error=f.getErrorMessage()),
            )
        else:
            result.addErrback(lambda f: self.log.failure("channel: {op} failed", f, op=msg["op"]))

    def _answer(self, ident: int, **body: Any) -> None:
        if self.open:
            self.sendString(  # type: ignore[no-untyped-call]
                json.dumps({"re": ident, **body}).encode()
            )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(ChannelError("channel closed"))
        self.on_lost()


class ChannelFactory(Factory):
    """Hands out one prepared Channel (for adoptStreamConnection)."""

    noisy = False

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def buildProtocol(self, addr: Any) -> Channel:
        return self.channel
