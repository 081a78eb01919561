"""`probe`'s reports as text for people and as one JSON document."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from proxy import config as cfg
from proxy.commands.probe.reports import AddressReport, CertFacts, IngressReport, RouteReport


# --------------------------------------------------------------------------- output
def _as_json(config: cfg.Config, reports: Sequence[RouteReport | IngressReport]) -> dict[str, Any]:
    def plain(value: Any) -> dict[str, Any]:
        return attrs.asdict(value, value_serializer=lambda _i, _f, v: None if v == "" else v)

    def address(a: AddressReport) -> dict[str, Any]:
        doc = plain(a)
        doc["ok"] = a.ok
        return doc

    routes: list[dict[str, Any]] = []
    for r in reports:
        if isinstance(r, IngressReport):
            routes.append({"name": r.name, "direction": "ingress", **plain(r), "ok": r.ok})
            continue
        dns = None
        if r.dns is not None:
            dns = {
                "resolver": r.dns.resolver or None,
                "answers": [{"address": a, "ttl": t} for a, t in r.dns.answers],
                "note": r.dns.note or None,
                "error": r.dns.error or None,
                "ms": r.dns.ms,
            }
        routes.append(
            {
                "name": r.name,
                "direction": "egress",
                "upstream": r.upstream,
                "tls_name": r.tls_name,
                "profile": r.profile,
                "trust": r.trust,
                "client_certificate": r.client_certificate,
                "error": r.error or None,
                "proxy": r.proxy,
                "dns": dns,
                "addresses": [address(a) for a in r.addresses],
                "oauth": plain(r.oauth) if r.oauth is not None else None,
                "ok": r.ok,
            }
        )
    return {"config": str(config.path), "ok": _all_ok(reports), "routes": routes}


def _all_ok(reports: Sequence[RouteReport | IngressReport]) -> bool:
    """Every probed route is fine; a route that cannot be probed from here (a socket systemd
    hands over) does not count, but a run that probed nothing is no confirmation."""
    probed = [r for r in reports if not (isinstance(r, IngressReport) and r.skipped)]
    return bool(probed) and all(r.ok for r in probed)


def _kv(lines: list[str], indent: int, key: str, value: str) -> None:
    label = f"{key}:" if key else ""
    lines.append(f"{' ' * indent}{label:<20} {value}")


def _chain_lines(lines: list[str], indent: int, title: str, chain: Sequence[CertFacts]) -> None:
    for i, c in enumerate(chain):
        _kv(lines, indent, f"{title} [{i}]", f"subject {c.subject}")
        _kv(lines, indent, "", f"issuer {c.issuer}")
        _kv(lines, indent, "", f"not after {c.not_after}")
        if c.sans is not None:
            _kv(lines, indent, "", f"SANs {', '.join(c.sans) or 'none'}")


def _ingress_text(r: IngressReport) -> list[str]:
    lines: list[str] = []

    def kv(key: str, value: str) -> None:
        _kv(lines, 2, key, value)

    dialed = f", dialed {r.address} as the partner would" if r.address else ""
    lines.append(f"ingress {r.name} <- listen {r.listen}{dialed}")
    if r.skipped:
        kv("not probed", r.skipped)
        kv("result", "not probed")
        return lines
    kv("TLS name", r.tls_name or "not set (no SNI, no name check): set server_name")
    kv("trust", f"{r.trust}, as the partner checks")
    kv("client certificate", r.client_certificate)
    if r.address:
        kv("TCP", r.tcp + (f" in {r.tcp_ms:g} ms" if r.tcp_ms is not None else ""))
    if r.tcp_ok:
        if r.tls_version and r.cipher:
            took = f" (handshake {r.handshake_ms:g} ms)" if r.handshake_ms is not None else ""
            kv("TLS", f"{r.tls_version}, {r.cipher}, ALPN {r.alpn or 'none'}{took}")
        kv("handshake", r.handshake)
        _chain_lines(lines, 2, "served chain", r.served_chain)
        verdict = r.verification + (f" (anchor {r.anchor})" if r.anchor else "")
        answer = {True: "yes: ", False: "NO: ", None: ""}[r.mozilla_root]
        kv("Mozilla root", answer + verdict)
        if r.private_ca:
            kv("warning", r.private_ca)
        if r.name_check:
            kv("name", r.name_check)
        if r.configured:
            kv("config", r.configured)
        if r.cert_requested is not None:
            kv("cert requested", "yes" if r.cert_requested else "no")
        kv("client CAs asked", "; ".join(r.client_cas) or "none")
        kv("client auth", r.client_auth)
    result = "OK" if r.ok else "FAILED"
    kv("result", f"{result} (warning: private CA)" if r.ok and r.private_ca else result)
    return lines


def _text(reports: Sequence[RouteReport | IngressReport]) -> str:
    lines: list[str] = []

    def kv(indent: int, key: str, value: str) -> None:
        _kv(lines, indent, key, value)

    for r in reports:
        if isinstance(r, IngressReport):
            lines += [*_ingress_text(r), ""]
            continue
        lines.append(
            f"egress {r.name} -> {r.upstream} (TLS name {r.tls_name}, profile {r.profile})"
        )
        kv(2, "trust", r.trust)
        if r.client_certificate:
            own = r.client_certificate
            kv(
                2,
                "client certificate",
                f"{own['subject']} ({own['key']}), not after {own['not_after']}",
            )
        if r.proxy:
            kv(2, "proxy", f"{r.proxy}: CONNECT by name, the proxy resolves the upstream")
        if r.error:
            kv(2, "error", r.error)
        if r.dns is not None:
            d = r.dns
            took = f" in {d.ms:g} ms" if d.ms is not None else ""
            dns = "proxy DNS" if r.proxy else "DNS"
            kv(2, dns, f"resolver {d.resolver}{took}" if d.resolver else "not asked")
            for addr, ttl in d.answers:
                kv(4, "answer", f"{addr} ({f'TTL {ttl} s' if ttl is not None else d.note})")
            if d.error:
                kv(4, "error", d.error)
            elif d.note and not d.answers:
                kv(4, "note", d.note)
        for a in r.addresses:
            lines.append(f"  {a.address}:{a.port}" + (" (proxy)" if r.proxy else ""))
            tcp = a.tcp + (f" in {a.tcp_ms:g} ms" if a.tcp_ms is not None else "")
            kv(4, "TCP", tcp)
            if a.proxy_answer:
                kv(4, "CONNECT", a.proxy_answer)
            if not a.tcp_ok or (r.proxy and a.verified is None and not a.tls_version):
                if a.tcp_ok:
                    kv(4, "client auth", a.client_cert)
                continue
            if a.tls_version and a.cipher:
                hs = (
                    f" (handshake {a.handshake_ms:g} ms)"
                    if a.handshake_ms is not None
                    else " (handshake not completed)"
                )
                kv(4, "TLS", f"{a.tls_version}, {a.cipher}, ALPN {a.alpn or 'none'}{hs}")
            elif a.tls_version:
                kv(4, "TLS", f"{a.tls_version} negotiated; the handshake did not complete")
            if a.handshake:
                kv(4, "handshake", a.handshake)
            _chain_lines(lines, 4, "peer chain", a.peer_chain)
            verdict = a.verification
            if a.verified and a.anchor:
                verdict += f" (anchor {a.anchor})"
            kv(4, "verification", verdict)
            if a.cert_requested is not None:
                asked = "yes" if a.cert_requested else "no"
                if a.acceptable_cas:
                    asked += f" (acceptable CAs: {'; '.join(a.acceptable_cas)})"
                kv(4, "cert requested", asked)
            kv(4, "client auth", a.client_cert)
        if r.oauth is not None:
            o = r.oauth
            if o.ok:
                expires = f"expires_in {o.expires_in} s" if o.expires_in is not None else "OK"
                kv(2, "OAuth token", f"OK from {o.token_url}, {expires}")
            else:
                kv(2, "OAuth token", f"FAILED: {o.error}")
        kv(2, "result", "OK" if r.ok else "FAILED")
        lines.append("")
    return "\n".join(lines)
