"""Each route's health: the certificates it holds and whether time has made them unusable (a
route fault, never a process fault), readiness checks, the `route_up` gauge, and the expiry
warnings. A lapsed certificate takes its route down at the moment it lapses, by a timer on the
reactor, not by a check per request."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from cryptography import x509
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from proxy import config as cfg
from proxy.telemetry.logs import rfc3339
from proxy.tls import pki
from proxy.wire.http import ProxyError

DAILY = 86400.0
MAX_TIMER = 7 * DAILY  # a far-off expiry is looked at again at least weekly (clock changes)


@attrs.frozen
class Held:
    """A certificate a route uses. role: `client`/`server` for the route's own certificate,
    `client_chain_N`/`server_chain_N` for the Nth certificate after it in its file, and
    `client_ca`, `client_ca_N` for the trust anchors of an ingress route's clients."""

    route: str
    direction: str
    role: str
    file: str
    cert: x509.Certificate

    @property
    def own(self) -> bool:
        """The route's own certificate: lapsed, it takes the route down."""
        return self.role in ("client", "server", "client_ca")


@attrs.frozen
class Check:
    """One readiness check: name, and why it fails (None: it passes)."""

    name: str
    failure: str | None = None


def held(state: Any) -> list[Held]:
    """Every certificate a running route uses, its chain and an ingress route's CAs included."""
    c = state.config
    out: list[Held] = []

    def add(role: str, path: Any, certs: Iterable[x509.Certificate], suffix: str) -> None:
        for i, cert in enumerate(certs):
            out.append(Held(c.name, c.direction, role if i == 0 else f"{role}{suffix}{i}",
                            str(path), cert))  # fmt: skip

    if isinstance(c, cfg.EgressRoute) and state.client_tls is not None:
        pair = state.client_tls.material.pair
        if pair is not None:
            add("client", c.client_cert, pair.chain, "_chain_")
    if state.server_tls is not None:
        m = state.server_tls.material
        add("server", c.server_cert, m.pair.chain, "_chain_")
        add("client_ca", c.client_ca, m.client_cas, "_")
    return out


def lapse(h: Held, now: datetime.datetime) -> tuple[str, str] | None:
    """(code, words) when `now` is outside the certificate's validity."""
    what = h.role if h.role == "client_ca" else f"{h.role}_certificate"
    subject = h.cert.subject.rfc4514_string()
    if now > h.cert.not_valid_after_utc:
        when = _iso(h.cert.not_valid_after_utc)
        return f"{what}_expired", f"{h.role} certificate {subject} expired at {when}"
    if now < h.cert.not_valid_before_utc:
        when = _iso(h.cert.not_valid_before_utc)
        return f"{what}_not_yet_valid", f"{h.role} certificate {subject} is valid from {when}"
    return None


def log_findings(findings: Iterable[cfg.Finding]) -> None:
    """`check`'s warnings, as log lines (certificates near their end are announced by Health
    with their route and role; lapsed ones take their route down with an error line)."""
    for f in findings:
        if f.level == "warning" and not f.fault:
            Health.log.warn("{file}: {key}: {message}", file=f.file, key=f.key, message=f.message)


