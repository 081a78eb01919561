"""TOML file -> frozen, validated attrs objects. Every mistake names the file and the key.

Parsing collects every finding instead of stopping at the first, so `check` can report them all
at once; `load()` raises ConfigError carrying the list.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from service_identity.hazmat import DNS_ID

from proxy import cpus, subjects
from proxy.pkcs11uri import Pkcs11URI, URIError, is_pkcs11
from proxy.pkcs11uri import parse as parse_pkcs11
from proxy.subjects import SubjectPattern

T = TypeVar("T")

PROFILES = ("d1", "generic")
IDENTITY_FAMILIES = ("client-cert", "xfcc", "x-client")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@attrs.frozen
class Finding:
    level: str  # "error" | "warning" | "info"
    file: str
    key: str
    message: str
    # "time": a certificate expired or not yet valid (its route goes down, `run` starts);
    # "expiry": a certificate near its end (the running sidecar announces it itself)
    fault: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{self.level}: {where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        super().__init__("; ".join(str(f) for f in findings))


@attrs.frozen
class Listen:
    """Where a route listens: TCP host:port, a unix socket path, or a systemd-passed socket."""

    kind: str  # "tcp" | "unix" | "systemd"
    host: str = ""
    port: int = 0
    path: str = ""
    name: str = ""

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{self.kind}:{self.path or self.name}"


@attrs.frozen
class Upstream:
    scheme: str  # "http" | "https"
    host: str
    port: int
    base_path: str  # "" or "/prefix" without trailing slash

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.base_path}"


@attrs.frozen
class ForwardProxy:
    """An HTTP forward proxy an egress route tunnels through (CONNECT host:port by name)."""

    host: str
    port: int
    auth_file: Path | None = None  # "user:password": Proxy-Authorization: Basic

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@attrs.frozen
class Limits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_body_bytes: int = 10 * 1024 * 1024
    max_connections: int = 1024  # at the limit the listener stops accepting (as nginx does)
    max_pipelined: int = 16  # requests queued behind the one in flight on a connection
    max_response_header_bytes: int = 32 * 1024  # an upstream's response head
    max_response_headers: int = 100
    min_body_rate: int = 1024  # bytes/s a request body must average once body_timeout is used


@attrs.frozen
class Timeouts:
    connect: float = 5.0  # TCP connect + TLS handshake toward the upstream
    response: float = 30.0  # request fully sent -> response head; also max silence in a body
    header: float = 10.0  # first byte of a request -> complete request head
    idle: float = 60.0  # downstream keep-alive idle
    pool_idle: float = 15.0  # an idle pooled upstream connection is closed after this
    handshake: float = 5.0  # TCP accept -> TLS handshake done (ingress)
    body: float = 20.0  # a request body's allowance before min_body_rate applies
    send: float = 30.0  # a client that takes none of what we owe it for this long is cut
    close_grace: float = 1.0  # after our close: the peer's close is awaited this long at most


@attrs.frozen
class EgressOAuth:
    token_url: str
    issuer: str
    signing_key: Path | Pkcs11URI  # a PEM file, or a key in a PKCS#11 token
    key_id: str
    audience: str | None = None
    body: str = "form"
    authorization: str = "replace"  # or "keep": leave the app's own Authorization header


@attrs.frozen
class EgressRoute:
    name: str
    listen: Listen
    upstream: Upstream
    client_cert: Path
    client_key: Path
    trust: Path | None  # None: the Mozilla bundle (certifi)
    max_connection_age: float = 60.0
    profile: str = "d1"
    env: str | None = None  # "PPR" | "PRD": the D1 environment the client cert must name
    server_name: str | None = None  # SNI and the name verified, when not the upstream host
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    pool_max_idle: int = 64
    oauth: EgressOAuth | None = None
    proxy: ForwardProxy | None = None
    direction: str = "egress"


@attrs.frozen
class IngressOAuth:
    """The hosted token endpoint: RFC 9068 JWT access tokens signed with ES256."""

    clients_file: Path
    signing_key: Path | Pkcs11URI  # P-256 key that signs the tokens issued here
    verify_keys: tuple[Path, ...] = ()  # keys whose tokens are accepted too (rotation)
    issuer: str = "mtls-sidecar"  # the tokens' iss
    audience: str | None = None  # the tokens' aud; None: the route's name
    token_path: str = "/oauth2/token"
    token_lifetime: float = 900.0
    forward_authorization: bool = False  # pass the validated bearer token on to the app


@attrs.frozen
class IngressRoute:
    name: str
    listen: Listen
    server_cert: Path
    server_key: Path
    client_ca: Path
    upstream: Upstream
    allow_subjects: tuple[SubjectPattern, ...] = ()  # empty: every certificate client_ca signed
    identity_headers: tuple[str, ...] = IDENTITY_FAMILIES
    upstream_trust: Path | None = None  # for an https internal upstream; None: Mozilla bundle
    server_name: str | None = None  # the name the partner calls us by (`check` tests the SANs)
    profile: str = "d1"
    limits: Limits = Limits()
    timeouts: Timeouts = Timeouts()
    pool_max_idle: int = 64
    max_connection_age: float = 300.0
    oauth: IngressOAuth | None = None
    client_crl: Path | None = None  # PEM (or DER) CRLs of client_ca, checked at every handshake
    crl_check: str = "leaf"  # "leaf" | "chain": every CA below the root too
    crl_stale: str = "warn"  # past nextUpdate: "warn" (an error line) | "refuse" (every caller)
    direction: str = "ingress"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@attrs.frozen
class AdminConfig:
    listen: Listen
    status_from: tuple[Network, ...] = LOOPBACK  # peers /status (and /) answer; others get 403


LOG_LEVELS = ("debug", "info", "warn", "error")


@attrs.frozen
class ServiceConfig:
    drain_timeout: float = 20.0
    reload_interval: float = 10.0  # seconds between checks of key-material files; 0 = off
    expiry_warning_days: float = 30.0
    nameservers: tuple[tuple[str, int], ...] = ()  # empty: the system resolver (getaddrinfo)
    log_format: str = "json"
    access_log: bool = True
    log_level: str = "info"  # debug | info | warn | error
    workers: int = 1  # > 1: a supervisor and this many worker processes on shared sockets
    workers_why: str = ""  # with workers = "auto": what the number came from (logged)
    max_worker_rss: int = 0  # bytes; a worker past it is replaced by a fresh one; 0 = off
    max_worker_age: float = 0.0  # seconds; a worker older than this is replaced; 0 = off
    malloc_trim_interval: float = 10.0  # seconds between glibc malloc_trim(0) calls; 0 = off

    def supervised(self) -> bool:
        """A supervisor runs the workers: several of them, or a limit that replaces them."""
        return self.workers > 1 or self.max_worker_rss > 0 or self.max_worker_age > 0


@attrs.frozen
class TracingConfig:
    """[tracing]: one span per exchange, exported over OTLP/HTTP (protobuf)."""

    otlp_endpoint: str  # the full URL spans are POSTed to, e.g. http://127.0.0.1:4318/v1/traces
    service_name: str = "mtls-sidecar"
    sample_ratio: float = 1.0  # for traces we start; a caller's sampled flag is followed
    headers_file: Path | None = None  # "Name: value" lines sent to the collector (its auth)
    max_queue_size: int = 2048  # spans waiting for export; past it they are dropped and counted
    export_timeout: float = 10.0


@attrs.frozen
class Config:
    path: Path
    service: ServiceConfig
    admin: AdminConfig | None
    egress: tuple[EgressRoute, ...]
    ingress: tuple[IngressRoute, ...]
    tracing: TracingConfig | None = None

    def routes(self) -> tuple[EgressRoute | IngressRoute, ...]:
        return (*self.egress, *self.ingress)


# A timeout above these is almost surely milliseconds written as seconds: `check` warns.
_SANE_TIMEOUTS = {
    "connect_timeout": 60.0,
    "response_timeout": 600.0,
    "header_timeout": 120.0,
    "idle_timeout": 3600.0,
    "pool_idle_timeout": 3600.0,
    "handshake_timeout": 60.0,
    "body_timeout": 600.0,
    "send_timeout": 600.0,
    "close_grace": 60.0,
}


def _span(seconds: float) -> str:
    """A duration as a person reads it: '8 h 20 min', '5 min', '45 s'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min" if minutes else f"{secs} s"


