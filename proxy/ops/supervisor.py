"""The supervisor for `[service] workers = N > 1`: it binds every listener (or takes systemd's),
runs N worker processes on those sockets, and serves no requests itself.

- Generations: a reload re-reads the whole config and validates it as `check` does; if valid, a
  new generation of workers starts on the same sockets and, once every one of them listens, the
  old generation drains. Listeners the new config adds are opened, those it drops are closed.
- A worker that dies is restarted with backoff; workers dying in a loop stop the supervisor.
- One D1 token per host: the supervisor holds each egress route's OAuth token source and the
  workers ask it over their channel (proxy.ops.worker.RemoteToken).
- systemd: READY once the first generation listens, RELOADING/READY around a swap, STOPPING on
  drain, WATCHDOG only while every worker answers.
- The admin listener is the supervisor's: /metrics sums the workers' counters and labels their
  gauges with `worker`; /readyz and /status ask the workers.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from proxy import config as cfg
from proxy.oauth import glue
from proxy.ops import audit
from proxy.ops.admin import PeerGate, readyz_answer, readyz_target, status_page
from proxy.ops.channel import Channel, ChannelFactory
from proxy.ops.health import Check, log_findings
from proxy.ops.service import (
    _signature,
    adopted_key,
    exit_at_once,
    key_material_paths,
    restart_only_keys,
)
from proxy.ops.worker import CHANNEL_FD_ENV, LISTEN_FDS_ENV, WORKER_ENV
from proxy.telemetry.logs import rfc3339
from proxy.telemetry.metrics import Metrics
from proxy.tls import contexts as tls

RECYCLE_CHECK = 5.0  # seconds between checks of max_worker_rss / max_worker_age
READY_TIMEOUT = 30.0  # a new worker that does not listen by then fails the generation
CRASH_WINDOW, CRASH_LIMIT = 60.0, 5  # this many unexpected deaths in the window: give up
CHILD_FD_BASE = 4  # 3 is the channel; listeners from 4 on
_STRIPPED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
             "LISTEN_FDNAMES")  # fmt: skip


def listen_key(where: cfg.Listen) -> str:
    """How a listener is named to a worker: systemd's name, or the address."""
    return where.name if where.kind == "systemd" else adopted_key(where)


def routes_of(config: cfg.Config) -> list[cfg.EgressRoute | cfg.IngressRoute]:
    return [*config.egress, *config.ingress]


def bind(where: cfg.Listen) -> socket.socket:
    if where.kind == "unix":
        path = Path(where.path)
        if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
            path.unlink()  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(where.path)
        os.chmod(where.path, 0o660)
    else:
        family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((where.host, where.port))
    sock.listen(1024)
    return sock


@attrs.define(eq=False)
class Worker:
    index: int
    generation: int
    channel: Channel
    process: Any = None
    ready: bool = False
    exited: bool = False
    started: float = 0.0  # reactor time at spawn, for max_worker_age
    recycling: bool = False  # a successor is starting for it
    became_ready: defer.Deferred[None] = attrs.field(factory=defer.Deferred)
    ended: defer.Deferred[int] = attrs.field(factory=defer.Deferred)
    os_pid: int | None = None  # kept after exit: Twisted forgets a reaped process's pid

    @property
    def pid(self) -> int | None:
        return self.os_pid if self.os_pid is not None else getattr(self.process, "pid", None)


