"""Every finding about a config and its key material, at once: what `check` prints, what `run`
refuses to start on, and what a reload refuses to swap in. One place, so they cannot disagree."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from cryptography.x509.oid import NameOID

from proxy import config as cfg
from proxy.oauth import glue as oauthglue
from proxy.oauth import hsm
from proxy.oauth import server as oauthserver
from proxy.pkcs11uri import Pkcs11URI
from proxy.tls import contexts as tls
from proxy.tls import pki, revocation
from proxy.wire import tunnel

# D1's published hosts and the environment their client certificates must name
D1_HOST_ENV = {"api.d1-stg.thalescloud.io": "PPR", "api.d1.thalescloud.io": "PRD"}


_KEYS = frozenset(
    {"client_cert", "client_key", "server_cert", "server_key", "client_ca", "trust", "client_crl"}
)


def findings_for(
    path: str | Path, now: datetime.datetime | None = None, *, listeners: bool = True
) -> tuple[list[cfg.Finding], cfg.Config | None]:
    """Parse `path` and audit it (`check`); the config is None when it did not parse."""
    config, findings = cfg.parse(path)
    if config is None:
        return findings, None
    return findings + audit(config, now, listeners=listeners), config


def errors(config: cfg.Config) -> list[cfg.Finding]:
    """What `run` and a reload refuse: the audit's errors (warnings stay warnings)."""
    return mistakes(audit(config, listeners=False, running=True))


def mistakes(findings: list[cfg.Finding]) -> list[cfg.Finding]:
    """The errors `run` and a reload refuse: all but faults of time (a certificate expired or
    not yet valid takes its own route down; the others serve)."""
    return [f for f in findings if f.level == "error" and f.fault != "time"]


def audit(
    config: cfg.Config,
    now: datetime.datetime | None = None,
    *,
    listeners: bool = False,
    running: bool = False,
) -> list[cfg.Finding]:
    """Findings about a parsed config and its key material. `listeners`: also try to bind
    each listen address (for `check`; a running sidecar holds them itself). `running`: for
    `run` and reload, which leave a stale CRL to crl_stale instead of refusing the config."""
    findings: list[cfg.Finding] = []
    now = now or datetime.datetime.now(datetime.UTC)
    file = str(config.path)
    warn_days = config.service.expiry_warning_days

    def add(level: str, key: str, message: str) -> None:
        findings.append(cfg.Finding(level, file, key, message))

    def certificate(key: str, path: Path, chain: list[Any], role: str) -> None:
        for problem in pki.weak_signature_problems(chain):
            add("error", key, f"{path}: {problem}")
        for problem in pki.chain_order_problems(chain):
            add("error", key, f"{path}: chain order: {problem}")
        leaf = chain[0]
        left = pki.days_left(leaf, now)
        subject = leaf.subject.rfc4514_string()
        if left < 0:
            add("error", key, f"{path}: {role} certificate {subject} expired {_days(-left)} ago")
        elif now < leaf.not_valid_before_utc:
            add("error", key, f"{path}: {role} certificate {subject} is not valid yet")
        elif left < warn_days:
            add("warning", key, f"{path}: {role} certificate {subject} expires in {_days(left)}")
        else:
            add("info", key, f"{path}: {role} certificate {subject}, {left:.0f} days left")
        if left < 0 or now < leaf.not_valid_before_utc:  # that route goes down, not `run`
            findings[-1] = attrs.evolve(findings[-1], fault="time")
        elif left < warn_days:
            findings[-1] = attrs.evolve(findings[-1], fault="expiry")

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
            if len(pair.chain) == 1 and pair.leaf.issuer != pair.leaf.subject:
                add(
                    "warning",
                    f"{prefix}.client_cert",
                    f"{r.client_cert}: holds the leaf only; its issuer "
                    f"{pair.leaf.issuer.rfc4514_string()} is missing: unless the server trusts "
                    "that issuer itself, append the intermediate to the file (D1 answers a "
                    "chain it cannot build with HTTP 400)",
                )
            if r.profile == "d1":
                env = r.env or D1_HOST_ENV.get(r.upstream.host)
                for problem in pki.d1_client_cert_problems(pair.leaf, env):
                    add("error", f"{prefix}.client_cert", f"{r.client_cert}: {problem}")
                gateway = _gateway_id(pair.leaf)
                if r.oauth is not None and gateway and r.oauth.issuer != gateway:
                    add(
                        "error",
                        f"{prefix}.oauth.issuer",
                        f"{r.oauth.issuer!r} is not the merchantGatewayId {gateway!r} of the "
                        f"client certificate's CN: D1 refuses the token request (invalid_grant)",
                    )

        guarded(f"{prefix}.client_cert", egress_checks)
        _egress_wiring(r, prefix, add)
        _key_file_mode(r.client_key, f"{prefix}.client_key", add)
        if r.proxy is not None and r.proxy.auth_file is not None:
            _proxy_auth(r.proxy.auth_file, f"{prefix}.proxy_auth_file", add)
        if r.oauth is not None:
            o = r.oauth
            _key_file_mode(o.signing_key, f"{prefix}.oauth.signing_key", add)

            def oauth_checks(o: cfg.EgressOAuth = o, prefix: str = prefix) -> None:
                key = oauthglue.signing_key(o)  # the loader `run` uses
                _token_self_test(key, f"{prefix}.oauth.signing_key", add)

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
            if material.revocation is not None:
                _crl_findings(
                    material.revocation, material.client_cas, r.client_ca,
                    f"{prefix}.client_crl", now, running, add,
                )  # fmt: skip

        guarded(f"{prefix}.server_cert", ingress_checks)
        _key_file_mode(ri.server_key, f"{prefix}.server_key", add)
        if ri.oauth is not None:
            _hosted_token_keys(ri.oauth, f"{prefix}.oauth", add)

    for key, value in _placeholders(config.path):
        add("error", key, f"{value!r} is a placeholder: put the real value here")
    if listeners:
        for key, where in _listen_addresses(config):
            problem = _bind_problem(where)
            if problem:
                add("warning", key, f"{where}: {problem}")
    return findings


