"""`mtls-sidecar status`: what the running sidecar holds, read from its admin listener's
/status: readiness, certificates in use, OAuth token state (never the token), the last
upstream connect per route, and the config in effect."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from proxy import config as cfg


def fetch_status(config: cfg.Config, timeout: float = 5.0) -> dict[str, Any]:
    admin = config.admin
    if admin is None or admin.listen.kind != "tcp":
        raise RuntimeError(f"{config.path}: no [admin] listen host:port to ask")
    host = admin.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{admin.listen.port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            data: dict[str, Any] = json.loads(answer.read())
    except urllib.error.HTTPError as e:
        if e.code == 403:
            raise RuntimeError(f"{url}: 403: this address is not in [admin] status_from") from None
        raise RuntimeError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise RuntimeError(f"{url}: {reason} (is the sidecar running?)") from None
    return data


def render(status: dict[str, Any]) -> str:
    lines = ["ready" if status["ready"] else "NOT READY: " + "; ".join(status["reasons"])]
    for r in status["routes"]:
        lines.append(
            f"\n{r['direction']} {r['name']}: {'listening' if r['listening'] else 'closed'}"
        )
        for c in r["certificates"]:
            lines.append(
                f"  {c['role']:9} {c['subject']}  serial {c['serial']}  not after {c['not_after']}"
                f"\n            sha256 {c['sha256']}  ({c['file']})"
            )
        token = r.get("oauth")
        if token is not None:
            lines.append(
                f"  oauth     valid until {token.get('valid_until') or '-'}, last fetch "
                f"{token.get('last_fetch') or '-'}, last error {token.get('last_error') or '-'}"
            )
        last = r.get("last_upstream_connect")
        if last:
            lines.append(f"  upstream  last connect {last['result']} at {last['time']}")
    return "\n".join(lines) + "\n"


def run_status(path: str, *, as_json: bool = False, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        status = fetch_status(cfg.load(path))
    except cfg.ConfigError as e:
        for f in e.findings:
            print(f"mtls-sidecar: {f}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"mtls-sidecar: error: {e}", file=sys.stderr)
        return 2
    out.write(json.dumps(status, indent=2) + "\n" if as_json else render(status))
    return 0 if status["ready"] else 1
