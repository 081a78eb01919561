"""The status page at / on the admin listener: the /status report as one HTML page a person reads
in a browser. Server-rendered, no script, no external asset; every state is written as a word as
well as a colour, and the tables read the same without the stylesheet."""

from __future__ import annotations

import datetime
import html
from collections.abc import Mapping
from typing import Any

# days left below which a certificate is shown as: (bound, word, css class), first match wins
EXPIRY_BANDS = (
    (0, "expired", "crit"),
    (3, "critical", "crit"),
    (14, "warning", "warn"),
    (30, "renew soon", "soon"),
)
MAX_REFRESH = 3600

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#111}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}
caption{text-align:left;font-weight:bold;font-size:1.1rem;padding:.3rem 0}
th,td{border:1px solid #bbb;padding:.25rem .6rem;text-align:left;vertical-align:top}
th[scope=col]{background:#eee}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{background:#d8f5d8}.soon{background:#fff4c2}.warn{background:#ffd9a8}.crit{background:#ffb3b3}
"""


class RefreshError(ValueError):
    """?refresh= that is not a whole number of seconds in range."""


def refresh_seconds(values: list[bytes] | None) -> int | None:
    """The ?refresh=N query argument: whole seconds from 1 to MAX_REFRESH, or None."""
    if not values:
        return None
    text = values[0].decode("ascii", "replace")
    if not text.isdigit() or not 1 <= int(text) <= MAX_REFRESH:
        raise RefreshError(f"refresh must be whole seconds from 1 to {MAX_REFRESH}, got {text!r}")
    return int(text)


def render(status: Mapping[str, Any], now: float, refresh: int | None = None) -> bytes:
    """The page for one /status report, as of `now` (Unix time)."""
    ready = bool(status.get("ready"))
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # nothing but this page's own style may load or run, whatever a value in it holds
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>mtls-sidecar: {'ready' if ready else 'NOT READY'}</title>",
    ]
    if refresh is not None:
        head.append(f'<meta http-equiv="refresh" content="{refresh}">')
    head += [f"<style>{_STYLE}</style>", "</head><body>", "<h1>mtls-sidecar</h1>"]
    body = [
        f"<p>As of {_e(_when(now))}. Pod readiness: "
        f'<strong class="{"ok" if ready else "crit"}">{"ready" if ready else "NOT READY"}</strong>'
        + (f" (started {_e(_when(status['started']))})" if status.get("started") else "")
        + "</p>"
    ]
    reasons = status.get("reasons") or []
    if reasons:
        body.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
    if status.get("error"):
        body.append(f"<p><strong>Status incomplete:</strong> {_e(status['error'])}</p>")
    routes = list(status.get("routes") or [])
    body += _routes(routes, reasons, status.get("uptime_seconds"))
    body += _certificates(routes, now)
    body += _tokens(routes, now)
    body += _workers(status.get("workers"))
    body += _reload(status.get("last_reload", "unknown"))
    body.append(
        '<p>Machine-readable: <a href="status">/status</a> (JSON), '
        '<a href="metrics">/metrics</a> (Prometheus).</p>'
    )
    return "\n".join([*head, *body, "</body></html>", ""]).encode()


def _routes(routes: list[Mapping[str, Any]], reasons: list[str], uptime: Any) -> list[str]:
    rows = []
    total = errors = 0
    for r in routes:
        name = str(r.get("name", "?"))
        state, why = _route_state(r, reasons)
        counts = r.get("requests") or {}
        n = int(counts.get("total", 0))
        codes = {int(k): int(v) for k, v in (counts.get("by_code") or {}).items()}
        c4 = sum(v for k, v in codes.items() if 400 <= k < 500)
        c5 = sum(v for k, v in codes.items() if k >= 500)
        total, errors = total + n, errors + c4 + c5
        css = "ok" if state in ("up", "serving") else "crit"
        rows.append(
            [
                _th_row(name),
                _td(r.get("direction", "")),
                _td(state, css),
                _td(why),
                _num(n),
                _num(c4),
                _num(c5),
                _num(_rate(n, uptime)),
                _td(_connect(r.get("last_upstream_connect"))),
            ]
        )
    if routes:
        rows.append(
            [
                _th_row("all routes"),
                _td(""),
                _td(""),
                _td(""),
                _num(total),
                _td(f"{errors} 4xx and 5xx", None, 2),
                _num(_rate(total, uptime)),
                _td(""),
            ]
        )
    return _table(
        "Routes",
        [
            "Route",
            "Direction",
            "State",
            "Reason",
            "Requests",
            "4xx",
            "5xx",
            "Requests/s since start",
            "Last upstream connect",
        ],
        rows,
        "No routes.",
    )


def _route_state(r: Mapping[str, Any], reasons: list[str]) -> tuple[str, str]:
    """The route's own state and reasons when the report has them, else what readiness says."""
    name = str(r.get("name", ""))
    why = r.get("reasons")
    if why is None:
        why = [x.removeprefix(f"{name}: ") for x in reasons if x.startswith(f"{name}: ")]
    state = r.get("state")
    if state is None:
        state = "down" if why or not r.get("listening", True) else "up"
        if not r.get("listening", True) and not why:
            why = ["not listening"]
    return str(state), "; ".join(str(w) for w in why)


def _certificates(routes: list[Mapping[str, Any]], now: float) -> list[str]:
    rows = []
    for r in routes:
        for c in r.get("certificates") or []:
            days = _days_left(c.get("not_after"), now)
            word, css = _band(days)
            left = "unknown" if days is None else f"{days} day{'' if abs(days) == 1 else 's'}"
            rows.append(
                [
                    _th_row(str(r.get("name", "?"))),
                    _td(c.get("role", "")),
                    _td(c.get("subject", "")),
                    _td(c.get("serial", "")),
                    _td(_when(c.get("not_after"))),
                    _td(f"{left} ({word})", css),
                ]
            )
    return _table(
        "Certificates",
        ["Route", "Role", "Subject", "Serial", "Not after", "Days left"],
        rows,
        "No certificates loaded.",
    )


def _tokens(routes: list[Mapping[str, Any]], now: float) -> list[str]:
    rows = []
    for r in routes:
        token = r.get("oauth")
        if not isinstance(token, Mapping):
            continue
        # only these keys are read: the report never holds the token, nor does this page
        until, fetched, error = (
            token.get("valid_until"),
            token.get("last_fetch"),
            token.get("last_error"),
        )
        left = _seconds(until, now)
        if left is not None and left > 0:
            state, css = f"valid, {int(left)} s left", "ok"
        else:
            state, css = ("failing" if error else "no token yet"), "crit"
        rows.append(
            [
                _th_row(str(r.get("name", "?"))),
                _td(state, css),
                _td(_when(fetched) or "never"),
                _td(_when(until) or "none"),
                _td(error or ""),
            ]
        )
    return _table(
        "OAuth tokens",
        ["Route", "State", "Last fetch", "Expires", "Last error"],
        rows,
        "No route fetches OAuth tokens.",
    )


def _workers(workers: Any) -> list[str]:
    if workers is None:
        return ["<h2>Workers</h2>", "<p>One process serves every route (no workers).</p>"]
    rows = []
    for w in workers:
        ready = bool(w.get("ready"))
        rss = w.get("resident_bytes")
        rows.append(
            [
                _th_row(str(w.get("index", "?"))),
                _td(w.get("pid", "")),
                _td(w.get("generation", "")),
                _td("ready" if ready else "not ready", "ok" if ready else "crit"),
                _num(f"{rss / 2**20:.1f}" if isinstance(rss, int | float) else ""),
            ]
        )
    return _table(
        "Workers",
        ["Worker", "PID", "Generation", "State", "Resident MiB"],
        rows,
        "No worker is running.",
    )


def _reload(last: Any) -> list[str]:
    if last == "unknown":
        return ["<h2>Last reload</h2>", "<p>Unknown: the report does not say.</p>"]
    if not isinstance(last, Mapping) or not last.get("time"):
        return ["<h2>Last reload</h2>", "<p>No reload since start.</p>"]
    result = str(last.get("result", "unknown"))
    css = "ok" if result == "success" else "crit"
    text = f'{_e(_when(last.get("time")))}: <span class="{css}">{_e(result)}</span>'
    if last.get("error"):
        text += f" ({_e(last['error'])})"
    return ["<h2>Last reload</h2>", f"<p>{text}</p>"]


# ---- small pieces


def _table(caption: str, columns: list[str], rows: list[list[str]], empty: str) -> list[str]:
    if not rows:
        return [f"<h2>{_e(caption)}</h2>", f"<p>{_e(empty)}</p>"]
    out = [f"<table><caption>{_e(caption)}</caption>", "<thead><tr>"]
    out += [f'<th scope="col">{_e(c)}</th>' for c in columns]
    out.append("</tr></thead><tbody>")
    out += ["<tr>" + "".join(cells) + "</tr>" for cells in rows]
    out.append("</tbody></table>")
    return out


def _th_row(text: str) -> str:
    return f'<th scope="row">{_e(text)}</th>'


def _td(value: Any, css: str | None = None, span: int = 1) -> str:
    attrs = (f' class="{css}"' if css else "") + (f' colspan="{span}"' if span > 1 else "")
    return f"<td{attrs}>{_e(value)}</td>"


def _num(value: Any) -> str:
    return _td(value, "num")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _rate(n: int, uptime: Any) -> str:
    if not isinstance(uptime, int | float) or uptime <= 0:
        return ""
    return f"{n / uptime:.2f}"


def _connect(last: Any) -> str:
    if not isinstance(last, Mapping):
        return ""
    parts = [str(last.get(k)) for k in ("result", "address", "time") if last.get(k)]
    return " ".join(parts)


def _epoch(value: Any) -> float | None:
    """Unix time from a number or an RFC 3339 / ISO 8601 string."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if t.tzinfo is None:
            t = t.replace(tzinfo=datetime.UTC)
        return t.timestamp()
    return None


def _when(value: Any) -> str:
    t = _epoch(value)
    if t is None:
        return "" if value is None else str(value)
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: Any, now: float) -> float | None:
    t = _epoch(value)
    return None if t is None else t - now


def _days_left(not_after: Any, now: float) -> int | None:
    left = _seconds(not_after, now)
    return None if left is None else int(left // 86400)


def _band(days: int | None) -> tuple[str, str]:
    if days is None:
        return "unknown", "warn"
    for bound, word, css in EXPIRY_BANDS:
        if days < bound:
            return word, css
    return "ok", "ok"
