"""The running sidecar: listeners, the timer sweep, reload, drain, admin, systemd notifications."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from proxy import config as cfg
from proxy.ops import audit, health
from proxy.ops.heap import start_trimming
from proxy.pkcs11uri import Pkcs11URI
from proxy.routes.egress import Egress
from proxy.routes.ingress import Ingress
from proxy.routes.route import Route
from proxy.telemetry.logs import AcceptErrors, AccessLog, RateLimitedLog, log_line, rfc3339
from proxy.telemetry.metrics import Metrics, RouteStats
from proxy.tls import contexts as tls
from proxy.tls import pki, revocation
from proxy.tls.transport import TLSFactory
from proxy.wire.pool import Pool
from proxy.wire.relay import DownstreamFactory
from proxy.wire.resolver import DNSResolver
from proxy.wire.tunnel import ProxyHop, hop_for, proxy_auth

if TYPE_CHECKING:
    from proxy.telemetry.tracing import Tracer

SWEEP_INTERVAL = 0.25
STALE_CRL_REPEAT = 3600.0  # a stale CRL's error line comes again this often while it stays


@attrs.define
class RouteState:
    """One route at run time: its config, its policy object and its reloadable TLS material."""

    config: cfg.EgressRoute | cfg.IngressRoute
    route: Route
    client_tls: tls.ClientTLS | None = None  # egress: toward the partner; ingress: https upstream
    server_tls: tls.ServerTLS | None = None  # ingress
    port: IListeningPort | None = None
    oauth_files: tuple[Any, ...] = ()  # the OAuth key files when built: a change rebuilds it


@attrs.define
class _Retiring:
    """A route a reload replaced or removed: its open connections finish, then it closes."""

    state: RouteState
    deadline: float  # drain_timeout: what is still open then is cut
    pool_deadline: float = 0.0  # set once its connections are gone: the pool's close grace
    cut: bool = False  # its connections were aborted at the deadline


class _Refused(Exception):
    """A reload refused: the text says why, naming the file and the key."""


@attrs.define
class _Plan:
    """What a reload swaps in, built before anything running is touched."""

    config: cfg.Config
    states: list[RouteState] = attrs.Factory(list)  # the routes in effect after the swap
    kept: list[RouteState] = attrs.Factory(list)  # running routes whose config is unchanged
    fresh: list[RouteState] = attrs.Factory(list)  # built by this reload
    material: list[tuple[RouteState, Any]] = attrs.Factory(list)  # new TLS of the kept routes
    upstream: list[tuple[tls.ClientTLS, tls.ClientMaterial]] = attrs.Factory(list)
    shared: list[tuple[tls.ClientTLS, tls.ClientMaterial]] = attrs.Factory(list)
    proxy_auth: list[tuple[ProxyHop, bytes | None]] = attrs.Factory(list)  # re-read credentials
    takeover: list[tuple[RouteState, RouteState]] = attrs.Factory(list)  # (new, old) same listen
    opened: list[tuple[RouteState, Any]] = attrs.Factory(list)  # (new, port opened for it)
    closing: list[RouteState] = attrs.Factory(list)  # old routes whose listen is gone


def adopted_key(where: cfg.Listen) -> str:
    """The key under which a socket bound by a supervisor for `where` is passed to a worker."""
    return f"={where}"


def key_material_paths(route: cfg.EgressRoute | cfg.IngressRoute) -> list[Path]:
    if isinstance(route, cfg.EgressRoute):
        paths = [route.client_cert, route.client_key, route.trust]
        if route.proxy:
            paths.append(route.proxy.auth_file)
        if route.oauth:
            paths.append(_key_file(route.oauth.signing_key))
    else:
        paths = [route.server_cert, route.server_key, route.client_ca, route.upstream_trust]
        paths.append(route.client_crl)
        if route.oauth:
            o = route.oauth
            paths += [o.clients_file, _key_file(o.signing_key), *o.verify_keys]
    return [p for p in paths if p is not None]


def _key_file(key: Path | Pkcs11URI) -> Path | None:
    """The file behind a signing key: itself, or a token key's PIN file."""
    return key.pin_source if isinstance(key, Pkcs11URI) else key


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


def _file_state(path: Path) -> tuple[str, float, int, int]:
    return _signature([path])[0]


def _oauth_paths(route: cfg.EgressRoute | cfg.IngressRoute) -> list[Path]:
    """Every file the route's [oauth] section names (keys, clients), in a stable order."""
    if route.oauth is None:
        return []
    out: list[Path] = []
    for value in attrs.asdict(route.oauth, recurse=False).values():
        if isinstance(value, Path):
            out.append(value)
        elif isinstance(value, Pkcs11URI) and value.pin_source is not None:
            out.append(value.pin_source)
        elif isinstance(value, tuple | list):
            out += [v for v in value if isinstance(v, Path)]
    return out


