"""The running sidecar: listeners, the timer sweep, reload, drain, admin, systemd notifications."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives import hashes
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from proxy import config as cfg
from proxy.ops import audit
from proxy.routes.egress import Egress
from proxy.routes.ingress import Ingress
from proxy.routes.route import Route
from proxy.telemetry.logs import AcceptErrors, AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.tls import contexts as tls
from proxy.wire.pool import Pool
from proxy.wire.relay import DownstreamFactory
from proxy.wire.resolver import DNSResolver

SWEEP_INTERVAL = 0.25


@attrs.define
class RouteState:
    """One route at run time: its config, its policy object and its reloadable TLS material."""

    config: cfg.EgressRoute | cfg.IngressRoute
    route: Route
    client_tls: tls.ClientTLS | None = None  # egress: toward the partner; ingress: https upstream
    server_tls: tls.ServerTLS | None = None  # ingress
    port: IListeningPort | None = None


def adopted_key(where: cfg.Listen) -> str:
    """The key under which a socket bound by a supervisor for `where` is passed to a worker."""
    return f"={where}"


def key_material_paths(route: cfg.EgressRoute | cfg.IngressRoute) -> list[Path]:
    if isinstance(route, cfg.EgressRoute):
        paths = [route.client_cert, route.client_key, route.trust]
        if route.oauth:
            paths.append(route.oauth.signing_key)
    else:
        paths = [route.server_cert, route.server_key, route.client_ca, route.upstream_trust]
        if route.oauth:
            o = route.oauth
            paths += [o.clients_file, o.signing_key, *o.verify_keys]
    return [p for p in paths if p is not None]


def _signature(paths: list[Path]) -> tuple[tuple[str, float, int, int], ...]:
    """What changes when a file is replaced, including a Kubernetes symlink swap."""
    out = []
    for p in paths:
        try:
            real = os.path.realpath(p)
            st = os.stat(real)
            out.append((real, st.st_mtime, st.st_size, st.st_ino))
        except OSError:
            out.append((str(p), -1.0, -1, -1))
    return tuple(out)


class Sidecar:
    log = Logger()

    def __init__(
        self,
        config: cfg.Config,
        reactor: Any,
        *,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        notifier: Any = None,
        remote_tokens: Any = None,  # a worker: route name -> token source held by the supervisor
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.metrics = metrics or Metrics.create()
        self.access_log = access_log or AccessLog(None, config.service.access_log)
        self.notifier = notifier
        self.remote_tokens = remote_tokens
        self.routes: list[RouteState] = []
        self.admin_port: IListeningPort | None = None
        self.draining = False
        self.ready = False
        self._sweeper: task.LoopingCall | None = None
        self._watcher: task.LoopingCall | None = None
        self._signature: tuple[Any, ...] = ()
        self._stopping: defer.Deferred[None] | None = None
        self.accept_errors: AcceptErrors | None = None  # set when logging starts
        self.last_connect: dict[str, dict[str, Any]] = {}  # route -> last upstream connect
        ns = config.service.nameservers
        self.resolver = DNSResolver(ns) if ns else reactor.nameResolver

    # ---- build (raises tls.MaterialError before anything listens)
    def build(self) -> None:
        for rc in self.config.egress:
            self.routes.append(self._build_egress(rc))
        for ri in self.config.ingress:
            self.routes.append(self._build_ingress(ri))
        self._signature = self._current_signature()
        self._record_expiry()

    def _pool(self, name: str, up: cfg.Upstream, client_tls: tls.ClientTLS | None,
              r: cfg.EgressRoute | cfg.IngressRoute) -> Pool:  # fmt: skip
        handshakes = self.metrics.handshake_errors
        pool = Pool(
            reactor=self.reactor,
            clock=self.reactor,
            resolver=self.resolver,
            host=up.host,
            port=up.port,
            tls=client_tls,
            connect_timeout=r.timeouts.connect,
            idle_timeout=r.timeouts.pool_idle,
            max_age=r.max_connection_age,
            max_idle=r.pool_max_idle,
            max_head_bytes=r.limits.max_response_header_bytes,
            max_head_fields=r.limits.max_response_headers,
            close_grace=r.timeouts.close_grace,
            on_connect=lambda result: self._connected(name, result),
            on_handshake_error=lambda detail: handshakes.labels(name, _reason_label(detail)).inc(),
            on_handshake=lambda kind: self.metrics.upstream_tls_handshakes.labels(name, kind).inc(),
        )
        self.metrics.watch_pool(name, pool.states)
        return pool

    def _build_egress(self, rc: cfg.EgressRoute) -> RouteState:
        material = tls.build_client_material(rc)
        client = tls.ClientTLS(material, rc.server_name or rc.upstream.host)
        pool = self._pool(rc.name, rc.upstream, client, rc)
        token_source = None
        if rc.oauth is not None:
            from proxy.oauth.glue import egress_token_source

            if self.remote_tokens is not None:
                token_source = self.remote_tokens(rc.name)
            else:
                token_source = egress_token_source(self.reactor, self.metrics, rc, client)
        route = Egress(
            rc,
            token_source=token_source,
            clock=self.reactor,
            pool=pool,
            metrics=self.metrics,
            access_log=self.access_log,
        )
        return RouteState(rc, route, client_tls=client)

    def _build_ingress(self, ri: cfg.IngressRoute) -> RouteState:
        server = tls.ServerTLS(tls.build_server_material(ri))
        client = None
        if ri.upstream.scheme == "https":
            client = tls.ClientTLS(tls.build_upstream_material(ri), ri.upstream.host)
        pool = self._pool(ri.name, ri.upstream, client, ri)
        endpoint = None
        if ri.oauth is not None:
            from proxy.oauth.glue import ingress_token_endpoint

            endpoint = ingress_token_endpoint(self.reactor, ri)
        route = Ingress(
            ri,
            token_endpoint=endpoint,
            clock=self.reactor,
            pool=pool,
            metrics=self.metrics,
            access_log=self.access_log,
        )
        return RouteState(ri, route, client_tls=client, server_tls=server)

    def _connected(self, route: str, result: str) -> None:
        self.metrics.upstream_connects.labels(route, result).inc()
        self.last_connect[route] = {"result": result, "time": _rfc3339(self.reactor.seconds())}

    # ---- what the admin listener and `status` show
    def readiness(self) -> list[str]:
        """Why new traffic would fail now; empty when ready."""
        if self.draining:
            return ["draining"]
        if not self.ready:
            return ["starting"]
        reasons = []
        now = self.reactor.seconds()
        for state in self.routes:
            if state.port is None or not getattr(state.port, "connected", True):
                reasons.append(f"{state.config.name}: listener not open")
            token = _token_state(state.route)
            if token is not None and not (token.get("valid_until") or 0) > now:
                error = token.get("last_error")
                reasons.append(
                    f"{state.config.name}: no valid OAuth token"
                    + (f" (last error: {error})" if error else " yet")
                )
        return reasons

    def status(self) -> dict[str, Any]:
        routes = []
        for state in self.routes:
            c = state.config
            certs = []
            if isinstance(c, cfg.EgressRoute) and state.client_tls is not None:
                pair = state.client_tls.material.pair
                if pair is not None:
                    certs.append(("client", c.client_cert, pair.leaf))
            if state.server_tls is not None:
                m = state.server_tls.material
                certs.append(("server", c.server_cert, m.pair.leaf))  # type: ignore[union-attr]
                certs += [("client_ca", c.client_ca, ca) for ca in m.client_cas]  # type: ignore[union-attr]
            token = _token_state(state.route)
            routes.append(
                {
                    "name": c.name,
                    "direction": c.direction,
                    "listening": state.port is not None,
                    "certificates": [
                        {"role": role, "file": str(path), **_cert_facts(cert)}
                        for role, path, cert in certs
                    ],
                    "oauth": None
                    if token is None
                    else {
                        k: (_rfc3339(v) if k in ("valid_until", "last_fetch") and v else v)
                        for k, v in token.items()
                    },
                    "last_upstream_connect": self.last_connect.get(c.name),
                }
            )
        return {
            "ready": not self.readiness(),
            "reasons": self.readiness(),
            "routes": routes,
            "config": _redacted(attrs.asdict(self.config)),
        }

    # ---- listening
    def start(self, inherited: Mapping[str, list[int]] | None = None) -> None:
        for state in self.routes:
            factory: Any = DownstreamFactory(state.route)
            if state.server_tls is not None:
                factory = tls.tls_factory(state.server_tls, False, factory)
            try:
                state.port = self._listen(state.config.listen, factory, inherited or {})
            except CannotListenError as e:
                raise tls.MaterialError(
                    f"{state.config.direction}[{state.config.name}].listen {state.config.listen}: "
                    f"cannot listen: {e.socketError or e}"
                ) from None
            state.route.listener = state.port
            self.log.info(
                "{route}: {direction} listening on {where} -> {upstream}",
                route=state.config.name,
                direction=state.config.direction,
                where=_where(state.port, state.config.listen),
                upstream=str(state.config.upstream),
            )
        if self.config.admin is not None:
            from proxy.ops.admin import admin_site

            where = self.config.admin.listen
            try:
                self.admin_port = self._listen(where, admin_site(self, self.metrics.registry), {})
            except CannotListenError as e:
                raise tls.MaterialError(
                    f"admin.listen {where}: cannot listen: {e.socketError or e}"
                ) from None
        # tokens are fetched once every listener is open: a listen failure comes first
        for state in self.routes:
            source = getattr(state.route, "token_source", None)
            if source is not None:
                source.source.start()
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        interval = self.config.service.reload_interval
        if interval > 0:
            self._watcher = task.LoopingCall(self._watch)
            self._watcher.clock = self.reactor
            self._watcher.start(interval, now=False)
        self.ready = True
        if self.notifier is not None:
            self.notifier.ready(f"{len(self.routes)} routes")

    def _listen(self, where: cfg.Listen, factory: Any, inherited: Mapping[str, list[int]]) -> Any:
        passed = inherited.get(adopted_key(where))
        if passed:  # a worker: the supervisor bound it and passed the socket down
            from proxy.ops.systemd import adopt_listener

            return adopt_listener(self.reactor, passed[0], factory)
        if where.kind == "tcp":
            return self.reactor.listenTCP(where.port, factory, backlog=1024, interface=where.host)
        if where.kind == "unix":
            return self.reactor.listenUNIX(where.path, factory, backlog=1024, mode=0o660)
        fds = inherited.get(where.name)
        if not fds:
            raise tls.MaterialError(
                f"listen systemd:{where.name}: no socket of that name was passed "
                "(FileDescriptorName= in the .socket unit)"
            )
        from proxy.ops.systemd import adopt_listener

        return adopt_listener(self.reactor, fds[0], factory)

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        for state in self.routes:
            state.route.sweep(now)
        self.access_log.flush()
        if self.accept_errors is not None:
            self.accept_errors.flush(now)

    # ---- reload
    def _current_signature(self) -> tuple[Any, ...]:
        paths: list[Path] = []
        for state in self.routes:
            paths += key_material_paths(state.config)
        return _signature(paths)

    def _watch(self) -> None:
        sig = self._current_signature()
        if sig != self._signature:
            self.log.info("key material changed on disk; reloading")
            self.reload()

    def reload(self) -> bool:
        """Rebuild every TLS context; swap only when all of them load. Returns success."""
        if self.notifier is not None:
            self.notifier.reloading()
        self._signature = self._current_signature()
        try:
            problems = audit.errors(self.config)  # what `check` calls an error is not swapped in
            if problems:
                raise tls.MaterialError(
                    f"{problems[0].key}: {problems[0].message}"
                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                )
            built: list[tuple[RouteState, Any]] = []
            upstream_tls: list[tuple[tls.ClientTLS, tls.ClientMaterial]] = []
            for state in self.routes:
                if isinstance(state.config, cfg.EgressRoute):
                    built.append((state, tls.build_client_material(state.config)))
                else:
                    built.append((state, tls.build_server_material(state.config)))
                    if state.client_tls is not None:  # an https internal upstream
                        upstream_tls.append(
                            (state.client_tls, tls.build_upstream_material(state.config))
                        )
        except tls.MaterialError as e:
            self.metrics.reloads.labels("failure").inc()
            self.log.error(
                "reload failed, keeping the current key material: {reason}", reason=str(e)
            )
            if self.notifier is not None:
                self.notifier.ready(f"reload failed: {e}")
            return False
        for state, material in built:
            if isinstance(material, tls.ClientMaterial):
                assert state.client_tls is not None
                old = state.client_tls.material.pair
                state.client_tls.material = material
                if old is None or material.pair is None or old.leaf != material.pair.leaf:
                    state.route.pool.renew()
            else:
                assert state.server_tls is not None
                state.server_tls.material = material
                if isinstance(state.route, Ingress):
                    state.route.peers.clear()  # a new client_ca may verify other chains
        for client, upstream_material in upstream_tls:
            client.material = upstream_material
        for state in self.routes:  # a fixed cause heals at once: no waiting out the backoff
            glue = getattr(state.route, "token_source", None)
            if glue is not None:
                glue.source.reset_backoff()
        self.metrics.reloads.labels("success").inc()
        self._record_expiry()
        self.log.info("key material reloaded")
        if self.notifier is not None:
            self.notifier.ready("reloaded")
        return True

    def _record_expiry(self) -> None:
        gauge = self.metrics.certificate_expiry
        for state in self.routes:
            name = state.config.name
            pair = state.client_tls.material.pair if state.client_tls is not None else None
            if pair is not None and isinstance(state.config, cfg.EgressRoute):
                leaf = pair.leaf
                gauge.labels(name, "client").set(leaf.not_valid_after_utc.timestamp())
            if state.server_tls is not None:
                m = state.server_tls.material
                gauge.labels(name, "server").set(m.pair.leaf.not_valid_after_utc.timestamp())
                for ca in m.client_cas[:1]:
                    gauge.labels(name, "client_ca").set(ca.not_valid_after_utc.timestamp())

    # ---- stop
    def stop(self) -> defer.Deferred[None]:
        """Stop accepting, let in-flight exchanges finish within drain_timeout, then close."""
        if self._stopping is not None:
            return self._stopping
        self.draining = True
        if self.notifier is not None:
            self.notifier.stopping()
        self.log.info("draining (up to {t}s)", t=self.config.service.drain_timeout)
        stops = [defer.maybeDeferred(s.port.stopListening) for s in self.routes if s.port]
        for state in self.routes:
            state.route.drain()
        deadline = self.reactor.seconds() + self.config.service.drain_timeout
        done: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            busy = sum(len(s.route.connections) for s in self.routes)
            if busy == 0 or self.reactor.seconds() >= deadline:
                if busy:
                    self.log.warn("drain timeout: closing {n} connections", n=busy)
                for s in self.routes:
                    s.route.abort_all()
                poll.stop()
                self.access_log.flush()
                done.callback(None)

        poll = task.LoopingCall(check)
        poll.clock = self.reactor
        defer.DeferredList(stops).addCallback(lambda _: poll.start(0.05, now=True))
        self._stopping = done
        return done


def _token_state(route: Route) -> dict[str, Any] | None:
    glue = getattr(route, "token_source", None)
    if getattr(glue, "remote", False):
        return None  # held by the supervisor, which reports it
    state = getattr(getattr(glue, "source", None), "state", None)
    return dict(state()) if state is not None else None


def _cert_facts(cert: Any) -> dict[str, str]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


_SECRET_KEY = re.compile(r"(?i)secret|password|token$|credential")


def _redacted(value: Any, key: str = "") -> Any:
    """The config as JSON-able data; anything named like a secret is hidden. (The config holds
    paths to key material, never the material itself.)"""
    if isinstance(value, dict):
        return {k: _redacted(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, key) for v in value]
    if _SECRET_KEY.search(key) and isinstance(value, str):
        return "[redacted]"
    return value if isinstance(value, int | float | bool | type(None)) else str(value)


def _where(port: Any, listen: cfg.Listen) -> str:
    try:
        host = port.getHost()
        return f"{host.host}:{host.port}" if hasattr(host, "port") else str(listen)
    except Exception:
        return str(listen)


def _reason_label(detail: str) -> str:
    text = detail.lower()
    for needle, label in (
        ("expired", "certificate_expired"),
        ("not yet valid", "certificate_not_yet_valid"),
        ("hostname mismatch", "hostname_mismatch"),
        ("not trusted", "certificate_untrusted"),
        ("protocol version", "protocol_version"),
        ("unsupported protocol", "protocol_version"),
        ("timed out", "timeout"),
        ("closed during", "peer_closed"),
    ):
        if needle in text:
            return label
    return "handshake_failed"


def install_signal_handlers(
    reactor: Any, sidecar: Sidecar, exit_code: Callable[[int], None]
) -> None:
    """SIGHUP reloads; SIGTERM/SIGINT drain then stop; a second one exits at once."""
    state = {"stopping": False}

    def on_term(signum: int, frame: object) -> None:
        if state["stopping"]:
            sidecar.access_log.flush()
            os._exit(1)
        state["stopping"] = True
        reactor.callFromThread(_graceful)

    def _graceful() -> None:
        def done(_: object) -> None:
            exit_code(0)
            reactor.stop()

        sidecar.stop().addBoth(done)

    def on_hup(signum: int, frame: object) -> None:
        reactor.callFromThread(sidecar.reload)

    # a parent (e.g. systemd-socket-activate) may hand us these blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