class _WorkerProcess(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor, self.worker = supervisor, worker

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        self.supervisor.worker_ended(self.worker, code if code is not None else -(signal or 0))


class Supervisor:
    log = Logger()

    def __init__(
        self,
        config: cfg.Config,
        reactor: Any,
        *,
        environ: Mapping[str, str],
        inherited: Mapping[str, list[int]],
        notifier: Any = None,
        log_level: str | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.environ = {k: v for k, v in environ.items() if k not in _STRIPPED}
        self.inherited = dict(inherited)
        self.notifier = notifier
        self.log_level = log_level
        self.metrics = Metrics.create()
        self.restarts = _restarts_counter(self.metrics)
        self.recycles = _recycles_counter(self.metrics)
        self.recycler: task.LoopingCall | None = None
        self.on_stopped: Any = lambda: None
        self.sockets: dict[str, int] = {}  # listen key -> fd held by the supervisor
        self.owned: dict[str, socket.socket] = {}  # the ones it bound itself
        self.generation = 0
        self.workers: list[Worker] = []  # the current generation
        self.retiring: list[Worker] = []
        self.tokens: dict[str, glue.EgressToken] = {}
        self.deaths: list[float] = []
        self.stopping: defer.Deferred[None] | None = None
        self.exit_code = 0
        self.admin_port: Any = None
        self.draining = False
        self.reloading = False
        self.watched: tuple[Any, ...] = ()
        self.started_at = reactor.seconds()
        self.last_reload: dict[str, Any] | None = None
        self.watcher: task.LoopingCall | None = None

    # ---- start
    def start(self) -> defer.Deferred[None]:
        self._open_listeners(self.config)
        self.tokens = self._token_sources(self.config)
        if self.config.admin is not None:
            self.admin_port = self.reactor.listenTCP(
                self.config.admin.listen.port, _admin_site(self),
                interface=self.config.admin.listen.host,
            )  # fmt: skip
        d = self._spawn_generation(self.config)

        def up(_: object) -> None:
            for source in self.tokens.values():
                source.source.start()
            self.watched = self._files()
            interval = self.config.service.reload_interval
            if interval > 0:
                self.watcher = task.LoopingCall(self._watch)
                self.watcher.clock = self.reactor
                self.watcher.start(interval, now=False)
            self.log.info("{n} workers ready (generation {g})", n=len(self.workers),
                          g=self.generation)  # fmt: skip
            if self.notifier is not None:
                self.notifier.ready(f"{len(self.workers)} workers")
            service = self.config.service
            if service.max_worker_rss or service.max_worker_age:
                self.recycler = task.LoopingCall(self._check_limits)
                self.recycler.clock = self.reactor
                self.recycler.start(RECYCLE_CHECK, now=False)

        return d.addCallback(up)

    # ---- the backstop: a worker past max_worker_rss or max_worker_age is replaced
    def _check_limits(self) -> None:
        if self.stopping is not None or self.reloading:
            return
        service = self.config.service
        now = self.reactor.seconds()
        for w in list(self.workers):
            if not w.ready or w.recycling or w.exited:
                continue
            rss = _rss_bytes(w.pid)
            if service.max_worker_rss and rss > service.max_worker_rss:
                self._recycle(w, "rss", f"resident {rss >> 20} MiB over max_worker_rss "
                                        f"{service.max_worker_rss >> 20} MiB")  # fmt: skip
            elif service.max_worker_age and now - w.started > service.max_worker_age:
                self._recycle(w, "age", f"running {now - w.started:.0f}s, over max_worker_age "
                                        f"{service.max_worker_age:g}s")  # fmt: skip

    def _recycle(self, old: Worker, reason: str, why: str) -> None:
        """A successor starts on the same sockets; once it listens, the old one drains."""
        old.recycling = True
        fresh = self._spawn(self.config, old.index, old.generation)
        timeout = self.reactor.callLater(READY_TIMEOUT, self._ready_timeout, [fresh])

        def swap(_: object) -> None:
            if timeout.active():
                timeout.cancel()
            if old not in self.workers or self.stopping is not None:
                self._retire(fresh)
                return
            self.workers[self.workers.index(old)] = fresh
            self.recycles.labels(reason).inc()
            self.log.info("worker {i} (pid {old}) recycled: {why}; pid {new} serving",
                          i=old.index, old=old.pid, why=why, new=fresh.pid)  # fmt: skip
            self._retire(old)

        def failed(f: Failure) -> None:
            if timeout.active():
                timeout.cancel()
            old.recycling = False  # tried again at the next check
            if not fresh.exited and fresh.process is not None:
                fresh.process.signalProcess("KILL")
            self.log.warn("worker {i} (pid {pid}) not recycled: its successor did not start: "
                          "{e}", i=old.index, pid=old.pid, e=f.getErrorMessage())  # fmt: skip

        fresh.became_ready.addCallbacks(swap, failed)

    def _open_listeners(self, config: cfg.Config) -> list[str]:
        """Bind what `config` needs and is not open yet; returns the keys opened now."""
        opened = []
        for route in routes_of(config):
            key = listen_key(route.listen)
            if key in self.sockets:
                continue
            if route.listen.kind == "systemd":
                fds = self.inherited.get(route.listen.name)
                if not fds:
                    raise tls.MaterialError(
                        f"{route.direction}[{route.name}].listen {route.listen}: no socket of "
                        "that name was passed (FileDescriptorName= in the .socket unit)"
                    )
                self.sockets[key] = fds[0]
            else:
                try:
                    sock = bind(route.listen)
                except OSError as e:
                    raise tls.MaterialError(
                        f"{route.direction}[{route.name}].listen {route.listen}: cannot listen: "
                        f"{e.strerror or e}"
                    ) from None
                self.owned[key] = sock
                self.sockets[key] = sock.fileno()
            opened.append(key)
        return opened

    def _close_listeners(self, keys: list[str]) -> None:
        for key in keys:
            self.sockets.pop(key, None)
            sock = self.owned.pop(key, None)
            if sock is not None:
                sock.close()

    def _token_sources(self, config: cfg.Config) -> dict[str, glue.EgressToken]:
        out = {}
        now = datetime.datetime.now(datetime.UTC)
        for rc in config.egress:
            if rc.oauth is not None:
                material = tls.build_client_material(rc)
                pair = material.pair
                if pair is not None and not pair.leaf.not_valid_before_utc <= now <= (
                    pair.leaf.not_valid_after_utc
                ):
                    continue  # its route is down: no token request over a lapsed certificate
                client = tls.ClientTLS(material, rc.server_name or rc.upstream.host)
                out[rc.name] = glue.egress_token_source(self.reactor, self.metrics, rc, client)
        return out

    # ---- workers
    def _spawn_generation(self, config: cfg.Config) -> defer.Deferred[None]:
        self.generation += 1
        fresh = [self._spawn(config, i, self.generation) for i in range(config.service.workers)]
        ready = defer.DeferredList([w.became_ready for w in fresh], fireOnOneErrback=True,
                                   consumeErrors=True)  # fmt: skip
        timeout = self.reactor.callLater(READY_TIMEOUT, self._ready_timeout, fresh)

        def swap(_: object) -> None:
            if timeout.active():
                timeout.cancel()
            old, self.workers = self.workers, fresh
            self.config = config
            for w in old:
                self._retire(w)

        def failed(f: Failure) -> Failure:
            if timeout.active():
                timeout.cancel()
            for w in fresh:
                if not w.exited and w.process is not None:
                    w.process.signalProcess("KILL")
            sub: Failure = getattr(f.value, "subFailure", f)
            return sub

        return ready.addCallbacks(swap, failed)

    def _ready_timeout(self, fresh: list[Worker]) -> None:
        for w in fresh:
            if not w.ready and not w.became_ready.called:
                w.became_ready.errback(
                    RuntimeError(f"a worker did not listen within {READY_TIMEOUT:g}s")
                )

    def _spawn(self, config: cfg.Config, index: int, generation: int) -> Worker:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = Worker(index, generation, Channel({}), started=self.reactor.seconds())
        worker.channel.handlers = {
            "ready": lambda msg: self._worker_ready(worker),
            "token": lambda msg: self._token(msg),
            "rejected": lambda msg: self._rejected(msg),
        }
        child_fds: dict[int, int | str] = {1: 1, 2: 2, 3: child.fileno()}
        listen = []
        for n, key in enumerate(sorted({listen_key(r.listen) for r in routes_of(config)})):
            child_fds[CHILD_FD_BASE + n] = self.sockets[key]
            listen.append(f"{key}={CHILD_FD_BASE + n}")
        env = {**self.environ, CHANNEL_FD_ENV: "3", LISTEN_FDS_ENV: ";".join(listen),
               WORKER_ENV: str(index)}  # fmt: skip
        args = [sys.executable, "-m", "proxy.cli", "run", "-c", str(config.path)]
        if self.log_level:
            args += ["--log-level", self.log_level]
        worker.process = self.reactor.spawnProcess(
            _WorkerProcess(self, worker), sys.executable, args, env=env, childFDs=child_fds
        )
        worker.os_pid = getattr(worker.process, "pid", None)
        child.close()
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX,
                                           ChannelFactory(worker.channel))  # fmt: skip
        parent.close()
        return worker

    def _worker_ready(self, worker: Worker) -> dict[str, Any]:
        worker.ready = True
        if not worker.became_ready.called:
            worker.became_ready.callback(None)
        return {}

    def _retire(self, worker: Worker) -> None:
        self.retiring.append(worker)
        if not worker.exited and worker.process is not None:
            worker.process.signalProcess("TERM")  # drains, then exits 0

    def worker_ended(self, worker: Worker, code: int) -> None:
        worker.exited = True
        if not worker.became_ready.called:
            worker.became_ready.errback(
                RuntimeError(f"worker {worker.index} exited with {code} before it listened")
            )
        if not worker.ended.called:
            worker.ended.callback(code)
        if worker in self.retiring:
            self.retiring.remove(worker)
            return
        if worker not in self.workers or self.stopping is not None:
            return
        now = self.reactor.seconds()
        self.deaths = [t for t in self.deaths if now - t < CRASH_WINDOW] + [now]
        self.restarts.inc()
        if len(self.deaths) >= CRASH_LIMIT:
            self.log.error(
                "workers died {n} times in {w:g}s (last: worker {i} exited with {code}): "
                "giving up", n=len(self.deaths), w=CRASH_WINDOW, i=worker.index, code=code,
            )  # fmt: skip
            self.exit_code = 1
            self.stop().addBoth(lambda _: self.on_stopped())
            return
        delay = min(30.0, 2.0 ** (len(self.deaths) - 1))
        self.log.warn("worker {i} (pid {pid}) exited with {code}; restarting in {d:g}s",
                      i=worker.index, pid=worker.pid, code=code, d=delay)  # fmt: skip
        self.reactor.callLater(delay, self._replace, worker)

    def _replace(self, dead: Worker) -> None:
        if self.stopping is not None or dead not in self.workers:
            return
        fresh = self._spawn(self.config, dead.index, dead.generation)
        self.workers[self.workers.index(dead)] = fresh

    # ---- tokens for the workers
    def _token(self, msg: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        source = self.tokens.get(msg.get("route", ""))
        if source is None:
            return defer.fail(RuntimeError(f"no OAuth token source for route {msg.get('route')!r}"))

        def answer(value: str) -> dict[str, Any]:
            state = source.source.state()
            return {"token": value, "valid_until": state["valid_until"] or 0.0}

        def failed(f: Failure) -> Failure:
            detail = getattr(f.value, "detail", None)
            return Failure(RuntimeError(detail)) if detail else f

        return source.source.token().addCallbacks(answer, failed)

    def _rejected(self, msg: dict[str, Any]) -> dict[str, Any]:
        source = self.tokens.get(msg.get("route", ""))
        if source is not None:
            before = source.source.state()["valid_until"]
            token = str(msg.get("token", ""))
            source.source.invalidate(token)
            if source.source.state()["valid_until"] != before:  # dropped: every worker drops it
                for w in self.workers:
                    w.channel.notify("drop", route=msg["route"], token=token)
        return {}

    # ---- reload: a new generation
    def _files(self) -> tuple[Any, ...]:
        """What changes when the config file or any key material is replaced."""
        paths = [self.config.path]
        for route in routes_of(self.config):
            paths += key_material_paths(route)
        return _signature(paths)

    def _watch(self) -> None:
        if self.reloading or self.stopping is not None:
            return
        seen = self._files()
        if seen != self.watched:
            self.watched = seen
            self.log.info("the config file or key material changed; reloading")
            self.reload()

    def reload(self) -> defer.Deferred[bool]:
        if self.reloading:
            return defer.succeed(False)
        self.reloading = True
        return self._reload().addBoth(self._reloaded)

    def _reloaded(self, result: Any) -> Any:
        self.reloading = False
        self.watched = self._files()
        return result

    def _reload(self) -> defer.Deferred[bool]:
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            config = cfg.load(self.config.path)
            findings = audit.audit(config, running=True)
            problems = audit.mistakes(findings)
            if problems:
                raise tls.MaterialError(f"{problems[0].key}: {problems[0].message}")
            if config.service.workers != self.config.service.workers:
                self.log.info("workers: {a} -> {b}", a=self.config.service.workers,
                              b=config.service.workers)  # fmt: skip
            opened = self._open_listeners(config)
            tokens = self._token_sources(config)
        except (cfg.ConfigError, tls.MaterialError) as e:
            return defer.succeed(self._reload_failed(str(e)))
        old_keys = {listen_key(r.listen) for r in routes_of(self.config)}
        new_keys = {listen_key(r.listen) for r in routes_of(config)}

        def swapped(_: object) -> bool:
            old_tokens, self.tokens = self.tokens, tokens
            for source in old_tokens.values():
                source.source.stop()
            for source in self.tokens.values():
                source.source.start()
            self._close_listeners(sorted(old_keys - new_keys))
            self.metrics.reloads.labels("success").inc()
            self.last_reload = {"time": rfc3339(self.reactor.seconds()), "result": "success",
                                "error": None}  # fmt: skip
            self.log.info("reloaded: generation {g} serving", g=self.generation)
            log_findings(findings)
            if self.notifier is not None:
                self.notifier.ready("reloaded")
            return True

        def failed(f: Failure) -> bool:
            self._close_listeners(opened)
            return self._reload_failed(f"the new generation did not start: {f.getErrorMessage()}")

        return self._spawn_generation(config).addCallbacks(swapped, failed)

    def _reload_failed(self, why: str) -> bool:
        self.metrics.reloads.labels("failure").inc()
        self.last_reload = {"time": rfc3339(self.reactor.seconds()), "result": "failure",
                            "error": why}  # fmt: skip
        self.log.error("reload failed, the current generation keeps serving: {why}", why=why)
        if self.notifier is not None:
            self.notifier.ready(f"reload failed: {why}")
        return False

    # ---- stop
    def stop(self) -> defer.Deferred[None]:
        if self.stopping is not None:
            return self.stopping
        self.draining = True
        if self.watcher is not None and self.watcher.running:
            self.watcher.stop()
        if self.recycler is not None and self.recycler.running:
            self.recycler.stop()
        if self.notifier is not None:
            self.notifier.stopping()
        everyone = [w for w in [*self.workers, *self.retiring] if not w.exited]
        for w in everyone:
            if w.process is not None:
                w.process.signalProcess("TERM")
        for source in self.tokens.values():
            source.source.stop()
        self.stopping = defer.DeferredList([w.ended for w in everyone]).addCallback(lambda _: None)
        return self.stopping

    # ---- watchdog, readiness, metrics, status
    def all_answer(self, timeout: float) -> defer.Deferred[bool]:
        pings = [_within(self.reactor, w.channel.call("ping"), timeout) for w in self.workers]
        return defer.DeferredList(pings, consumeErrors=True).addCallback(
            lambda results: bool(results) and all(ok for ok, _ in results)
        )

    def readiness_checks(self, route: str | None = None) -> defer.Deferred[list[Check] | None]:
        """/readyz: the workers listen (asked of worker 0: they share the sockets); the OAuth
        tokens are the supervisor's, so /readyz/<route> takes their state from here."""
        if self.draining:
            return defer.succeed([Check("shutdown", "draining")])
        if not self.workers or not all(w.ready and not w.exited for w in self.workers):
            return defer.succeed([Check("started", "workers starting")])
        asked = _within(self.reactor, self.workers[0].channel.call("checks", route=route), 5.0)

        def answered(msg: dict[str, Any]) -> list[Check] | None:
            if msg.get("unknown"):
                return None
            checks = [Check(name, failure) for name, failure in msg.get("checks", [])]
            source = self.tokens.get(route or "")
            if route is not None and source is not None:
                state = source.source.state()
                failure = None
                if not (state["valid_until"] or 0) > self.reactor.seconds():
                    error = state["last_error"]
                    failure = "no valid OAuth token" + (
                        f" (last error: {error})" if error else " yet"
                    )
                checks = [c for c in checks if c.name != "oauth_token"]
                checks.append(Check("oauth_token", failure))
            return checks

        return asked.addCallbacks(
            answered, lambda f: [Check("workers", f"worker 0: {f.getErrorMessage()}")]
        )

    def readiness(self) -> defer.Deferred[list[str]]:
        return self.readiness_checks().addCallback(
            lambda checks: [c.failure for c in checks or [] if c.failure]
        )

    def metrics_text(self) -> defer.Deferred[bytes]:
        asks = [_within(self.reactor, w.channel.call("metrics"), 5.0) for w in self.workers]

        def merge(results: list[tuple[bool, Any]]) -> bytes:
            pages = [
                (w.index, r["text"]) for w, (ok, r) in zip(self.workers, results, strict=True) if ok
            ]
            resident = [(w.index, _rss_bytes(w.pid)) for w in self.workers]
            own = generate_latest(self.metrics.registry).decode()
            return merge_metrics(own, pages, resident).encode()

        return defer.DeferredList(asks, consumeErrors=True).addCallback(merge)

    def status(self) -> defer.Deferred[dict[str, Any]]:
        alive = [w for w in self.workers if w.ready and not w.exited]
        if alive:
            asked = _within(self.reactor, alive[0].channel.call("status"), 5.0)
            asked.addErrback(lambda f: {"routes": [], "error": f.getErrorMessage()})
        else:
            asked = defer.succeed({"routes": [], "error": "no worker ready"})

        stats = [_within(self.reactor, w.channel.call("stats"), 5.0) for w in self.workers]
        counted = defer.DeferredList(stats, consumeErrors=True)

        def add(
            report: dict[str, Any], counts: list[tuple[bool, Any]]
        ) -> defer.Deferred[dict[str, Any]]:
            now = self.reactor.seconds()
            for route in report.get("routes", []):
                source = self.tokens.get(route["name"])
                if source is not None:
                    route["oauth"] = _token_view(source.source.state())
                    if route["oauth"]["valid_until"] is None:
                        why = "no valid OAuth token"
                        route["reasons"] = [*route.get("reasons", []), why]
                        route["state"] = "down"
            report["workers"] = [
                {"index": w.index, "pid": w.pid, "generation": w.generation, "ready": w.ready,
                 "started": rfc3339(w.started), "uptime_seconds": round(now - w.started, 3),
                 "resident_bytes": _rss_bytes(w.pid),
                 "requests": got.get("requests") if ok else None}
                for w, (ok, got) in zip(self.workers, counts, strict=True)
            ]  # fmt: skip
            report["started"] = rfc3339(self.started_at)
            report["uptime_seconds"] = round(now - self.started_at, 3)
            report["last_reload"] = self.last_reload
            report["restart_keys"] = restart_only_keys(supervised=True)
            # a worker counts only its own requests: take every worker's from the merged metrics
            return self.metrics_text().addCallback(lambda text: _with_counts(report, text))

        both = defer.gatherResults([asked, counted])
        return both.addCallback(lambda results: add(results[0], results[1]))


def _token_view(state: Any) -> dict[str, Any]:
    """A token source's state with RFC 3339 times."""
    times = ("valid_until", "last_fetch")
    return {k: (rfc3339(float(v)) if k in times and v else v) for k, v in dict(state).items()}


def _with_counts(report: dict[str, Any], text: bytes) -> dict[str, Any]:
    codes: dict[tuple[str, str], dict[str, int]] = {}
    for fam in text_string_to_metric_families(text.decode()):
        if fam.name != "mtls_sidecar_requests":
            continue
        for sample in fam.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels.get("route", ""), sample.labels.get("direction", ""))
                by_code = codes.setdefault(key, {})
                code = sample.labels.get("code", "")
                by_code[code] = by_code.get(code, 0) + int(sample.value)
    for route in report.get("routes", []):
        by_code = codes.get((route.get("name", ""), route.get("direction", "")), {})
        route["requests"] = {
            "total": sum(by_code.values()),
            "by_code": dict(sorted(by_code.items())),
        }
    return report


def _restarts_counter(metrics: Metrics) -> Any:
    from prometheus_client import Counter

    return Counter("mtls_sidecar_worker_restarts", "Workers restarted after dying.",
                   registry=metrics.registry)  # fmt: skip


def _recycles_counter(metrics: Metrics) -> Any:
    from prometheus_client import Counter

    counter = Counter("mtls_sidecar_worker_recycles", "Workers replaced for a limit, by reason.",
                      ["reason"], registry=metrics.registry)  # fmt: skip
    for reason in ("rss", "age"):
        counter.labels(reason)
    return counter


def _within(reactor: Any, d: defer.Deferred[Any], seconds: float) -> defer.Deferred[Any]:
    return d.addTimeout(seconds, reactor)


def _rss_bytes(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def merge_metrics(own: str, pages: list[tuple[int, str]], resident: list[tuple[int, int]]) -> str:
    """One exposition for every worker: counters and histograms summed, gauges per worker."""
    families: dict[str, dict[str, Any]] = {}
    order: list[str] = []

    def family(name: str, kind: str, doc: str) -> dict[str, Any]:
        if name not in families:
            families[name] = {"type": kind, "help": doc, "samples": {}}
            order.append(name)
        return families[name]

    for worker, text in [(None, own), *pages]:
        for fam in text_string_to_metric_families(text):
            f = family(fam.name, fam.type, fam.documentation)
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                labels = dict(s.labels)
                if fam.type == "gauge" and worker is not None:
                    labels["worker"] = str(worker)
                key = (s.name, tuple(sorted(labels.items())))
                f["samples"][key] = f["samples"].get(key, 0.0) + s.value
    f = family("mtls_sidecar_worker_resident_bytes", "gauge", "Resident memory of each worker.")
    for index, rss in resident:
        f["samples"][("mtls_sidecar_worker_resident_bytes", (("worker", str(index)),))] = rss
    lines = []
    for name in order:
        f = families[name]
        kind = "untyped" if f["type"] == "unknown" else f["type"]
        lines += [f"# HELP {name} {f['help']}", f"# TYPE {name} {kind}"]
        for (sample, labels), value in f["samples"].items():
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{text}}} {value!r}" if text else f"{sample} {value!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Async(Resource):
    isLeaf = True

    def __init__(self, answer: Any, with_request: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.answer = answer
        self.with_request = with_request

    def render_GET(self, request: Request) -> Any:
        def done(result: tuple[int, bytes, bytes]) -> None:
            code, kind, body = result
            request.setResponseCode(code)
            request.setHeader(b"content-type", kind)
            request.setHeader(b"cache-control", b"no-store")
            request.write(body)
            request.finish()

        def failed(f: Failure) -> None:
            request.setResponseCode(503)
            request.write(json.dumps({"error": f.getErrorMessage()}).encode())
            request.finish()

        args = (request,) if self.with_request else ()
        defer.maybeDeferred(self.answer, *args).addCallbacks(done, failed)
        return NOT_DONE_YET


def _admin_site(sup: Supervisor) -> Site:
    def ready(request: Request) -> defer.Deferred[tuple[int, bytes, bytes]]:
        route, _ = readyz_target(request)
        return sup.readiness_checks(route).addCallback(
            lambda checks: readyz_answer(lambda _: checks, request)
        )

    def metrics() -> defer.Deferred[tuple[int, bytes, bytes]]:
        return sup.metrics_text().addCallback(
            lambda text: (200, b"text/plain; version=0.0.4; charset=utf-8", text)
        )

    def status() -> defer.Deferred[tuple[int, bytes, bytes]]:
        return sup.status().addCallback(
            lambda s: (200, b"application/json", json.dumps(s, indent=2, default=str).encode())
        )

    def page(request: Request) -> defer.Deferred[tuple[int, bytes, bytes]]:
        return sup.status().addCallback(
            lambda s: status_page(request.args, s, sup.reactor.seconds())
        )

    root = Resource()
    root.putChild(b"healthz", _Async(lambda: (200, b"text/plain", b"ok\n")))  # type: ignore[no-untyped-call]
    root.putChild(b"readyz", _Async(ready, with_request=True))  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", _Async(metrics))  # type: ignore[no-untyped-call]
    status_from = sup.config.admin.status_from if sup.config.admin else ()
    root.putChild(b"status", PeerGate(_Async(status), status_from))
    root.putChild(b"", PeerGate(_Async(page, with_request=True), status_from))
    site = Site(root)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def install_supervisor_signals(reactor: Any, sup: Supervisor, done: Any) -> None:
    """SIGHUP: a new generation; SIGTERM/SIGINT: drain every worker, then exit."""
    import signal as sig

    def on_term(signum: int, frame: object) -> None:
        if sup.stopping is not None:
            exit_at_once(sup.config.service.log_format, signum)
        reactor.callFromThread(lambda: sup.stop().addBoth(lambda _: done()))

    def on_hup(signum: int, frame: object) -> None:
        reactor.callFromThread(sup.reload)

    sig.pthread_sigmask(sig.SIG_UNBLOCK, {sig.SIGTERM, sig.SIGINT, sig.SIGHUP})
    sig.signal(sig.SIGTERM, on_term)
    sig.signal(sig.SIGINT, on_term)
    sig.signal(sig.SIGHUP, on_hup)


def run_supervisor(config: cfg.Config, inherited: Mapping[str, list[int]],
                   environ: Mapping[str, str], log_level: str | None,
                   findings: list[cfg.Finding] | None = None) -> int:  # fmt: skip
    from twisted.internet import reactor

    from proxy.ops.systemd import Notifier, watchdog_interval
    from proxy.telemetry.logs import start_logging, startup_error

    notifier = Notifier(dict(environ))
    sup = Supervisor(config, reactor, environ=environ, inherited=inherited, notifier=notifier,
                     log_level=log_level)  # fmt: skip
    start_logging(config.service.log_format, level=log_level or config.service.log_level)
    if config.service.workers_why:
        Supervisor.log.info(
            "workers: {n} ({why})", n=config.service.workers, why=config.service.workers_why
        )
    log_findings(findings or [])

    def stopped() -> None:
        reactor.stop()  # type: ignore[attr-defined]

    sup.on_stopped = stopped

    def started() -> None:
        try:
            d = sup.start()
        except tls.MaterialError as e:
            startup_error(config.service.log_format, str(e))
            sup.exit_code = 2
            reactor.stop()  # type: ignore[attr-defined]
            return

        def failed(f: Failure) -> None:
            fmt = config.service.log_format
            startup_error(fmt, f"workers did not start: {f.getErrorMessage()}")
            sup.exit_code = 2
            sup.stop().addBoth(lambda _: stopped())

        d.addErrback(failed)
        install_supervisor_signals(reactor, sup, stopped)
        interval = watchdog_interval(dict(environ))
        if interval:

            def beat() -> None:
                sup.all_answer(interval / 4).addCallback(
                    lambda ok: notifier.watchdog() if ok else None
                )

            task.LoopingCall(beat).start(interval / 2)

    reactor.callWhenRunning(started)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return sup.exit_code