def _listen_key(route: cfg.EgressRoute | cfg.IngressRoute) -> str:
    """Which running listener a new route takes over: the one on the same address (an
    ephemeral port 0 only from the route of the same name)."""
    where = route.listen
    if where.kind == "tcp" and where.port == 0:
        return f"{route.direction}:{route.name}@{where}"
    return str(where)


def _client_identity(rc: cfg.EgressRoute) -> tuple[Any, ...]:
    """What an egress route's client TLS is made of: equal -> a rebuilt route shares it (and
    the OAuth token fetched over it)."""
    return (rc.client_cert, rc.client_key, rc.trust, rc.profile, rc.server_name or rc.upstream.host)


def _swap_factory(port: Any, factory: Any) -> None:
    """A listening port builds every accepted connection with `port.factory`, read at each
    accept: swapping it sends new connections to another route, and the socket never closes."""
    old = port.factory
    factory.doStart()
    port.factory = factory
    old.doStop()


def _findings_text(findings: list[cfg.Finding]) -> str:
    first = findings[0]
    where = f"{first.file}: {first.key}" if first.key else first.file
    more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
    return f"{where}: {first.message}{more}"


def _pool_states(pools: list[Pool]) -> dict[str, int]:
    total: dict[str, int] = {}
    for pool in pools:
        for state, n in pool.states().items():
            total[state] = total.get(state, 0) + n
    return total


# keys read once at start: a reload that changes them says so and keeps the running value
RESTART_KEYS = {
    "service.workers": "workers",
    "service.malloc_trim_interval": "malloc_trim_interval",
    "log.format": "log_format",
    "log.level": "log_level",
    "resolver.nameservers": "nameservers",
}


def restart_only_keys(supervised: bool = False) -> list[str]:
    """The keys a reload leaves at their running value. A supervisor applies a new `workers`
    at reload (a new generation of that size); a single process needs a restart for it."""
    keys = ["admin.listen", *RESTART_KEYS]
    return [k for k in keys if not (supervised and k == "service.workers")]


def _restart_keys(running: cfg.Config, new: cfg.Config) -> list[str]:
    old, now = running.admin, new.admin
    keys = ["admin.listen"] if (old and old.listen) != (now and now.listen) else []
    if old and now and old.status_from != now.status_from:
        keys.append("admin.status_from")
    if running.tracing != new.tracing:
        keys.append("tracing")
    for key, field in RESTART_KEYS.items():
        if getattr(running.service, field, None) != getattr(new.service, field, None):
            keys.append(key)
    return keys


