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


def admin_url(config: cfg.Config) -> str:
    admin = config.admin
    if admin is None or admin.listen.kind != "tcp":
        raise RuntimeError(f"{config.path}: no [admin] listen host:port to ask")
    host = admin.listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{admin.listen.port}"


def parse_admin(text: str) -> str:
    """--admin HOST:PORT (IPv6 as [::1]:PORT) -> the admin listener's base URL."""
    try:
        where = cfg.parse_listen(text, "127.0.0.1")
    except Exception as e:  # the parser's own error type says what is wrong with it
        raise RuntimeError(f"--admin {text!r}: {e}") from None
    if where.kind != "tcp":
        raise RuntimeError(f"--admin {text!r}: expected HOST:PORT")
    host = "127.0.0.1" if where.host in ("0.0.0.0", "") else where.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{where.port}"


def fetch_status(base: str, timeout: float = 5.0) -> dict[str, Any]:
    url = f"{base}/status"
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
    if status.get("started"):
        lines.append(f"started {status['started']} ({status.get('uptime_seconds', 0):.0f} s ago)")
    last = status.get("last_reload")
    if last:
        error = f": {last['error']}" if last.get("error") else ""
        lines.append(f"last reload {last['time']}: {last['result']}{error}")
    else:
        lines.append("last reload: none since start")
    for w in status.get("workers") or []:
        rss = (w.get("resident_bytes") or 0) / 2**20
        lines.append(
            f"worker {w['index']}: pid {w['pid']}, generation {w['generation']}, up "
            f"{w.get('uptime_seconds', 0):.0f} s, rss {rss:.1f} MiB, "
            f"{w.get('requests')} requests"
        )
    for r in status["routes"]:
        state = r.get("state", "up" if r["listening"] else "down")
        why = f" ({'; '.join(r['reasons'])})" if r.get("reasons") else ""
        lines.append(
            f"\n{r['direction']} {r['name']}: {state.upper()}{why}, "
            f"{'listening' if r['listening'] else 'closed'}"
        )
        for c in r["certificates"]:
            days = c.get("days_left")
            left = f", {days:.1f} days left" if isinstance(days, int | float) else ""
            lines.append(
                f"  {c['role']:9} {c['subject']}  serial {c['serial']}  not after "
                f"{c['not_after']}{left}\n            sha256 {c['sha256']}  ({c['file']})"
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


def run_status(
    path: str | None, *, admin: str | None = None, as_json: bool = False, out: Any = None
) -> int:
    """Ask the admin listener named by --admin, or by the config file's [admin] listen. With
    --admin no config file is read: during an incident the file may be what is broken."""
    out = out or sys.stdout
    try:
        base = parse_admin(admin) if admin else admin_url(cfg.load(path or ""))
        status = fetch_status(base)
    except cfg.ConfigError as e:
        for f in e.findings:
            print(f"mtls-sidecar: {f}", file=sys.stderr)
        print("mtls-sidecar: hint: `status --admin HOST:PORT` needs no config file",
              file=sys.stderr)  # fmt: skip
        return 2
    except RuntimeError as e:
        print(f"mtls-sidecar: error: {e}", file=sys.stderr)
        return 2
    out.write(json.dumps(status, indent=2) + "\n" if as_json else render(status))
    return 0 if status["ready"] else 1