def _days(days: float) -> str:
    """'12 days', '1 day'; under a day in hours, under an hour in minutes ("0 days" helps no
    one)."""
    if days >= 1:
        return f"{round(days)} day{'s' if round(days) != 1 else ''}"
    hours = days * 24
    if hours >= 1:
        return f"{hours:.0f} hour{'s' if round(hours) != 1 else ''}"
    minutes = max(1, round(hours * 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


def _crl_findings(
    rev: revocation.Revocation,
    cas: tuple[Any, ...],
    ca_path: Path,
    key: str,
    now: datetime.datetime,
    running: bool,
    add: Callable[[str, str, str], None],
) -> None:
    """Each CRL signed by a CA of client_ca and fresh; a CRL from every CA the check needs."""
    signers: set[Any] = set()
    for crl in rev.crls:
        what = f"{rev.path}: {revocation.describe(crl)}"
        signer = revocation.issuer_of(crl, cas)
        if signer is None:
            add("error", key, f"{what}: not signed by any CA in client_ca {ca_path}: refused")
            continue
        signers.add(signer.subject)
        nu = revocation.next_update(crl)
        if nu is not None and nu <= now:
            if not running:  # at run time crl_stale decides; the service logs it as an error
                add(
                    "error",
                    key,
                    f"{what}: past its nextUpdate by {(now - nu).total_seconds() / 3600:.0f} "
                    f"hours: fetch a fresh CRL from the CA (crl_stale = {rev.stale})",
                )
        elif revocation.near_stale(crl, now):
            left = (nu - now).total_seconds() / 3600 if nu else 0
            add("warning", key, f"{what}: nextUpdate in {left:.0f} hours: a fresh CRL is due")
        else:
            revoked = len(list(crl))
            add("info", key, f"{what}: {revoked} revoked, signed by its CA")
    roots = [ca for ca in cas if revocation.is_self_signed(ca)]
    if rev.check == "chain":
        if not roots:
            add(
                "error",
                key,
                f'crl_check = "chain" checks every CA below the root: client_ca {ca_path} '
                "must hold the self-signed root (and the intermediates under it)",
            )
        needed = list(cas)
    else:
        issuers = {ca.issuer for ca in cas if not revocation.is_self_signed(ca)}
        needed = [ca for ca in cas if ca.subject not in issuers]  # the CAs that issue leaves
    for ca in needed:
        if ca.subject not in signers:
            add(
                "error",
                key,
                f"{rev.path}: no CRL from {ca.subject.rfc4514_string()} (client_ca {ca_path}): "
                f'every certificate it issued would be refused (crl_check = "{rev.check}")',
            )


def _gateway_id(leaf: Any) -> str | None:
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    match = pki.D1_CN.match(str(cns[0].value)) if len(cns) == 1 else None
    return match["gateway_id"] if match else None


def _hosted_token_keys(
    o: cfg.IngressOAuth, prefix: str, add: Callable[[str, str, str], None]
) -> None:
    """The hosted tokens' keys load as `run` loads them: a P-256 signing key, and every
    verify-only key; the kids let an operator compare replicas."""
    _key_file_mode(o.signing_key, f"{prefix}.signing_key", add)
    try:
        key = oauthglue.signing_key(o)
        kid = oauthserver.key_id(key.public_key())
        add("info", f"{prefix}.signing_key", f"{o.signing_key}: ES256 signing key, kid {kid}")
        _token_self_test(key, f"{prefix}.signing_key", add)
    except (ValueError, tls.MaterialError) as e:
        add("error", f"{prefix}.signing_key", str(e).removeprefix("oauth.signing_key "))
    for index, path in enumerate(o.verify_keys):
        try:
            kid = oauthserver.key_id(oauthserver.load_public_key(path))
            add("info", f"{prefix}.verify_keys[{index}]", f"{path}: ES256 verify key, kid {kid}")
        except ValueError as e:
            add("error", f"{prefix}.verify_keys[{index}]", str(e))


def _egress_wiring(r: cfg.EgressRoute, prefix: str, add: Callable[[str, str, str], None]) -> None:
    if r.profile == "d1" and r.env is not None:
        host_env = D1_HOST_ENV.get(r.upstream.host)
        if host_env is not None and host_env != r.env:
            add(
                "error",
                f"{prefix}.env",
                f"env {r.env} but upstream {r.upstream.host} is D1's {host_env} host",
            )
    if r.oauth is not None:
        token_host = (urlsplit(r.oauth.token_url).hostname or "").lower()
        if token_host and token_host != r.upstream.host.lower():
            add(
                "warning",
                f"{prefix}.oauth.token_url",
                f"on {token_host}, not on the route's upstream {r.upstream.host}: the token is "
                "fetched over this route's mutual TLS, so it usually lives on the same host",
            )
    if r.listen.kind == "tcp" and not _loopback(r.listen.host):
        add(
            "warning",
            f"{prefix}.listen",
            f"{r.listen.host} is not a loopback address: the app's traffic to it (and its "
            "bearer token) is plain text on the network",
        )


def _proxy_auth(path: Path, key: str, add: Callable[[str, str, str], None]) -> None:
    """The proxy credentials read as `run` reads them, and kept from other users like a key."""
    _key_file_mode(path, key, add)
    try:
        tunnel.read_proxy_auth(path)
    except tls.MaterialError as e:
        add("error", key, str(e))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_self_test(key: Any, where: str, add: Callable[[str, str, str], None]) -> None:
    """A key in a token: log in and sign a test digest, as a token fetch will."""
    if isinstance(key, hsm.TokenKey):
        try:
            add("info", where, f"{key.uri}: {hsm.self_test(key)} in the token")
        except hsm.HsmError as e:
            add("error", where, str(e))


def _key_file_mode(path: Path | Pkcs11URI, key: str, add: Callable[[str, str, str], None]) -> None:
    """Keys readable by others are a finding; readable by our own group is not (a Kubernetes
    Secret with fsGroup is always 0440, root-owned, group = the pod's). A token key: its PIN
    file."""
    if isinstance(path, Pkcs11URI):
        if path.pin_source is None:
            return
        path = path.pin_source
    try:
        st = path.stat()
    except OSError:
        return  # unreadable files are reported by the loaders
    mode = st.st_mode
    ours = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if mode & stat.S_IRWXO or (mode & stat.S_IRWXG and not ours) or mode & stat.S_IWGRP:
        add(
            "warning",
            key,
            f"{path}: mode {stat.S_IMODE(mode):04o}: readable by others or by a group this "
            f"process is not in; `chmod 600 {path}`",
        )


_PLACEHOLDER = re.compile(r"(?i)change[-_ ]?me|replace[-_ ]with|<[a-z][a-z0-9 _-]*>|\bTODO\b")


def _placeholders(path: Path) -> Iterator[tuple[str, str]]:
    """String values left as placeholders (CHANGE-ME, REPLACE-WITH-...) in the file; empty
    required values are the config parser's errors."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return

    def walk(value: Any, key: str) -> Iterator[tuple[str, str]]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and _PLACEHOLDER.search(value):
            yield key, value

    yield from walk(data, "")


def _listen_addresses(config: cfg.Config) -> Iterator[tuple[str, cfg.Listen]]:
    for i, e in enumerate(config.egress):
        yield f"egress[{i}] ({e.name}).listen", e.listen
    for i, g in enumerate(config.ingress):
        yield f"ingress[{i}] ({g.name}).listen", g.listen
    if config.admin is not None:
        yield "admin.listen", config.admin.listen


def _bind_problem(where: cfg.Listen) -> str | None:
    if where.kind != "tcp":
        return None
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((where.host, where.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return "in use (by this sidecar if it is running, or by another process)"
        if e.errno == errno.EACCES:
            return (
                f"port {where.port} needs privileges: use a systemd socket "
                '(listen = "systemd:NAME") or CAP_NET_BIND_SERVICE'
            )
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{where.host} is not an address of this host"
        return f"cannot bind: {e.strerror or e}"
    return None