# --------------------------------------------------------------------------- scalar parsers
class _Bad(Exception):
    """A value is wrong; the message says how. The reader adds file and key."""


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise _Bad("expected a size in bytes or a string like '10MiB'")
    if isinstance(value, int):
        if value < 0:
            raise _Bad("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            return int(float(m.group(1)) * _UNITS[unit])
    raise _Bad(f"expected a size in bytes or a string like '10MiB', got {value!r}")


def _workers(value: object) -> int:
    """A worker count ("auto" is read in `service`, with its reason)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise _Bad(f'expected a number of workers from 1 to 256 or "auto", got {value!r}')
    return value


def parse_duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"expected seconds as a number, got {value!r}")
    if value < 0:
        raise _Bad("must not be negative")
    return float(value)


def parse_listen(value: object, default_host: str) -> Listen:
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{default_host}:{value}"
    if not isinstance(value, str) or not value:
        raise _Bad(f"expected 'host:port', 'unix:PATH' or 'systemd:NAME', got {value!r}")
    if value.startswith("unix:"):
        if not value[5:] or "\x00" in value:
            raise _Bad("unix: needs a socket path (without NUL)")
        return Listen("unix", path=value[5:])
    if value.startswith("systemd:"):
        if not value[8:]:
            raise _Bad("systemd: needs the socket's FileDescriptorName")
        return Listen("systemd", name=value[8:])
    if value.isascii() and value.isdigit():
        return Listen("tcp", host=default_host, port=_port(value))
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:([0-9]+)$", value) or re.match(
        r"^([^:]+):([0-9]+)$", value
    )
    if not m:
        raise _Bad(f"expected 'host:port' (IPv6 as '[::1]:port'), got {value!r}")
    try:
        _host_name(m.group(1))
    except _Bad:
        raise _Bad(f"{m.group(1)!r} in {value!r} is not a host name or IP address") from None
    return Listen("tcp", host=m.group(1), port=_port(m.group(2)))


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise _Bad(f"port {port} out of range")
    return port


def parse_upstream(value: object, schemes: tuple[str, ...]) -> Upstream:
    if not isinstance(value, str):
        raise _Bad(f"expected a URL like 'https://host[:port][/base]', got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise _Bad(f"scheme must be {' or '.join(schemes)}, got {value!r}")
    if not parts.hostname:
        raise _Bad(f"no host in {value!r}")
    try:
        _host_name(parts.hostname)
    except _Bad:
        raise _Bad(f"{parts.hostname!r} in {value!r} is not a host name or IP address") from None
    if parts.query or parts.fragment or parts.username:
        raise _Bad("no query, fragment or credentials allowed in the upstream URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise _Bad(str(e)) from None
    return Upstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def parse_proxy_url(value: object) -> tuple[str, int]:
    """A forward proxy's URL: http://host:port, nothing else (credentials go in a file)."""
    if not isinstance(value, str):
        raise _Bad(f"expected a URL like 'http://proxy.corp:3128', got {value!r}")
    parts = urlsplit(value)
    if parts.scheme != "http":
        raise _Bad(
            f"scheme must be http (the CONNECT request to the proxy is plain HTTP; the tunnel "
            f"through it carries our TLS), got {value!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise _Bad("no credentials in the URL: put 'user:password' in proxy_auth_file")
    if not parts.hostname:
        raise _Bad(f"no host in {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _Bad(f"no path, query or fragment allowed in the proxy URL, got {value!r}")
    try:
        port = parts.port
    except ValueError as e:
        raise _Bad(str(e)) from None
    if not port:
        raise _Bad(
            f"give the proxy's port, e.g. 'http://{parts.hostname}:3128': proxies listen on "
            "3128, 8080 or 8888 and no default is safe to guess"
        )
    return parts.hostname, port


# --------------------------------------------------------------------------- table reader
class _Reader:
    """Reads keys of one TOML table, remembering which were used, collecting findings."""

    def __init__(self, loader: _Loader, table: Mapping[str, Any], prefix: str) -> None:
        self.loader, self.table, self.prefix = loader, table, prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> None:
        self.loader.add("error", self.key(name), message)

    def get(self, name: str, parse: Callable[[object], T], default: T | None = None) -> T | None:
        self.used.add(name)
        if name not in self.table:
            return default
        try:
            return parse(self.table[name])
        except _Bad as e:
            self.error(name, str(e))
            return default

    def require(self, name: str, parse: Callable[[object], T]) -> T | None:
        if name not in self.table:
            self.used.add(name)
            self.error(name, "missing (required)")
            return None
        return self.get(name, parse)

    def sub(self, name: str) -> _Reader | None:
        self.used.add(name)
        value = self.table.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(name, "expected a table")
            return None
        return _Reader(self.loader, value, self.key(name))

    def finish(self) -> None:
        for name in self.table:
            if name not in self.used:
                # every get/require has run by now: `used` is the table's whole vocabulary
                close = difflib.get_close_matches(name, sorted(self.used), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.error(name, f"unknown key{hint}")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {type(value).__name__}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {value!r}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"expected a non-negative integer, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in choices:
            raise _Bad(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(value)

    return parse


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad("expected a list of strings")
    return tuple(value)


_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _host_name(value: object) -> str:
    """A DNS host name (IDN allowed) or an IP address: what TLS sends as SNI and checks."""
    text = _str(value)
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_name = ""
    labels = ascii_name.split(".")
    ok = ascii_name and len(ascii_name) <= 253 and all(_LABEL.match(x) for x in labels)
    if ok and not labels[-1].isdigit():  # "1.2.3" or "0" would be read as an IPv4 address
        try:
            DNS_ID(text)  # the check TLS makes of it (IDNA 2008)
            return text
        except ValueError:
            pass
    raise _Bad(f"{text!r} is not a host name or IP address: a host name only; the port "
               "belongs in `upstream`")  # fmt: skip


def _networks(r: _Reader, key: str) -> tuple[Network, ...]:
    """A list of CIDRs ("10.0.0.0/8", "::1"); each bad entry is an error naming it."""
    listed: tuple[str, ...] | None = r.get(key, _str_list, None)
    if listed is None:
        return LOOPBACK
    out: list[Network] = []
    for i, text in enumerate(listed):
        try:
            out.append(ipaddress.ip_network(text.strip()))
        except ValueError as e:
            r.error(f"{key}[{i}]", f"{text!r} is not an address or CIDR block: {e}")
    return tuple(out)


def _route_name(value: object) -> str:
    text = _str(value)
    if not _NAME.match(text):
        raise _Bad("use 1-64 letters, digits, '.', '_' or '-'")
    return text


class _Loader:
    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.parent
        self.environ = environ
        self.findings: list[Finding] = []

    def add(self, level: str, key: str, message: str) -> None:
        self.findings.append(Finding(level, str(self.path), key, message))

    def file(self, value: object) -> Path:
        """A key-material path: relative to the config's folder; 'file:' prefix and
        ${CREDENTIALS_DIRECTORY} (systemd LoadCredential=) understood; must be readable."""
        text = _str(value).removeprefix("file:")
        if "${CREDENTIALS_DIRECTORY}" in text or "$CREDENTIALS_DIRECTORY" in text:
            creds = self.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise _Bad(
                    f"{text!r} names $CREDENTIALS_DIRECTORY, which is not set (systemd sets it"
                    " for the service; elsewhere set it to the key folder, e.g. `export"
                    " CREDENTIALS_DIRECTORY=/etc/mtls-sidecar/keys`)"
                )
            text = text.replace("${CREDENTIALS_DIRECTORY}", creds)
            text = text.replace("$CREDENTIALS_DIRECTORY", creds)
        path = (self.base / os.path.expanduser(text)).absolute()
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            raise _Bad(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError:  # a NUL in the path
            raise _Bad(f"not a file path: {text!r}") from None
        return path

    def key(self, value: object) -> Path | Pkcs11URI:
        """A private key: a file as `file()` reads it, or an RFC 7512 pkcs11: URI."""
        if isinstance(value, str) and is_pkcs11(value):
            try:
                return parse_pkcs11(value, self.base)
            except URIError as e:
                raise _Bad(f"{value}: {e}") from None
        return self.file(value)

    def listen(self, listen: Listen | None) -> Listen | None:
        """unix: socket paths resolve against the config's folder, like every other path."""
        if listen is not None and listen.kind == "unix":
            return attrs.evolve(listen, path=str((self.base / listen.path).absolute()))
        return listen

    def limits(self, r: _Reader) -> Limits:
        d = Limits()
        values: dict[str, int] = {}
        for key, parse, minimum in (
            ("max_header_bytes", parse_size, 1024),
            ("max_headers", _int, 1),
            ("max_body_bytes", parse_size, 0),  # 0: no request body accepted
            ("max_connections", _int, 1),
            ("max_pipelined", _int, 0),
            ("max_response_header_bytes", parse_size, 1024),
            ("max_response_headers", _int, 1),
            ("min_body_rate", parse_size, 1),
        ):
            value = r.get(key, parse, None)
            if value is not None and value < minimum:
                r.error(key, f"must be at least {minimum}")
                value = None
            values[key] = getattr(d, key) if value is None else value
        return Limits(**values)

    def timeouts(self, r: _Reader, *, tls_clients: bool) -> Timeouts:
        d = Timeouts()
        values: dict[str, float] = {}
        for field, key in (
            ("connect", "connect_timeout"),
            ("response", "response_timeout"),
            ("header", "header_timeout"),
            ("idle", "idle_timeout"),
            ("pool_idle", "pool_idle_timeout"),
            ("handshake", "handshake_timeout"),
            ("body", "body_timeout"),
            ("send", "send_timeout"),
            ("close_grace", "close_grace"),
        ):
            if key == "handshake_timeout" and not tls_clients:
                continue  # egress clients speak plain HTTP: no handshake to time
            value = r.get(key, parse_duration, None)
            if value == 0:
                r.error(key, "must be greater than 0")
                value = None
            elif value is not None and value > _SANE_TIMEOUTS[key]:
                self.add(
                    "warning",
                    r.key(key),
                    f"{value:g} s ({_span(value)}) is far above {_SANE_TIMEOUTS[key]:g} s; "
                    "durations are seconds, not milliseconds",
                )
            values[field] = getattr(d, field) if value is None else value
        return Timeouts(**values)

    def egress(self, table: Mapping[str, Any], index: int) -> EgressRoute | None:
        r = _Reader(self, table, f"egress[{index}]")
        name = r.require("name", _route_name)
        if name:
            r.prefix = f"egress[{index}] ({name})"
        listen = self.listen(r.require("listen", lambda v: parse_listen(v, "127.0.0.1")))
        upstream = r.require("upstream", lambda v: parse_upstream(v, ("https",)))
        cert = r.require("client_cert", self.file)
        key = r.require("client_key", self.file)
        trust = r.get("trust", self.file)
        profile = r.get("profile", _choice(*PROFILES), "d1") or "d1"
        env = r.get("env", _choice("PPR", "PRD"))
        server_name = r.get("server_name", _host_name)
        age = r.get("max_connection_age", parse_duration, 60.0)
        if age == 0:
            r.error("max_connection_age", "must be greater than 0")
        pool_max_idle = r.get("pool_max_idle", _int, 64)
        limits, timeouts = self.limits(r), self.timeouts(r, tls_clients=False)
        forward, forward_ok = self.forward_proxy(r)
        oauth = None
        o = r.sub("oauth")
        if o is not None:
            oauth = self.egress_oauth(o)
        r.finish()
        if None in (name, listen, upstream, cert, key) or (o is not None and oauth is None):
            return None
        if not forward_ok:
            return None
        assert name and listen and upstream and cert and key
        return EgressRoute(
            name=name,
            listen=listen,
            upstream=upstream,
            client_cert=cert,
            client_key=key,
            trust=trust,
            max_connection_age=age or 60.0,
            profile=profile,
            env=env,
            server_name=server_name,
            limits=limits,
            timeouts=timeouts,
            pool_max_idle=pool_max_idle if pool_max_idle is not None else 64,
            oauth=oauth,
            proxy=forward,
        )

    def forward_proxy(self, r: _Reader) -> tuple[ForwardProxy | None, bool]:
        """`proxy` and `proxy_auth_file`, and whether both are good."""
        where = r.get("proxy", parse_proxy_url)
        auth = r.get("proxy_auth_file", self.file)
        if "proxy_auth_file" in r.table and "proxy" not in r.table:
            r.error("proxy_auth_file", "set without proxy: there is no proxy to authenticate to")
            return None, False
        if where is None:
            return None, "proxy" not in r.table and "proxy_auth_file" not in r.table
        if "proxy_auth_file" in r.table and auth is None:
            return None, False
        return ForwardProxy(where[0], where[1], auth), True

    def egress_oauth(self, r: _Reader) -> EgressOAuth | None:
        token_url = r.require("token_url", _str)
        if token_url is not None and urlsplit(token_url).scheme != "https":
            r.error("token_url", "must be an https:// URL")
            token_url = None
        elif token_url is not None:
            try:
                host = urlsplit(token_url).hostname
                _host_name(host)
                urlsplit(token_url).port  # noqa: B018 (raises on a bad port)
            except (_Bad, ValueError):
                r.error("token_url", f"no valid host or port in {token_url!r}")
                token_url = None
        issuer = r.require("issuer", _str)
        key = r.require("signing_key", self.key)
        kid = r.require("key_id", _str)
        audience = r.get("audience", _str)
        body = r.get("body", _choice("form", "json"), "form") or "form"
        authz = r.get("authorization", _choice("replace", "keep"), "replace") or "replace"
        for name, value in (("issuer", issuer), ("key_id", kid)):
            if value == "":
                r.error(name, "must not be empty")
        r.finish()
        if not (token_url and issuer and key and kid):
            return None
        return EgressOAuth(token_url, issuer, key, kid, audience, body, authz)

    def ingress(self, table: Mapping[str, Any], index: int) -> IngressRoute | None:
        r = _Reader(self, table, f"ingress[{index}]")
        name = r.require("name", _route_name)
        if name:
            r.prefix = f"ingress[{index}] ({name})"
        listen = self.listen(r.require("listen", lambda v: parse_listen(v, "0.0.0.0")))
        cert = r.require("server_cert", self.file)
        key = r.require("server_key", self.file)
        client_ca = r.require("client_ca", self.file)
        upstream = r.require("upstream", lambda v: parse_upstream(v, ("http", "https")))
        allow = self.subjects(r, "allow_subjects")
        families: tuple[str, ...] | None = r.get("identity_headers", _str_list, None)
        if families is None:
            families = IDENTITY_FAMILIES
        for family in families or ():
            if family not in IDENTITY_FAMILIES:
                r.error(
                    "identity_headers",
                    f"unknown family {family!r}; known: client-cert, xfcc, x-client",
                )
        upstream_trust = r.get("upstream_trust", self.file)
        client_crl = r.get("client_crl", self.file)
        crl_check = r.get("crl_check", _choice("leaf", "chain"), "leaf") or "leaf"
        crl_stale = r.get("crl_stale", _choice("warn", "refuse"), "warn") or "warn"
        if client_crl is None:
            for needs_crl in ("crl_check", "crl_stale"):
                if needs_crl in table:
                    r.error(needs_crl, "has no effect without client_crl")
        server_name = r.get("server_name", _host_name)
        profile = r.get("profile", _choice(*PROFILES), "d1") or "d1"
        pool_max_idle = r.get("pool_max_idle", _int, 64)
        age = r.get("max_connection_age", parse_duration, 300.0)
        if age == 0:
            r.error("max_connection_age", "must be greater than 0")
        limits, timeouts = self.limits(r), self.timeouts(r, tls_clients=True)
        oauth = None
        o = r.sub("oauth")
        if o is not None:
            oauth = self.ingress_oauth(o)
        r.finish()
        if None in (name, listen, cert, key, client_ca, upstream) or (
            o is not None and oauth is None
        ):
            return None
        assert name and listen and cert and key and client_ca and upstream
        return IngressRoute(
            name=name,
            listen=listen,
            server_cert=cert,
            server_key=key,
            client_ca=client_ca,
            upstream=upstream,
            allow_subjects=allow or (),
            identity_headers=tuple(f for f in families or () if f in IDENTITY_FAMILIES),
            upstream_trust=upstream_trust,
            server_name=server_name,
            profile=profile,
            limits=limits,
            timeouts=timeouts,
            pool_max_idle=pool_max_idle if pool_max_idle is not None else 64,
            max_connection_age=300.0 if age is None or age == 0 else age,
            oauth=oauth,
            client_crl=client_crl,
            crl_check=crl_check,
            crl_stale=crl_stale,
        )

    def subjects(self, r: _Reader, key: str) -> tuple[SubjectPattern, ...]:
        """Each entry a DN pattern (proxy.subjects); info findings give the form compared."""
        listed: tuple[str, ...] | None = r.get(key, _str_list, None)
        if listed is not None and not listed:
            r.error(
                key,
                "an empty list: omit the key to admit every certificate the client CA "
                "signed, or list the subjects to admit",
            )
        out: list[SubjectPattern] = []
        for i, entry in enumerate(listed or ()):
            try:
                pattern = subjects.parse(entry)
            except subjects.PatternError as e:
                r.error(f"{key}[{i}]", f"{entry!r} is not a distinguished name: {e}")
                continue
            scope = "any common name of the" if pattern.common_name_only else "the whole"
            where = r.key(f"{key}[{i}]")
            self.add("info", where, f"{entry!r} compares {scope} subject with {pattern}")
            if pattern.looks_reversed:
                self.add(
                    "warning",
                    where,
                    f"{entry!r} is read as RFC 4514, most specific "
                    "first, yet starts with C/DC and ends with CN: for the order openssl "
                    "prints, write it as 'C = .., CN = ..' or '/C=../CN=..'",
                )
            out.append(pattern)
        return tuple(out)

    def ingress_oauth(self, r: _Reader) -> IngressOAuth | None:
        clients = r.require("clients_file", self.file)
        signing_key = r.require("signing_key", self.key)
        verify_keys: list[Path] = []
        listed: tuple[str, ...] = r.get("verify_keys", _str_list, None) or ()
        for i, text in enumerate(listed):
            try:
                verify_keys.append(self.file(text))
            except _Bad as e:
                r.error(f"verify_keys[{i}]", str(e))
        issuer = r.get("issuer", _str, "mtls-sidecar")
        audience = r.get("audience", _str)
        bad = False
        for name, value in (("issuer", issuer), ("audience", audience)):
            if value is not None and (not value or not value.isprintable()):
                r.error(name, "must be a non-empty printable string")
                bad = True
        path = r.get("token_path", _str, "/oauth2/token") or "/oauth2/token"
        if not path.startswith("/"):
            r.error("token_path", "must start with '/'")
        lifetime = r.get("token_lifetime", parse_duration, None)
        if lifetime is not None and lifetime < 1:
            r.error("token_lifetime", "must be at least 1 (seconds)")
            lifetime = None
        forward = bool(r.get("forward_authorization", _bool, False))
        r.finish()
        if bad or not (clients and signing_key) or len(verify_keys) != len(listed):
            return None
        return IngressOAuth(
            clients_file=clients,
            signing_key=signing_key,
            verify_keys=tuple(verify_keys),
            issuer=issuer or "mtls-sidecar",
            audience=audience,
            token_path=path,
            token_lifetime=lifetime or 900.0,
            forward_authorization=forward,
        )

    def service(self, root: _Reader) -> ServiceConfig:
        d = ServiceConfig()
        log = root.sub("log")
        fmt, access, level = d.log_format, d.access_log, d.log_level
        if log:
            fmt = log.get("format", _choice("json", "text"), fmt) or fmt
            access = bool(log.get("access", _bool, access))
            level = log.get("level", _choice(*LOG_LEVELS), level) or level
            log.finish()
        svc = root.sub("service")
        drain, reload_s, warn = d.drain_timeout, d.reload_interval, d.expiry_warning_days
        workers, workers_why = d.workers, ""
        if svc:
            if svc.table.get("workers") == "auto":  # the CPUs and the cgroup's CPU quota
                svc.used.add("workers")
                workers, workers_why = cpus.workers_auto()
            else:
                workers = svc.get("workers", _workers, workers) or workers
        max_rss, max_age, trim = d.max_worker_rss, d.max_worker_age, d.malloc_trim_interval
        if svc:
            max_rss = svc.get("max_worker_rss", parse_size, max_rss) or 0
            max_age = svc.get("max_worker_age", parse_duration, max_age) or 0.0
            value = svc.get("malloc_trim_interval", parse_duration, None)
            trim = trim if value is None else value  # 0: no trimming
            value = svc.get("drain_timeout", parse_duration, None)
            drain = drain if value is None else value  # 0: close at once on SIGTERM
            reload_s = svc.get("reload_interval", parse_duration, reload_s) or 0.0
            value = svc.get("expiry_warning_days", parse_duration, None)
            warn = warn if value is None else value  # 0: no expiry warnings
            svc.finish()
        servers: list[tuple[str, int]] = []
        res = root.sub("resolver")
        if res:
            listed: tuple[str, ...] = res.get("nameservers", _str_list, None) or ()
            for i, text in enumerate(listed):
                try:
                    ns = parse_listen(text if ":" in text else f"{text}:53", "")
                    servers.append((ns.host, ns.port))
                except _Bad as e:
                    res.error(f"nameservers[{i}]", str(e))
            res.finish()
        return ServiceConfig(
            drain_timeout=drain,
            reload_interval=reload_s if reload_s is not None else d.reload_interval,
            expiry_warning_days=warn,
            nameservers=tuple(servers),
            log_format=fmt,
            access_log=access,
            log_level=level,
            workers=workers,
            workers_why=workers_why,
            max_worker_rss=max_rss,
            max_worker_age=max_age,
            malloc_trim_interval=trim,
        )

    def tracing(self, root: _Reader) -> TracingConfig | None:
        t = root.sub("tracing")
        if t is None:
            return None
        d = TracingConfig("")
        endpoint = t.require("otlp_endpoint", _otlp_endpoint)
        name = t.get("service_name", _str, d.service_name)
        if not name:
            t.error("service_name", "must not be empty")
        ratio = t.get("sample_ratio", _ratio, d.sample_ratio)
        headers = t.get("headers_file", self.file)
        queue = t.get("max_queue_size", _int, d.max_queue_size)
        if queue is not None and queue < 1:
            t.error("max_queue_size", "must be at least 1")
        timeout = t.get("export_timeout", parse_duration, d.export_timeout)
        if timeout is not None and timeout <= 0:
            t.error("export_timeout", "must be more than 0 (seconds)")
        t.finish()
        if not endpoint:
            return None
        return TracingConfig(
            otlp_endpoint=endpoint,
            service_name=name or d.service_name,
            sample_ratio=d.sample_ratio if ratio is None else ratio,
            headers_file=headers,
            max_queue_size=max(1, queue or d.max_queue_size),
            export_timeout=timeout if timeout and timeout > 0 else d.export_timeout,
        )


def _otlp_endpoint(value: object) -> str:
    """OTLP/HTTP's traces URL; a bare http(s)://host:port gets the standard /v1/traces path."""
    text = _str(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Bad(f"expected an http(s):// URL like 'http://127.0.0.1:4318', got {text!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise _Bad("no credentials, query or fragment in the URL (use headers_file for auth)")
    try:
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError as e:
        raise _Bad(str(e)) from None
    return text if parts.path not in ("", "/") else text.rstrip("/") + "/v1/traces"


def _ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise _Bad(f"expected a number from 0 to 1, got {value!r}")
    return float(value)


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Parse and validate the file's syntax, types, keys and file paths (not key material)."""
    config, findings = parse(path, environ)
    errors = [f for f in findings if f.level == "error"]
    if errors or config is None:
        raise ConfigError(errors or findings)
    return config


def parse(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> tuple[Config | None, list[Finding]]:
    p = Path(path).absolute()
    loader = _Loader(p, os.environ if environ is None else environ)
    try:
        raw = p.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        loader.add("error", "", f"cannot read: {e.strerror or e}")
        return None, loader.findings
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        loader.add(
            "error",
            "",
            f"is not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}; Latin-1 or Windows-1252?):"
            " TOML files are UTF-8; convert it, e.g. with `iconv -f latin1 -t utf-8`",
        )
        return None, loader.findings
    except tomllib.TOMLDecodeError as e:
        if raw.startswith(b"\xef\xbb\xbf"):
            loader.add(
                "error",
                "",
                "starts with a byte order mark (BOM), which TOML does not allow: save it as UTF-8"
                f" without BOM, e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' {p}`",
            )
        else:
            loader.add("error", "", f"not valid TOML: {e}")
        return None, loader.findings
    root = _Reader(loader, data, "")
    service = loader.service(root)
    admin = None
    a = root.sub("admin")
    if a:
        listen = a.require("listen", lambda v: parse_listen(v, "127.0.0.1"))
        status_from = _networks(a, "status_from")
        a.finish()
        admin = AdminConfig(listen, status_from) if listen else None
    tracing = loader.tracing(root)
    egress: list[EgressRoute] = []
    ingress: list[IngressRoute] = []
    prefixes: dict[int, str] = {}
    for section, build, out in (
        ("egress", loader.egress, egress),
        ("ingress", loader.ingress, ingress),
    ):
        root.used.add(section)
        tables = data.get(section, [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            root.error(section, f"expected [[{section}]] tables")
            continue
        for i, table in enumerate(tables):
            route = build(table, i)
            if route is not None:
                out.append(route)  # type: ignore[arg-type]
                prefixes[id(route)] = f"{section}[{i}] ({route.name})"
    root.finish()
    _check_unique(loader, [*egress, *ingress], prefixes, admin)
    if not egress and not ingress and not any(f.level == "error" for f in loader.findings):
        loader.add("error", "", "no [[egress]] or [[ingress]] route defined")
    config = Config(p, service, admin, tuple(egress), tuple(ingress), tracing)
    return config, loader.findings


def _check_unique(
    loader: _Loader,
    routes: list[EgressRoute | IngressRoute],
    prefixes: dict[int, str],
    admin: AdminConfig | None,
) -> None:
    names: dict[str, str] = {}
    listens: dict[str, str] = {}
    items = [(prefixes[id(r)], r.listen) for r in routes]
    if admin:
        items.append(("admin", admin.listen))
    for route in routes:
        key = prefixes[id(route)]
        if route.name in names:
            loader.add("error", f"{key}.name", f"duplicate route name (also {names[route.name]})")
        names.setdefault(route.name, key)
    for key, listen in items:
        where = str(listen)
        ephemeral = listen.kind == "tcp" and listen.port == 0
        if where in listens and not ephemeral:
            loader.add("error", f"{key}.listen", f"{where} is also used by {listens[where]}")
        listens.setdefault(where, key)