def _in_effect(running: cfg.Config, new: cfg.Config) -> cfg.Config:
    """`new`, with the running values of the keys that need a restart."""
    kept = {f: getattr(running.service, f) for f in RESTART_KEYS.values()
            if hasattr(running.service, f)}  # fmt: skip
    return attrs.evolve(new, admin=running.admin, tracing=running.tracing,
                        service=attrs.evolve(new.service, **kept))  # fmt: skip


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
        announce: bool = True,  # log expiry warnings and findings (one worker of N does)
        wall: Callable[[], float] = time.time,  # certificates' validity is judged by it
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
        self._trimmer: task.LoopingCall | None = None
        self._seen: dict[str, tuple[Any, ...]] = {}  # watched file -> its state when read
        self._attempted: list[Path] = []  # key material of a refused config: watched too
        self._retiring: list[_Retiring] = []  # replaced routes finishing their connections
        self._inherited: dict[str, list[int]] = {}  # sockets passed at start, not yet adopted
        self._adopted: set[str] = set()  # listen addresses served on a passed socket
        self._parked: dict[str, Any] = {}  # passed sockets no route uses now (not closed)
        self._pools: dict[str, list[Pool]] = {}  # route name -> its pools (running, draining)
        self._stopping: defer.Deferred[None] | None = None
        self.accept_errors: AcceptErrors | None = None  # set when logging starts
        self.last_connect: dict[str, dict[str, Any]] = {}  # route -> last upstream connect
        self.last_reload: dict[str, Any] | None = None  # time, result, error
        self.started_at = reactor.seconds()
        self.health = health.Health(self, _token_state, announce=announce, wall=wall)
        self._stale_crl_logged: dict[str, tuple[int, float]] = {}  # route -> (CRLs, when)
        self.started = reactor.seconds()
        self.tracer: Tracer | None = None  # built with the routes when [tracing] is set
        self._trace_log = RateLimitedLog(self.log, reactor)
        ns = config.service.nameservers
        self.resolver = DNSResolver(ns) if ns else reactor.nameResolver

    # ---- build (raises tls.MaterialError before anything listens)
    def build(self) -> None:
        self._seen = self._stat_watched()  # before reading: a change while building is seen
        if self.config.tracing is not None and self.tracer is None:
            from proxy.telemetry.tracing import Tracer, TracingError

            try:
                self.tracer = Tracer(self.config.tracing, self.metrics, self._trace_warning)
            except TracingError as e:
                raise tls.MaterialError(str(e)) from None
        for rc in self.config.routes():
            files = _signature(_oauth_paths(rc))
            if isinstance(rc, cfg.EgressRoute):
                state = self._build_egress(rc)
            else:
                state = self._build_ingress(rc)
            state.oauth_files = files
            self.routes.append(state)
        self._record_expiry()

    def _trace_warning(self, key: str, message: str) -> None:
        """The tracing SDK's warnings, from its export thread: a few per 10 s in the log (the
        metrics count every dropped span)."""
        self.reactor.callFromThread(
            self._trace_log.warn, f"tracing:{key}", "tracing: {message}", message=message
        )

    def _pool(self, name: str, up: cfg.Upstream, client_tls: tls.ClientTLS | None,
              r: cfg.EgressRoute | cfg.IngressRoute, hop: ProxyHop | None = None,
              ) -> Pool:  # fmt: skip
        handshakes = self.metrics.handshake_errors
        self.metrics.known_labels(name, r.direction, isinstance(r, cfg.EgressRoute) and
                                  r.oauth is not None)  # fmt: skip
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
            proxy=hop,
        )
        self._watch_pool(name, pool)
        return pool

    def _watch_pool(self, name: str, pool: Pool) -> None:
        """One set of pool gauges per route name, summed over its running and draining pools."""
        pools = self._pools.get(name)
        if pools is None:
            pools = self._pools[name] = []
            self.metrics.watch_pool(name, lambda: _pool_states(pools))
        pools.append(pool)

    def _build_egress(self, rc: cfg.EgressRoute, prev: RouteState | None = None,
                      shared: list[tuple[tls.ClientTLS, tls.ClientMaterial]] | None = None,
                      proxy_auth: list[tuple[ProxyHop, bytes | None]] | None = None,
                      ) -> RouteState:  # fmt: skip
        """prev: the running route of that name a reload replaces. When its client TLS is made
        of the same files the new route shares it (the new material goes in at the swap, via
        `shared`), and with the same [oauth] its token source: no new token fetch. With the
        same proxy it shares the proxy hop too (credentials re-read, in at the swap via
        `proxy_auth`), so a carried token source sends what the pool sends."""
        material = tls.build_client_material(rc)
        reused = (
            prev.client_tls
            if prev is not None
            and shared is not None
            and isinstance(prev.config, cfg.EgressRoute)
            and _client_identity(prev.config) == _client_identity(rc)
            else None
        )
        if reused is not None and shared is not None:
            client = reused
            shared.append((client, material))
        else:
            client = tls.ClientTLS(material, rc.server_name or rc.upstream.host)
        hop = hop_for(rc.proxy)
        kept_hop = prev.route.pool.proxy if prev is not None else None
        if (
            hop is not None
            and kept_hop is not None
            and proxy_auth is not None
            and prev is not None
            and isinstance(prev.config, cfg.EgressRoute)
            and prev.config.proxy == rc.proxy
        ):
            proxy_auth.append((kept_hop, hop.authorization))
            hop = kept_hop
        pool = self._pool(rc.name, rc.upstream, client, rc, hop)
        token_source = None
        carried = getattr(prev.route, "token_source", None) if prev and reused else None
        if (
            rc.oauth is not None
            and carried is not None
            and prev is not None
            and prev.config.oauth == rc.oauth
            and prev.config.timeouts.connect == rc.timeouts.connect
            and isinstance(prev.config, cfg.EgressRoute)
            and prev.config.proxy == rc.proxy  # the token call goes through the route's proxy
            and prev.oauth_files == _signature(_oauth_paths(rc))
        ):
            token_source = carried  # fetched over the same client TLS with the same key
        elif rc.oauth is not None:
            from proxy.oauth.glue import egress_token_source

            if self.remote_tokens is not None:
                token_source = self.remote_tokens(rc.name)
            else:
                token_source = egress_token_source(self.reactor, self.metrics, rc, client, hop)
        route = Egress(
            rc,
            token_source=token_source,
            clock=self.reactor,
            pool=pool,
            metrics=self.metrics,
            access_log=self.access_log,
            tracer=self.tracer,
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
            tracer=self.tracer,
        )
        return RouteState(ri, route, client_tls=client, server_tls=server)

    def _connected(self, route: str, result: str) -> None:
        self.metrics.upstream_connects.labels(route, result).inc()
        self.last_connect[route] = {"result": result, "time": rfc3339(self.reactor.seconds())}

    # ---- what the admin listener and `status` show
    def readiness(self) -> list[str]:
        """Why the traffic a Service sends this pod would fail now; empty when ready. Egress
        certificates and tokens never count here (see `route_readiness`)."""
        return [c.failure for c in self.health.pod_checks() if c.failure]

    def readiness_checks(self, route: str | None = None) -> list[health.Check] | None:
        """The checks of /readyz, or of /readyz/<route>; None for an unknown route."""
        if route is None:
            return self.health.pod_checks()
        for state in self.routes:
            if state.config.name == route:
                return self.health.route_checks(state)
        return None

    def status(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        moment = self.health.now()
        routes = []
        for state in self.routes:
            c = state.config
            reasons = self.health.route_reasons(state)
            token = _token_state(state.route)
            routes.append(
                {
                    "name": c.name,
                    "direction": c.direction,
                    "state": "down" if reasons else "up",
                    "reasons": reasons,
                    "listening": state.port is not None,
                    "certificates": [
                        {
                            "role": h.role,
                            "file": h.file,
                            **_cert_facts(h.cert),
                            "days_left": round(pki.days_left(h.cert, moment), 2),
                        }
                        for h in health.held(state)
                    ],
                    "oauth": None
                    if token is None
                    else {
                        k: (rfc3339(v) if k in ("valid_until", "last_fetch") and v else v)
                        for k, v in token.items()
                    },
                    "last_upstream_connect": self.last_connect.get(c.name),
                    "requests": request_counts(self.metrics.routes, c.name, c.direction),
                }
            )
        now = self.reactor.seconds()
        reasons = self.readiness()
        return {
            "ready": not reasons,
            "reasons": reasons,
            "started": rfc3339(self.started_at),
            "uptime_seconds": round(now - self.started_at, 3),
            "last_reload": self.last_reload,
            "routes": routes,
            "restart_keys": restart_only_keys(),
            "config": _redacted(attrs.asdict(self.config)),
        }

    # ---- listening
    def start(self, inherited: Mapping[str, list[int]] | None = None) -> None:
        self._inherited = dict(inherited or {})  # a reload may adopt what no route used yet
        for state in self.routes:
            state.port = self._open_listener(state)
            state.route.listener = state.port
            self._log_listening(state)
            self.metrics.route_up.labels(state.config.name, state.config.direction).set(1)
            for reason in ("max_connections", "draining"):  # exported at 0 from start
                self.metrics.connections_refused.labels(state.config.name, reason)
        if self.config.admin is not None:
            from proxy.ops.admin import admin_site

            where, status_from = self.config.admin.listen, self.config.admin.status_from
            site = admin_site(self, self.metrics.registry, status_from, self.reactor.seconds)
            try:
                self.admin_port = self._listen(where, site, {})
            except CannotListenError as e:
                raise tls.MaterialError(
                    f"admin.listen {where}: cannot listen: {e.socketError or e}"
                ) from None
        # tokens are fetched once every listener is open (a listen failure comes first), and
        # only for routes whose certificate is valid now
        self.health.start()
        self._sweeper = task.LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        self._trimmer = start_trimming(self.reactor, self.config.service.malloc_trim_interval)
        self._start_watcher()
        self.ready = True
        if self.notifier is not None:
            self.notifier.ready(f"{len(self.routes)} routes")

    def _start_watcher(self) -> None:
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        self._watcher = None
        interval = self.config.service.reload_interval
        if interval > 0:
            self._watcher = task.LoopingCall(self._watch)
            self._watcher.clock = self.reactor
            self._watcher.start(interval, now=False)

    def _factory(self, state: RouteState) -> Any:
        factory: Any = DownstreamFactory(state.route)
        if state.server_tls is not None:
            factory = TLSFactory(state.server_tls, False, factory)
        return factory

    def _open_listener(self, state: RouteState) -> Any:
        """A listener for the route: a passed socket parked by an earlier reload, one passed
        at start (adopted once: its descriptor is closed then), or a new one."""
        where = state.config.listen
        factory = self._factory(state)
        parked = self._parked.pop(str(where), None)
        if parked is not None:
            _swap_factory(parked, factory)
            parked.startReading()
            return parked
        keys = [adopted_key(where)] + ([where.name] if where.kind == "systemd" else [])
        passed = next((k for k in keys if self._inherited.get(k)), None)
        try:
            port = self._listen(where, factory, self._inherited)
        except (CannotListenError, OSError, ValueError) as e:
            why = e.socketError or e if isinstance(e, CannotListenError) else e
            raise tls.MaterialError(
                f"{state.config.direction}[{state.config.name}].listen {where}: "
                f"cannot listen: {why}"
            ) from None
        if passed is not None:
            del self._inherited[passed]
            self._adopted.add(str(where))
        return port

    def _close_listener(self, where: cfg.Listen, port: Any) -> None:
        """Stop accepting on a listener no route uses now. A passed socket is parked instead
        of closed: its descriptor is gone, and a later reload may want it back."""
        if str(where) in self._adopted:
            port.stopReading()
            self._parked[str(where)] = port
        else:
            port.stopListening()

    def _log_listening(self, state: RouteState) -> None:
        self.log.info(
            "{route}: {direction} listening on {where} -> {upstream}",
            route=state.config.name,
            direction=state.config.direction,
            where=_where(state.port, state.config.listen),
            upstream=str(state.config.upstream),
        )

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
        if self._retiring:
            self._sweep_retiring(now)
        self._check_crls(now)
        self.access_log.flush()
        if self.accept_errors is not None:
            self.accept_errors.flush(now)

    def _check_crls(self, now: float) -> None:
        """An error line when a route's CRL passes its nextUpdate (the handshakes themselves
        follow crl_stale), again every STALE_CRL_REPEAT seconds while it stays stale."""
        for state in self.routes:
            rev = state.server_tls.material.revocation if state.server_tls else None
            stale_at = rev.stale_at() if rev is not None else None
            if rev is None or stale_at is None or now < stale_at.timestamp():
                continue
            name = state.config.name
            logged = self._stale_crl_logged.get(name)
            if logged and logged[0] == id(rev) and now - logged[1] < STALE_CRL_REPEAT:
                continue
            self._stale_crl_logged[name] = (id(rev), now)
            wall = datetime.datetime.fromtimestamp(now, datetime.UTC)
            effect = (
                "every caller is refused (crl_stale = refuse)"
                if rev.stale == "refuse"
                else "its revocations still apply, callers are admitted (crl_stale = warn)"
            )
            self.log.error(
                "{route}: client_crl {path}: {crls} past nextUpdate: the CA has not published a "
                "fresh CRL or it was not put in place; {effect}",
                route=name,
                path=str(rev.path),
                crls="; ".join(revocation.describe(c) for c in rev.stale_ones(wall)),
                effect=effect,
            )

    # ---- reload: the whole config file again, swapped in only when all of it is good
    def _watched(self) -> list[Path]:
        """The files a change of which reloads: the config file, the key material of the
        routes in effect, and that of the last config refused (fixing its files retries it)."""
        paths = [self.config.path]
        for rc in self.config.routes():
            paths += key_material_paths(rc)
        return paths + self._attempted

    def _stat_watched(self) -> dict[str, tuple[Any, ...]]:
        return {str(p): _file_state(p) for p in self._watched()}

    def _watch(self) -> None:
        changed = [p for p in self._watched() if _file_state(p) != self._seen.get(str(p))]
        if changed:
            what = "config file" if changed[0] == self.config.path else "key material"
            self.log.info(
                "{what} changed on disk ({path}); reloading", what=what, path=str(changed[0])
            )
            self.reload()

    def reload(self) -> bool:
        """Re-read the config file and its key material and validate them as `check` does.
        Valid: routes whose config is unchanged keep running with their TLS material re-read;
        the others are built anew and take over their listeners (new connections get them),
        new listeners open, the replaced routes finish their open connections and close.
        Invalid: everything running stays as it is. Returns success."""
        if self.draining:  # stopping: nothing new opens
            self.log.info("draining: reload ignored")
            return False
        if self.notifier is not None:
            self.notifier.reloading()
        path = self.config.path
        seen = self._stat_watched()  # before reading: a change during the reload is seen next
        plan: _Plan | None = None
        try:
            try:
                config = cfg.load(path)
            except cfg.ConfigError as e:
                self._attempted = []
                raise _Refused(_findings_text(e.findings)) from None
            self._attempted = [p for rc in config.routes() for p in key_material_paths(rc)]
            seen.update((str(p), _file_state(p)) for p in self._attempted)
            findings = audit.audit(config, running=True)
            problems = audit.mistakes(findings)  # what `check` calls a mistake is not swapped in
            if problems:
                raise _Refused(_findings_text(problems))
            plan = self._prepare(config)
            self._open_listeners(plan)
        except Exception as e:  # whatever went wrong, what runs stays as it is
            if plan is not None:
                self._discard(plan)
            self._seen = seen
            if isinstance(e, _Refused):
                reason = str(e)
            elif isinstance(e, tls.MaterialError):
                reason = f"{path}: {e}"
            else:
                reason = f"{path}: unexpected {type(e).__name__}: {e}"
            self.metrics.reloads.labels("failure").inc()
            self.last_reload = {"time": rfc3339(self.reactor.seconds()), "result": "failure",
                                "error": reason}  # fmt: skip
            self.log.error(
                "reload failed, keeping the current key material and config: {reason}",
                reason=reason,
            )
            if self.notifier is not None:
                self.notifier.ready(f"reload failed: {reason}")
            return False
        self._attempted = []
        self._seen = seen
        self._commit(plan)
        self.last_reload = {"time": rfc3339(self.reactor.seconds()), "result": "success",
                            "error": None}  # fmt: skip
        if self.health.announce:
            health.log_findings(findings)
        if self.notifier is not None:
            self.notifier.ready("reloaded")
        return True

    def _prepare(self, config: cfg.Config) -> _Plan:
        """Build what the new config needs; nothing running is touched (tls.MaterialError)."""
        plan = _Plan(config)
        running = {(s.config.direction, s.config.name): s for s in self.routes}
        items: list[tuple[str, cfg.EgressRoute | cfg.IngressRoute]] = [
            (f"egress[{i}] ({r.name})", r) for i, r in enumerate(config.egress)
        ]
        items += [(f"ingress[{i}] ({r.name})", r) for i, r in enumerate(config.ingress)]
        for key, rc in items:
            prev = running.get((rc.direction, rc.name))
            files = _signature(_oauth_paths(rc))
            try:
                if prev is not None and prev.config == rc and prev.oauth_files == files:
                    self._reread_material(prev, plan)
                    plan.states.append(prev)
                    plan.kept.append(prev)
                    continue
                if isinstance(rc, cfg.EgressRoute):
                    state = self._build_egress(rc, prev, plan.shared, plan.proxy_auth)
                else:
                    state = self._build_ingress(rc)
            except Exception as e:
                self._discard(plan)
                if isinstance(e, tls.MaterialError):
                    raise tls.MaterialError(f"{key}: {e}") from None
                raise
            state.oauth_files = files
            self._count_on(state.route)
            plan.states.append(state)
            plan.fresh.append(state)
        return plan

    def _reread_material(self, state: RouteState, plan: _Plan) -> None:
        if isinstance(state.config, cfg.EgressRoute):
            plan.material.append((state, tls.build_client_material(state.config)))
            hop = state.route.pool.proxy
            if hop is not None and state.config.proxy is not None:
                plan.proxy_auth.append((hop, proxy_auth(state.config.proxy)))
        else:
            plan.material.append((state, tls.build_server_material(state.config)))
            if state.client_tls is not None:  # an https internal upstream
                plan.upstream.append((state.client_tls, tls.build_upstream_material(state.config)))

    def _count_on(self, route: Route) -> None:
        """A rebuilt route counts on in the request metrics of the route it replaces."""
        fresh = route.stats
        for stats in self.metrics.routes:
            if stats is not fresh and (stats.route, stats.direction) == (
                fresh.route,
                fresh.direction,
            ):
                self.metrics.routes.remove(fresh)
                route.stats = stats
                return

    def _open_listeners(self, plan: _Plan) -> None:
        """A new route on the address of a running one that is not kept takes its listener
        over at the swap; any other gets a listener now (tls.MaterialError)."""
        kept = {id(s) for s in plan.kept}
        held = {_listen_key(s.config): s for s in self.routes if s.port and id(s) not in kept}
        for state in plan.fresh:
            prev = held.pop(_listen_key(state.config), None)
            if prev is not None:
                plan.takeover.append((state, prev))
            else:
                plan.opened.append((state, self._open_listener(state)))
        plan.closing = list(held.values())

    def _discard(self, plan: _Plan) -> None:
        """Undo a plan that will not be swapped in: nothing ran on it."""
        for state, port in plan.opened:
            self._close_listener(state.config.listen, port)
        plan.opened = []
        in_use = {id(s.route.stats) for s in self._all_states()}
        for state in plan.fresh:
            self._unwatch_pool(state.config.name, state.route.pool)
            if id(state.route.stats) not in in_use:
                self.metrics.routes.remove(state.route.stats)
        plan.fresh = []

    def _commit(self, plan: _Plan) -> None:
        """The swap, in one reactor turn: no connection is accepted half-way through it."""
        running, new = self.config, plan.config
        restart = _restart_keys(running, new)
        self.config = _in_effect(running, new)
        # routes kept: their TLS material re-read in place (new connections use it)
        for state, material in plan.material:
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
        for client, upstream_material in plan.upstream + plan.shared:
            client.material = upstream_material
        for hop, authorization in plan.proxy_auth:  # new connections send the new credentials
            hop.authorization = authorization
        # listeners: taken over, opened, closed
        for state, prev in plan.takeover:
            port = self._release_listener(prev)
            _swap_factory(port, self._factory(state))
            state.port, state.route.listener = port, port
        for state, port in plan.opened:
            state.port, state.route.listener = port, port
            self._log_listening(state)
        for prev in plan.closing:
            port = self._release_listener(prev)
            self._close_listener(prev.config.listen, port)
            self.log.info(
                "{route}: no longer in the config: stopped listening on {where}",
                route=prev.config.name,
                where=str(prev.config.listen),
            )
        # the routes in effect; the replaced ones drain
        before, self.routes = self.routes, plan.states
        kept = {id(s) for s in plan.kept}
        running_sources = {id(getattr(s.route, "token_source", None)) for s in before}
        for prev in before:
            if id(prev) not in kept:
                self._retire(prev)
        self.health.reloaded()  # routes whose certificate lapsed go down before any token fetch
        for state in self.routes:
            glue = getattr(state.route, "token_source", None)
            if glue is None or getattr(state.route, "fault", None) is not None:
                continue
            if id(glue) in running_sources:  # a fixed cause heals at once: no backoff wait
                glue.source.reset_backoff()
            else:
                glue.source.start()
        # what else the config says
        if running.service.access_log != new.service.access_log:
            self.access_log.flush()
            self.access_log.enabled = new.service.access_log
        if running.service.reload_interval != new.service.reload_interval:
            self._start_watcher()
        names = {s.config.name for s in self.routes}
        for prev in before:
            if prev.config.name not in names:
                for role in ("client", "server", "client_ca"):
                    with contextlib.suppress(KeyError):
                        self.metrics.certificate_expiry.remove(prev.config.name, role)
        self.metrics.reloads.labels("success").inc()
        self._record_expiry()
        added = [s.config.name for s in plan.fresh if s.config.name not in
                 {p.config.name for p in before}]  # fmt: skip
        self.log.info(
            "config and key material reloaded: {n} routes ({kept} unchanged, {rebuilt} rebuilt,"
            " added: {added}, removed: {removed})",
            n=len(self.routes),
            kept=len(plan.kept),
            rebuilt=len(plan.fresh) - len(added),
            added=", ".join(added) or "none",
            removed=", ".join(sorted({p.config.name for p in before} - names)) or "none",
        )
        if restart:
            self.log.warn(
                "reload: {keys} changed: read at start only, the running value stays in effect "
                "until a restart",
                keys=", ".join(restart),
            )

    def _release_listener(self, prev: RouteState) -> Any:
        """Take a replaced route's listener away from it (resumed if it paused accepting)."""
        port = prev.port
        assert port is not None
        if prev.route.accept_paused:
            prev.route.accept_paused = False
            port.startReading()  # type: ignore[attr-defined]
        prev.route.listener = None
        prev.port = None
        return port

    def _retire(self, prev: RouteState) -> None:
        """The route stops taking requests: each open connection finishes its exchange in
        flight and closes; an idle keep-alive one closes now. A connection accepted before the
        swap whose first request is not in yet is answered by this route, then closed."""
        route = prev.route
        route.draining = True
        for down in list(route.connections):
            down.drain()
        deadline = self.reactor.seconds() + self.config.service.drain_timeout
        self._retiring.append(_Retiring(prev, deadline))

    def _sweep_retiring(self, now: float) -> None:
        for retiring in list(self._retiring):
            route = retiring.state.route
            route.sweep(now)
            if route.connections and not retiring.cut:
                if now < retiring.deadline:
                    continue
                retiring.cut = True
                self.log.warn(
                    "{route}: replaced by a reload: drain timeout: closing {n} connections",
                    route=route.name,
                    n=len(route.connections),
                )
                for down in list(route.connections):
                    down.transport.abortConnection()
            if not retiring.pool_deadline:  # idle upstream connections close now, politely
                retiring.pool_deadline = now + route.timeouts.close_grace + SWEEP_INTERVAL
                route.pool.renew()
                continue
            if route.pool.live and now < retiring.pool_deadline:
                continue
            route.pool.close_all()
            self._retiring.remove(retiring)
            self._unwatch_pool(route.name, route.pool)
            glue = getattr(route, "token_source", None)
            if glue is not None and all(
                getattr(s.route, "token_source", None) is not glue for s in self._all_states()
            ):
                glue.source.stop()
            self.log.debug("{route}: the replaced route is closed", route=route.name)

    def _all_states(self) -> list[RouteState]:
        """The routes in effect and the replaced ones still finishing their connections."""
        return self.routes + [r.state for r in self._retiring]

    def _unwatch_pool(self, name: str, pool: Pool) -> None:
        pools = self._pools.get(name, [])
        if pool in pools:
            pools.remove(pool)

    def _record_expiry(self) -> None:
        self.health.record()

    # ---- stop
    def stop(self) -> defer.Deferred[None]:
        """Stop accepting, let in-flight exchanges finish within drain_timeout, then close."""
        if self._stopping is not None:
            return self._stopping
        self.draining = True
        self.health.stop()
        if self.notifier is not None:
            self.notifier.stopping()
        self.log.info("draining (up to {t}s)", t=self.config.service.drain_timeout)
        stops = [defer.maybeDeferred(s.port.stopListening) for s in self.routes if s.port]
        for state in self.routes:
            state.route.drain()
        started = self.reactor.seconds()
        deadline = started + self.config.service.drain_timeout
        done: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            busy = sum(len(s.route.connections) for s in self._all_states())
            if busy == 0 or self.reactor.seconds() >= deadline:
                if busy:
                    self.log.warn("drain timeout: closing {n} connections", n=busy)
                for s in self._all_states():
                    s.route.abort_all()
                poll.stop()
                self.access_log.flush()
                if self.tracer is not None:
                    self.tracer.close()
                # the last line: an operator reading the log knows the stop was complete
                self.log.info(
                    "stopped after a {s:.1f}s drain; connections cut at the drain timeout: {n}",
                    s=self.reactor.seconds() - started,
                    n=busy,
                )
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


def request_counts(stats: list[RouteStats], route: str, direction: str) -> dict[str, Any]:
    """Requests answered on a route since start (every build of it), by status code."""
    codes: dict[str, int] = {}
    for s in stats:
        if s.route == route and s.direction == direction:
            for code, n in s.codes.items():
                codes[str(code)] = codes.get(str(code), 0) + n
    return {"total": sum(codes.values()), "by_code": dict(sorted(codes.items()))}


def _cert_facts(cert: Any) -> dict[str, str]:
    facts = pki.describe(cert)
    out = {k: facts[k] for k in ("subject", "serial", "sha256")}
    out["not_after"] = rfc3339(cert.not_valid_after_utc.timestamp())
    return out


_SECRET_KEY = re.compile(r"(?i)secret|password|token$|credential|pin_value")


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
        ("unknown ca", "unknown_ca"),  # the partner does not know our client certificate
        ("not trusted", "certificate_untrusted"),
        ("protocol version", "protocol_version"),
        ("unsupported protocol", "protocol_version"),
        ("timed out", "timeout"),
        ("closed during", "peer_closed"),
    ):
        if needle in text:
            return label
    return "handshake_failed"


def exit_at_once(log_format: str, signum: int) -> NoReturn:
    """A second SIGTERM/SIGINT while draining: one log line, then exit 128 + the signal, as a
    shell reports a process that signal ended (not 0: requests in flight are cut; not 1,
    which reads as a crash)."""
    code = 128 + signum
    line = log_line(
        log_format,
        f"second {signal.Signals(signum).name} while draining: exiting at once with status"
        f" {code}; requests in flight are cut",
        level="warn",
        logger="proxy.ops.service",
    )
    os.write(1, line.encode())  # in a signal handler: one write, no buffered stream
    os._exit(code)


def install_signal_handlers(
    reactor: Any, sidecar: Sidecar, exit_code: Callable[[int], None]
) -> None:
    """SIGHUP reloads; SIGTERM/SIGINT drain then stop; a second one exits at once."""
    state = {"stopping": False}

    def on_term(signum: int, frame: object) -> None:
        if state["stopping"]:
            sidecar.access_log.flush()
            exit_at_once(sidecar.config.service.log_format, signum)
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
