"""Egress through a forward proxy, in memory: the config keys, the credentials file, the CONNECT
exchange, and the pool's connect step through it (errors, deadline, DNS asked for the proxy)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, error
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from proxy import config as cfg
from proxy.ops import audit
from proxy.tls.contexts import ClientMaterial, ClientTLS, MaterialError, client_context
from proxy.wire.http import ProxyError
from proxy.wire.pool import Pool, UpstreamConnection
from proxy.wire.tunnel import (
    ProxyHop,
    Tunnel,
    TunnelEndpoint,
    TunnelError,
    read_proxy_auth,
)

PASSWORD = "pa55-w0rd:with-colon"


# --------------------------------------------------------------------------- config
def _config(tmp_path: Path, extra: str) -> tuple[cfg.Config | None, list[cfg.Finding]]:
    for name in ("c.pem", "c.key"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "s.toml"
    path.write_text(
        f"""
[[egress]]
name = "d1"
listen = "127.0.0.1:8080"
upstream = "https://api.d1-stg.thalescloud.io"
client_cert = "c.pem"
client_key = "c.key"
{extra}
"""
    )
    return cfg.parse(path)


def _errors(findings: list[cfg.Finding]) -> list[str]:
    return [f"{f.key}: {f.message}" for f in findings if f.level == "error"]


def test_config_reads_proxy_and_auth_file(tmp_path: Path) -> None:
    (tmp_path / "proxy-auth").write_text("u:p\n")
    config, findings = _config(
        tmp_path, 'proxy = "http://proxy.corp:3128/"\nproxy_auth_file = "proxy-auth"'
    )
    assert not _errors(findings)
    assert config is not None
    forward = config.egress[0].proxy
    assert forward == cfg.ForwardProxy("proxy.corp", 3128, tmp_path / "proxy-auth")
    assert str(forward) == "http://proxy.corp:3128"


def test_config_without_proxy_has_none(tmp_path: Path) -> None:
    config, findings = _config(tmp_path, "")
    assert config is not None and config.egress[0].proxy is None and not _errors(findings)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("https://proxy.corp:3128", "scheme must be http"),
        ("socks5://proxy.corp:1080", "scheme must be http"),
        ("http://user:pw@proxy.corp:3128", "no credentials in the URL"),
        ("http://proxy.corp:3128/path", "no path, query or fragment"),
        ("http://proxy.corp:3128?x=1", "no path, query or fragment"),
        ("http://proxy.corp", "give the proxy's port"),
        ("http://proxy.corp:99999", "out of range"),
        ("http://:3128", "no host"),
        ("proxy.corp:3128", "scheme must be http"),
    ],
)
def test_config_refuses_a_bad_proxy_url_naming_the_key(
    tmp_path: Path, value: str, says: str
) -> None:
    config, findings = _config(tmp_path, f'proxy = "{value}"')
    errors = _errors(findings)
    assert len(errors) == 1, errors
    assert errors[0].startswith("egress[0] (d1).proxy: ") and says in errors[0]
    assert "pw" not in errors[0] or "user:pw" not in errors[0]
    assert config is not None and not config.egress  # the route is not built


def test_config_refuses_an_auth_file_without_a_proxy(tmp_path: Path) -> None:
    (tmp_path / "proxy-auth").write_text("u:p\n")
    _, findings = _config(tmp_path, 'proxy_auth_file = "proxy-auth"')
    assert _errors(findings) == [
        "egress[0] (d1).proxy_auth_file: set without proxy: there is no proxy to authenticate to"
    ]


def test_config_refuses_a_missing_auth_file(tmp_path: Path) -> None:
    _, findings = _config(tmp_path, 'proxy = "http://p:3128"\nproxy_auth_file = "nope"')
    (only,) = _errors(findings)
    assert only.startswith("egress[0] (d1).proxy_auth_file: cannot read ")


# --------------------------------------------------------------------------- credentials
def test_auth_file_gives_a_basic_header(tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_text(f"merchant:{PASSWORD}\n")
    value = read_proxy_auth(path)
    assert value == b"Basic " + base64.b64encode(f"merchant:{PASSWORD}".encode())


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "exactly one line"),
        (f"merchant:{PASSWORD}\nsecond:line\n".encode(), "exactly one line"),
        (PASSWORD.replace(":", "").encode(), "expected 'user:password'"),
        (f":{PASSWORD}".encode(), "expected 'user:password'"),
        (f"merchant:{PASSWORD}\x01".encode(), "control characters"),
    ],
)
def test_a_bad_auth_file_is_named_and_its_content_never_shown(
    tmp_path: Path, content: bytes, says: str
) -> None:
    path = tmp_path / "a"
    path.write_bytes(content)
    with pytest.raises(MaterialError) as caught:
        read_proxy_auth(path)
    assert str(caught.value).startswith(f"proxy_auth_file {path}: ")
    assert says in str(caught.value)
    assert "w0rd" not in str(caught.value)


def test_check_warns_on_an_auth_file_others_can_read_and_errors_on_a_bad_one(
    tmp_path: Path,
) -> None:
    auth = tmp_path / "proxy-auth"
    auth.write_text("u:p\n")
    auth.chmod(0o644)
    config, _ = _config(tmp_path, 'proxy = "http://p:3128"\nproxy_auth_file = "proxy-auth"')
    assert config is not None
    found = [f for f in audit.audit(config) if f.key.endswith("proxy_auth_file")]
    assert [(f.level, "mode 0644" in f.message) for f in found] == [("warning", True)]
    auth.chmod(0o600)
    assert not [f for f in audit.audit(config) if f.key.endswith("proxy_auth_file")]
    auth.write_text("no colon here\n")
    found = [f for f in audit.audit(config) if f.key.endswith("proxy_auth_file")]
    assert [f.level for f in found] == ["error"]
    assert "no colon" not in found[0].message


# --------------------------------------------------------------------------- CONNECT
class _Inner(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def _tunnel(
    authorization: bytes | None = None, max_head: int = 16384
) -> tuple[Tunnel, StringTransport, _Inner, list[TunnelError]]:
    hop = ProxyHop("proxy.corp", 3128, authorization)
    inner = _Inner()
    failures: list[TunnelError] = []
    t = Tunnel(hop, "api.d1.test", 443, lambda: inner, failures.append, max_head=max_head)
    transport = StringTransport()
    t.makeConnection(transport)
    return t, transport, inner, failures


def test_connect_request_names_the_host_and_carries_the_credentials() -> None:
    _, transport, _, _ = _tunnel(b"Basic dTpw")
    assert transport.value() == (
        b"CONNECT api.d1.test:443 HTTP/1.1\r\nHost: api.d1.test:443\r\n"
        b"Proxy-Authorization: Basic dTpw\r\n\r\n"
    )
    _, bare, _, _ = _tunnel()
    assert b"Proxy-Authorization" not in bare.value()


def test_connect_to_an_ipv6_upstream_brackets_it() -> None:
    assert (
        ProxyHop("p", 1)
        .request("2001:db8::1", 443)
        .startswith(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n")
    )


def test_a_2xx_answer_hands_the_connection_to_the_inner_protocol() -> None:
    t, transport, inner, failures = _tunnel()
    t.dataReceived(b"HTTP/1.1 200 Connection est")
    assert inner.transport is None  # the head is not complete yet
    t.dataReceived(b"ablished\r\nVia: x\r\n\r\nTLS-bytes")
    assert not failures
    assert inner.transport is transport and inner.data == b"TLS-bytes"
    assert t.answer == "HTTP/1.1 200 Connection established"
    t.dataReceived(b"more")
    assert inner.data == b"TLS-bytesmore"
    t.connectionLost(Failure(error.ConnectionDone()))
    assert inner.lost is not None and inner.lost.check(error.ConnectionDone)


@pytest.mark.parametrize("status", [b"403 Forbidden", b"407 Proxy Authentication Required",
                                    b"502 Bad Gateway", b"503 Service Unavailable"])  # fmt: skip
def test_a_refusal_quotes_the_status_line_and_closes(status: bytes) -> None:
    t, transport, inner, failures = _tunnel()
    t.dataReceived(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
    (failure,) = failures
    assert failure.code == "proxy_refused"
    assert failure.detail == (
        f"proxy http://proxy.corp:3128 refused CONNECT api.d1.test:443: HTTP/1.0 {status.decode()}"
    )
    assert transport.disconnecting or getattr(transport, "aborting", False)
    assert inner.transport is None
    t.connectionLost(Failure(error.ConnectionAborted()))
    assert len(failures) == 1  # reported once


def test_a_status_line_is_quoted_without_control_characters() -> None:
    t, _, _, failures = _tunnel()
    t.dataReceived(b"HTTP/1.1 403 no\x1b[31m way\r\n\r\n")
    assert failures[0].detail.endswith(": HTTP/1.1 403 no?[31m way")


def test_an_answer_head_past_the_bound_is_refused() -> None:
    t, _, _, failures = _tunnel(max_head=64)
    t.dataReceived(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 7)  # 59 bytes
    assert not failures
    t.dataReceived(b"X: y\r\n" * 4)
    (failure,) = failures
    assert failure.code == "bad_gateway" and "head over 64 bytes" in failure.detail


def test_a_non_http_answer_is_a_bad_gateway() -> None:
    t, _, inner, failures = _tunnel()
    t.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert failures[0].code == "bad_gateway" and inner.transport is None


def test_a_proxy_that_closes_before_answering_is_a_refusal() -> None:
    t, _, _, failures = _tunnel()
    t.connectionLost(Failure(error.ConnectionDone()))
    assert failures[0].code == "proxy_refused"
    assert "closed the connection before answering CONNECT api.d1.test:443" in failures[0].detail


# --------------------------------------------------------------------------- the pool
class _NoAddress:
    """A resolver that knows no name."""

    def resolveHostName(self, receiver: Any, host: str, port: int = 0, *a: Any, **k: Any) -> Any:
        receiver.resolutionBegan(None)
        receiver.resolutionComplete()
        return receiver


def _pool(clock: MemoryReactorClock, hop: ProxyHop, resolver: Any = None) -> tuple[Pool, list[str]]:
    results: list[str] = []
    pool = Pool(
        reactor=clock,
        clock=clock,
        resolver=resolver or _NoAddress(),
        host="api.d1.test",
        port=443,
        tls=None,
        connect_timeout=5.0,
        idle_timeout=15.0,
        max_age=60.0,
        max_idle=4,
        on_connect=results.append,
        proxy=hop,
    )
    return pool, results


def _acquired(pool: Pool) -> tuple[list[UpstreamConnection], list[Failure]]:
    got: list[UpstreamConnection] = []
    failed: list[Failure] = []
    d = pool.acquire()
    assert isinstance(d, defer.Deferred)
    d.addCallbacks(got.append, failed.append)
    return got, failed


def test_pool_dials_the_proxy_and_tunnels_to_the_upstream_by_name() -> None:
    clock = MemoryReactorClock()
    pool, results = _pool(clock, ProxyHop("127.0.0.1", 3128, b"Basic dTpw"))
    got, failed = _acquired(pool)
    (host, port, factory, timeout, _bind) = clock.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 3128, 5.0)  # the proxy, not the upstream
    transport = StringTransport()
    proto = factory.buildProtocol(None)
    proto.makeConnection(transport)
    assert transport.value().startswith(b"CONNECT api.d1.test:443 HTTP/1.1\r\n")
    assert not got and pool.states()["connecting"] == 1
    proto.dataReceived(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert not failed and len(got) == 1 and results == ["ok"]
    conn = got[0]
    assert conn.label == "api.d1.test:443 via 127.0.0.1:3128"
    transport.clear()
    conn.write(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.value() == b"GET / HTTP/1.1\r\n\r\n"


def test_pool_refused_by_the_proxy_answers_proxy_refused() -> None:
    clock = MemoryReactorClock()
    pool, results = _pool(clock, ProxyHop("127.0.0.1", 3128))
    _, failed = _acquired(pool)
    proto = clock.tcpClients[0][2].buildProtocol(None)
    proto.makeConnection(StringTransport())
    proto.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    (f,) = failed
    assert isinstance(f.value, ProxyError)
    assert (f.value.status, f.value.code) == (502, "proxy_refused")
    assert f.value.detail.endswith(": HTTP/1.1 407 Proxy Authentication Required")
    assert results == ["proxy_refused"] and not pool.live


def test_pool_proxy_refusing_tcp_is_proxy_unreachable() -> None:
    clock = MemoryReactorClock()
    pool, results = _pool(clock, ProxyHop("127.0.0.1", 3128))
    _, failed = _acquired(pool)
    factory = clock.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    (f,) = failed
    assert isinstance(f.value, ProxyError) and f.value.code == "proxy_unreachable"
    assert f.value.status == 502
    assert f.value.detail == (
        "cannot connect to proxy http://127.0.0.1:3128: connection refused (127.0.0.1:3128)"
    )
    assert results == ["proxy_unreachable"]


def test_pool_proxy_name_without_address_is_proxy_unreachable() -> None:
    clock = MemoryReactorClock()
    pool, results = _pool(clock, ProxyHop("proxy.corp", 3128))
    _, failed = _acquired(pool)
    (f,) = failed
    assert isinstance(f.value, ProxyError) and f.value.code == "proxy_unreachable"
    assert f.value.detail.startswith("cannot connect to proxy http://proxy.corp:3128: DNS: ")
    assert not clock.tcpClients and results == ["proxy_unreachable"]


def test_pool_deadline_covers_a_proxy_that_never_answers_connect() -> None:
    clock = MemoryReactorClock()
    pool, _ = _pool(clock, ProxyHop("127.0.0.1", 3128))
    _, failed = _acquired(pool)
    proto = clock.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"HTTP/1.1 200 Conn")  # and then nothing
    clock.advance(4.9)
    pool.sweep(clock.seconds())
    assert not failed
    clock.advance(0.2)
    pool.sweep(clock.seconds())  # the connect deadline: no NotConnectingError on the way
    (f,) = failed
    assert isinstance(f.value, ProxyError) and (f.value.status, f.value.code) == (
        504,
        "upstream_timeout",
    )
    assert "api.d1.test:443 via 127.0.0.1:3128 timed out after 5s" in f.value.detail
    assert transport.disconnecting or getattr(transport, "aborting", False)
    assert not pool.live


# --------------------------------------------------------------------------- Agent endpoint
class _Endpoint:
    """Stands for the TCP endpoint to the proxy: the test drives the connection."""

    def __init__(self) -> None:
        self.factory: Any = None
        self.dialing: defer.Deferred[Any] = defer.Deferred()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.factory = factory
        return self.dialing


def _creator() -> ClientTLS:
    return ClientTLS(ClientMaterial(None, client_context(None, None, "generic")), "api.d1.test")


def test_token_endpoint_times_out_a_proxy_that_never_answers() -> None:
    clock = MemoryReactorClock()
    to_proxy = _Endpoint()
    hop = ProxyHop("proxy.corp", 3128)
    endpoint = TunnelEndpoint(clock, to_proxy, hop, "api.d1.test", 443, _creator(), 5.0)
    failed: list[Failure] = []
    endpoint.connect(Protocol).addErrback(failed.append)
    tunnel = to_proxy.factory.buildProtocol(None)
    transport = StringTransport()
    tunnel.makeConnection(transport)
    to_proxy.dialing.callback(tunnel)
    assert transport.value().startswith(b"CONNECT api.d1.test:443 HTTP/1.1\r\n")
    clock.advance(5.0)
    (f,) = failed
    assert isinstance(f.value, TunnelError)
    assert f.value.detail == "proxy http://proxy.corp:3128 did not answer CONNECT within 5 s"
    assert transport.disconnecting or getattr(transport, "aborting", False)


def test_token_endpoint_proxy_down_is_proxy_unreachable() -> None:
    clock = MemoryReactorClock()
    to_proxy = _Endpoint()
    hop = ProxyHop("proxy.corp", 3128)
    endpoint = TunnelEndpoint(clock, to_proxy, hop, "api.d1.test", 443, _creator(), 5.0)
    failed: list[Failure] = []
    endpoint.connect(Protocol).addErrback(failed.append)
    to_proxy.dialing.errback(Failure(error.ConnectionRefusedError()))
    (f,) = failed
    assert isinstance(f.value, TunnelError) and f.value.code == "proxy_unreachable"
    assert f.value.detail == "cannot connect to proxy http://proxy.corp:3128: connection refused"
    assert not clock.getDelayedCalls()


# --------------------------------------------------------------------------- reload
def _basic(text: str) -> bytes:
    return b"Basic " + base64.b64encode(text.encode())


def test_reload_rereads_the_credentials_and_a_bad_file_keeps_the_old(tmp_path: Path) -> None:
    from tests.unit.test_service_reload import egress, running, write

    d = _reload_material(tmp_path)
    proxy = 'proxy = "http://127.0.0.1:3128"\nproxy_auth_file = "proxy-auth"'
    (d / "proxy-auth").write_text("merchant:one\n")
    sidecar, _, _ = running(d, egress("out", 18101, proxy))
    hop = sidecar.routes[0].route.pool.proxy
    assert hop is not None and hop.authorization == _basic("merchant:one")
    (d / "proxy-auth").write_text("merchant:two\n")
    assert sidecar.reload()
    assert sidecar.routes[0].route.pool.proxy is hop and hop.authorization == _basic("merchant:two")
    (d / "proxy-auth").write_text("no-colon\n")
    assert not sidecar.reload()  # refused: the running credentials stay
    assert hop.authorization == _basic("merchant:two")
    # a rebuilt route (another key changed) with the same proxy keeps the hop its token
    # source may hold, with the credentials read anew
    (d / "proxy-auth").write_text("merchant:three\n")
    write(d, egress("out", 18101, proxy + "\nmax_connection_age = 30"))
    assert sidecar.reload()
    rebuilt = sidecar.routes[0].route
    assert rebuilt.config.max_connection_age == 30 and rebuilt.pool.proxy is hop
    assert hop.authorization == _basic("merchant:three")


def _reload_material(tmp_path: Path) -> Path:
    from proxy.tls.throwaway import make_ca, write_ca
    from tests.unit.test_service_reload import D1_SUBJECT

    server_ca = make_ca("C=FR,O=Merchant PKI,CN=Root")
    client_ca = make_ca("C=FR,O=Thales-like,CN=Client CA")
    write_ca(server_ca, tmp_path / "server-ca.pem")
    client_ca.issue(D1_SUBJECT, client=True).write(tmp_path, "client")
    return tmp_path
