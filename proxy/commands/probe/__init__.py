"""`mtls-sidecar probe`: dial each route the way its peer does, and say what happened.

Egress: the dial goes through the same pieces as the data path: the route's client material
(`tls.build_client_material`), `tls.ClientTLS`, the configured resolver and `pool.Pool`, so
the verification verdict is the one `run` would reach. One pool per DNS answer makes every
address's result visible. A short `GET /` on a verified connection tells whether the server
accepted our client certificate: with TLS 1.3 a server judges it only after the handshake.

Ingress: the probe stands where the partner stands and dials our own listener: it verifies the
served chain against the Mozilla bundle (the egress `trust` default, which is what D1 checks),
reads the CA names the listener asks clients for from its CertificateRequest, and presents no
client certificate, so a listener that enforces mutual TLS refuses it: that refusal is expected
and reported.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, task

from proxy import config as cfg
from proxy.commands.probe.egress import _Prober
from proxy.commands.probe.ingress import _IngressProber
from proxy.commands.probe.output import _all_ok, _as_json, _text
from proxy.commands.probe.reports import ERROR, IngressReport, RouteReport

__all__ = ["run_probe"]


# --------------------------------------------------------------------------- entry point
def run_probe(config_path: str, route: str | None, *, as_json: bool, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        config = cfg.load(config_path)
    except cfg.ConfigError as e:
        for f in e.findings:
            print(f"mtls-sidecar: {f}", file=sys.stderr)  # a finding starts with "error:"
        return 2
    routes = list(config.routes())
    names = ", ".join(r.name for r in routes) or "none"
    if route is not None:
        routes = [r for r in routes if r.name == route]
        if not routes:
            _error(f"no route named {route!r} in {config.path}; routes: {names}")
            return 2
    if not routes:
        _error(f"{config.path} has no [[egress]] or [[ingress]] route to probe")
        return 2
    result: dict[str, list[RouteReport | IngressReport]] = {}

    async def main(reactor: Any) -> None:
        egress, ingress = _Prober(reactor, config), _IngressProber(reactor)
        result["reports"] = [
            await (egress.route(r) if isinstance(r, cfg.EgressRoute) else ingress.route(r))
            for r in routes
        ]

    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if "reports" not in result:
            return int(e.code) if isinstance(e.code, int) else 1
    reports = result["reports"]
    if as_json:
        json.dump(_as_json(config, reports), out, indent=2)
        out.write("\n")
    else:
        out.write(_text(reports))
    out.flush()
    return 0 if _all_ok(reports) else 1


def _error(message: str) -> None:
    print(f"{ERROR} {message}", file=sys.stderr)
