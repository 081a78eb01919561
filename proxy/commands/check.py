"""`mtls-sidecar check`: every finding about a config and its key material, at once."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import config as cfg
from proxy.oauth import glue as oauthglue
from proxy.tls import contexts as tls
from proxy.tls import pki

# D1's published hosts and the environment their client certificates must name
D1_HOST_ENV = {"api.d1-stg.thalescloud.io": "PPR", "api.d1.thalescloud.io": "PRD"}


_KEYS = frozenset({"client_cert", "client_key", "server_cert", "server_key", "client_ca", "trust"})


def findings_for(
    path: str | Path, now: datetime.datetime | None = None
) -> tuple[list[cfg.Finding], cfg.Config | None]:
    config, findings = cfg.parse(path)
    if config is None:
        return findings, None
    now = now or datetime.datetime.now(datetime.UTC)
    file = str(config.path)
    warn_days = config.service.expiry_warning_days

    def add(level: str, key: str, message: str) -> None:
        findings.append(cfg.Finding(level, file, key, message))

    def certificate(key: str, path: Path, chain: list[Any], role: str) -> None:
        for problem in pki.chain_order_problems(chain):
            add("error", key, f"{path}: chain order: {problem}")
        leaf = chain[0]
        left = pki.days_left(leaf, now)
        subject = leaf.subject.rfc4514_string()
        if left < 0:
            add("error", key, f"{path}: {role} certificate {subject} expired {-left:.0f} days ago")
        elif now < leaf.not_valid_before_utc:
            add("error", key, f"{path}: {role} certificate {subject} is not valid yet")
        elif left < warn_days:
            add("warning", key, f"{path}: {role} certificate {subject} expires in {left:.0f} days")
        else:
            add("info", key, f"{path}: {role} certificate {subject}, {left:.0f} days left")

    def guarded(key: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except tls.MaterialError as e:
            # the message starts with the key it is about ("client_key /path: ...")
            first = str(e).split(" ", 1)[0]
            prefix = key.rsplit(".", 1)[0]
            add("error", f"{prefix}.{first}" if first in _KEYS else key, str(e))

    for index, r in enumerate(config.egress):
        prefix = f"egress[{index}] ({r.name})"

        def egress_checks(r: cfg.EgressRoute = r, prefix: str = prefix) -> None:
            pair = tls.build_client_material(r).pair  # exactly what `run` loads
            assert pair is not None
            certificate(f"{prefix}.client_cert", r.client_cert, list(pair.chain), "client")
            if r.profile == "d1":
                env = r.env or D1_HOST_ENV.get(r.upstream.host)
                for problem in pki.d1_client_cert_problems(pair.leaf, env):
                    add("error", f"{prefix}.client_cert", f"{r.client_cert}: {problem}")

        guarded(f"{prefix}.client_cert", egress_checks)
        if r.oauth is not None:
            o = r.oauth

            def oauth_checks(o: cfg.EgressOAuth = o) -> None:
                oauthglue.signing_key(o)  # the loader `run` uses

            guarded(f"{prefix}.oauth.signing_key", oauth_checks)

    for index, ri in enumerate(config.ingress):
        prefix = f"ingress[{index}] ({ri.name})"

        def ingress_checks(r: cfg.IngressRoute = ri, prefix: str = prefix) -> None:
            material = tls.build_server_material(r)  # exactly what `run` loads
            pair = material.pair
            certificate(f"{prefix}.server_cert", r.server_cert, list(pair.chain), "server")
            if r.server_name and not pki.san_covers(pair.leaf, r.server_name):
                add(
                    "error",
                    f"{prefix}.server_cert",
                    f"{r.server_cert}: subjectAltName does not cover server_name "
                    f"{r.server_name!r}: the partner will refuse the connection",
                )
            if len(pair.chain) == 1 and pair.leaf.issuer != pair.leaf.subject:
                add(
                    "warning",
                    f"{prefix}.server_cert",
                    f"{r.server_cert}: holds the leaf only; serve the full chain (intermediates)",
                )
            for ca in material.client_cas:
                certificate(f"{prefix}.client_ca", r.client_ca, [ca], "client CA")

        guarded(f"{prefix}.server_cert", ingress_checks)
    return findings, config


def run_check(path: str, *, as_json: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    findings, _ = findings_for(path)
    errors = sum(f.level == "error" for f in findings)
    if as_json:
        json.dump(
            {
                "ok": errors == 0,
                "errors": errors,
                "warnings": sum(f.level == "warning" for f in findings),
                "findings": [
                    {"level": f.level, "file": f.file, "key": f.key, "message": f.message}
                    for f in findings
                ],
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for f in findings:
            out.write(f"{f}\n")
        out.write(f"{'OK' if errors == 0 else 'FAILED'}: {errors} error(s)\n")
    return 0 if errors == 0 else 1