def _span(seconds: float) -> str:
    """A time left as a person says it: 40 s, 3.5 hours, 12 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds / 60:.0f} min"
    return f"{seconds / 86400:.0f} days"


def _iso(when: datetime.datetime) -> str:
    return rfc3339(when.timestamp())


class Health:
    """Watches the routes of a Sidecar: their certificates over time and their readiness."""

    log = Logger()

    def __init__(
        self,
        sidecar: Any,
        token_state: Callable[[Any], dict[str, Any] | None],
        *,
        announce: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sidecar = sidecar
        self.clock = sidecar.reactor  # timers
        self.wall = wall  # what certificates are compared with (a test ties it to its clock)
        self.token_state = token_state  # a route -> its OAuth token state (None: not held here)
        self.announce = announce  # workers but the first stay quiet: one warning, not N
        self.faults: dict[str, list[tuple[str, str, Held]]] = {}  # route name -> its lapses
        self._applied: dict[int, list[str]] = {}  # id(route object) -> the lapse codes applied
        self._timer: IDelayedCall | None = None
        self._daily: IDelayedCall | None = None
        self.running = False
        sidecar.metrics.before_collect.append(self.record)

    # ---- time
    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.wall(), datetime.UTC)

    def start(self) -> None:
        """At start: route states, the warnings, and the timers."""
        self.running = True
        self.evaluate(when="start")
        self.warn_expiring()
        self._daily = self.clock.callLater(DAILY, self._day)

    def reloaded(self) -> None:
        if self.running:
            self.evaluate(when="reload")
            self.warn_expiring()

    def stop(self) -> None:
        self.running = False
        for call in (self._timer, self._daily):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._daily = None

    def _day(self) -> None:
        self.warn_expiring()
        self._daily = self.clock.callLater(DAILY, self._day)

    def evaluate(self, when: str = "timer") -> None:
        """Compute every route's lapses now, apply them, log what changed, set the next timer."""
        now = self.now()
        applied, self._applied = self._applied, {}
        self.faults = {}
        upcoming: list[datetime.datetime] = []
        for state in self.sidecar.routes:
            lapses = []
            for h in held(state):
                if not h.own:
                    continue
                found = lapse(h, now)
                if found is not None:
                    lapses.append((*found, h))
                for edge in (h.cert.not_valid_before_utc, h.cert.not_valid_after_utc):
                    if edge >= now:
                        upcoming.append(edge)
            self.faults[state.config.name] = lapses
            self._apply(state, lapses, applied.get(id(state.route)), when)
            self._applied[id(state.route)] = [code for code, _, _ in lapses]
        self._schedule(now, upcoming)
        self.record()

    def _apply(self, state: Any, lapses: list[tuple[str, str, Held]], was: list[str] | None,
               when: str) -> None:  # fmt: skip
        """was: the lapse codes applied to this route object before (None: never looked at)."""
        route, name = state.route, state.config.name
        down = bool(lapses)
        changed = [c for c, _, _ in lapses] != (was or [])
        if hasattr(route, "fault"):  # egress: answer at once, no new upstream connection
            if down:
                code, words, h = lapses[0]
                not_after = _iso(h.cert.not_valid_after_utc)
                route.fault = ProxyError(503, code, f"{words}: this route is down",
                                         (("not_after", not_after),))  # fmt: skip
            else:
                route.fault = None
            if changed and down:
                route.pool.renew()  # idle connections close now, busy ones after their response
            glue = getattr(route, "token_source", None)
            if glue is not None and not getattr(glue, "remote", False):
                if down:  # the token request would go out over the lapsed certificate
                    glue.source.stop()
                elif changed or was is None:
                    glue.source.start()
        if not changed and when == "timer":
            return
        if down and (changed or when != "timer") and self.announce:
            consequence = ("answering 503, no upstream connection" if hasattr(route, "fault")
                           else "still serving it; reported down")  # fmt: skip
            for code, words, h in lapses:
                self.log.error(
                    "{route}: {words}: route down ({consequence})",
                    route=name, words=words, consequence=consequence, reason=code,
                    role=h.role, subject=h.cert.subject.rfc4514_string(),
                    not_after=_iso(h.cert.not_valid_after_utc),
                )  # fmt: skip
        elif not down and was and changed and self.announce:
            self.log.info("{route}: certificates valid again: route up", route=name)

    def _schedule(self, now: datetime.datetime, edges: list[datetime.datetime]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.running:
            return
        # the first instant past an edge: notAfter itself is still valid (RFC 5280)
        delay = min([(e - now).total_seconds() + 0.001 for e in edges] + [MAX_TIMER])
        self._timer = self.clock.callLater(max(delay, 0.0), self.evaluate)

    # ---- warnings
    def warn_expiring(self) -> None:
        if not self.announce:
            return
        days = self.sidecar.config.service.expiry_warning_days
        now = self.now()
        for state in self.sidecar.routes:
            for h in held(state):
                left = pki.days_left(h.cert, now)
                if 0 <= left < days:
                    self.log.warn(
                        "{route}: {role} certificate {subject} expires in {left} ({not_after})",
                        route=h.route, role=h.role, subject=h.cert.subject.rfc4514_string(),
                        left=_span(left * 86400), days_left=round(left, 4),
                        not_after=_iso(h.cert.not_valid_after_utc),
                    )  # fmt: skip

    # ---- metrics
    def record(self) -> None:
        """Expiry of every certificate in use and each route's state, as gauges."""
        metrics = self.sidecar.metrics
        expiry, up = metrics.certificate_expiry, metrics.route_up
        expiry.clear()
        up.clear()
        for state in self.sidecar.routes:
            for h in held(state):
                expiry.labels(h.route, h.role).set(h.cert.not_valid_after_utc.timestamp())
            c = state.config
            up.labels(c.name, c.direction).set(0 if self.route_reasons(state) else 1)

    # ---- readiness
    def route_checks(self, state: Any) -> list[Check]:
        """What `/readyz/<route>` answers: the listener, the material now, a usable token."""
        name = state.config.name
        port = state.port
        listening = port is not None and getattr(port, "connected", True)
        checks = [Check("listener", None if listening else "listener not open")]
        lapses = self.faults.get(name, [])
        checks.append(Check("certificates", "; ".join(w for _, w, _ in lapses) or None))
        if isinstance(state.config, cfg.EgressRoute) and state.config.oauth is not None:
            token = self.token_state(state.route)
            failure = None
            if token is not None and not (token.get("valid_until") or 0) > self.clock.seconds():
                error = token.get("last_error")
                failure = "no valid OAuth token" + (f" (last error: {error})" if error else " yet")
            checks.append(Check("oauth_token", failure))
        return checks

    def route_reasons(self, state: Any) -> list[str]:
        return [c.failure for c in self.route_checks(state) if c.failure]

    def pod_checks(self) -> list[Check]:
        """What `/readyz` answers: every listener open, every ingress route's material loaded.
        Egress certificates and tokens never flip it (upstream health, as Envoy's readiness)."""
        s = self.sidecar
        if s.draining:  # its listeners are closing: that is the one reason
            return [Check("shutdown", "draining")]
        checks = [Check("shutdown"), Check("started", None if s.ready else "starting")]
        for state in s.routes:
            name = state.config.name
            port = state.port
            listening = port is not None and getattr(port, "connected", True)
            why = None if listening else f"{name}: listener not open"
            checks.append(Check(f"listener:{name}", why))
            if isinstance(state.config, cfg.IngressRoute):
                why = None if state.server_tls is not None else f"{name}: material not loaded"
                checks.append(Check(f"material:{name}", why))
        return checks


def render_checks(checks: list[Check], verbose: bool, what: str) -> tuple[int, bytes, bytes]:
    """(status, content type, body) as kube-apiserver answers /readyz: JSON reasons by default,
    `[+]name ok` / `[-]name failed: why` lines with ?verbose."""
    failed = [c for c in checks if c.failure]
    code = 503 if failed else 200
    if verbose:
        lines = [f"[+]{c.name} ok" if not c.failure else f"[-]{c.name} failed: {c.failure}"
                 for c in checks]  # fmt: skip
        lines.append(f"{what} check {'failed' if failed else 'passed'}")
        return code, b"text/plain; charset=utf-8", ("\n".join(lines) + "\n").encode()
    reasons = [c.failure for c in failed if c.failure]
    body = json.dumps({"ready": not failed, "reasons": reasons}).encode() + b"\n"
    return code, b"application/json", body
